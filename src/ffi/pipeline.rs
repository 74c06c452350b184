//! `lowvram_pipeline` and `lowvram_conditioning`: one entry point per step for every model family — load a
//! pipeline, encode a prompt (or give tensors), denoise, decode.

use crate::ffi::backend::forward;
use std::ffi::c_char;
use std::mem::size_of;

use crate::api::{ComponentPaths, HostTensor, Pipeline, PromptOptions};
use crate::error::Error;
use crate::ffi::boundary::{
    arc_handle, borrow, box_handle, clone_arc, field, free_arc, free_box, guard, guard_ctx, non_null, opt_str_arg, out_arg,
    params_bytes, release_of, str_arg, CStruct, Field, Handle, OwnershipArc, OwnershipBox,
};
use crate::ffi::context::{init_params, lowvram_context};
use crate::ffi::run::{lowvram_decode_params, lowvram_denoise_params, lowvram_run_report, run_decode, run_denoise};
use crate::ffi::status::lowvram_status;
use crate::ffi::tensor::{into_handle, lowvram_tensor};
use crate::models::Conditioning;

/// A loaded pipeline: a family's denoiser, VAE and text encoders (with tokenizers), in one context's cache.
/// Opaque, shared: each call holds its own reference, so freeing the handle during a call on another thread only
/// drops the host's reference. Free with `lowvram_pipeline_free`. Thread-safe: calls on one pipeline may run from
/// several threads.
#[allow(non_camel_case_types)]
pub struct lowvram_pipeline {
    _private: [u8; 0],
}

impl Handle for lowvram_pipeline {
    type Target = Pipeline;
    type Ownership = OwnershipArc;
}

/// Named conditioning tensors (`sampling.cond_embeddings`, `sampling.uncond_embeddings`, `sampling.cond_pooled`,
/// `sampling.uncond_pooled`, `sampling.time_ids`): the same names as the CLI's `--inputs` file. Opaque, one owner
/// (the host). Reading is thread-safe; `lowvram_conditioning_set` must not run concurrently with other calls on
/// the same conditioning. Free with `lowvram_conditioning_free`.
#[allow(non_camel_case_types)]
pub struct lowvram_conditioning {
    _private: [u8; 0],
}

impl Handle for lowvram_conditioning {
    type Target = Conditioning;
    type Ownership = OwnershipBox;
}

/// Where a pipeline's components are. Initialise with `lowvram_pipeline_params_init(&p, sizeof p)`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_pipeline_params {
    /// `sizeof(lowvram_pipeline_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// A diffusers pipeline folder (model_index.json, unet/ or transformer/, vae/, text_encoder/, tokenizer/, ...),
    /// or a single-file checkpoint (SD 1.x/2.x/SDXL; FLUX.1 BFL or Comfy `.safetensors`, a FLUX transformer `.gguf`).
    /// Required.
    pub path: *const c_char,
    /// A VAE component folder or file (FLUX.1's `ae.safetensors`) replacing the pipeline's vae/; NULL = the
    /// pipeline's. Default NULL.
    pub vae_path: *const c_char,
    /// A text encoder component folder (its tokenizer folder beside it) replacing text_encoder/. Default NULL.
    pub text_encoder_path: *const c_char,
    /// The second text encoder (SDXL's OpenCLIP bigG, FLUX's T5) replacing text_encoder_2/. Default NULL.
    pub text_encoder_2_path: *const c_char,
}

/// How a prompt is encoded. Initialise with `lowvram_prompt_params_init(&p, sizeof p)`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_prompt_params {
    /// `sizeof(lowvram_prompt_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// What not to draw (the unconditional half of guidance); NULL = none (SDXL: zeros). Default NULL.
    pub negative_prompt: *const c_char,
    /// Images per prompt. Default 1.
    pub batch: u32,
    /// Image width and height in pixels (SDXL's size conditioning). Default 512 × 512.
    pub width: u32,
    pub height: u32,
    /// Layers to skip from the end of the text encoder (diffusers' clip_skip). Default 0.
    pub clip_skip: u32,
}

impl CStruct for lowvram_pipeline_params {
    const NAME: &'static str = "lowvram_pipeline_params";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, path),
            field!(Self, vae_path),
            field!(Self, text_encoder_path),
            field!(Self, text_encoder_2_path),
        ]
    }
}

impl CStruct for lowvram_prompt_params {
    const NAME: &'static str = "lowvram_prompt_params";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, negative_prompt),
            field!(Self, batch),
            field!(Self, width),
            field!(Self, height),
            field!(Self, clip_skip),
        ]
    }
}

fn pipeline_defaults(struct_size: u32) -> lowvram_pipeline_params {
    lowvram_pipeline_params {
        struct_size,
        path: std::ptr::null(),
        vae_path: std::ptr::null(),
        text_encoder_path: std::ptr::null(),
        text_encoder_2_path: std::ptr::null(),
    }
}

fn prompt_defaults(struct_size: u32) -> lowvram_prompt_params {
    lowvram_prompt_params {
        struct_size,
        negative_prompt: std::ptr::null(),
        batch: 1,
        width: 512,
        height: 512,
        clip_skip: 0,
    }
}

/// Fill `*params` with defaults and store `struct_size`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_pipeline_params_init(
    params: *mut lowvram_pipeline_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_pipeline_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &pipeline_defaults(struct_size as u32)))
}

/// Fill `*params` with defaults and store `struct_size`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_prompt_params_init(
    params: *mut lowvram_prompt_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_prompt_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &prompt_defaults(struct_size as u32)))
}

/// Load a pipeline into `ctx`'s cache: the family is detected from the folder or file (SD 1.x/2.x, SDXL, FLUX.1),
/// each component is loaded as `lowvram_model_load` would (memory-mapped, no device memory yet). Text encoders are
/// optional: a pipeline without them takes conditioning from the host only. On success `*out` is a new handle owned
/// by the caller. Errors: IO, FORMAT, UNSUPPORTED (an unknown pipeline class), INVALID_ARGUMENT (a missing VAE: the message
/// says which path to pass). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_pipeline_load(
    ctx: *const lowvram_context,
    params: *const lowvram_pipeline_params,
    out: *mut *mut lowvram_pipeline,
) -> lowvram_status {
    forward!(lowvram_pipeline_load(ctx, params, out));
    guard_ctx(ctx, |ctx| {
        type P = lowvram_pipeline_params;
        let out = out_arg(out, "out")?;
        if params.is_null() {
            return Err(Error::NullArgument("params"));
        }
        let p = params_bytes(params, &pipeline_defaults(size_of::<P>() as u32))?;
        let path = str_arg(p.get(field!(P, path)), "params->path")?;
        let opt = |ptr, name| opt_str_arg(ptr, name).map(|s| s.map(Into::into));
        let components = ComponentPaths {
            vae: opt(p.get(field!(P, vae_path)), "params->vae_path")?,
            text_encoder: opt(p.get(field!(P, text_encoder_path)), "params->text_encoder_path")?,
            text_encoder_2: opt(p.get(field!(P, text_encoder_2_path)), "params->text_encoder_2_path")?,
        };
        let pipeline = Pipeline::load(ctx, path.as_ref(), &components)?;
        *out = arc_handle(std::sync::Arc::new(pipeline));
        Ok(())
    })
}

/// Free a pipeline handle (NULL is a no-op). Models stay in the cache until its budgets evict them.
#[no_mangle]
pub unsafe extern "C" fn lowvram_pipeline_free(pipeline: *mut lowvram_pipeline) {
    forward!(lowvram_pipeline_free(pipeline));
    free_arc(pipeline)
}

/// Encode `prompt` (UTF-8) with the pipeline's text encoders into the conditioning its denoiser takes (SD 1.x:
/// embeddings of prompt and negative; SDXL: both encoders' penultimate states, pooled embeddings and size
/// conditioning; FLUX.1: T5's states and CLIP-L's pooled vector, no negative). The encoders run under the cache
/// like any model (loaded, streamed, evicted). `params` NULL = defaults. On success `*out` is a new conditioning
/// owned by the caller. INVALID_ARGUMENT when the pipeline has no text encoder (the message names the component to
/// pass). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_pipeline_encode_prompt(
    ctx: *const lowvram_context,
    pipeline: *const lowvram_pipeline,
    prompt: *const c_char,
    params: *const lowvram_prompt_params,
    out: *mut *mut lowvram_conditioning,
) -> lowvram_status {
    forward!(lowvram_pipeline_encode_prompt(ctx, pipeline, prompt, params, out));
    guard_ctx(ctx, |ctx| {
        type P = lowvram_prompt_params;
        let pipeline = clone_arc(pipeline, "pipeline")?;
        let prompt = str_arg(prompt, "prompt")?;
        let out = out_arg(out, "out")?;
        let p = params_bytes(params, &prompt_defaults(size_of::<P>() as u32))?;
        let negative = opt_str_arg(p.get(field!(P, negative_prompt)), "params->negative_prompt")?;
        let options = PromptOptions {
            batch: p.get::<u32>(field!(P, batch)) as usize,
            image_size: (p.get::<u32>(field!(P, height)) as usize, p.get::<u32>(field!(P, width)) as usize),
            clip_skip: p.get::<u32>(field!(P, clip_skip)) as usize,
        };
        let cond = pipeline.encode_prompt(ctx, prompt, negative, &options)?;
        *out = box_handle(cond);
        Ok(())
    })
}

/// Denoise with the pipeline's denoiser from `cond` (checked against what the family needs: a missing or
/// misshapen tensor is INVALID_ARGUMENT naming it and its expected shape). `init_noise` `[B, C, h, w]` or NULL
/// (seeded, size from `params`); `params` as for `lowvram_denoise` (NULL = defaults). On success `*out_latents`
/// (owned by the caller) receives the final latents f32; `report` (may be NULL) the measurements. Cancel and
/// thread-safety as `lowvram_denoise`. Borrowed inputs are read during the call only.
#[no_mangle]
pub unsafe extern "C" fn lowvram_pipeline_denoise(
    ctx: *const lowvram_context,
    pipeline: *const lowvram_pipeline,
    cond: *const lowvram_conditioning,
    params: *const lowvram_denoise_params,
    init_noise: *const lowvram_tensor,
    report: *mut lowvram_run_report,
    out_latents: *mut *mut lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_pipeline_denoise(ctx, pipeline, cond, params, init_noise, report, out_latents));
    // Read first: the release runs exactly once, also when the context is NULL or failed.
    let _release = release_of(
        params,
        field!(lowvram_denoise_params, progress_user_data),
        field!(lowvram_denoise_params, progress_user_data_release),
    );
    guard_ctx(ctx, |ctx| {
        let latents = run_denoise(params, report, |options, step_noise, on_step, token, r| {
            let pipeline = clone_arc(pipeline, "pipeline")?;
            let cond = borrow(cond, "cond")?;
            non_null(out_latents, "out_latents")?;
            let noise = (init_noise as *const HostTensor).as_ref().map(|t| t.tensor());
            ctx.denoise_conditioned_with(pipeline.denoiser(), options, cond, noise, step_noise, on_step, token, r)
        })?;
        *out_arg(out_latents, "out_latents")? = into_handle(HostTensor::from_tensor(&latents)?);
        Ok(())
    })
}

/// Decode `latents` with the pipeline's VAE (as `lowvram_vae_decode`: scaling and shift applied here, automatic
/// tiling by default). On success `*out_image` `[B, 3, H, W]` f32 is owned by the caller. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_pipeline_decode(
    ctx: *const lowvram_context,
    pipeline: *const lowvram_pipeline,
    params: *const lowvram_decode_params,
    latents: *const lowvram_tensor,
    report: *mut lowvram_run_report,
    out_image: *mut *mut lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_pipeline_decode(ctx, pipeline, params, latents, report, out_image));
    let _release = release_of(
        params,
        field!(lowvram_decode_params, progress_user_data),
        field!(lowvram_decode_params, progress_user_data_release),
    );
    guard_ctx(ctx, |ctx| {
        let image = run_decode(params, report, |tiling, on_block, token, r| {
            let pipeline = clone_arc(pipeline, "pipeline")?;
            let latents = borrow(latents, "latents")?;
            non_null(out_image, "out_image")?;
            ctx.vae_decode_with(pipeline.vae(), latents.tensor(), tiling, on_block, token, r)
        })?;
        *out_arg(out_image, "out_image")? = into_handle(HostTensor::from_tensor(&image)?);
        Ok(())
    })
}

/// Create an empty conditioning for host-given tensors. On success `*out` is owned by the caller. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_conditioning_new(out: *mut *mut lowvram_conditioning) -> lowvram_status {
    forward!(lowvram_conditioning_new(out));
    guard(|| {
        let out = out_arg(out, "out")?;
        *out = box_handle(Conditioning::new());
        Ok(())
    })
}

/// Set the tensor `name` (e.g. "sampling.cond_pooled") of `cond` to a copy of `tensor` (replacing one of that
/// name); the caller keeps `tensor`. Names are checked against the family when the conditioning is used.
#[no_mangle]
pub unsafe extern "C" fn lowvram_conditioning_set(
    cond: *mut lowvram_conditioning,
    name: *const c_char,
    tensor: *const lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_conditioning_set(cond, name, tensor));
    guard(|| {
        let cond = (cond as *mut Conditioning).as_mut().ok_or(Error::NullArgument("cond"))?;
        let name = str_arg(name, "name")?;
        let tensor = borrow(tensor, "tensor")?;
        if !name.starts_with("sampling.") {
            return Err(Error::invalid(format!("conditioning names start with \"sampling.\", got \"{name}\"")));
        }
        cond.insert(name, tensor.tensor().clone());
        Ok(())
    })
}

/// Copy the tensor `name` of `cond` into a new tensor handle `*out` (owned by the caller). INVALID_ARGUMENT when
/// `cond` has no tensor of that name. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_conditioning_get(
    cond: *const lowvram_conditioning,
    name: *const c_char,
    out: *mut *mut lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_conditioning_get(cond, name, out));
    guard(|| {
        let cond = borrow(cond, "cond")?;
        let name = str_arg(name, "name")?;
        let out = out_arg(out, "out")?;
        let t = cond.get(name).ok_or_else(|| Error::invalid(format!("the conditioning has no tensor {name}")))?;
        *out = into_handle(HostTensor::from_tensor(t)?);
        Ok(())
    })
}

/// Free a conditioning (NULL is a no-op).
#[no_mangle]
pub unsafe extern "C" fn lowvram_conditioning_free(cond: *mut lowvram_conditioning) {
    forward!(lowvram_conditioning_free(cond));
    free_box(cond)
}
