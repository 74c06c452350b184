//! Group normalisation (PyTorch `nn.GroupNorm`, affine), optionally followed by SiLU — the pair every resnet starts
//! with. Mean and variance are computed in f32 (two-pass, biased variance as PyTorch), whatever the input dtype.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Normalise `x` `[B, C, ...]` over `groups` channel groups (and all spatial positions), then scale by `weight` `[C]`
/// and shift by `bias` `[C]`; apply SiLU when `silu`. Returns `x`'s dtype.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::invalid("group_norm: input must be [B, C, ...]"));
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        return Err(Error::invalid(format!("group_norm: {c} channels not divisible into {groups} groups")));
    }
    let dtype = x.dtype();
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    let normed = {
        let xf = x.to_dtype(DType::F32)?.contiguous()?.reshape((b, groups, ()))?;
        let mean = xf.mean_keepdim(2)?;
        let centered = xf.broadcast_sub(&mean)?;
        drop(xf);
        let var = centered.sqr()?.mean_keepdim(2)?;
        let inv_std = (var + eps)?.sqrt()?.recip()?;
        centered.broadcast_mul(&inv_std)?.reshape(dims.as_slice())?
    };
    let w = weight.to_dtype(DType::F32)?.reshape(affine_shape.as_slice())?;
    let bb = bias.to_dtype(DType::F32)?.reshape(affine_shape.as_slice())?;
    let mut y = normed.broadcast_mul(&w)?.broadcast_add(&bb)?;
    drop(normed);
    if silu {
        y = y.silu()?;
    }
    Ok(y.to_dtype(dtype)?)
}

/// Transient bytes of one [`group_norm`] call on `elems` elements beyond its input and output: at most three f32
/// copies of the input live at once (the f32 input, the centred values, and the squared or scaled values).
pub fn group_norm_scratch_bytes(elems: usize) -> u64 {
    3 * 4 * elems as u64
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// Straightforward per-group loop in f64, the reference.
    fn reference(x: &[f32], b: usize, c: usize, hw: usize, g: usize, w: &[f32], bias: &[f32], eps: f64) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let cg = c / g;
        for bi in 0..b {
            for gi in 0..g {
                let start = bi * c * hw + gi * cg * hw;
                let sl = &x[start..start + cg * hw];
                let mean = sl.iter().map(|&v| v as f64).sum::<f64>() / sl.len() as f64;
                let var = sl.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / sl.len() as f64;
                for (i, &v) in sl.iter().enumerate() {
                    let ch = gi * cg + i / hw;
                    out[start + i] = (((v as f64 - mean) / (var + eps).sqrt()) * w[ch] as f64 + bias[ch] as f64) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_and_fuses_silu() {
        let dev = Device::Cpu;
        let (b, c, h, wd, g) = (2, 8, 3, 5, 4);
        let x = Tensor::randn(0.5f32, 2.0, (b, c, h, wd), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, c, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.1, c, &dev).unwrap();
        let y = super::group_norm(&x, g, &w, &bias, 1e-5, false).unwrap();
        let r = reference(
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            b,
            c,
            h * wd,
            g,
            &w.to_vec1().unwrap(),
            &bias.to_vec1().unwrap(),
            1e-5,
        );
        let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let err = yv.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "max err {err}");
        let ys = super::group_norm(&x, g, &w, &bias, 1e-5, true).unwrap();
        let manual = y.silu().unwrap();
        let d = (ys - manual).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0);
        let yh = super::group_norm(&x.to_dtype(DType::F16).unwrap(), g, &w, &bias, 1e-5, false).unwrap();
        assert_eq!(yh.dtype(), DType::F16);
    }
}
