//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` (diffusers 0.42.1, default options).

use candle_core::Tensor;

use super::config::{PredictionType, ResolvedConfig, TimestepSpacing};
use super::{check_step, div_s, mul_s, noise, schedule, Scheduler};
use crate::{Error, Result};

/// Timesteps (float32 values), sigmas (float32, final 0) and init_noise_sigma shared by both Euler schedulers.
struct EulerSchedule {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

fn euler_schedule(cfg: &ResolvedConfig, steps: usize, karras: bool) -> EulerSchedule {
    let ac = schedule::alphas_cumprod(cfg);
    let train = schedule::train_sigmas(&ac);
    let ts32 = schedule::euler_timesteps(cfg, steps);
    // np.interp(timesteps, arange, sigmas): float64 from float32 tables.
    let mut sig64: Vec<f64> = ts32.iter().map(|&t| schedule::np_interp_index(t as f64, &train)).collect();
    let ts: Vec<f64> = if karras {
        // _convert_to_karras(in_sigmas=interpolated sigmas): sigma_min/max are the ends of *this* schedule.
        let n = sig64.len();
        let (smin, smax) = (sig64[n - 1], sig64[0]);
        sig64 = schedule::karras_sigmas(smin, smax, n);
        let logs = schedule::log_sigmas(&train);
        // Timesteps: _sigma_to_t in float64, then cast to float32 (not rounded, unlike DPM-Solver).
        sig64.iter().map(|&s| schedule::sigma_to_t(s, &logs) as f32 as f64).collect()
    } else {
        ts32.iter().map(|&t| t as f64).collect()
    };
    let mut sigmas: Vec<f32> = sig64.iter().map(|&s| s as f32).collect();
    sigmas.push(0.0);
    let max = sigmas.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match cfg.timestep_spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    };
    EulerSchedule { timesteps: ts, sigmas, init_noise_sigma }
}

/// `sample / (sigma² + 1) ** 0.5`.
fn scale_input(x: &Tensor, sigma: f32) -> Result<Tensor> {
    div_s(x, (sigma * sigma + 1.0).sqrt())
}

/// The predicted clean sample `x0` at `sigma` (epsilon: `x − σ·ε`; v: `v·(−σ/√(σ²+1)) + x/(σ²+1)`).
fn pred_original(pred: PredictionType, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match pred {
        PredictionType::Epsilon => (sample - mul_s(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul_s(model_output, c)? + div_s(sample, sigma * sigma + 1.0)?)?
        }
    })
}

/// diffusers' `EulerDiscreteScheduler` (s_churn 0, so `sigma_hat = sigma`).
pub struct Euler {
    sched: EulerSchedule,
    pred: PredictionType,
}

impl Euler {
    pub fn new(cfg: &ResolvedConfig, steps: usize) -> Result<Self> {
        Ok(Euler { sched: euler_schedule(cfg, steps, cfg.use_karras_sigmas), pred: cfg.prediction_type })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.sched.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sched.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        self.sched.init_noise_sigma as f64
    }
    fn scale_model_input(&self, x: &Tensor, step: usize) -> Result<Tensor> {
        check_step(step, self.sched.timesteps.len())?;
        scale_input(x, self.sched.sigmas[step])
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        check_step(step, self.sched.timesteps.len())?;
        let sigma = self.sched.sigmas[step];
        let sigma_hat = sigma * (0.0f32 + 1.0);
        let x0 = match self.pred {
            PredictionType::Epsilon => (sample - mul_s(model_output, sigma_hat)?)?,
            PredictionType::VPrediction => pred_original(self.pred, model_output, sample, sigma)?,
        };
        let derivative = div_s(&(sample - x0)?, sigma_hat)?;
        let dt = self.sched.sigmas[step + 1] - sigma_hat;
        Ok((sample + mul_s(&derivative, dt)?)?)
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler` (no Karras option there).
pub struct EulerAncestral {
    sched: EulerSchedule,
    pred: PredictionType,
    seed: u64,
}

impl EulerAncestral {
    pub fn new(cfg: &ResolvedConfig, steps: usize) -> Result<Self> {
        if cfg.use_karras_sigmas {
            return Err(Error::unsupported("Karras sigmas with euler_a"));
        }
        Ok(EulerAncestral { sched: euler_schedule(cfg, steps, false), pred: cfg.prediction_type, seed: 0 })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.sched.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sched.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        self.sched.init_noise_sigma as f64
    }
    fn scale_model_input(&self, x: &Tensor, step: usize) -> Result<Tensor> {
        check_step(step, self.sched.timesteps.len())?;
        scale_input(x, self.sched.sigmas[step])
    }
    fn needs_noise(&self) -> bool {
        true
    }
    fn set_noise_seed(&mut self, seed: u64) {
        self.seed = seed;
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        check_step(step, self.sched.timesteps.len())?;
        let sigma = self.sched.sigmas[step];
        let x0 = pred_original(self.pred, model_output, sample, sigma)?;
        let (sf, st) = (sigma, self.sched.sigmas[step + 1]);
        let sigma_up = ((st * st) * (sf * sf - st * st) / (sf * sf)).sqrt();
        let sigma_down = (st * st - sigma_up * sigma_up).sqrt();
        let derivative = div_s(&(sample - x0)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (sample + mul_s(&derivative, dt)?)?;
        let drawn;
        let noise = match noise {
            Some(n) => {
                if n.dims() != sample.dims() {
                    return Err(Error::invalid(format!(
                        "euler_a step noise has shape {:?}, the latents {:?}",
                        n.dims(),
                        sample.dims()
                    )));
                }
                n
            }
            None => {
                drawn = noise::step_noise(self.seed, step, sample.dims(), sample.device())?;
                &drawn
            }
        };
        let noise = noise.to_dtype(prev.dtype())?;
        Ok((prev + mul_s(&noise, sigma_up)?)?)
    }
}
