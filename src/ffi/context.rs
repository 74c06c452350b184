//! `lowvram_context`: create, configure, free.

use crate::ffi::backend::forward;
use std::ffi::{c_char, c_void, CString};
use std::mem::size_of;

use crate::api::{Context, ContextOptions};
use crate::error::Error;
use crate::ffi::boundary::{
    box_handle, check_out_size, check_params_size, field, free_box, guard, guard_ctx, non_null, opt_str_arg, out_arg,
    params_bytes, str_arg, write_out, CStruct, Field, Handle, OwnershipBox,
};
use crate::ffi::status::lowvram_status;
use crate::log::{lowvram_log_callback, lowvram_release_callback, LogSink};

/// A context: one model cache with its RAM and VRAM budgets, a logger and a cancel epoch. Opaque. Ownership: one
/// owner, the host, from `lowvram_context_new` to `lowvram_context_free`. Its functions are thread-safe unless
/// stated.
///
/// Concurrency on one context: every call may come from any thread, and calls share the context's budgets.
/// - On `cpu` and `emulated:` devices, denoise, decode and prompt-encoding calls compute concurrently, each on its
///   calling thread.
/// - On CUDA their device work is serialised: the context has one CUDA stream per thread but one cuBLAS handle
///   and workspace, which two threads must not use at once. A denoise, decode or encode holds the context's
///   compute gate from the moment its model is locked (its memory taken) until it returns; another such call waits
///   for it (a wait a cancel token or `lowvram_context_cancel` ends with CANCELLED). Loads, configuration, stats,
///   reservations, cancel and `lowvram_context_free_memory` never wait for the gate. For GPU work in parallel, use
///   one context per thread: each has its own stream and cuBLAS handle.
///
/// CUDA memory: each context allocates from a memory pool of its own (`cuMemPoolCreate` on its device); the
/// process default pool's attributes are never read or changed (`cuda_allocator` sets the release threshold of the
/// context's own pool). The tensor library allocates from the device's *current* pool, so while a call of the
/// context runs (from locking its model until it returns, and during `lowvram_model_load_to_device`) the context's
/// pool is made the device's current pool, and the previous one is restored when the last such call ends. Caveat:
/// the current pool is per device, process-wide. While a call runs, `cudaMallocAsync` without an explicit pool
/// made by the host on that device, from any thread, also draws from the context's pool (and is counted as the
/// context's use), and a host that changes the device's current pool meanwhile has it set back when the call
/// ends. `cudaMalloc`, and `cudaMallocFromPoolAsync` with the host's own pool, are unaffected. Two contexts on one
/// device computing at once both allocate from the pool of the one whose call started last.
#[allow(non_camel_case_types)]
pub struct lowvram_context {
    _private: [u8; 0],
}

impl Handle for lowvram_context {
    type Target = Context;
    type Ownership = OwnershipBox;
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
    /// Passed back to `log_callback`; not owned by the library unless `log_user_data_release` is set.
    pub log_user_data: *mut c_void,
    /// Called exactly once with `log_user_data` when the library will never use it again: when the context's log
    /// callback is replaced or the context freed (after any message being delivered), or at once when
    /// `log_callback` is NULL or `lowvram_context_new` fails (except when `struct_size` itself is rejected: then no
    /// field is trusted). NULL = the host manages `log_user_data` itself (then
    /// it must outlive the context). Since 0.2.
    pub log_user_data_release: lowvram_release_callback,
}

fn context_defaults(struct_size: u32) -> lowvram_context_params {
    lowvram_context_params {
        struct_size,
        device: std::ptr::null(),
        config_yaml: std::ptr::null(),
        config_path: std::ptr::null(),
        log_callback: None,
        log_user_data: std::ptr::null_mut(),
        log_user_data_release: None,
    }
}

impl CStruct for lowvram_context_params {
    const NAME: &'static str = "lowvram_context_params";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, device),
            field!(Self, config_yaml),
            field!(Self, config_path),
            field!(Self, log_callback),
            field!(Self, log_user_data),
            field!(Self, log_user_data_release),
        ]
    }
}

/// Write `defaults` into the first `struct_size` bytes of a host params struct (only the bytes the host owns).
///
/// # Safety
/// `params` must be valid for `struct_size` bytes of writes.
pub(crate) unsafe fn init_params<T: CStruct>(params: *mut T, struct_size: usize, defaults: &T) -> crate::Result<()> {
    // No reference is formed: the host's struct may be shorter than ours.
    if params.is_null() {
        return Err(Error::NullArgument("params"));
    }
    check_params_size::<T>(struct_size)?;
    let n = struct_size.min(size_of::<T>());
    std::ptr::copy_nonoverlapping((defaults as *const T).cast::<u8>(), params.cast::<u8>(), n);
    std::ptr::write_unaligned(params.cast::<u32>(), struct_size as u32);
    Ok(())
}

/// Fill `*params` with defaults (all NULL: automatic device, default configuration, process-wide logging) and
/// store `struct_size`. `struct_size` is the host's `sizeof(lowvram_context_params)`: older (smaller) and newer
/// (larger) sizes are accepted exactly as `lowvram_context_new` accepts them (≥ 4, not ending inside a field).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_params_init(
    params: *mut lowvram_context_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_context_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &context_defaults(struct_size as u32)))
}

/// Create a context. `params` may be NULL (all defaults). On success `*out` receives a new handle owned by the
/// caller, to be freed with `lowvram_context_free`; on failure `*out` is unchanged. Logs the cache sizes chosen and
/// the rules that chose them. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_new(
    params: *const lowvram_context_params,
    out: *mut *mut lowvram_context,
) -> lowvram_status {
    forward!(lowvram_context_new(params, out));
    guard(|| {
        let p = params_bytes(params, &context_defaults(size_of::<lowvram_context_params>() as u32))?;
        type P = lowvram_context_params;
        // From here the log user data belongs to the sink: released on every path.
        let log = LogSink::with_release(
            p.get(field!(P, log_callback)),
            p.get(field!(P, log_user_data)),
            p.get(field!(P, log_user_data_release)),
        );
        let out = out_arg(out, "out")?;
        let options = ContextOptions {
            device: opt_str_arg(p.get(field!(P, device)), "params->device")?.map(Into::into),
            config_yaml: opt_str_arg(p.get(field!(P, config_yaml)), "params->config_yaml")?.map(Into::into),
            config_path: opt_str_arg(p.get(field!(P, config_path)), "params->config_path")?.map(Into::into),
            log,
        };
        *out = box_handle(Context::new(options)?);
        Ok(())
    })
}

/// Free a context. NULL is a no-op. Must not be called while another thread is inside a call on the same context,
/// and must not be called twice. Handles made from it outlive it and keep working: a model handle can still be
/// described (`lowvram_model_get_info`) and freed, a reservation read and freed; each keeps its own share of the
/// cache (its weights, RAM and device memory) until it is freed, so free them too. Using such a model with another
/// context is INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_free(ctx: *mut lowvram_context) {
    forward!(lowvram_context_free(ctx));
    guard(|| {
        free_box(ctx);
        Ok(())
    });
}

/// Set this context's log callback (NULL: fall back to the process-wide one). `user_data` is passed back
/// unchanged; the host owns it and must keep it valid until the context is freed (the library may still deliver a
/// message to the old callback while this call returns). Prefer `lowvram_context_set_log_callback_ex`, whose
/// release callback says exactly when `user_data` is dead. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_set_log_callback(
    ctx: *const lowvram_context,
    callback: lowvram_log_callback,
    user_data: *mut c_void,
) -> lowvram_status {
    forward!(lowvram_context_set_log_callback(ctx, callback, user_data));
    lowvram_context_set_log_callback_ex(ctx, callback, user_data, None)
}

/// Set this context's log callback (NULL: fall back to the process-wide one) with a release for `user_data`: the
/// library calls `release(user_data)` exactly once, when it will never use `user_data` again (the callback is
/// replaced and no message is being delivered to it any more, or the context is freed; at once if `callback` is
/// NULL or the call fails). Replacing a callback is therefore race-free. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_set_log_callback_ex(
    ctx: *const lowvram_context,
    callback: lowvram_log_callback,
    user_data: *mut c_void,
    release: lowvram_release_callback,
) -> lowvram_status {
    forward!(lowvram_context_set_log_callback_ex(ctx, callback, user_data, release));
    let sink = LogSink::with_release(callback, user_data, release);
    guard_ctx(ctx, |ctx| {
        ctx.logger().set_sink(sink);
        Ok(())
    })
}

/// Cancel every call running on `ctx` at this moment (on any thread): each stops at its next step or block (on the
/// CPU and `emulated:` devices within a block, between chunks of an attention or convolution; per tile when decoding
/// tiled), returns LOWVRAM_STATUS_CANCELLED and releases its working memory. Calls that start afterwards are not
/// affected, and no call starting can erase the request. To cancel one call, or a call that may not have started
/// yet, give it a `lowvram_cancel_token`. Thread-safe; safe to call from a callback.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_cancel(ctx: *const lowvram_context) -> lowvram_status {
    forward!(lowvram_context_cancel(ctx));
    guard_ctx(ctx, |ctx| {
        ctx.cancel();
        Ok(())
    })
}

/// Apply YAML configuration text (any subset of the keys in README.md) to a live context, without a restart:
/// budgets take effect at once, and a generation running on another thread adapts at its next block. On error
/// (unknown key, bad value; the message names the key and the accepted values) nothing changes. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_configure(ctx: *const lowvram_context, yaml: *const c_char) -> lowvram_status {
    forward!(lowvram_context_configure(ctx, yaml));
    guard_ctx(ctx, |ctx| ctx.configure(str_arg(yaml, "yaml")?))
}

/// Memory statistics of a context's cache (a snapshot). Bytes throughout.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_cache_stats {
    /// Set by the caller to `sizeof(lowvram_cache_stats)`; on return, the bytes the library wrote (an older library
    /// writes fewer fields, a newer one only those this size covers).
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
    /// Models without a RAM copy (`keep_ram_copy_of_weights: false`, or larger than the RAM cache): their blocks
    /// are read from the file's memory map through the staging ring. The log says which and why, per model. (It
    /// sits in what was `model_count`'s padding, so a host built against the 0.1 header still gets
    /// `struct_size == sizeof` back.)
    pub models_without_ram_copy: u32,
    /// Host bytes page-locked now (RAM copies and staging slots, whole pages), and the cap on them
    /// (`max_pinned_memory_gb`; 0 = nothing is pinned: `pin_memory: false` or the CPU device).
    pub pinned_bytes: u64,
    pub pinned_cap_bytes: u64,
    /// Models whose RAM copy is not pinned (the cap, `pin_memory: false`, the driver refused): their blocks cross
    /// from pageable memory.
    pub models_unpinned: u32,
}

impl CStruct for lowvram_cache_stats {
    const NAME: &'static str = "lowvram_cache_stats";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, device_total_bytes),
            field!(Self, device_free_bytes),
            field!(Self, device_used_bytes),
            field!(Self, device_used_by_cache_bytes),
            field!(Self, device_peak_bytes),
            field!(Self, device_refused_allocations),
            field!(Self, ram_cache_used_bytes),
            field!(Self, ram_cache_limit_bytes),
            field!(Self, bytes_streamed_total),
            field!(Self, cache_hits),
            field!(Self, cache_misses),
            field!(Self, model_count),
            field!(Self, models_without_ram_copy),
            field!(Self, pinned_bytes),
            field!(Self, pinned_cap_bytes),
            field!(Self, models_unpinned),
        ]
    }
}

/// Fill `*out` with the cache's statistics. Set `out->struct_size = sizeof *out` first: the fields it covers are
/// written (an older, smaller struct gets the fields it knows). Written only on success. Thread-safe.
/// `lowvram_context_stats_json` gives everything, per model and with the sizing rules.
#[no_mangle]
pub unsafe extern "C" fn lowvram_context_stats(
    ctx: *const lowvram_context,
    out: *mut lowvram_cache_stats,
) -> lowvram_status {
    forward!(lowvram_context_stats(ctx, out));
    guard_ctx(ctx, |ctx| {
        non_null(out, "out")?;
        check_out_size(out, "out")?;
        let s = ctx.stats();
        let value = lowvram_cache_stats {
            struct_size: size_of::<lowvram_cache_stats>() as u32,
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
            models_without_ram_copy: s.ram.models_without_ram_copy as u32,
            pinned_bytes: s.ram.pinned_bytes,
            pinned_cap_bytes: s.ram.pinned_cap_bytes.unwrap_or(0),
            models_unpinned: s.ram.models_unpinned as u32,
        };
        write_out(out, &value);
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
    forward!(lowvram_context_stats_json(ctx, out_json));
    guard_ctx(ctx, |ctx| {
        let out = out_arg(out_json, "out_json")?;
        let json = serde_json::to_string(&ctx.stats()).map_err(|e| Error::invalid(e.to_string()))?;
        *out = CString::new(json).map_err(|e| Error::invalid(e.to_string()))?.into_raw();
        Ok(())
    })
}

/// Free a string the library returned (e.g. from `lowvram_context_stats_json`). NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn lowvram_string_free(s: *mut c_char) {
    forward!(lowvram_string_free(s));
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
    forward!(lowvram_context_free_memory(ctx, bytes, out_freed));
    guard_ctx(ctx, |ctx| {
        let freed = ctx.free_memory(bytes);
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
pub unsafe extern "C" fn lowvram_context_unload_all(
    ctx: *const lowvram_context,
    out_freed: *mut u64,
) -> lowvram_status {
    forward!(lowvram_context_unload_all(ctx, out_freed));
    guard_ctx(ctx, |ctx| {
        let freed = ctx.unload_all();
        if let Some(o) = out_freed.as_mut() {
            *o = freed;
        }
        Ok(())
    })
}
