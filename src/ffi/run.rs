//! `lowvram_denoise` and `lowvram_vae_decode`: the operations, with their params, progress, cancel and reports.

use crate::ffi::backend::forward;
use std::ffi::c_void;
use std::mem::size_of;

use crate::api::{CancelToken, DenoiseOptions, HostTensor, RunReport, Tiling};
use crate::error::{Error, Result};
use crate::ffi::boundary::{
    borrow, check_out_size, clone_arc, field, guard, guard_ctx, non_null, out_arg, params_bytes, release_of, write_out,
    CStruct, Field,
};
use crate::ffi::cancel::{lowvram_cancel_token, token_arg};
use crate::ffi::context::{init_params, lowvram_context};
use crate::ffi::model::lowvram_model;
use crate::ffi::status::lowvram_status;
use crate::ffi::tensor::{into_handle, lowvram_tensor};
use crate::log::lowvram_release_callback;
use crate::sampling::SchedulerKind;

/// Samplers (stable numbers), matching diffusers' schedulers as configured by the model's scheduler_config.json.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum lowvram_scheduler {
    /// EulerDiscreteScheduler.
    Euler = 0,
    /// EulerAncestralDiscreteScheduler.
    EulerA = 1,
    /// DDIMScheduler, eta 0.
    Ddim = 2,
    /// DPMSolverMultistepScheduler (dpmsolver++, order 2).
    Dpmpp2m = 3,
    /// FlowMatchEulerDiscreteScheduler as FluxPipeline runs it (flow models; no classifier-free guidance).
    FlowEuler = 4,
}

/// Progress of a running call: `step` of `total` done. Return false to cancel (the call then returns CANCELLED).
/// Runs on the thread that made the call. It may call `lowvram_context_stats`, `lowvram_context_cancel` and
/// `lowvram_cancel_token_cancel`; it must not start another call on the same context, throw or `longjmp`.
#[allow(non_camel_case_types)]
pub type lowvram_progress_callback =
    Option<unsafe extern "C" fn(step: u32, total: u32, user_data: *mut c_void) -> bool>;

/// Parameters of `lowvram_denoise`. Initialise with `lowvram_denoise_params_init(&p, sizeof p)`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_denoise_params {
    /// `sizeof(lowvram_denoise_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// A `lowvram_scheduler` value. Default EULER.
    pub scheduler: u32,
    /// Karras sigma schedule (EULER and DPMPP_2M only). Default false. Read as a byte: any non-zero value is true.
    pub karras: bool,
    /// Number of denoising steps. Default 20.
    pub steps: u32,
    /// Classifier-free guidance scale; ≤ 1 runs the conditional batch only; |guidance| ≤ 1000. Default 7.5.
    pub guidance: f32,
    /// Seed of the initial noise (when `init_noise` is NULL) and of Euler ancestral's step noise. Default 0.
    pub seed: u64,
    /// Latent width and height (image size / 8) used when `init_noise` is NULL. Default 64 × 64 (512 px).
    pub latent_width: u32,
    pub latent_height: u32,
    /// Optional `[steps, B, 4, h, w]` f32 noise for Euler ancestral's steps (NULL = seeded). Borrowed for the call.
    pub step_noise: *const lowvram_tensor,
    /// Called after each step; NULL = none.
    pub progress: lowvram_progress_callback,
    /// Passed back to `progress`.
    pub progress_user_data: *mut c_void,
    /// Cancels this call (also before it starts); NULL = none. The call holds its own reference. Since 0.2.
    pub cancel_token: *const lowvram_cancel_token,
    /// Called exactly once with `progress_user_data` before the call returns, whatever its status (unless the
    /// params' `struct_size` itself is rejected), when the library will never use it again. NULL = none. Since 0.2.
    pub progress_user_data_release: lowvram_release_callback,
}

/// Parameters of `lowvram_vae_decode`. Initialise with `lowvram_decode_params_init(&p, sizeof p)`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_decode_params {
    /// `sizeof(lowvram_decode_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// Tile edge in latent pixels: 0 = automatic (untiled when it fits, tiled when its working memory does not
    /// fit, and after a device OOM); > 0 = always tile with this edge. Tiled decoding is exact (global GroupNorm
    /// statistics, halo convolutions): it matches the untiled result to float rounding. Default 0.
    pub tile_latent: u32,
    /// Ignored: exact tiles need no overlap. Kept so the struct layout stays stable. Default 0.
    pub overlap_latent: u32,
    /// Never tile (BUDGET_TOO_SMALL when the whole decode cannot fit). Default false. Read as a byte: any non-zero
    /// value is true.
    pub never_tile: bool,
    /// Called as each decoder block starts with `(blocks done, blocks)`; return false to cancel. NULL = none.
    /// Since 0.2.
    pub progress: lowvram_progress_callback,
    /// Passed back to `progress`. Since 0.2.
    pub progress_user_data: *mut c_void,
    /// Cancels this call (also before it starts); NULL = none. The call holds its own reference. Since 0.2.
    pub cancel_token: *const lowvram_cancel_token,
    /// As in `lowvram_denoise_params`. Since 0.2.
    pub progress_user_data_release: lowvram_release_callback,
}

/// What a run measured, filled when the caller passes a non-NULL report pointer: on success and on failure once
/// the call ran (BUDGET_TOO_SMALL and CANCELLED report what was measured up to then). Bytes and milliseconds.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_run_report {
    /// Set by the caller to `sizeof(lowvram_run_report)`; on return, the bytes the library wrote.
    pub struct_size: u32,
    /// Wall time of the call, milliseconds.
    pub total_ms: f64,
    /// Highest device bytes in use during the run (weights + working memory), per the allocator.
    pub peak_device_bytes: u64,
    /// Bytes copied to the device for non-resident blocks during the run.
    pub bytes_streamed: u64,
    /// Device bytes of the model resident when the run ended (compute dtype), and bytes of all its weights
    /// (storage dtype): with an fp16 file computed in f32 the first may exceed the second.
    pub resident_bytes: u64,
    pub model_bytes: u64,
    /// Working memory reserved for the run (max of `device_working_mem_gb` and the op's estimate).
    pub working_bytes: u64,
    /// Device allocations refused during the run.
    pub refused_allocations: u64,
    /// Decode: the tile edge used in latent pixels, 0 when untiled.
    pub tile_latent: u32,
}

impl CStruct for lowvram_denoise_params {
    const NAME: &'static str = "lowvram_denoise_params";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, scheduler),
            field!(Self, karras),
            field!(Self, steps),
            field!(Self, guidance),
            field!(Self, seed),
            field!(Self, latent_width),
            field!(Self, latent_height),
            field!(Self, step_noise),
            field!(Self, progress),
            field!(Self, progress_user_data),
            field!(Self, cancel_token),
            field!(Self, progress_user_data_release),
        ]
    }
}

impl CStruct for lowvram_decode_params {
    const NAME: &'static str = "lowvram_decode_params";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, tile_latent),
            field!(Self, overlap_latent),
            field!(Self, never_tile),
            field!(Self, progress),
            field!(Self, progress_user_data),
            field!(Self, cancel_token),
            field!(Self, progress_user_data_release),
        ]
    }
}

impl CStruct for lowvram_run_report {
    const NAME: &'static str = "lowvram_run_report";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, total_ms),
            field!(Self, peak_device_bytes),
            field!(Self, bytes_streamed),
            field!(Self, resident_bytes),
            field!(Self, model_bytes),
            field!(Self, working_bytes),
            field!(Self, refused_allocations),
            field!(Self, tile_latent),
        ]
    }
}

fn denoise_defaults(struct_size: u32) -> lowvram_denoise_params {
    lowvram_denoise_params {
        struct_size,
        scheduler: lowvram_scheduler::Euler as u32,
        karras: false,
        steps: 20,
        guidance: 7.5,
        seed: 0,
        latent_width: 64,
        latent_height: 64,
        step_noise: std::ptr::null(),
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        cancel_token: std::ptr::null(),
        progress_user_data_release: None,
    }
}

fn decode_defaults(struct_size: u32) -> lowvram_decode_params {
    lowvram_decode_params {
        struct_size,
        tile_latent: 0,
        overlap_latent: 0,
        never_tile: false,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        cancel_token: std::ptr::null(),
        progress_user_data_release: None,
    }
}

/// Fill `*params` with defaults and store `struct_size` (the host's `sizeof(lowvram_denoise_params)`; older and
/// newer sizes are accepted as `lowvram_denoise` accepts them). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_denoise_params_init(
    params: *mut lowvram_denoise_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_denoise_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &denoise_defaults(struct_size as u32)))
}

/// Fill `*params` with defaults and store `struct_size` (the host's `sizeof(lowvram_decode_params)`). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_decode_params_init(
    params: *mut lowvram_decode_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_decode_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &decode_defaults(struct_size as u32)))
}

/// Write the report (if the host asked for one) covering the fields its `struct_size` covers.
///
/// # Safety
/// `out` must be NULL or a report checked by `check_out_size`.
unsafe fn write_report(out: *mut lowvram_run_report, r: &RunReport) {
    if out.is_null() {
        return;
    }
    let value = lowvram_run_report {
        struct_size: size_of::<lowvram_run_report>() as u32,
        total_ms: r.total_ms,
        peak_device_bytes: r.peak_device_bytes,
        bytes_streamed: r.bytes_streamed,
        resident_bytes: r.resident_bytes,
        model_bytes: r.model_bytes,
        working_bytes: r.working_bytes,
        refused_allocations: r.refused_allocations,
        tile_latent: r.tile_latent.unwrap_or(0) as u32,
    };
    write_out(out, &value);
}

fn scheduler_arg(n: u32) -> Result<SchedulerKind> {
    match n {
        0 => Ok(SchedulerKind::Euler),
        1 => Ok(SchedulerKind::EulerAncestral),
        2 => Ok(SchedulerKind::Ddim),
        3 => Ok(SchedulerKind::DpmPP2M),
        4 => Ok(SchedulerKind::FlowEuler),
        n => Err(Error::invalid(format!(
            "params->scheduler is {n} (accepted: 0 euler, 1 euler_a, 2 ddim, 3 dpmpp_2m, 4 flow_euler)"
        ))),
    }
}

/// Run the denoising loop on `unet` (a UNet model loaded in `ctx`; another context's model is INVALID_ARGUMENT).
/// `cond` is `[B, S, D]` text embeddings (f32/f16/bf16); `uncond` the same shape or NULL (zeros); `init_noise`
/// `[B, 4, h, w]` standard-normal noise or NULL (seeded with `params->seed`, size from `params->latent_*`).
/// `params` NULL = defaults. Sizes are checked before anything is allocated: an absurd size is INVALID_ARGUMENT,
/// or OUT_OF_HOST_MEMORY / BUDGET_TOO_SMALL with the bytes needed and available; a result with NaN or infinity is
/// INVALID_ARGUMENT. Blocks of the UNet that do not fit the budget stream from RAM; the call reserves its working
/// memory and releases it on return (also on error and cancel). On success `*out_latents` receives the final
/// latents `[B, 4, h, w]` f32 (before the VAE scaling; pass them to `lowvram_vae_decode`), owned by the caller.
/// `report` (may be NULL; set its struct_size) receives the measurements on success and on failure once the call
/// ran. Cancel: `params->cancel_token`, the progress callback returning false, or `lowvram_context_cancel`; the
/// call stops at its next UNet block with CANCELLED (on the CPU and `emulated:` devices inside a block too: the
/// attention and convolutions poll it between chunks of work). The call holds its own references to `unet` and the
/// token, so either may be freed meanwhile; input tensors are borrowed for the call. Runs on the calling thread;
/// several calls may run on one context from different threads (they share its budgets).
#[no_mangle]
pub unsafe extern "C" fn lowvram_denoise(
    ctx: *const lowvram_context,
    unet: *const lowvram_model,
    params: *const lowvram_denoise_params,
    cond: *const lowvram_tensor,
    uncond: *const lowvram_tensor,
    init_noise: *const lowvram_tensor,
    report: *mut lowvram_run_report,
    out_latents: *mut *mut lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_denoise(ctx, unet, params, cond, uncond, init_noise, report, out_latents));
    // Read first: the release runs exactly once, also when the context is NULL or failed.
    let _release = release_of(
        params,
        field!(lowvram_denoise_params, progress_user_data),
        field!(lowvram_denoise_params, progress_user_data_release),
    );
    guard_ctx(ctx, |ctx| {
        // Arguments are checked inside the runner, after the params: their user data is released either way.
        let latents = run_denoise(params, report, |options, step_noise, on_step, token, r| {
            let unet = clone_arc(unet, "unet")?;
            let cond = borrow(cond, "cond")?;
            let uncond = (uncond as *const HostTensor).as_ref();
            let init_noise = (init_noise as *const HostTensor).as_ref();
            non_null(out_latents, "out_latents")?;
            ctx.denoise_with(
                &unet,
                options,
                cond.tensor(),
                uncond.map(|t| t.tensor()),
                init_noise.map(|t| t.tensor()),
                step_noise,
                on_step,
                token,
                r,
            )
        })?;
        *out_arg(out_latents, "out_latents")? = into_handle(HostTensor::from_tensor(&latents)?);
        Ok(())
    })
}

/// The body every denoise entry point shares: decode `params` (NULL = defaults), hold the progress user data
/// until the call ends (then release it), run `f`, write the report on success and on failure.
///
/// # Safety
/// `params` NULL or a params struct of at least its `struct_size`; `report` NULL or a report of its struct_size.
pub(crate) unsafe fn run_denoise(
    params: *const lowvram_denoise_params,
    report: *mut lowvram_run_report,
    f: impl FnOnce(
        &DenoiseOptions,
        Option<&candle_core::Tensor>,
        &mut dyn FnMut(usize, usize) -> bool,
        Option<&CancelToken>,
        &mut RunReport,
    ) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    type P = lowvram_denoise_params;
    let p = params_bytes(params, &denoise_defaults(size_of::<P>() as u32))?;
    let progress: lowvram_progress_callback = p.get(field!(P, progress));
    let user_data: *mut c_void = p.get(field!(P, progress_user_data));
    check_out_size(report, "report")?;
    let token = token_arg(p.get(field!(P, cancel_token)))?;
    let options = DenoiseOptions {
        scheduler: scheduler_arg(p.get(field!(P, scheduler)))?,
        karras: p.flag(field!(P, karras)),
        steps: p.get::<u32>(field!(P, steps)) as usize,
        guidance: p.get::<f32>(field!(P, guidance)) as f64,
        seed: p.get(field!(P, seed)),
        latent_size: (p.get::<u32>(field!(P, latent_height)) as usize, p.get::<u32>(field!(P, latent_width)) as usize),
    };
    let step_noise_ptr: *const lowvram_tensor = p.get(field!(P, step_noise));
    let step_noise = (step_noise_ptr as *const HostTensor).as_ref().map(|t| t.tensor());
    let mut on_step = |step: usize, total: usize| match progress {
        Some(cb) => cb(step as u32, total as u32, user_data),
        None => true,
    };
    let mut r = RunReport::default();
    let result = f(&options, step_noise, &mut on_step, token.as_deref(), &mut r);
    write_report(report, &r);
    result
}

/// Decode `latents` (`[B, C, h, w]` as `lowvram_denoise` returns them; the VAE's scaling factor, and the shift
/// factor where it has one (FLUX), are applied here)
/// with `vae` (a VAE model loaded in `ctx`) into the raw decoder output `[B, 3, 8h, 8w]` f32 (≈ [-1, 1],
/// unclamped). `params` NULL = defaults (automatic tiling). The call reserves the decode's working-memory
/// estimate; when that cannot fit it decodes in tiles, and after a device OOM it retries in tiles. On success
/// `*out_image` is owned by the caller; `report` (may be NULL) receives the measurements on success and on failure
/// once the call ran. Cancel as for `lowvram_denoise`: the decode stops at its next decoder block, or
/// tile, or chunk of a convolution or attention (CPU and `emulated:` devices). Thread-safe as
/// `lowvram_denoise`.
#[no_mangle]
pub unsafe extern "C" fn lowvram_vae_decode(
    ctx: *const lowvram_context,
    vae: *const lowvram_model,
    params: *const lowvram_decode_params,
    latents: *const lowvram_tensor,
    report: *mut lowvram_run_report,
    out_image: *mut *mut lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_vae_decode(ctx, vae, params, latents, report, out_image));
    // Read first: the release runs exactly once, also when the context is NULL or failed.
    let _release = release_of(
        params,
        field!(lowvram_decode_params, progress_user_data),
        field!(lowvram_decode_params, progress_user_data_release),
    );
    guard_ctx(ctx, |ctx| {
        let image = run_decode(params, report, |tiling, on_block, token, r| {
            let vae = clone_arc(vae, "vae")?;
            let latents = borrow(latents, "latents")?;
            non_null(out_image, "out_image")?;
            ctx.vae_decode_with(&vae, latents.tensor(), tiling, on_block, token, r)
        })?;
        *out_arg(out_image, "out_image")? = into_handle(HostTensor::from_tensor(&image)?);
        Ok(())
    })
}

/// The body every decode entry point shares (see [`run_denoise`]).
///
/// # Safety
/// As [`run_denoise`].
pub(crate) unsafe fn run_decode(
    params: *const lowvram_decode_params,
    report: *mut lowvram_run_report,
    f: impl FnOnce(
        Tiling,
        &mut dyn FnMut(usize, usize) -> bool,
        Option<&CancelToken>,
        &mut RunReport,
    ) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    type P = lowvram_decode_params;
    let p = params_bytes(params, &decode_defaults(size_of::<P>() as u32))?;
    let progress: lowvram_progress_callback = p.get(field!(P, progress));
    let user_data: *mut c_void = p.get(field!(P, progress_user_data));
    check_out_size(report, "report")?;
    let token = token_arg(p.get(field!(P, cancel_token)))?;
    let tile: u32 = p.get(field!(P, tile_latent));
    let tiling = if p.flag(field!(P, never_tile)) {
        Tiling::Never
    } else if tile > 0 {
        Tiling::Tiles { tile_latent: tile as usize }
    } else {
        Tiling::Auto
    };
    let mut on_block = |done: usize, total: usize| match progress {
        Some(cb) => cb(done as u32, total as u32, user_data),
        None => true,
    };
    let mut r = RunReport::default();
    let result = f(tiling, &mut on_block, token.as_deref(), &mut r);
    write_report(report, &r);
    result
}
