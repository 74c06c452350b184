//! The denoise loop, as `StableDiffusionPipeline.__call__` runs it (diffusers 0.42.1):
//!
//! ```text
//! latents = init_noise * init_noise_sigma
//! for i, t in enumerate(timesteps):
//!     x = cat([latents, latents]) if guidance > 1 else latents     # uncond first, then cond
//!     x = scheduler.scale_model_input(x, t)
//!     e = model(x, t)
//!     if guidance > 1: u, c = e.chunk(2); e = u + guidance * (c - u)
//!     latents = scheduler.step(e, t, latents)
//! ```
//!
//! Flow matching (`flow_euler`, FluxPipeline's loop) differs in three ways, all through the scheduler: the noise is
//! not scaled (`init_noise_sigma` = 1), the input is not scaled, and there is no classifier-free guidance (one
//! forward on B rows per step, whatever `guidance` is: FLUX.1 dev's guidance is an input of the model, handed to it
//! by the caller's closure, and the prediction is a velocity the step applies as is). The scheduler's sigmas depend
//! on the latent size (dynamic shifting), taken from `init_noise`.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

use super::{make_scheduler_for, mul_s, noise, SchedulerConfig, SchedulerKind};
use crate::{Error, Result};

/// What [`denoise`] needs besides the model and the noise.
#[derive(Debug, Clone)]
pub struct DenoiseParams {
    pub kind: SchedulerKind,
    /// Karras sigmas (euler, dpmpp_2m).
    pub karras: bool,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the model on the conditional batch only (no concatenation).
    /// Ignored by the loop for `flow_euler` (see the module doc).
    pub guidance: f64,
    /// Seeds Euler ancestral's per-step noise when no `step_noise` is given (stream `1 + step`).
    pub seed: u64,
    pub scheduler_config: SchedulerConfig,
}

/// Runs the sampler and returns the final latents (`f32`, the shape of `init_noise`).
///
/// * `model(x, t)`: the noise (or v) prediction for the batch `x` at timestep `t`. With guidance > 1, `x` is
///   `[latents; latents]` (2B rows: the caller's closure pairs the first B with the unconditional embedding and
///   the last B with the conditional one); otherwise B rows. `x` is already scaled by the scheduler. The output
///   must have `x`'s shape.
/// * `init_noise`: standard-normal noise `[B, C, h, w]` (e.g. [`noise::initial_noise`]); it is multiplied by the
///   scheduler's `init_noise_sigma` here.
/// * `step_noise`: optional `[steps, B, C, h, w]`; step `i` of Euler ancestral uses `step_noise[i]` (other
///   samplers ignore it). Without it, `seeded_normal(seed, 1 + i, ..)`.
/// * `progress(i + 1, total)` after each step; returning `false` stops with [`Error::Cancelled`].
/// * `cancel` is read before each step; when set, [`Error::Cancelled`].
pub fn denoise(
    model: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    params: &DenoiseParams,
    init_noise: &Tensor,
    step_noise: Option<&Tensor>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
    cancel: &AtomicBool,
) -> Result<Tensor> {
    let shape = init_noise.dims().to_vec();
    if shape.len() != 4 {
        return Err(Error::invalid(format!("init_noise must be [B, C, h, w], got {shape:?}")));
    }
    let size = Some((shape[2], shape[3]));
    let mut sched = make_scheduler_for(params.kind, &params.scheduler_config, params.steps, params.karras, size)?;
    sched.set_noise_seed(params.seed);
    let total = sched.timesteps().len();
    if let Some(sn) = step_noise {
        let d = sn.dims();
        if d.len() != 5 || d[1..] != shape[..] || d[0] < total {
            return Err(Error::invalid(format!(
                "sampling.step_noise must be [steps ≥ {total}, {}, {}, {}, {}], got {d:?}",
                shape[0], shape[1], shape[2], shape[3]
            )));
        }
    }
    if !params.guidance.is_finite() {
        return Err(Error::invalid(format!("guidance = {} is not finite", params.guidance)));
    }
    let cfg = params.guidance > 1.0 && params.kind.classifier_free_guidance();
    let g = params.guidance as f32;
    let mut latents = mul_s(&init_noise.to_dtype(DType::F32)?, sched.init_noise_sigma() as f32)?;
    for i in 0..total {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let t = sched.timesteps()[i];
        let x = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let x = sched.scale_model_input(&x, i)?;
        let out = model(&x, t)?;
        if out.dims() != x.dims() {
            return Err(Error::invalid(format!(
                "model returned shape {:?} for input {:?}",
                out.dims(),
                x.dims()
            )));
        }
        let out = out.to_dtype(DType::F32)?;
        let guided = if cfg {
            let b = shape[0];
            let u = out.narrow(0, 0, b)?;
            let c = out.narrow(0, b, b)?;
            (&u + mul_s(&(&c - &u)?, g)?)?
        } else {
            out
        };
        let noise_i = if sched.needs_noise() {
            Some(match step_noise {
                Some(sn) => sn.get(i)?.to_dtype(DType::F32)?.to_device(latents.device())?,
                None => noise::step_noise(params.seed, i, &shape, latents.device())?,
            })
        } else {
            None
        };
        latents = sched.step(&guided, i, &latents, noise_i.as_ref())?;
        if !progress(i + 1, total) {
            return Err(Error::Cancelled);
        }
    }
    Ok(latents)
}
