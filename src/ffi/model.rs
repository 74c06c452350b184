//! `lowvram_model`: load a component folder into a context's cache, inspect it, place it, free it.

use crate::ffi::backend::forward;
use std::ffi::{c_char, c_void};
use std::mem::size_of;

use crate::api::{Model, ModelKind};
use crate::ffi::boundary::{
    arc_handle, borrow, check_out_size, clone_arc, field, free_arc, guard, guard_ctx, non_null, out_arg, params_bytes,
    release_of, str_arg, write_out, CStruct, Field, Handle, OwnershipArc,
};
use crate::ffi::cancel::{lowvram_cancel_token, token_arg};
use crate::ffi::context::{init_params, lowvram_context};
use crate::ffi::run::lowvram_progress_callback;
use crate::ffi::status::lowvram_status;
use crate::log::lowvram_release_callback;

/// A loaded model component (a UNet or a VAE). Opaque. Ownership: shared; the host's handle is one reference and
/// every running call using the model holds its own, so `lowvram_model_free` during a run only drops the host's
/// reference. It runs only on the context it was loaded in. Thread-safe.
#[allow(non_camel_case_types)]
pub struct lowvram_model {
    _private: [u8; 0],
}

impl Handle for lowvram_model {
    type Target = Model;
    type Ownership = OwnershipArc;
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
    /// A text encoder (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel): used by a pipeline's prompt
    /// encoding.
    TextEncoder = 2,
    /// A diffusion transformer (FLUX.1's FluxTransformer2DModel): a pipeline's denoiser, used by `lowvram_denoise`.
    Transformer = 3,
}

/// A model's facts, filled by `lowvram_model_get_info`. Bytes throughout.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_model_info {
    /// Set by the caller to `sizeof(lowvram_model_info)`; on return, the bytes the library wrote.
    pub struct_size: u32,
    /// What the model is (a `lowvram_model_kind` value).
    pub kind: u32,
    /// Bytes of all weights, in their storage dtype.
    pub total_bytes: u64,
    /// Device bytes resident now, in the compute dtype: weights are converted once when placed, so an fp16 file
    /// computed in f32 takes twice its storage bytes and this may exceed `total_bytes`.
    pub resident_bytes: u64,
    /// Number of blocks (the unit of residency and streaming).
    pub block_count: u32,
    /// Number of blocks resident now.
    pub resident_block_count: u32,
    /// The model's identity, unique in the process: two loads of one folder in one context share it (the cache
    /// keeps one copy), models of different contexts never do. Since 0.3.
    pub id: u64,
}

impl CStruct for lowvram_model_info {
    const NAME: &'static str = "lowvram_model_info";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, kind),
            field!(Self, total_bytes),
            field!(Self, resident_bytes),
            field!(Self, block_count),
            field!(Self, resident_block_count),
            field!(Self, id),
        ]
    }
}

/// Parameters of `lowvram_model_load_ex`. Initialise with `lowvram_model_load_params_init(&p, sizeof p)`. Since 0.2.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_model_load_params {
    /// `sizeof(lowvram_model_load_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// Called after each phase of the load (config read, weights mapped, tensors checked) with `(done, 3)`; return
    /// false to cancel (CANCELLED). Runs on the calling thread. NULL = none.
    pub progress: lowvram_progress_callback,
    /// Passed back to `progress`.
    pub progress_user_data: *mut c_void,
    /// Called exactly once with `progress_user_data` before the call returns (whatever its status), when the
    /// library will never use it again. NULL = none.
    pub progress_user_data_release: lowvram_release_callback,
    /// Cancels the load at its next phase; NULL = none. The call holds its own reference.
    pub cancel_token: *const lowvram_cancel_token,
}

impl CStruct for lowvram_model_load_params {
    const NAME: &'static str = "lowvram_model_load_params";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, progress),
            field!(Self, progress_user_data),
            field!(Self, progress_user_data_release),
            field!(Self, cancel_token),
        ]
    }
}

fn load_defaults(struct_size: u32) -> lowvram_model_load_params {
    lowvram_model_load_params {
        struct_size,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        progress_user_data_release: None,
        cancel_token: std::ptr::null(),
    }
}

/// Fill `*params` with defaults and store `struct_size` (the host's `sizeof(lowvram_model_load_params)`).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_load_params_init(
    params: *mut lowvram_model_load_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_model_load_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &load_defaults(struct_size as u32)))
}

/// Load a diffusers component folder (`.../unet` or `.../vae`: config.json plus diffusion_pytorch_model.safetensors
/// or .fp16.safetensors) into `ctx`'s cache. The weights are memory-mapped and every tensor the architecture reads
/// is checked by name and shape (a renamed or misshapen tensor is FORMAT here, not at the first run); no device
/// memory is used until the model runs or `lowvram_model_load_to_device` places it. A UNet picks up
/// `../scheduler/scheduler_config.json` when present (SD 1.5's scheduler otherwise). On success `*out` is a new
/// handle owned by the caller. Errors: IO (missing folder or files), FORMAT (corrupt safetensors, bad config.json,
/// a count or size out of range, a missing tensor; the message names it), UNSUPPORTED (an architecture or config
/// key this version cannot run). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_load(
    ctx: *const lowvram_context,
    path: *const c_char,
    out: *mut *mut lowvram_model,
) -> lowvram_status {
    forward!(lowvram_model_load(ctx, path, out));
    lowvram_model_load_ex(ctx, path, std::ptr::null(), out)
}

/// `lowvram_model_load` with progress and cancel (`params` NULL = none): the load stops with CANCELLED at its next
/// phase when `params->cancel_token` is cancelled, the progress callback returns false, or `lowvram_context_cancel`
/// is called while it runs. Since 0.2. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_load_ex(
    ctx: *const lowvram_context,
    path: *const c_char,
    params: *const lowvram_model_load_params,
    out: *mut *mut lowvram_model,
) -> lowvram_status {
    forward!(lowvram_model_load_ex(ctx, path, params, out));
    // Read first: the release runs exactly once, also when the context is NULL or failed.
    let _release = release_of(
        params,
        field!(lowvram_model_load_params, progress_user_data),
        field!(lowvram_model_load_params, progress_user_data_release),
    );
    guard_ctx(ctx, |ctx| {
        type P = lowvram_model_load_params;
        let p = params_bytes(params, &load_defaults(size_of::<P>() as u32))?;
        let progress: lowvram_progress_callback = p.get(field!(P, progress));
        let user_data: *mut c_void = p.get(field!(P, progress_user_data));
        let path = str_arg(path, "path")?;
        let out = out_arg(out, "out")?;
        let token = token_arg(p.get(field!(P, cancel_token)))?;
        let mut on_phase = |done: usize, total: usize| match progress {
            Some(cb) => cb(done as u32, total as u32, user_data),
            None => true,
        };
        let model = ctx.load_model_with(std::path::Path::new(path), &mut on_phase, token.as_deref())?;
        *out = arc_handle(model);
        Ok(())
    })
}

/// Describe a model. Set `out->struct_size = sizeof *out` first: the fields it covers are written (older, smaller
/// structs get the fields they know). Written only on success. Works after the model's context was freed.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_get_info(
    model: *const lowvram_model,
    out: *mut lowvram_model_info,
) -> lowvram_status {
    forward!(lowvram_model_get_info(model, out));
    guard(|| {
        let model = borrow(model, "model")?;
        non_null(out, "out")?;
        check_out_size(out, "out")?;
        let w = model.weights();
        let value = lowvram_model_info {
            struct_size: size_of::<lowvram_model_info>() as u32,
            kind: match model.kind() {
                ModelKind::Unet => lowvram_model_kind::Unet as u32,
                ModelKind::Vae => lowvram_model_kind::Vae as u32,
                ModelKind::TextEncoder => lowvram_model_kind::TextEncoder as u32,
                ModelKind::Transformer => lowvram_model_kind::Transformer as u32,
            },
            total_bytes: w.total_bytes(),
            resident_bytes: w.resident_bytes(),
            block_count: w.blocks().len() as u32,
            resident_block_count: w.resident_blocks().len() as u32,
            id: model.id(),
        };
        write_out(out, &value);
        Ok(())
    })
}

/// Place up to `max_bytes` of the model's weights on the device now (an explicit partial load; the rest streams
/// when used). `*out_resident_bytes` (may be NULL) receives the bytes resident afterwards. BUDGET_TOO_SMALL when
/// the cache's budget leaves no room; INVALID_ARGUMENT when the model was loaded in another context. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_load_to_device(
    ctx: *const lowvram_context,
    model: *const lowvram_model,
    max_bytes: u64,
    out_resident_bytes: *mut u64,
) -> lowvram_status {
    forward!(lowvram_model_load_to_device(ctx, model, max_bytes, out_resident_bytes));
    guard_ctx(ctx, |ctx| {
        let model = clone_arc(model, "model")?;
        let resident = ctx.load_to_device(&model, max_bytes)?;
        if let Some(o) = out_resident_bytes.as_mut() {
            *o = resident;
        }
        Ok(())
    })
}

/// Drop the host's reference to a model. NULL is a no-op. A call using the model keeps its own reference until it
/// returns; with the last reference the model's weights leave the cache (RAM copy and device bytes). Safe during a
/// run on another thread, and after the model's context was freed.
#[no_mangle]
pub unsafe extern "C" fn lowvram_model_free(model: *mut lowvram_model) {
    forward!(lowvram_model_free(model));
    guard(|| {
        free_arc(model);
        Ok(())
    });
}
