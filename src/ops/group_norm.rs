//! Group normalisation (PyTorch `nn.GroupNorm`, affine), optionally followed by SiLU — the pair every resnet starts
//! with. Mean and variance are computed in f32 or better (two-pass, biased variance as PyTorch), whatever the input
//! dtype. f32 CPU tensors go through one fused kernel (`ops::cpu::norm`), CUDA tensors (a `cuda` build) through the
//! fused CUDA kernel (`kernels/group_norm.cu`: chunked Welford statistics, then one normalising pass); other dtypes on
//! the CPU through a candle composition ([`group_norm_reference`]), the reference both kernels are tested against.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::ops::OpTarget;
use crate::ops::cpu::{self, is_cpu_f32};

/// Normalise `x` `[B, C, ...]` over `groups` channel groups (and all spatial positions), then scale by `weight` `[C]`
/// and shift by `bias` `[C]`; apply SiLU when `silu`. Returns `x`'s dtype.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let (c, spatial) = check(x, groups, weight, bias)?;
    crate::ops::activation::enter(crate::ops::activation::bytes_like(x, x.elem_count()))?;
    #[cfg(feature = "cuda")]
    if crate::ops::cuda::group_norm::supported(x, groups) {
        return Ok(crate::ops::cuda::group_norm::group_norm(x, groups, weight, bias, eps, silu)?);
    }
    if !(is_cpu_f32(x) && is_cpu_f32(weight) && is_cpu_f32(bias)) {
        return group_norm_reference(x, groups, weight, bias, eps, silu);
    }
    let mut out = vec![0f32; x.elem_count()];
    cpu::with_f32(x, |xs| {
        cpu::with_f32(weight, |w| {
            cpu::with_f32(bias, |b| cpu::norm::group_norm(xs, &mut out, c, spatial, groups, w, b, eps, silu))
        })
    })???; // one `?` per `with_f32`
    cpu::f32_tensor(out, x.shape())
}

/// Validate the shapes; returns `(channels, spatial elements per channel)`.
fn check(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor) -> Result<(usize, usize)> {
    let dims = x.dims();
    if dims.len() < 2 {
        return Err(Error::invalid("group_norm: input must be [B, C, ...]"));
    }
    let c = dims[1];
    if groups == 0 || c % groups != 0 {
        return Err(Error::invalid(format!("group_norm: {c} channels not divisible into {groups} groups")));
    }
    if weight.elem_count() != c || bias.elem_count() != c {
        return Err(Error::invalid(format!(
            "group_norm: weight {:?} and bias {:?} must have {c} elements",
            weight.dims(),
            bias.dims()
        )));
    }
    Ok((c, dims[2..].iter().product()))
}

/// The candle composition of [`group_norm`] (f32 statistics, up to three f32 copies of the input): the path for
/// f16/bf16 and CUDA, and the reference the kernel is tested against.
pub fn group_norm_reference(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    check(x, groups, weight, bias)?;
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
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

/// Transient bytes of one [`group_norm`] call on `elems` elements beyond its input and output, on the path `target`
/// selects ([`OpTarget::new`]; a bare `DType` means the composition's, the larger): the candle composition (CUDA,
/// f16/bf16) holds at most three f32 copies of the input at once (the f32 input, the centred values, the squared or
/// scaled values); the f32 CPU kernel needs none; the CUDA kernel a statistics buffer of 12 bytes per chunk of
/// 8192 elements of a group — at most `12 · (elems / 8192 + B·G)`, bounded here for `B·G ≤ 4096` (batch 128 at 32
/// groups).
pub fn group_norm_scratch_bytes(elems: usize, target: impl Into<OpTarget>) -> u64 {
    // The kernels allocate only their output (a strided input would add one contiguous copy; no model passes one).
    let target = target.into();
    if target.cuda_kernels {
        12 * (elems as u64 / 8192 + 4096)
    } else if target.cpu_kernels {
        0
    } else {
        3 * 4 * elems as u64
    }
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
        assert!(d < 1e-6, "fused silu differs from silu after by {d}");
        let yh = super::group_norm(&x.to_dtype(DType::F16).unwrap(), g, &w, &bias, 1e-5, false).unwrap();
        assert_eq!(yh.dtype(), DType::F16);
    }

    use crate::ops::cpu::testing::max_err;

    /// The kernel against the candle composition at UNet/VAE channel counts (spatial sizes cut down) and odd shapes.
    #[test]
    fn kernel_matches_composition() {
        let dev = Device::Cpu;
        let shapes: &[(&[usize], usize)] = &[
            (&[2, 320, 8, 8], 32),
            (&[2, 640, 5, 7], 32),
            (&[2, 1280, 3, 3], 32),
            (&[1, 128, 33, 17], 32),
            (&[2, 6, 1, 1], 3),
            (&[3, 10, 13], 5),
            (&[2, 4], 2),
            (&[1, 32, 50, 50], 32), // groups longer than one statistics block, partial last block
        ];
        let mut worst = 0f32;
        for &(shape, g) in shapes {
            let c = shape[1];
            let x = Tensor::randn(0f32, 1.0, shape, &dev).unwrap().affine(3.0, 0.7).unwrap();
            let w = Tensor::randn(1f32, 0.3, c, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c, &dev).unwrap();
            for eps in [1e-5, 1e-6] {
                for silu in [false, true] {
                    let y = super::group_norm(&x, g, &w, &b, eps, silu).unwrap();
                    let r = super::group_norm_reference(&x, g, &w, &b, eps, silu).unwrap();
                    assert_eq!(y.dims(), shape);
                    let (d, m) = max_err(&y, &r);
                    worst = worst.max(d / m.max(1.0));
                    assert!(d <= 2e-6 * m.max(1.0), "{shape:?} g{g} eps{eps} silu{silu}: max err {d} (max |y| {m})");
                }
            }
        }
        println!("group_norm kernel vs composition: worst max-abs error / max(1, max |y|) = {worst:e}");
    }

    #[test]
    fn kernel_is_deterministic_and_thread_count_independent() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 320, 16, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 320, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 320, &dev).unwrap();
        crate::ops::cpu::testing::assert_thread_count_independent(&|| super::group_norm(&x, 32, &w, &b, 1e-6, true).unwrap());
    }

    #[test]
    fn strided_input_and_bad_shapes() {
        let dev = Device::Cpu;
        let (w, b) = (Tensor::randn(1f32, 0.3, 8, &dev).unwrap(), Tensor::randn(0f32, 0.3, 8, &dev).unwrap());
        let perm = Tensor::randn(0f32, 1.0, (2, 6, 8, 7), &dev).unwrap().permute((0, 2, 1, 3)).unwrap();
        assert!(!perm.is_contiguous());
        let y = super::group_norm(&perm, 4, &w, &b, 1e-5, true).unwrap();
        let r = super::group_norm_reference(&perm, 4, &w, &b, 1e-5, true).unwrap();
        assert!(max_err(&y, &r).0 < 1e-5);
        assert!(super::group_norm(&perm, 3, &w, &b, 1e-5, true).is_err()); // 8 channels, 3 groups
        assert!(super::group_norm(&perm, 0, &w, &b, 1e-5, true).is_err());
        let w7 = Tensor::ones(7, DType::F32, &dev).unwrap();
        assert!(super::group_norm(&perm, 4, &w7, &b, 1e-5, true).is_err());
        assert!(super::group_norm(&Tensor::ones(5, DType::F32, &dev).unwrap(), 1, &w, &b, 1e-5, true).is_err());
    }
}
