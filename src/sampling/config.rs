//! A diffusers `scheduler_config.json`, and its resolution for the scheduler being built.
//!
//! Pipelines build their sampler with `XScheduler.from_config(model_config)`: keys the scheduler's `__init__`
//! takes are used, keys it does not take are ignored, and keys the file lacks take *that scheduler's* default
//! (they differ: SD 1.5's file has no `timestep_spacing`, so Euler, Euler ancestral and DPM-Solver use
//! `linspace` while DDIM uses `leading`). [`SchedulerConfig`] keeps what the file says; [`SchedulerConfig::resolve`]
//! applies one scheduler's defaults and refuses, naming the key, any setting that scheduler would honour but we
//! do not implement.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::SchedulerKind;
use crate::{Error, Result};

/// Largest `num_train_timesteps` accepted (diffusers' models use 1000).
pub const MAX_TRAIN_TIMESTEPS: i64 = 100_000;

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, T)`.
    Linear,
    /// `torch.linspace(beta_start**0.5, beta_end**0.5, T) ** 2` (Stable Diffusion).
    ScaledLinear,
}

/// `prediction_type`: what the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise (SD 1.x, SD 2.x base).
    Epsilon,
    /// The velocity `alpha·eps − sigma·x0` (SD 2.x 768-v).
    VPrediction,
}

/// `timestep_spacing`: how inference timesteps are placed among the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The contents of a diffusers `scheduler_config.json`, as written (absent keys stay `None`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    /// DDIM only.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM only (Euler and DPM-Solver do not take it).
    pub clip_sample: Option<bool>,
    /// DDIM only.
    pub clip_sample_range: Option<f64>,
    /// Euler and DPM-Solver only.
    pub use_karras_sigmas: Option<bool>,
    /// Every other key with its value, checked against the scheduler being built by [`SchedulerConfig::resolve`].
    pub other: BTreeMap<String, Value>,
}

/// A [`SchedulerConfig`] with one scheduler's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub use_karras_sigmas: bool,
}

/// Python's `json` writes `Infinity`, `-Infinity` and `NaN` (e.g. DPM-Solver's `lambda_min_clipped`), which are
/// not JSON; turn those bare tokens into strings so the file parses, and read them back as floats.
fn quote_nonfinite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_str {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_str = false;
            }
            rest = &rest[ch.len_utf8()..];
            continue;
        }
        if ch == '"' {
            in_str = true;
            out.push(ch);
            rest = &rest[1..];
            continue;
        }
        let mut matched = false;
        for tok in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(tok) {
                out.push('"');
                out.push_str(tok);
                out.push('"');
                rest = &rest[tok.len()..];
                matched = true;
                break;
            }
        }
        if !matched {
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

fn as_f64(key: &str, v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| Error::format(format!("scheduler_config: `{key}` is not a number"))),
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        _ => Err(Error::format(format!("scheduler_config: `{key}` must be a number, got {v}"))),
    }
}

fn as_int(key: &str, v: &Value) -> Result<i64> {
    // diffusers writes ints; tolerate 1.0 as well.
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Ok(i);
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                _ => Err(Error::format(format!("scheduler_config: `{key}` must be an integer, got {v}"))),
            }
        }
        _ => Err(Error::format(format!("scheduler_config: `{key}` must be an integer, got {v}"))),
    }
}

fn as_bool(key: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| Error::format(format!("scheduler_config: `{key}` must be true or false, got {v}")))
}

fn as_str<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str().ok_or_else(|| Error::format(format!("scheduler_config: `{key}` must be a string, got {v}")))
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text)
    }

    /// Parses the text of a `scheduler_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(&quote_nonfinite(text))
            .map_err(|e| Error::format(format!("scheduler_config: {e}")))?;
        Self::from_value(&value)
    }

    /// Builds from an already-parsed JSON object. Value types are checked for the keys we read; a `null` is
    /// treated as absent (diffusers writes `"trained_betas": null`).
    pub fn from_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::format("scheduler_config: expected a JSON object"))?;
        let mut c = SchedulerConfig::default();
        for (key, v) in obj {
            if v.is_null() {
                continue;
            }
            match key.as_str() {
                "num_train_timesteps" => {
                    let n = as_int(key, v)?;
                    if n < 2 {
                        return Err(Error::invalid(format!("scheduler_config: num_train_timesteps = {n} (needs ≥ 2)")));
                    }
                    // The schedules are tables of this length: bound it before anything is sized from it.
                    if n > MAX_TRAIN_TIMESTEPS {
                        return Err(Error::format(format!(
                            "scheduler_config: num_train_timesteps = {n} is out of range (at most {MAX_TRAIN_TIMESTEPS})"
                        )));
                    }
                    c.num_train_timesteps = Some(n as usize);
                }
                "beta_start" => c.beta_start = Some(as_f64(key, v)?),
                "beta_end" => c.beta_end = Some(as_f64(key, v)?),
                "beta_schedule" => {
                    c.beta_schedule = Some(match as_str(key, v)? {
                        "linear" => BetaSchedule::Linear,
                        "scaled_linear" => BetaSchedule::ScaledLinear,
                        other => {
                            return Err(Error::unsupported(format!(
                                "scheduler_config key `beta_schedule` = \"{other}\" (supported: linear, scaled_linear)"
                            )))
                        }
                    })
                }
                "prediction_type" => {
                    c.prediction_type = Some(match as_str(key, v)? {
                        "epsilon" => PredictionType::Epsilon,
                        "v_prediction" => PredictionType::VPrediction,
                        other => {
                            return Err(Error::unsupported(format!(
                                "scheduler_config key `prediction_type` = \"{other}\" (supported: epsilon, v_prediction)"
                            )))
                        }
                    })
                }
                "timestep_spacing" => {
                    c.timestep_spacing = Some(match as_str(key, v)? {
                        "linspace" => TimestepSpacing::Linspace,
                        "leading" => TimestepSpacing::Leading,
                        "trailing" => TimestepSpacing::Trailing,
                        other => {
                            return Err(Error::unsupported(format!(
                                "scheduler_config key `timestep_spacing` = \"{other}\" (supported: leading, linspace, trailing)"
                            )))
                        }
                    })
                }
                "steps_offset" => c.steps_offset = Some(as_int(key, v)?),
                "set_alpha_to_one" => c.set_alpha_to_one = Some(as_bool(key, v)?),
                "clip_sample" => c.clip_sample = Some(as_bool(key, v)?),
                "clip_sample_range" => c.clip_sample_range = Some(as_f64(key, v)?),
                "use_karras_sigmas" => c.use_karras_sigmas = Some(as_bool(key, v)?),
                _ => {
                    c.other.insert(key.clone(), v.clone());
                }
            }
        }
        Ok(c)
    }

    /// SD 1.5's `scheduler_config.json` (PNDMScheduler's, as shipped).
    pub fn sd15() -> Self {
        Self::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
                "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#,
        )
        .expect("built-in config parses")
    }

    /// The configuration `kind`'s diffusers class would run with: its defaults for absent keys. Errors with
    /// [`Error::Unsupported`], naming the key, when the file sets something that class honours and we do not
    /// implement; keys the class does not take are ignored, as `from_config` ignores them.
    pub fn resolve(&self, kind: SchedulerKind) -> Result<ResolvedConfig> {
        let class = kind.diffusers_class();
        // Keys the class takes whose non-default values we do not implement: (key, default).
        let fixed: &[(&str, Value)] = &match kind {
            SchedulerKind::Euler => vec![
                ("trained_betas", Value::Null),
                ("interpolation_type", Value::from("linear")),
                ("use_exponential_sigmas", Value::from(false)),
                ("use_beta_sigmas", Value::from(false)),
                ("sigma_min", Value::Null),
                ("sigma_max", Value::Null),
                ("timestep_type", Value::from("discrete")),
                ("rescale_betas_zero_snr", Value::from(false)),
                ("final_sigmas_type", Value::from("zero")),
            ],
            SchedulerKind::EulerAncestral => {
                vec![("trained_betas", Value::Null), ("rescale_betas_zero_snr", Value::from(false))]
            }
            SchedulerKind::Ddim => vec![
                ("trained_betas", Value::Null),
                ("thresholding", Value::from(false)),
                ("rescale_betas_zero_snr", Value::from(false)),
            ],
            SchedulerKind::DpmPP2M => vec![
                ("trained_betas", Value::Null),
                ("solver_order", Value::from(2)),
                ("thresholding", Value::from(false)),
                ("algorithm_type", Value::from("dpmsolver++")),
                ("solver_type", Value::from("midpoint")),
                ("lower_order_final", Value::from(true)),
                ("euler_at_final", Value::from(false)),
                ("use_exponential_sigmas", Value::from(false)),
                ("use_beta_sigmas", Value::from(false)),
                ("use_lu_lambdas", Value::from(false)),
                ("use_flow_sigmas", Value::from(false)),
                ("final_sigmas_type", Value::from("zero")),
                ("lambda_min_clipped", Value::from("-Infinity")),
                ("variance_type", Value::Null),
                ("rescale_betas_zero_snr", Value::from(false)),
                ("use_dynamic_shifting", Value::from(false)),
            ],
        };
        for (key, default) in fixed {
            let Some(v) = self.other.get(*key) else { continue };
            let same = match (v, default) {
                (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                (Value::String(a), Value::String(b)) => a == b,
                (a, b) => a == b,
            };
            if !same {
                return Err(Error::unsupported(format!(
                    "scheduler_config key `{key}` = {v} ({class} is implemented with `{key}` = {default} only)"
                )));
            }
        }
        let takes_clip = matches!(kind, SchedulerKind::Ddim);
        let takes_karras = matches!(kind, SchedulerKind::Euler | SchedulerKind::DpmPP2M);
        let r = ResolvedConfig {
            num_train_timesteps: self.num_train_timesteps.unwrap_or(1000),
            beta_start: self.beta_start.unwrap_or(0.0001),
            beta_end: self.beta_end.unwrap_or(0.02),
            beta_schedule: self.beta_schedule.unwrap_or(BetaSchedule::Linear),
            prediction_type: self.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: self.timestep_spacing.unwrap_or(match kind {
                SchedulerKind::Ddim => TimestepSpacing::Leading,
                _ => TimestepSpacing::Linspace,
            }),
            steps_offset: self.steps_offset.unwrap_or(0),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
            clip_sample: takes_clip && self.clip_sample.unwrap_or(true),
            clip_sample_range: self.clip_sample_range.unwrap_or(1.0),
            use_karras_sigmas: takes_karras && self.use_karras_sigmas.unwrap_or(false),
        };
        if !(r.beta_start.is_finite() && r.beta_end.is_finite() && r.beta_start >= 0.0 && r.beta_end < 1.0) {
            return Err(Error::invalid(format!(
                "scheduler_config: beta_start = {}, beta_end = {} (need 0 ≤ beta < 1)",
                r.beta_start, r.beta_end
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_num_train_timesteps_is_a_format_error_naming_the_key() {
        for v in ["4294967295", "18446744073709551615", "1e300"] {
            let e = SchedulerConfig::from_json_str(&format!("{{\"num_train_timesteps\": {v}}}")).unwrap_err();
            assert!(matches!(e, Error::Format(_)) && e.to_string().contains("num_train_timesteps"), "{v}: {e}");
        }
    }

    #[test]
    fn sd15_defaults_differ_per_scheduler() {
        let c = SchedulerConfig::sd15();
        assert_eq!(c.other.get("skip_prk_steps"), Some(&Value::Bool(true)));
        let e = c.resolve(SchedulerKind::Euler).unwrap();
        assert_eq!(e.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(e.steps_offset, 1);
        assert_eq!(e.beta_schedule, BetaSchedule::ScaledLinear);
        let d = c.resolve(SchedulerKind::Ddim).unwrap();
        assert_eq!(d.timestep_spacing, TimestepSpacing::Leading);
        assert!(!d.set_alpha_to_one && !d.clip_sample);
        // An empty config: DDIM clips and sets alpha to one by default.
        let d = SchedulerConfig::from_json_str("{}").unwrap().resolve(SchedulerKind::Ddim).unwrap();
        assert!(d.set_alpha_to_one && d.clip_sample);
        assert_eq!(d.beta_schedule, BetaSchedule::Linear);
    }

    #[test]
    fn nonfinite_tokens_parse() {
        let c = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "_note": "x -Infinity \" NaN", "solver_order": 2}"#,
        )
        .unwrap();
        assert_eq!(c.other["lambda_min_clipped"], Value::from("-Infinity"));
        assert_eq!(c.other["_note"], Value::from("x -Infinity \" NaN"));
        c.resolve(SchedulerKind::DpmPP2M).unwrap();
        let c = SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -5.1}"#).unwrap();
        let e = c.resolve(SchedulerKind::DpmPP2M).unwrap_err().to_string();
        assert!(e.contains("lambda_min_clipped"), "{e}");
        // Euler does not take lambda_min_clipped: ignored, as from_config ignores it.
        c.resolve(SchedulerKind::Euler).unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = SchedulerConfig::from_json_str(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)));
        assert!(e.to_string().contains("beta_schedule"), "{e}");
        let e = SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("prediction_type"), "{e}");
        let e = SchedulerConfig::from_json_str(r#"{"steps_offset": "one"}"#).unwrap_err();
        assert!(matches!(e, Error::Format(_)) && e.to_string().contains("steps_offset"), "{e}");
        let e = SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 0.2]}"#)
            .unwrap()
            .resolve(SchedulerKind::Euler)
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("trained_betas"), "{e}");
        let e = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#)
            .unwrap()
            .resolve(SchedulerKind::Ddim)
            .unwrap_err();
        assert!(e.to_string().contains("thresholding"), "{e}");
        let e = SchedulerConfig::from_json_str(r#"{"solver_order": 3}"#)
            .unwrap()
            .resolve(SchedulerKind::DpmPP2M)
            .unwrap_err();
        assert!(e.to_string().contains("solver_order"), "{e}");
        // Integers written as floats are accepted where diffusers compares numerically.
        SchedulerConfig::from_json_str(r#"{"solver_order": 2.0}"#).unwrap().resolve(SchedulerKind::DpmPP2M).unwrap();
    }
}
