//! `lowvram_context`: create, configure, free.

use std::ffi::{c_char, c_void, CString};
use std::mem::{offset_of, size_of};

use crate::api::{Context, ContextOptions};
use crate::error::Error;
use crate::ffi::boundary::{borrow, guard, opt_str_arg, out_arg, str_arg, Handle};
use crate::ffi::status::lowvram_status;
use crate::log::{lowvram_log_callback, LogSink};

/// A context: one model cache with its RAM and VRAM budgets, a logger and a cancel flag. Opaque.
/// Created by `lowvram_context_new`, freed by `lowvram_context_free`. Its functions are thread-safe unless stated.
#[allow(non_camel_case_types)]
pub struct lowvram_context {
    _private: [u8; 0],
}

impl Handle for lowvram_context {
    type Target = Context;
}

/// Parameters of `lowvram_context_new`. Initialise with `lowvram_context_params_init(&p, sizeof p)`, then set fields.
/// The library reads only the fields `struct_size` covers, so hosts built against an older header keep working.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_context_params {
    /// `sizeof(lowvram_context_params)` as the host sees it; set by `lowvram_context_params_init`.
    pub struct_size: u32,
    /// Device to compute on: "auto", "cpu", "cuda:N" or "emulated:SIZE" (e.g. "emulated:512MiB", a CPU-backed
    /// device with a hard capacity). NULL = the configuration's `device` (default "auto"). Copied; not retained.
    pub device: *const c_char,
    /// YAML configuration text (keys in README.md), applied after `config_path`. NULL = none. Copied.
    pub config_yaml: *const c_char,
    /// Path of a YAML configuration file. NULL = none. Read during `lowvram_context_new`.
    pub config_path: *const c_char,
    /// Log callback for this context; NULL = use the process-wide callback (`lowvram_set_log_callback`).
    pub log_callback: lowvram_log_callback,
    /// Passed back to `log_callback`; not owned by the library, must outlive the context or the callback.
    pub log_user_data: *mut c_void,
}

const PARAMS_SIZE: usize = size_of::<lowvram_context_params>();

/// Read field `$f` of `*$p` only if the host's struct covers it.
macro_rules! covered {
    ($p:expr, $f:ident, $default:expr) => {
        if ($p.struct_size as usize) >= offset_of!(lowvram_context_params, $f) + std::mem::size_of_val(&$p.$f) {
            $p.$f
        } else {
            $default
        }
    };
}

/// Fill `*params` with defaults (all NULL: automatic device, default configuration, process-wide logging) and
/// store `struct_size`. `struct_size` must be the host's `sizeof(lowvram_context_params)`; it may be smaller than
/// this library's (an older header), never smaller than the first version's. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_params_init(
    params: *mut lowvram_context_params,
    struct_size: usize,
) -> lowvram_status {
    guard(|| {
        let params = out_arg(params, "params")?;
        if !(offset_of!(lowvram_context_params, log_user_data) + size_of::<*mut c_void>()..=PARAMS_SIZE.max(4096))
            .contains(&struct_size)
        {
            return Err(Error::invalid(format!(
                "struct_size {struct_size} is not a sizeof(lowvram_context_params) this library knows ({PARAMS_SIZE})"
            )));
        }
        // Write only the bytes the host owns.
        let defaults = lowvram_context_params {
            struct_size: struct_size as u32,
            device: std::ptr::null(),
            config_yaml: std::ptr::null(),
            config_path: std::ptr::null(),
            log_callback: None,
            log_user_data: std::ptr::null_mut(),
        };
        let n = struct_size.min(PARAMS_SIZE);
        std::ptr::copy_nonoverlapping(
            (&defaults as *const lowvram_context_params).cast::<u8>(),
            (params as *mut lowvram_context_params).cast::<u8>(),
            n,
        );
        Ok(())
    })
}

/// Create a context. `params` may be NULL (all defaults). On success `*out` receives a new handle owned by the
/// caller, to be freed with `lowvram_context_free`; on failure `*out` is unchanged. Logs the cache sizes chosen and
/// the rules that chose them. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_new(
    params: *const lowvram_context_params,
    out: *mut *mut lowvram_context,
) -> lowvram_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        let mut options = ContextOptions::default();
        if let Some(p) = params.as_ref() {
            if (p.struct_size as usize) < offset_of!(lowvram_context_params, device) + size_of::<*const c_char>() {
                return Err(Error::invalid(format!(
                    "params->struct_size is {}: initialise params with lowvram_context_params_init",
                    p.struct_size
                )));
            }
            options.device = opt_str_arg(covered!(p, device, std::ptr::null()), "params->device")?.map(Into::into);
            options.config_yaml =
                opt_str_arg(covered!(p, config_yaml, std::ptr::null()), "params->config_yaml")?.map(Into::into);
            options.config_path =
                opt_str_arg(covered!(p, config_path, std::ptr::null()), "params->config_path")?.map(Into::into);
            options.log = LogSink::new(covered!(p, log_callback, None), covered!(p, log_user_data, std::ptr::null_mut()));
        }
        let ctx = Box::new(Context::new(options)?);
        *out = Box::into_raw(ctx).cast();
        Ok(())
    })
}

/// Free a context and everything its cache holds. NULL is a no-op. Must not be called while another thread is
/// inside a call on the same context, and must not be called twice. Model handles loaded from it stay valid to
/// free (their weights are released with the last reference).
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_free(ctx: *mut lowvram_context) {
    guard(|| {
        if !ctx.is_null() {
            drop(Box::from_raw(ctx.cast::<Context>()));
        }
        Ok(())
    });
}

/// Set this context's log callback (NULL: fall back to the process-wide one). `user_data` is passed back
/// unchanged and must stay valid until the callback is replaced or the context freed. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_set_log_callback(
    ctx: *const lowvram_context,
    callback: lowvram_log_callback,
    user_data: *mut c_void,
) -> lowvram_status {
    guard(|| {
        borrow(ctx, "ctx")?.logger().set_sink(LogSink::new(callback, user_data));
        Ok(())
    })
}

/// Ask the call running on `ctx` (on another thread) to stop at its next step or block; it then returns
/// LOWVRAM_STATUS_CANCELLED and releases its working memory. A call that starts later clears the request.
/// Thread-safe; safe to call from a callback.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_cancel(ctx: *const lowvram_context) -> lowvram_status {
    guard(|| {
        borrow(ctx, "ctx")?.cancel();
        Ok(())
    })
}

/// Apply YAML configuration text (any subset of the keys in README.md) to a live context, without a restart:
/// budgets take effect at once, and a generation running on another thread adapts at its next block. On error
/// (unknown key, bad value; the message names the key and the accepted values) nothing changes. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_configure(ctx: *const lowvram_context, yaml: *const c_char) -> lowvram_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        ctx.configure(str_arg(yaml, "yaml")?)
    })
}

/// Memory statistics of a context's cache (a snapshot). Bytes throughout.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_cache_stats {
    /// Set by the caller to `sizeof(lowvram_cache_stats)`.
    pub struct_size: u32,
    /// Device capacity (0 when unknown, e.g. the CPU).
    pub device_total_bytes: u64,
    /// Device bytes free per the allocator (0 when unknown).
    pub device_free_bytes: u64,
    /// Device bytes in use by the manager now: resident weights, streamed blocks, working memory, reservations.
    pub device_used_bytes: u64,
    /// Device bytes held by resident weights (the device cache).
    pub device_used_by_cache_bytes: u64,
    /// Highest `device_used_bytes` since the last run started.
    pub device_peak_bytes: u64,
    /// Allocations the device refused since the context was created.
    pub device_refused_allocations: u64,
    /// Bytes of RAM weight copies held, and the RAM cache limit.
    pub ram_cache_used_bytes: u64,
    pub ram_cache_limit_bytes: u64,
    /// Bytes streamed to the device (copied for one use and released), since the context was created.
    pub bytes_streamed_total: u64,
    /// Loads and locks served from memory, and those that read the file.
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Models alive in the cache.
    pub model_count: u32,
}

/// Fill `*out` with the cache's statistics. Set `out->struct_size = sizeof *out` first. Written only on success.
/// Thread-safe. `lowvram_context_stats_json` gives everything, per model and with the sizing rules.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_stats(
    ctx: *const lowvram_context,
    out: *mut lowvram_cache_stats,
) -> lowvram_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let out = out_arg(out, "out")?;
        let expected = size_of::<lowvram_cache_stats>() as u32;
        if out.struct_size < expected {
            return Err(Error::invalid(format!(
                "out->struct_size is {}, expected sizeof(lowvram_cache_stats) = {expected}",
                out.struct_size
            )));
        }
        let s = ctx.stats();
        *out = lowvram_cache_stats {
            struct_size: expected,
            device_total_bytes: s.device.usage.capacity_bytes.unwrap_or(0),
            device_free_bytes: s.device.free_bytes.unwrap_or(0),
            device_used_bytes: s.device.usage.current_bytes,
            device_used_by_cache_bytes: s.device.used_by_cache_bytes,
            device_peak_bytes: s.device.usage.peak_bytes,
            device_refused_allocations: s.device.usage.refused_allocations,
            ram_cache_used_bytes: s.ram.cache_used_bytes,
            ram_cache_limit_bytes: s.ram.cache_limit_bytes,
            bytes_streamed_total: s.bytes_streamed_total,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            model_count: s.models.len() as u32,
        };
        Ok(())
    })
}

/// All of the cache's statistics as one JSON object (the `lowvram stats` format: device, ram, models, plan,
/// sizing). On success `*out_json` is a NUL-terminated string owned by the caller; free it with
/// `lowvram_string_free`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_stats_json(
    ctx: *const lowvram_context,
    out_json: *mut *mut c_char,
) -> lowvram_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let out = out_arg(out_json, "out_json")?;
        let json = serde_json::to_string(&ctx.stats()).map_err(|e| Error::invalid(e.to_string()))?;
        *out = CString::new(json).map_err(|e| Error::invalid(e.to_string()))?.into_raw();
        Ok(())
    })
}

/// Free a string the library returned (e.g. from `lowvram_context_stats_json`). NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn lowvram_string_free(s: *mut c_char) {
    guard(|| {
        if !s.is_null() {
            drop(CString::from_raw(s));
        }
        Ok(())
    });
}

/// Free at least `bytes` of device memory held by models not in use (ComfyUI's /free), evicting least recently
/// used models first; `*out_freed` (may be NULL) receives the bytes actually freed. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_free_memory(
    ctx: *const lowvram_context,
    bytes: u64,
    out_freed: *mut u64,
) -> lowvram_status {
    guard(|| {
        let freed = borrow(ctx, "ctx")?.free_memory(bytes);
        if let Some(o) = out_freed.as_mut() {
            *o = freed;
        }
        Ok(())
    })
}

/// Unload every model not in use from the device and the RAM cache: models whose handles are still held stay valid
/// and reload from their files on next use; the others are forgotten (their files unmapped). `*out_freed` (may be
/// NULL) receives the device bytes freed. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_unload_all(ctx: *const lowvram_context, out_freed: *mut u64) -> lowvram_status {
    guard(|| {
        let freed = borrow(ctx, "ctx")?.unload_all();
        if let Some(o) = out_freed.as_mut() {
            *o = freed;
        }
        Ok(())
    })
}
