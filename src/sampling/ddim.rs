//! `DDIMScheduler` with eta = 0 (diffusers 0.42.1, as StableDiffusionPipeline calls it).

use candle_core::Tensor;

use super::config::{PredictionType, ResolvedConfig};
use super::{check_step, div_s, mul_s, schedule, Scheduler};
use crate::Result;

/// Deterministic DDIM. Quirk kept from diffusers: the previous timestep is always
/// `t − num_train_timesteps // steps`, whatever the spacing (with `linspace` it is not the next timestep).
pub struct Ddim {
    timesteps_i: Vec<i64>,
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    pred: PredictionType,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(cfg: &ResolvedConfig, steps: usize) -> Result<Self> {
        let ac = schedule::alphas_cumprod(cfg);
        let ts = schedule::ddim_timesteps(cfg, steps);
        Ok(Ddim {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            timesteps_i: ts,
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            step_ratio: (cfg.num_train_timesteps / steps) as i64,
            pred: cfg.prediction_type,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, x: &Tensor, step: usize) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        Ok(x.clone())
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        let t = self.timesteps_i[step];
        let prev_t = t - self.step_ratio;
        let a_t = self.alpha_at(t);
        let a_prev = self.alpha_at(prev_t);
        let b_t = 1.0f32 - a_t;
        let (mut x0, eps) = match self.pred {
            PredictionType::Epsilon => {
                (div_s(&(sample - mul_s(model_output, b_t.sqrt())?)?, a_t.sqrt())?, model_output.clone())
            }
            PredictionType::VPrediction => (
                (mul_s(sample, a_t.sqrt())? - mul_s(model_output, b_t.sqrt())?)?,
                (mul_s(model_output, a_t.sqrt())? + mul_s(sample, b_t.sqrt())?)?,
            ),
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        // eta = 0: std_dev_t = 0 · variance**0.5 = 0.
        let std_dev_t = 0.0f32;
        let dir = mul_s(&eps, (1.0f32 - a_prev - std_dev_t * std_dev_t).sqrt())?;
        Ok((mul_s(&x0, a_prev.sqrt())? + dir)?)
    }
}
