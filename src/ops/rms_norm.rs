//! Root-mean-square layer norm (T5's `T5LayerNorm`, FLUX's q/k `RMSNorm`): `x / sqrt(mean(x²) + eps) · weight` over
//! the last dimension, with no mean subtraction and no bias.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// RMS norm of `x` over its last dimension times `weight` (shape `[last]`). The mean of squares and the division run
/// in f32 whatever x's dtype (as transformers and BFL compute them); the result has x's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let last = x.dim(D::Minus1)?;
    if weight.dims() != [last] {
        return Err(Error::invalid(format!(
            "rms_norm: weight of shape {:?} for a last dimension of {last}",
            weight.dims()
        )));
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    // transformers' T5LayerNorm casts back to the weight's dtype before the product when that is half precision;
    // the product in f32 then one rounding differs from it by at most one ulp of the half type.
    let w = weight.to_dtype(DType::F32)?;
    Ok(normed.broadcast_mul(&w)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_formula_and_checks_the_weight() {
        let x = Tensor::new(&[[1f32, -2., 3., 0.5], [0., 0., 0., 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2., 0.5, -1.], &Device::Cpu).unwrap();
        let y = rms_norm(&x, &w, 1e-6).unwrap().to_vec2::<f32>().unwrap();
        let xs = [[1f32, -2., 3., 0.5], [0., 0., 0., 4.]];
        let ws = [1f32, 2., 0.5, -1.];
        for (row, out) in xs.iter().zip(&y) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            for i in 0..4 {
                let want = row[i] / (ms + 1e-6).sqrt() * ws[i];
                assert!((out[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "{} vs {want}", out[i]);
            }
        }
        let bad = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        assert!(rms_norm(&x, &bad, 1e-6).is_err());
    }
}
