//! `y = x Wᵀ + b` over the last dimension (PyTorch `nn.Linear`). f32 CPU tensors: one GEMM (the `gemm` crate)
//! into an output pre-filled with the bias, so the bias costs no extra pass or buffer; other dtypes and CUDA: candle's
//! matmul + broadcast_add ([`linear_reference`]).

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::ops::cpu::{self, is_cpu_f32};

/// Apply a linear layer: `x` is `[..., in]`, `weight` is `[out, in]`, `bias` (if any) is `[out]`; returns `[..., out]`.
///
/// Scratch: none beyond the output (plus a contiguous copy of `x` or `weight` when strided).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, in_f, out_f, out_shape) = check(x, weight, bias)?;
    super::activation::enter(super::activation::bytes_like(x, rows * out_f))?;
    if !(is_cpu_f32(x) && is_cpu_f32(weight) && bias.is_none_or(is_cpu_f32)) {
        return linear_reference(x, weight, bias);
    }
    let mut out = vec![0f32; rows * out_f];
    if let Some(b) = bias {
        cpu::with_f32(b, |b| {
            for row in out.chunks_exact_mut(out_f) {
                row.copy_from_slice(b);
            }
        })?;
    }
    cpu::with_f32(x, |xs| cpu::with_f32(weight, |w| gemm_xwt(&mut out, xs, w, rows, out_f, in_f, bias.is_some())))??;
    cpu::f32_tensor(out, out_shape)
}

/// Validate the shapes; returns `(rows, in, out, output shape)`.
fn check(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize, Vec<usize>)> {
    let (out_f, in_f) = weight.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(Error::invalid("linear: input must have at least one dimension"));
    };
    if last != in_f {
        return Err(Error::invalid(format!("linear: input has {last} features, weight expects {in_f}")));
    }
    if let Some(b) = bias {
        if b.elem_count() != out_f {
            return Err(Error::invalid(format!("linear: bias {:?} must have {out_f} elements", b.dims())));
        }
    }
    let mut out_shape = lead.to_vec();
    out_shape.push(out_f);
    Ok((lead.iter().product(), in_f, out_f, out_shape))
}

/// `dst` (`m × n`, row-major) `= x · wᵀ`, or `+=` when `accumulate`, for row-major `x` `m × k` and `w` `n × k`
/// (a Linear weight), with the `gemm` crate over the current rayon pool. Its blocking depends on the shapes only and
/// each output element's k-sum is accumulated in one fixed order, so the result does not depend on the thread count.
pub(crate) fn gemm_xwt(dst: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize, accumulate: bool) {
    assert!(dst.len() == m * n && x.len() == m * k && w.len() == n * k, "gemm_xwt: slice lengths do not match m, n, k");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let threads = cpu::threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the three slices hold exactly m·n, m·k and n·k elements (asserted above), and the strides below address
    // only those: dst[i, j] at i·n + j, lhs = x[i, l] at i·k + l, rhs = wᵀ[l, j] = w[j, l] at j·k + l. `dst` is a
    // unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Candle's matmul + broadcast_add: the path for f16/bf16 and CUDA, and the kernel's test reference.
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, in_f, _, out_shape) = check(x, weight, bias)?;
    let x2 = x.contiguous()?.reshape((rows, in_f))?;
    let mut y = x2.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y.reshape(out_shape)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn linear_matches_manual_sum() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2., 3.], [4., 5., 6.]]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0., -1.], [0.5, 0.5, 0.5]], &dev).unwrap();
        let b = Tensor::new(&[10f32, -1.], &dev).unwrap();
        let y = super::linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2]);
        let v: Vec<Vec<f32>> = y.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v, vec![vec![8.0, 2.0], vec![8.0, 6.5]]);
    }

    use crate::ops::cpu::testing::max_err;

    #[test]
    fn kernel_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        let mut worst = 0f32;
        for &(lead, k, n) in &[(&[2usize, 64][..], 320usize, 320usize), (&[2, 77], 768, 320), (&[3, 5], 7, 9), (&[1], 1, 1), (&[37], 1280, 10)] {
            let mut shape = lead.to_vec();
            shape.push(k);
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap() / (k as f64).sqrt()).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            for bias in [Some(&b), None] {
                let y = super::linear(&x, &w, bias).unwrap();
                let r = super::linear_reference(&x, &w, bias).unwrap();
                assert_eq!(y.dims(), r.dims());
                let (d, m) = max_err(&y, &r);
                worst = worst.max(d / m.max(1.0));
                assert!(d <= 2e-6 * m.max(1.0), "{shape:?}→{n}: max err {d} (max |y| {m})");
            }
        }
        println!("linear kernel vs matmul+bias: worst max-abs error / max(1, max |y|) = {worst:e}");
    }

    #[test]
    fn kernel_is_deterministic_and_thread_count_independent() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 300, 320), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (640, 320), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 640, &dev).unwrap();
        crate::ops::cpu::testing::assert_thread_count_independent(&|| super::linear(&x, &w, Some(&b)).unwrap());
    }

    #[test]
    fn strided_weight_bad_shapes_and_other_dtypes() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap().t().unwrap(); // [5, 6], strided
        let y = super::linear(&x, &wt, None).unwrap();
        let r = super::linear_reference(&x, &wt, None).unwrap();
        assert!(max_err(&y, &r).0 < 1e-5);
        assert!(super::linear(&x, &wt, Some(&Tensor::ones(4, DType::F32, &dev).unwrap())).is_err());
        assert!(super::linear(&Tensor::ones((4, 5), DType::F32, &dev).unwrap(), &wt, None).is_err());
        let xh = x.to_dtype(DType::F16).unwrap();
        let yh = super::linear(&xh, &wt.to_dtype(DType::F16).unwrap(), None).unwrap();
        assert_eq!(yh.dtype(), DType::F16);
    }
}
