//! Layer normalisation over the last dimension (PyTorch `nn.LayerNorm`, affine); statistics in f32.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Normalise `x` `[..., C]` over its last dimension, scale by `weight` `[C]`, shift by `bias` `[C]`. Returns `x`'s dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let normed = {
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        drop(xf);
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
    };
    let y = normed.broadcast_mul(&weight.to_dtype(DType::F32)?)?.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    Ok(y.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn rows_have_zero_mean_unit_variance() {
        let dev = Device::Cpu;
        let x = Tensor::randn(3f32, 2.0, (2, 4, 16), &dev).unwrap();
        let w = Tensor::ones(16, candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(16, candle_core::DType::F32, &dev).unwrap();
        let y = super::layer_norm(&x, &w, &b, 1e-5).unwrap();
        let rows: Vec<Vec<f32>> = y.reshape((8, 16)).unwrap().to_vec2().unwrap();
        for r in rows {
            let m: f32 = r.iter().sum::<f32>() / 16.0;
            let v: f32 = r.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / 16.0;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3, "mean {m} var {v}");
        }
    }
}
