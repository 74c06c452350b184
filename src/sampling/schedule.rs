//! The numerics diffusers' schedulers share, reproduced operation by operation.
//!
//! diffusers mixes precisions: the training schedule (`betas`, `alphas_cumprod`) is built with torch in
//! `float32`; inference timesteps and sigma interpolation run in numpy `float64` (sometimes from `float32`
//! inputs) and are cast back to `float32`; the per-step scalars are 0-dim `float32` tensors. Each helper here
//! states which of these it mirrors. Small differences matter: near `t = 0`, `sigma = sqrt((1 − ᾱ)/ᾱ)` loses
//! four digits to cancellation, so one ulp of `ᾱ` moves sigma_min by ~3e-5 relative.

use super::config::{BetaSchedule, ResolvedConfig, TimestepSpacing};

/// `torch.linspace(start, end, n, dtype=torch.float32)` on CPU, bit for bit (torch 2.15.0).
///
/// ATen's CPU kernel computes `step = (end − start) / (n − 1)` in float, then `start + step·i` for the first half
/// and `end − step·(n − 1 − i)` for the second; the x86-64 build contracts both to a fused multiply-add, which is
/// what the fixtures show (an unfused evaluation differs from torch in ~25 % of the 1000 betas).
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let s = start as f32;
    let e = end as f32;
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / ((n - 1) as f32);
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { step.mul_add(i as f32, s) } else { (-step).mul_add((n - 1 - i) as f32, e) })
        .collect()
}

/// `alphas_cumprod` (float32) as diffusers' schedulers build it: betas by torch.linspace (squared for
/// scaled_linear), `alphas = 1.0 − betas` in float32, and `torch.cumprod`, whose CPU kernel accumulates in double
/// and stores each partial product as float.
pub fn alphas_cumprod(cfg: &ResolvedConfig) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    let betas: Vec<f32> = match cfg.beta_schedule {
        BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
        BetaSchedule::ScaledLinear => torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
    };
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// `((1 − ᾱ) / ᾱ) ** 0.5` elementwise in float32 (torch; `** 0.5` is a correctly rounded sqrt), ascending in t.
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0f32 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, num)` in float64: `i·((stop − start)/(num − 1)) + start`, the last element set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for float64 arguments with a negative step, as numpy fills it: length
/// `ceil((stop − start)/step)`, elements `start + i·delta` with `delta = (start + step) − start`.
pub fn np_arange_desc(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !(len > 0.0) {
        return Vec::new();
    }
    let len = len as usize;
    let first = start;
    let second = start + step;
    let delta = second - first;
    (0..len)
        .map(|i| match i {
            0 => first,
            1 => second,
            _ => first + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)` for `x` inside `[0, len − 1]` (numpy's arr_interp: exact hits and the
/// right end return the table value; otherwise `slope·(x − x_j) + fp_j`).
pub fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    slope * (x - j as f64) + y0
}

/// Karras et al. (2022) sigmas, rho = 7, in float64 as diffusers' `_convert_to_karras` computes them.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to `sigma`, against
/// `log_sigmas` (float32, ascending in t).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last log_sigma ≤ log_sigma (argmax of the cumulative count), 0 if none; at most n − 2.
    let mut low = 0usize;
    for (j, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low = j;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let lo = log_sigmas[low] as f64;
    let hi = log_sigmas[high] as f64;
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `np.log` of the float32 training sigmas (float32 results).
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// Inference timesteps of the Euler family (`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`), float32.
pub fn euler_timesteps(cfg: &ResolvedConfig, steps: usize) -> Vec<f32> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, T − 1, N, dtype=float32)[::-1]: computed in float64, cast.
            np_linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(|x| x as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| np_round((i * ratio) as f64) as f32 + cfg.steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / steps as f64;
            np_arange_desc(t as f64, 0.0, -ratio).into_iter().map(|x| np_round(x) as f32 - 1.0).collect()
        }
    }
}

/// Inference timesteps of `DDIMScheduler` (int64).
pub fn ddim_timesteps(cfg: &ResolvedConfig, steps: usize) -> Vec<i64> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(|x| np_round(x) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps).rev().map(|i| (i * ratio) as i64 + cfg.steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / steps as f64;
            np_arange_desc(t as f64, 0.0, -ratio).into_iter().map(|x| np_round(x) as i64 - 1).collect()
        }
    }
}

/// Inference timesteps of `DPMSolverMultistepScheduler` without Karras sigmas (int64). `lambda_min_clipped` is
/// −inf (the only value we accept), so the last usable timestep is `num_train_timesteps`.
pub fn dpm_timesteps(cfg: &ResolvedConfig, steps: usize) -> Vec<i64> {
    let t = cfg.num_train_timesteps;
    let last = t;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (last - 1) as f64, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .map(|x| np_round(x) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = last / (steps + 1);
            (1..=steps).rev().map(|i| (i * ratio) as i64 + cfg.steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / steps as f64;
            np_arange_desc(last as f64, 0.0, -ratio).into_iter().map(|x| np_round(x) as i64 - 1).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints_and_symmetry() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        let v = np_linspace(0.0, 999.0, 8);
        assert_eq!(v[7], 999.0);
        assert_eq!(v[1], 999.0 / 7.0);
    }

    #[test]
    fn arange_lengths() {
        assert_eq!(np_arange_desc(1000.0, 0.0, -125.0), vec![1000.0, 875.0, 750.0, 625.0, 500.0, 375.0, 250.0, 125.0]);
        assert_eq!(np_arange_desc(1000.0, 0.0, -50.0).len(), 20);
    }

    #[test]
    fn round_half_even() {
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(np_round(-0.5), -0.0);
    }
}
