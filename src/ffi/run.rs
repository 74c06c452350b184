//! `lowvram_denoise` and `lowvram_vae_decode`: the operations, with their params, progress and reports.

use std::ffi::c_void;
use std::mem::size_of;

use crate::api::{DenoiseOptions, HostTensor, RunReport, Tiling};
use crate::error::{Error, Result};
use crate::ffi::boundary::{borrow, guard, out_arg};
use crate::ffi::context::lowvram_context;
use crate::ffi::model::lowvram_model;
use crate::ffi::status::lowvram_status;
use crate::ffi::tensor::{into_handle, lowvram_tensor};
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
}

/// Progress of a running call: `step` of `total` done. Return false to cancel (the call then returns CANCELLED).
/// Runs on the thread that made the call.
#[allow(non_camel_case_types)]
pub type lowvram_progress_callback = Option<unsafe extern "C" fn(step: u32, total: u32, user_data: *mut c_void) -> bool>;

/// Parameters of `lowvram_denoise`. Initialise with `lowvram_denoise_params_init(&p, sizeof p)`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_denoise_params {
    /// `sizeof(lowvram_denoise_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// A `lowvram_scheduler` value. Default EULER.
    pub scheduler: u32,
    /// Karras sigma schedule (EULER and DPMPP_2M only). Default false.
    pub karras: bool,
    /// Number of denoising steps. Default 20.
    pub steps: u32,
    /// Classifier-free guidance scale; ≤ 1 runs the conditional batch only. Default 7.5.
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
    /// Never tile (BUDGET_TOO_SMALL when the whole decode cannot fit). Default false.
    pub never_tile: bool,
}

/// What a run measured, filled when the caller passes a non-NULL report pointer. Bytes and milliseconds.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_run_report {
    /// Set by the caller to `sizeof(lowvram_run_report)`.
    pub struct_size: u32,
    /// Wall time of the call, milliseconds.
    pub total_ms: f64,
    /// Highest device bytes in use during the run (weights + working memory), per the allocator.
    pub peak_device_bytes: u64,
    /// Bytes copied to the device for non-resident blocks during the run.
    pub bytes_streamed: u64,
    /// Bytes of the model resident when the run ended, and of all its weights.
    pub resident_bytes: u64,
    pub model_bytes: u64,
    /// Working memory reserved for the run (max of `device_working_mem_gb` and the op's estimate).
    pub working_bytes: u64,
    /// Device allocations refused during the run.
    pub refused_allocations: u64,
    /// Decode: the tile edge used in latent pixels, 0 when untiled.
    pub tile_latent: u32,
}

/// Fill a params struct of the host's `size` with `defaults` (what `*_params_init` does for every struct).
pub(crate) unsafe fn init_struct<T: 'static>(p: *mut T, size: usize, defaults: T, name: &str) -> Result<()> {
    let p = out_arg(p, "params")?;
    let full = size_of::<T>();
    if size < size_of::<u32>() || size > full.max(4096) {
        return Err(Error::invalid(format!("struct_size {size} is not a sizeof({name}) this library knows ({full})")));
    }
    let mut d = defaults;
    // Every params struct starts with its u32 struct_size.
    *(&mut d as *mut T).cast::<u32>() = size as u32;
    std::ptr::copy_nonoverlapping((&d as *const T).cast::<u8>(), (p as *mut T).cast::<u8>(), size.min(full));
    Ok(())
}

/// Copy the host's params struct into a full one, fields it does not cover taking the defaults (NULL = defaults).
pub(crate) unsafe fn read_struct<T>(p: *const T, defaults: T) -> Result<T> {
    read_params(p, defaults)
}

/// The denoise options, the optional step noise and the raw params of a `lowvram_denoise_params` (NULL =
/// defaults).
pub(crate) unsafe fn denoise_options<'a>(
    params: *const lowvram_denoise_params,
) -> Result<(DenoiseOptions, Option<&'a candle_core::Tensor>, lowvram_denoise_params)> {
    let p = read_params(params, denoise_defaults())?;
    let scheduler = match p.scheduler {
        0 => SchedulerKind::Euler,
        1 => SchedulerKind::EulerAncestral,
        2 => SchedulerKind::Ddim,
        3 => SchedulerKind::DpmPP2M,
        n => {
            return Err(Error::invalid(format!(
                "params->scheduler is {n} (accepted: 0 euler, 1 euler_a, 2 ddim, 3 dpmpp_2m)"
            )))
        }
    };
    let options = DenoiseOptions {
        scheduler,
        karras: p.karras,
        steps: p.steps as usize,
        guidance: p.guidance as f64,
        seed: p.seed,
        latent_size: (p.latent_height as usize, p.latent_width as usize),
    };
    let step_noise = (p.step_noise as *const HostTensor).as_ref().map(|t| t.tensor());
    Ok((options, step_noise, p))
}

/// The tiling a `lowvram_decode_params` asks for (NULL = automatic).
pub(crate) unsafe fn decode_tiling(params: *const lowvram_decode_params) -> Result<Tiling> {
    let p = read_params(params, decode_defaults())?;
    Ok(if p.never_tile {
        Tiling::Never
    } else if p.tile_latent > 0 {
        Tiling::Tiles { tile_latent: p.tile_latent as usize }
    } else {
        Tiling::Auto
    })
}

/// Copy the host's params struct into a full one, fields it does not cover taking the defaults.
unsafe fn read_params<T>(p: *const T, defaults: T) -> Result<T> {
    let Some(src) = p.as_ref() else { return Ok(defaults) };
    let size = *(src as *const T).cast::<u32>() as usize;
    if size < size_of::<u32>() {
        return Err(Error::invalid("params->struct_size is 0: initialise params with the init function"));
    }
    let mut out = defaults;
    std::ptr::copy_nonoverlapping(
        (src as *const T).cast::<u8>(),
        (&mut out as *mut T).cast::<u8>(),
        size.min(size_of::<T>()),
    );
    Ok(out)
}

fn denoise_defaults() -> lowvram_denoise_params {
    lowvram_denoise_params {
        struct_size: size_of::<lowvram_denoise_params>() as u32,
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
    }
}

fn decode_defaults() -> lowvram_decode_params {
    lowvram_decode_params {
        struct_size: size_of::<lowvram_decode_params>() as u32,
        tile_latent: 0,
        overlap_latent: 0,
        never_tile: false,
    }
}

/// Fill `*params` with defaults and store `struct_size` (the host's `sizeof(lowvram_denoise_params)`). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_denoise_params_init(
    params: *mut lowvram_denoise_params,
    struct_size: usize,
) -> lowvram_status {
    guard(|| init_struct(params, struct_size, denoise_defaults(), "lowvram_denoise_params"))
}

/// Fill `*params` with defaults and store `struct_size` (the host's `sizeof(lowvram_decode_params)`). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_decode_params_init(
    params: *mut lowvram_decode_params,
    struct_size: usize,
) -> lowvram_status {
    guard(|| init_struct(params, struct_size, decode_defaults(), "lowvram_decode_params"))
}

pub(crate) fn write_report(out: *mut lowvram_run_report, r: &RunReport) -> Result<()> {
    // SAFETY: the caller passes NULL or a valid report.
    let Some(out) = (unsafe { out.as_mut() }) else { return Ok(()) };
    let expected = size_of::<lowvram_run_report>() as u32;
    if out.struct_size < expected {
        return Err(Error::invalid(format!(
            "report->struct_size is {}, expected sizeof(lowvram_run_report) = {expected}",
            out.struct_size
        )));
    }
    *out = lowvram_run_report {
        struct_size: expected,
        total_ms: r.total_ms,
        peak_device_bytes: r.peak_device_bytes,
        bytes_streamed: r.bytes_streamed,
        resident_bytes: r.resident_bytes,
        model_bytes: r.model_bytes,
        working_bytes: r.working_bytes,
        refused_allocations: r.refused_allocations,
        tile_latent: r.tile_latent.unwrap_or(0) as u32,
    };
    Ok(())
}

pub(crate) fn check_report(out: *const lowvram_run_report) -> Result<()> {
    // SAFETY: the caller passes NULL or a valid report.
    match unsafe { out.as_ref() } {
        Some(r) if (r.struct_size as usize) < size_of::<lowvram_run_report>() => Err(Error::invalid(format!(
            "report->struct_size is {}, expected sizeof(lowvram_run_report) = {}",
            r.struct_size,
            size_of::<lowvram_run_report>()
        ))),
        _ => Ok(()),
    }
}

/// Run the denoising loop on `unet` (a UNet model of `ctx`). `cond` is `[B, S, D]` text embeddings (f32/f16/bf16);
/// `uncond` the same shape or NULL (zeros); `init_noise` `[B, 4, h, w]` standard-normal noise or NULL (seeded with
/// `params->seed`, size from `params->latent_*`). `params` NULL = defaults. Blocks of the UNet that do not fit the
/// budget stream from RAM; the call reserves its working memory and releases it on return (also on error and
/// cancel). On success `*out_latents` receives the final latents `[B, 4, h, w]` f32 (before the VAE scaling;
/// pass them to `lowvram_vae_decode`), owned by the caller; `report` (may be NULL; set its struct_size) receives the
/// measurements. Cancel with `lowvram_context_cancel` from another thread or by returning false from the progress
/// callback: CANCELLED. Input tensors are borrowed for the call. Runs on the calling thread; several calls may run
/// on one context from different threads (they share its budgets).
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
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let unet = borrow(unet, "unet")?;
        let cond = borrow(cond, "cond")?;
        let uncond = (uncond as *const HostTensor).as_ref();
        let init_noise = (init_noise as *const HostTensor).as_ref();
        let out = out_arg(out_latents, "out_latents")?;
        check_report(report)?;
        let (options, step_noise, p) = denoise_options(params)?;
        let mut progress = |step: usize, total: usize| match p.progress {
            Some(cb) => cb(step as u32, total as u32, p.progress_user_data),
            None => true,
        };
        let (latents, r) = ctx.denoise(
            unet,
            &options,
            cond.tensor(),
            uncond.map(|t| t.tensor()),
            init_noise.map(|t| t.tensor()),
            step_noise,
            &mut progress,
        )?;
        let handle = HostTensor::from_tensor(&latents)?;
        write_report(report, &r)?;
        *out = into_handle(handle);
        Ok(())
    })
}

/// Decode `latents` (`[B, 4, h, w]` as `lowvram_denoise` returns them; the VAE's scaling factor is applied here)
/// with `vae` (a VAE model of `ctx`) into the raw decoder output `[B, 3, 8h, 8w]` f32 (≈ [-1, 1], unclamped).
/// `params` NULL = defaults (automatic tiling). The call reserves the decode's working-memory estimate; when that
/// cannot fit it decodes in tiles, and after a device OOM it retries in tiles. On success `*out_image` is owned by
/// the caller; `report` (may be NULL) receives the measurements. CANCELLED at the next block after
/// `lowvram_context_cancel`. Thread-safe as `lowvram_denoise`.
#[no_mangle]
pub unsafe extern "C" fn lowvram_vae_decode(
    ctx: *const lowvram_context,
    vae: *const lowvram_model,
    params: *const lowvram_decode_params,
    latents: *const lowvram_tensor,
    report: *mut lowvram_run_report,
    out_image: *mut *mut lowvram_tensor,
) -> lowvram_status {
    guard(|| {
        let ctx = borrow(ctx, "ctx")?;
        let vae = borrow(vae, "vae")?;
        let latents = borrow(latents, "latents")?;
        let out = out_arg(out_image, "out_image")?;
        check_report(report)?;
        let tiling = decode_tiling(params)?;
        let (image, r) = ctx.vae_decode(vae, latents.tensor(), tiling)?;
        let handle = HostTensor::from_tensor(&image)?;
        write_report(report, &r)?;
        *out = into_handle(handle);
        Ok(())
    })
}

