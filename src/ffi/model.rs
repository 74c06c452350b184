//! `lowvram_model`: load a component folder into a context's cache, inspect it, place it, free it.

use std::ffi::c_char;
use std::sync::Arc;

use crate::api::{Model, ModelKind};
use crate::error::Error;
use crate::ffi::boundary::{borrow, guard, out_arg, str_arg, Handle};
use crate::ffi::context::lowvram_context;
use crate::ffi::status::lowvram_status;

/// A loaded model component (a UNet or a VAE). Opaque, shared: the cache and any running generation hold their
/// own references, so freeing the handle during a run only drops the host's reference. Free with
/// `lowvram_model_free`. Thread-safe.
#[allow(non_camel_case_types)]
pub struct lowvram_model {
    _private: [u8; 0],
}

impl Handle for lowvram_model {
    type Target = Model;
}

/// What a model is (stable numbers).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum lowvram_model_kind {
    /// A UNet2DConditionModel (SD 1.x / 2.x): used by `lowvram_denoise`.
    Unet = 0,
    /// An AutoencoderKL: used by `lowvram_vae_decode`.
    Vae = 1,
    /// A text encoder (CLIPTextModel, CLIPTextModelWithProjection): used by a pipeline's prompt encoding.
    TextEncoder = 2,
}

/// A model's facts, filled by `lowvram_model_get_info`. Bytes throughout.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_model_info {
    /// Set by the caller to `sizeof(lowvram_model_info)`.
    pub struct_size: u32,
    /// What the model is (a `lowvram_model_kind` value).
    pub kind: u32,
    /// Bytes of all weights, in their storage dtype.
    pub total_bytes: u64,
    /// Bytes resident on the device now.
    pub resident_bytes: u64,
    /// Number of blocks (the unit of residency and streaming).
    pub block_count: u32,
    /// Number of blocks resident now.
    pub resident_block_count: u32,
}

/// Load a diffusers component folder (`.../unet` or `.../vae`: config.json plus diffusion_pytorch_model.safetensors
/// or .fp16.safetensors) into `ctx`'s cache. The weights are memory-mapped and validated; no device memory is used
/// until the model runs or `lowvram_model_load_to_device` places it. A UNet picks up `../scheduler/
/// scheduler_config.json` when present (SD 1.5's scheduler otherwise). On success `*out` is a new handle owned by
/// the caller. Errors: IO (missing folder or files), FORMAT (corrupt safetensors, bad config.json), UNSUPPORTED
/// (an architecture or config key this version cannot run; the message names it). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_load(
    ctx: *const lowvram_context,
    path: *const c_char,
    out: *mut *mut lowvram_model,
) -> lowvram_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let path = str_arg(path, "path")?;
        let out = out_arg(out, "out")?;
        let model = ctx.load_model(std::path::Path::new(path))?;
        *out = Arc::into_raw(model) as *mut lowvram_model;
        Ok(())
    })
}

/// Describe a model. Set `out->struct_size = sizeof *out` first; written only on success. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_get_info(
    model: *const lowvram_model,
    out: *mut lowvram_model_info,
) -> lowvram_status {
    guard(|| {
        let model = borrow(model, "model")?;
        let out = out_arg(out, "out")?;
        let expected = std::mem::size_of::<lowvram_model_info>() as u32;
        if out.struct_size < expected {
            return Err(Error::invalid(format!(
                "out->struct_size is {}, expected sizeof(lowvram_model_info) = {expected}",
                out.struct_size
            )));
        }
        let w = model.weights();
        *out = lowvram_model_info {
            struct_size: expected,
            kind: match model.kind() {
                ModelKind::Unet => lowvram_model_kind::Unet as u32,
                ModelKind::Vae => lowvram_model_kind::Vae as u32,
                ModelKind::TextEncoder => lowvram_model_kind::TextEncoder as u32,
            },
            total_bytes: w.total_bytes(),
            resident_bytes: w.resident_bytes(),
            block_count: w.blocks().len() as u32,
            resident_block_count: w.resident_blocks().len() as u32,
        };
        Ok(())
    })
}

/// Place up to `max_bytes` of the model's weights on the device now (an explicit partial load; the rest streams
/// when used). `*out_resident_bytes` (may be NULL) receives the bytes resident afterwards. BUDGET_TOO_SMALL when
/// the cache's budget leaves no room. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_load_to_device(
    ctx: *const lowvram_context,
    model: *const lowvram_model,
    max_bytes: u64,
    out_resident_bytes: *mut u64,
) -> lowvram_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let model = borrow(model, "model")?;
        let resident = ctx.load_to_device(model, max_bytes)?;
        if let Some(o) = out_resident_bytes.as_mut() {
            *o = resident;
        }
        Ok(())
    })
}

/// Drop the host's reference to a model. NULL is a no-op. The cache keeps the weights (subject to its budgets)
/// until the context is freed or they are evicted; a run using the model keeps it alive until it returns.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_free(model: *mut lowvram_model) {
    guard(|| {
        if !model.is_null() {
            drop(Arc::from_raw(model as *const Model));
        }
        Ok(())
    });
}
