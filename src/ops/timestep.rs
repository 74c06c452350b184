//! Sinusoidal timestep embedding (diffusers' `get_timestep_embedding`, max period 10000, scale 1).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// `[N, dim]` f32 embedding of `timesteps`: frequencies `exp(-ln(10000)·i / (dim/2 − freq_shift))`, `[sin | cos]`
/// (or `[cos | sin]` when `flip_sin_to_cos`), zero-padded when `dim` is odd. Computed in f32 like PyTorch.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((ln * i as f32) / denom).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    #[test]
    fn first_frequency_is_one() {
        let e = super::timestep_embedding(&[2.0], 8, true, 0.0, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = e.to_vec2().unwrap();
        assert!((v[0][0] - 2f32.cos()).abs() < 1e-6);
        assert!((v[0][4] - 2f32.sin()).abs() < 1e-6);
    }
}
