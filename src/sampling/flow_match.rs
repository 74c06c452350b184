//! `FlowMatchEulerDiscreteScheduler` (diffusers 0.42.1) as `FluxPipeline` drives it: the rectified-flow Euler
//! sampler of FLUX.1 (scheduler name `flow_euler`).
//!
//! The model predicts a velocity `v`; the latents move along it: `x_{i+1} = x_i + (σ_{i+1} − σ_i)·v`, in `f32`.
//! The schedule (`FluxPipeline.__call__` → `set_timesteps(sigmas=…, mu=…)`):
//!
//! * `σ = np.linspace(1, 1/N, N)` (float64, cast to float32);
//! * `use_dynamic_shifting` (FLUX.1 dev): `mu = m·L + b` with `m = (max_shift − base_shift)/(max_image_seq_len −
//!   base_image_seq_len)`, `b = base_shift − m·base_image_seq_len` (float64, `calculate_shift`), `L` = the packed
//!   image sequence length `(h/2)·(w/2)` of an `h`×`w` latent; then `σ' = e^mu / (e^mu + (1/σ − 1))`
//!   (`time_shift_type = "exponential"`) or `mu / (mu + (1/σ − 1))` (`"linear"`), in float32 as numpy computes it;
//! * otherwise the static shift `σ' = s·σ / (1 + (s − 1)·σ)` (`shift` = 1 leaves σ unchanged: FLUX.1 schnell);
//! * a final `σ = 0`; timesteps `= σ'·num_train_timesteps` (float32).
//!
//! The initial noise is not scaled (`init_noise_sigma = 1`) and the model input is not scaled either. The loop runs
//! **one forward per step and no classifier-free guidance** ([`super::SchedulerKind::classifier_free_guidance`]):
//! FLUX.1 dev's guidance is distilled into the model (it takes the guidance scale as an input, from the conditioning
//! its [`crate::models::Denoiser`] reads), and schnell ignores it. The model receives `t` = the timestep in
//! `[0, num_train_timesteps]` (FLUX divides it by 1000 to get σ, as `FluxPipeline` passes `timestep / 1000`).
//!
//! Keys of the config we do not implement (`invert_sigmas`, `shift_terminal`, `use_karras_sigmas`,
//! `use_exponential_sigmas`, `use_beta_sigmas`, `stochastic_sampling`, and the pipeline's `use_flow_sigmas`) are
//! refused by name when set (see [`super::SchedulerConfig::resolve`]).

use candle_core::Tensor;
use serde_json::Value;

use super::{check_step, mul_s, schedule, Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// `time_shift_type`: how `mu` shifts the sigmas under dynamic shifting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeShift {
    /// `e^mu / (e^mu + (1/σ − 1))` (the default; FLUX.1).
    Exponential,
    /// `mu / (mu + (1/σ − 1))`.
    Linear,
}

/// The `FlowMatchEulerDiscreteScheduler` parameters of a `scheduler_config.json`, with diffusers' defaults for
/// absent keys.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    /// The static shift (unused with dynamic shifting).
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: f64,
    pub max_image_seq_len: f64,
    pub time_shift: TimeShift,
}

fn num(c: &SchedulerConfig, key: &str, default: f64) -> Result<f64> {
    match c.other.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| Error::format(format!("scheduler_config: `{key}` must be a finite number, got {v}"))),
    }
}

impl FlowMatchConfig {
    /// Reads the flow-matching keys of `c` (the unsupported ones are refused by [`SchedulerConfig::resolve`]).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        c.resolve(super::SchedulerKind::FlowEuler)?;
        let use_dynamic_shifting = match c.other.get("use_dynamic_shifting") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::format(format!("scheduler_config: `use_dynamic_shifting` must be true or false, got {v}"))
            })?,
        };
        let time_shift = match c.other.get("time_shift_type") {
            None => TimeShift::Exponential,
            Some(Value::String(s)) if s == "exponential" => TimeShift::Exponential,
            Some(Value::String(s)) if s == "linear" => TimeShift::Linear,
            Some(v) => {
                return Err(Error::unsupported(format!(
                    "scheduler_config key `time_shift_type` = {v} (supported: \"exponential\", \"linear\")"
                )))
            }
        };
        let cfg = FlowMatchConfig {
            num_train_timesteps: c.num_train_timesteps.unwrap_or(1000),
            shift: num(c, "shift", 1.0)?,
            use_dynamic_shifting,
            base_shift: num(c, "base_shift", 0.5)?,
            max_shift: num(c, "max_shift", 1.15)?,
            base_image_seq_len: num(c, "base_image_seq_len", 256.0)?,
            max_image_seq_len: num(c, "max_image_seq_len", 4096.0)?,
            time_shift,
        };
        // Finite here (checked by `num`).
        if cfg.shift <= 0.0 {
            return Err(Error::invalid(format!("scheduler_config: shift = {} (needs > 0)", cfg.shift)));
        }
        if cfg.use_dynamic_shifting && cfg.max_image_seq_len == cfg.base_image_seq_len {
            return Err(Error::invalid(
                "scheduler_config: max_image_seq_len equals base_image_seq_len (mu is undefined)",
            ));
        }
        Ok(cfg)
    }

    /// `calculate_shift(image_seq_len, …)` of `FluxPipeline`, in float64.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len);
        let b = self.base_shift - m * self.base_image_seq_len;
        image_seq_len as f64 * m + b
    }

    /// The shifted sigmas (float32, without the final 0) for `steps` steps; `image_seq_len` is needed with dynamic
    /// shifting.
    pub fn sigmas(&self, steps: usize, image_seq_len: Option<usize>) -> Result<Vec<f32>> {
        if steps == 0 {
            return Err(Error::invalid("steps must be at least 1"));
        }
        let base: Vec<f32> =
            schedule::np_linspace(1.0, 1.0 / steps as f64, steps).into_iter().map(|s| s as f32).collect();
        Ok(if self.use_dynamic_shifting {
            let seq = image_seq_len.ok_or_else(|| {
                Error::invalid("flow_euler with use_dynamic_shifting needs the latent size (the image sequence length)")
            })?;
            let mu = self.mu(seq);
            // numpy: a Python float meets a float32 array as a float32 (NEP 50); `** 1.0` is exact.
            let c = match self.time_shift {
                TimeShift::Exponential => mu.exp() as f32,
                TimeShift::Linear => mu as f32,
            };
            base.iter().map(|&s| c / (c + (1.0f32 / s - 1.0f32))).collect()
        } else {
            let s = self.shift as f32;
            let s1 = (self.shift - 1.0) as f32;
            base.iter().map(|&x| s * x / (1.0f32 + s1 * x)).collect()
        })
    }
}

/// The packed image sequence length of an `h`×`w` latent: FLUX packs 2×2 patches (`(h/2)·(w/2)`).
pub fn image_seq_len(latent_h: usize, latent_w: usize) -> usize {
    (latent_h / 2) * (latent_w / 2)
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` with FluxPipeline's sigmas.
pub struct FlowMatchEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
}

impl FlowMatchEuler {
    /// The schedule for `steps` steps of `config`; `image_seq_len` (see [`image_seq_len`]) sets `mu` when the config
    /// uses dynamic shifting.
    pub fn new(config: &SchedulerConfig, steps: usize, image_seq_len: Option<usize>) -> Result<Self> {
        let cfg = FlowMatchConfig::from_config(config)?;
        let mut sigmas = cfg.sigmas(steps, image_seq_len)?;
        let t = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| (s * t) as f64).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEuler { timesteps, sigmas })
    }
}

impl Scheduler for FlowMatchEuler {
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
    /// `sample + (σ_{i+1} − σ_i)·v`, in f32 (diffusers upcasts the sample to float32 before the update).
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        let dt = self.sigmas[step + 1] - self.sigmas[step];
        let sample = sample.to_dtype(candle_core::DType::F32)?;
        let v = model_output.to_dtype(candle_core::DType::F32)?;
        Ok((sample + mul_s(&v, dt)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json).unwrap()
    }

    #[test]
    fn mu_at_the_reference_lengths() {
        let c = FlowMatchConfig::from_config(&cfg(r#"{"use_dynamic_shifting": true}"#)).unwrap();
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert_eq!(image_seq_len(128, 128), 4096);
        assert_eq!(image_seq_len(13, 9), 24);
    }

    #[test]
    fn schnell_schedule_is_linear_and_ends_at_zero() {
        let s = FlowMatchEuler::new(&cfg(r#"{"shift": 1.0, "use_dynamic_shifting": false}"#), 4, None).unwrap();
        assert_eq!(s.sigmas().unwrap(), &[1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(s.timesteps(), &[1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(s.init_noise_sigma(), 1.0);
    }

    #[test]
    fn dynamic_shifting_needs_the_size_and_refuses_what_is_not_implemented() {
        let dev = cfg(r#"{"use_dynamic_shifting": true, "shift": 3.0}"#);
        assert!(matches!(FlowMatchEuler::new(&dev, 4, None), Err(Error::InvalidArgument(_))));
        for (key, value) in [
            ("invert_sigmas", "true"),
            ("shift_terminal", "0.1"),
            ("use_karras_sigmas", "true"),
            ("use_exponential_sigmas", "true"),
            ("use_beta_sigmas", "true"),
            ("stochastic_sampling", "true"),
            ("use_flow_sigmas", "true"),
            ("time_shift_type", "\"cosine\""),
        ] {
            let e = FlowMatchEuler::new(&cfg(&format!("{{\"{key}\": {value}}}")), 4, Some(16)).err().unwrap();
            assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains(key), "{key}: {e}");
        }
        // Their defaults (as diffusers writes them) are accepted; shift_terminal 0 is "off" in diffusers too.
        FlowMatchEuler::new(
            &cfg(r#"{"invert_sigmas": false, "shift_terminal": null, "use_karras_sigmas": false,
                     "stochastic_sampling": false, "time_shift_type": "linear", "use_dynamic_shifting": true}"#),
            4,
            Some(16),
        )
        .unwrap();
        FlowMatchEuler::new(&cfg(r#"{"shift_terminal": 0.0}"#), 4, None).unwrap();
        let e = FlowMatchEuler::new(&cfg(r#"{"shift": "3"}"#), 4, None).err().unwrap();
        assert!(matches!(e, Error::Format(_)) && e.to_string().contains("shift"), "{e}");
    }
}
