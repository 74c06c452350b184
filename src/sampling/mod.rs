//! Samplers and the denoise loop, matching diffusers 0.42.1.
//!
//! * [`config`]: a model's `scheduler_config.json` and its per-scheduler defaults.
//! * [`Scheduler`]: one sampler run (timesteps, sigmas, input scaling, step), built by [`make_scheduler`]
//!   for a [`SchedulerKind`]: `euler` (EulerDiscreteScheduler), `euler_a` (EulerAncestralDiscreteScheduler),
//!   `ddim` (DDIMScheduler, eta 0), `dpmpp_2m` (DPMSolverMultistepScheduler: dpmsolver++, order 2); Karras sigmas
//!   for `euler` and `dpmpp_2m`; `flow_euler` ([`flow_match`]: FlowMatchEulerDiscreteScheduler as FluxPipeline
//!   runs it, for velocity-predicting flow models such as FLUX.1).
//! * [`noise`]: our counter-based seeded Gaussian generator.
//! * [`denoise()`]: the loop StableDiffusionPipeline runs (classifier-free guidance included).
//!
//! Latents are kept in `f32` throughout (diffusers' float32 pipeline); per-step scalars are computed in `f32` in the
//! order diffusers computes them on 0-dim float32 tensors, so the fixtures agree to ~1e-6.

pub mod config;
pub mod ddim;
pub mod denoise;
pub mod dpm;
pub mod euler;
pub mod flow_match;
pub mod noise;
pub mod schedule;

use std::str::FromStr;

use candle_core::Tensor;

pub use config::{BetaSchedule, PredictionType, ResolvedConfig, SchedulerConfig, TimestepSpacing};
pub use denoise::{denoise, DenoiseParams};
pub use noise::{initial_noise, seeded_normal};

use crate::{Error, Result};

/// One sampler run over a fixed number of steps.
///
/// Drive it as the pipeline does: for `i` in `0..timesteps().len()`, scale the model input with
/// [`Scheduler::scale_model_input`], evaluate the model at `timesteps()[i]`, then [`Scheduler::step`] with the
/// (guided) prediction. Multistep samplers keep history, so steps must come in order, each once.
pub trait Scheduler {
    /// The timesteps the model is evaluated at, in order (the exact values diffusers passes to the UNet).
    fn timesteps(&self) -> &[f64];
    /// The sigma schedule (`timesteps().len() + 1` values, float32 as diffusers holds them), where the scheduler
    /// has one (DDIM has none).
    fn sigmas(&self) -> Option<&[f32]>;
    /// The factor the initial Gaussian noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;
    /// The model input for step `step` (the identity for DDIM and DPM-Solver).
    fn scale_model_input(&self, x: &Tensor, step: usize) -> Result<Tensor>;
    /// Advances `sample` by step `step` given the model's (guided) prediction. `noise` is the fresh Gaussian
    /// noise for this step, used by ancestral samplers only (shape of `sample`); when `None` they draw it from
    /// [`noise::step_noise`] with the seed of [`Scheduler::set_noise_seed`].
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor>;
    /// Whether [`Scheduler::step`] uses fresh noise.
    fn needs_noise(&self) -> bool {
        false
    }
    /// The seed ancestral samplers use when `step` is given no noise (default 0).
    fn set_noise_seed(&mut self, _seed: u64) {}
}

/// The samplers we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `euler`: EulerDiscreteScheduler.
    Euler,
    /// `euler_a`: EulerAncestralDiscreteScheduler.
    EulerAncestral,
    /// `ddim`: DDIMScheduler with eta 0.
    Ddim,
    /// `dpmpp_2m`: DPMSolverMultistepScheduler (dpmsolver++, solver_order 2, midpoint).
    DpmPP2M,
    /// `flow_euler`: FlowMatchEulerDiscreteScheduler with FluxPipeline's sigmas (static or dynamic shift).
    FlowEuler,
}

impl SchedulerKind {
    /// All kinds with their names.
    pub const ALL: [(SchedulerKind, &'static str); 5] = [
        (SchedulerKind::Euler, "euler"),
        (SchedulerKind::EulerAncestral, "euler_a"),
        (SchedulerKind::Ddim, "ddim"),
        (SchedulerKind::DpmPP2M, "dpmpp_2m"),
        (SchedulerKind::FlowEuler, "flow_euler"),
    ];

    /// The name `FromStr` accepts.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(k, _)| *k == self).map(|(_, n)| *n).unwrap_or("?")
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmPP2M => "DPMSolverMultistepScheduler",
            SchedulerKind::FlowEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// Whether the loop runs classifier-free guidance (two batches per step when guidance > 1). Not for flow
    /// matching: FLUX.1 dev's guidance is distilled into the model (an input of its forward) and schnell has none,
    /// so `flow_euler` runs one forward per step whatever the guidance.
    pub fn classifier_free_guidance(self) -> bool {
        !matches!(self, SchedulerKind::FlowEuler)
    }

    /// Whether `karras = true` is available (diffusers' `use_karras_sigmas`).
    pub fn supports_karras(self) -> bool {
        matches!(self, SchedulerKind::Euler | SchedulerKind::DpmPP2M)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(k, _)| *k).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
            Error::invalid(format!("unknown scheduler \"{s}\" (accepted: {})", names.join(", ")))
        })
    }
}

/// Builds `kind` as diffusers' `Class.from_config(config)` would (with `use_karras_sigmas=True` when `karras`,
/// or when the config itself sets it), and calls `set_timesteps(steps)`. A `flow_euler` config with dynamic
/// shifting needs the latent size: use [`make_scheduler_for`].
pub fn make_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
    karras: bool,
) -> Result<Box<dyn Scheduler + Send>> {
    make_scheduler_for(kind, config, steps, karras, None)
}

/// [`make_scheduler`] for latents of `latent_size` (h, w): `flow_euler` takes its dynamic shift from the image
/// sequence length `(h/2)·(w/2)` as FluxPipeline does; the other samplers do not depend on the size.
pub fn make_scheduler_for(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
    karras: bool,
    latent_size: Option<(usize, usize)>,
) -> Result<Box<dyn Scheduler + Send>> {
    if steps == 0 {
        return Err(Error::invalid("steps must be at least 1"));
    }
    if karras && !kind.supports_karras() {
        let why = if kind == SchedulerKind::FlowEuler { "not implemented for" } else { "no use_karras_sigmas in" };
        return Err(Error::unsupported(format!(
            "Karras sigmas with {kind} ({why} {}); they are available for euler and dpmpp_2m",
            kind.diffusers_class()
        )));
    }
    let mut cfg = config.resolve(kind)?;
    cfg.use_karras_sigmas |= karras;
    if steps > cfg.num_train_timesteps {
        return Err(Error::invalid(format!(
            "steps = {steps} exceeds num_train_timesteps = {}",
            cfg.num_train_timesteps
        )));
    }
    Ok(match kind {
        SchedulerKind::Euler => Box::new(euler::Euler::new(&cfg, steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler::EulerAncestral::new(&cfg, steps)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&cfg, steps)?),
        SchedulerKind::DpmPP2M => Box::new(dpm::DpmPP2M::new(&cfg, steps)?),
        SchedulerKind::FlowEuler => Box::new(flow_match::FlowMatchEuler::new(
            config,
            steps,
            latent_size.map(|(h, w)| flow_match::image_seq_len(h, w)),
        )?),
    })
}

/// `x · s` with `s` rounded to f32 (torch: float32 tensor times a 0-dim float32 tensor or a Python float).
pub(crate) fn mul_s(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(s as f64, 0.0)?)
}

/// `x / s`, a true division (not a multiplication by `1/s`), as torch divides by a 0-dim tensor.
pub(crate) fn div_s(x: &Tensor, s: f32) -> Result<Tensor> {
    let d = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&d)?)
}

pub(crate) fn check_step(step: usize, n: usize) -> Result<()> {
    if step >= n {
        return Err(Error::invalid(format!("step {step} out of range (the schedule has {n} steps)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for (k, n) in SchedulerKind::ALL {
            assert_eq!(n.parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.to_string(), n);
        }
        let e = "dpm++".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(e.contains("euler, euler_a, ddim, dpmpp_2m, flow_euler"), "{e}");
    }

    #[test]
    fn karras_only_where_diffusers_has_it() {
        let c = SchedulerConfig::sd15();
        assert!(matches!(make_scheduler(SchedulerKind::Ddim, &c, 10, true), Err(Error::Unsupported(_))));
        assert!(matches!(make_scheduler(SchedulerKind::EulerAncestral, &c, 10, true), Err(Error::Unsupported(_))));
        make_scheduler(SchedulerKind::Euler, &c, 10, true).unwrap();
        make_scheduler(SchedulerKind::DpmPP2M, &c, 10, true).unwrap();
        assert!(matches!(make_scheduler(SchedulerKind::Euler, &c, 0, false), Err(Error::InvalidArgument(_))));
        assert!(matches!(make_scheduler(SchedulerKind::FlowEuler, &c, 10, true), Err(Error::Unsupported(_))));
    }
}
