//! Layer normalisation over the last dimension (PyTorch `nn.LayerNorm`, affine); statistics in f32 or better.
//! f32 CPU tensors go through one fused kernel (`ops::cpu::norm`), other dtypes and CUDA through a candle
//! composition ([`layer_norm_reference`]).

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::ops::cpu::{self, is_cpu_f32};

/// Normalise `x` `[..., C]` over its last dimension, scale by `weight` `[C]`, shift by `bias` `[C]`. Returns `x`'s dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let width = check(x, weight, bias)?;
    if !(is_cpu_f32(x) && is_cpu_f32(weight) && is_cpu_f32(bias)) {
        return layer_norm_reference(x, weight, bias, eps);
    }
    let mut out = vec![0f32; x.elem_count()];
    cpu::with_f32(x, |xs| {
        cpu::with_f32(weight, |w| {
            cpu::with_f32(bias, |b| {
                cpu::norm::layer_norm(xs, &mut out, width, w, b, eps)
            })
        })
    })???; // one `?` per `with_f32`
    cpu::f32_tensor(out, x.shape())
}

/// Validate the shapes; returns the normalised width.
fn check(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<usize> {
    let Some(&width) = x.dims().last() else {
        return Err(Error::invalid(
            "layer_norm: input must have at least one dimension",
        ));
    };
    if width == 0 || weight.elem_count() != width || bias.elem_count() != width {
        return Err(Error::invalid(format!(
            "layer_norm: last dim {width}, weight {:?} and bias {:?} must all match",
            weight.dims(),
            bias.dims()
        )));
    }
    Ok(width)
}

/// The candle composition of [`layer_norm`]: the path for f16/bf16 and CUDA, and the kernel's test reference.
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    check(x, weight, bias)?;
    let dtype = x.dtype();
    let normed = {
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        drop(xf);
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
    };
    let y = normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    Ok(y.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

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

    #[test]
    fn kernel_matches_composition() {
        let dev = Device::Cpu;
        let shapes: &[&[usize]] = &[
            &[2, 64, 320],
            &[2, 16, 640],
            &[1, 9, 1280],
            &[2, 77, 768],
            &[3, 5, 7],
            &[1],
            &[130, 3],
        ];
        let mut worst = 0f32;
        for &shape in shapes {
            let c = *shape.last().unwrap();
            let x = Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .affine(2.0, 0.5)
                .unwrap();
            let w = Tensor::randn(1f32, 0.3, c, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c, &dev).unwrap();
            for eps in [1e-5, 1e-6] {
                let y = super::layer_norm(&x, &w, &b, eps).unwrap();
                let r = super::layer_norm_reference(&x, &w, &b, eps).unwrap();
                assert_eq!(y.dims(), shape);
                let (d, m) = crate::ops::cpu::testing::max_err(&y, &r);
                worst = worst.max(d / m.max(1.0));
                // 1e-5: a 3-wide row of nearly equal values (random data) amplifies the reference composition's own
                // cancellation error; seen 6e-6 once in many runs, typical 5e-7.
                assert!(
                    d <= 1e-5 * m.max(1.0),
                    "{shape:?} eps {eps}: max err {d} (max |y| {m})"
                );
            }
        }
        println!(
            "layer_norm kernel vs composition: worst max-abs error / max(1, max |y|) = {worst:e}"
        );
    }

    #[test]
    fn kernel_is_deterministic_and_thread_count_independent() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 333, 320), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 320, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 320, &dev).unwrap();
        crate::ops::cpu::testing::assert_thread_count_independent(&|| {
            super::layer_norm(&x, &w, &b, 1e-5).unwrap()
        });
    }

    #[test]
    fn bad_shapes_and_other_dtypes() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let (w, b) = (
            Tensor::ones(8, DType::F32, &dev).unwrap(),
            Tensor::zeros(8, DType::F32, &dev).unwrap(),
        );
        assert!(
            super::layer_norm(&x, &Tensor::ones(7, DType::F32, &dev).unwrap(), &b, 1e-5).is_err()
        );
        assert!(
            super::layer_norm(&x, &w, &Tensor::ones(9, DType::F32, &dev).unwrap(), 1e-5).is_err()
        );
        let xt = x
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap(); // strided view
        let y = super::layer_norm(&xt, &w, &b, 1e-5).unwrap();
        let r = super::layer_norm_reference(&x, &w, &b, 1e-5).unwrap();
        let (d, _) = crate::ops::cpu::testing::max_err(&y, &r);
        assert!(d < 1e-5);
        let yh = super::layer_norm(&x.to_dtype(DType::F16).unwrap(), &w, &b, 1e-5).unwrap();
        assert_eq!(yh.dtype(), DType::F16);
    }
}
