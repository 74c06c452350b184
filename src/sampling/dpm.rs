//! `DPMSolverMultistepScheduler` as DPM++ 2M: algorithm_type dpmsolver++, solver_order 2, solver_type midpoint,
//! lower_order_final, final_sigmas_type zero, optional Karras sigmas (diffusers 0.42.1 defaults).

use candle_core::Tensor;

use super::config::{PredictionType, ResolvedConfig};
use super::{check_step, div_s, mul_s, schedule, Scheduler};
use crate::{Error, Result};

/// DPM++ 2M. Step 0 and the last step are first order (the last because final_sigmas_type is "zero", which
/// makes it return the model's x0 prediction exactly); the others are second order.
pub struct DpmPP2M {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    pred: PredictionType,
    /// The previous step's converted model output (x0 prediction).
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
    next_step: usize,
}

/// `_sigma_to_alpha_sigma_t` on a 0-dim float32 tensor.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmPP2M {
    pub fn new(cfg: &ResolvedConfig, steps: usize) -> Result<Self> {
        let ac = schedule::alphas_cumprod(cfg);
        let train = schedule::train_sigmas(&ac);
        let (ts, sig64): (Vec<i64>, Vec<f64>) = if cfg.use_karras_sigmas {
            // in_sigmas = flip(training sigmas): the full range, not the spacing's ends.
            let s = schedule::karras_sigmas(train[0] as f64, train[train.len() - 1] as f64, steps);
            let logs = schedule::log_sigmas(&train);
            let ts = s.iter().map(|&x| schedule::np_round(schedule::sigma_to_t(x, &logs)) as i64).collect();
            (ts, s)
        } else {
            let ts = schedule::dpm_timesteps(cfg, steps);
            let s = ts.iter().map(|&t| schedule::np_interp_index(t as f64, &train)).collect();
            (ts, s)
        };
        let mut sigmas: Vec<f32> = sig64.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Ok(DpmPP2M {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            sigmas,
            pred: cfg.prediction_type,
            prev_x0: None,
            lower_order_nums: 0,
            next_step: 0,
        })
    }
}

impl Scheduler for DpmPP2M {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, x: &Tensor, step: usize) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        Ok(x.clone())
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_step(step, n)?;
        if step != self.next_step {
            return Err(Error::invalid(format!(
                "dpmpp_2m is multistep: expected step {}, got {step}",
                self.next_step
            )));
        }
        // convert_model_output (dpmsolver++): the x0 prediction.
        let (a, s) = alpha_sigma(self.sigmas[step]);
        let x0 = match self.pred {
            PredictionType::Epsilon => div_s(&(sample - mul_s(model_output, s)?)?, a)?,
            PredictionType::VPrediction => (mul_s(sample, a)? - mul_s(model_output, s)?)?,
        };
        let lower_order_final = step == n - 1; // final_sigmas_type "zero"
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (_alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(a, s);
        let h = lambda_t - lambda_s0;
        let c = alpha_t * ((-h).exp() - 1.0);
        let prev = match (&self.prev_x0, self.lower_order_nums < 1 || lower_order_final) {
            (Some(m1), false) => {
                // multistep_dpm_solver_second_order_update, midpoint.
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let h0 = lambda_s0 - lambda_s1;
                let r0 = h0 / h;
                let d1 = mul_s(&(&x0 - m1)?, 1.0f32 / r0)?;
                ((mul_s(sample, sigma_t / sigma_s0)? - mul_s(&x0, c)?)? - mul_s(&d1, 0.5f32 * c)?)?
            }
            _ => {
                // dpm_solver_first_order_update.
                (mul_s(sample, sigma_t / sigma_s0)? - mul_s(&x0, c)?)?
            }
        };
        self.prev_x0 = Some(x0);
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(prev)
    }
}
