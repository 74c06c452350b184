//! GEGLU (diffusers' `GEGLU`): project to twice the width, split, `value · GELU(gate)` with the exact (erf) GELU.
//! f32 CPU tensors: the projection is a GEMM without bias into a block of rows, then one pass adds both biases and
//! writes `value · gelu(gate)` straight into the output; other dtypes and CUDA: [`geglu_reference`].

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::ops::cpu::{self, elementwise::gelu_erf, is_cpu_f32};
use crate::ops::linear::{gemm_xwt, linear};

/// Rows of the projection computed at once: bounds the projection scratch to `ROW_BLOCK · 2·inner` floats (5 MiB
/// for SD's 2·1280) instead of the whole `[rows, 2·inner]`, and keeps it in cache for the epilogue. Large enough that
/// the GEMM runs at full speed.
const ROW_BLOCK: usize = 512;

/// `x` `[..., in]`, `weight` `[2·inner, in]`, `bias` `[2·inner]` → `[..., inner]`: the first half of the projection
/// is the value, the second half the gate.
pub fn geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (two_inner, in_f) = weight.dims2()?;
    if two_inner % 2 != 0 {
        return Err(Error::invalid(format!("geglu: projection width {two_inner} is odd")));
    }
    if in_f == 0 || !(is_cpu_f32(x) && is_cpu_f32(weight) && bias.is_none_or(is_cpu_f32)) {
        return geglu_reference(x, weight, bias);
    }
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(Error::invalid("geglu: input must have at least one dimension"));
    };
    if last != in_f {
        return Err(Error::invalid(format!("geglu: input has {last} features, weight expects {in_f}")));
    }
    if let Some(b) = bias {
        if b.elem_count() != two_inner {
            return Err(Error::invalid(format!("geglu: bias {:?} must have {two_inner} elements", b.dims())));
        }
    }
    let inner = two_inner / 2;
    let rows: usize = lead.iter().product();
    let bias_data = match bias {
        Some(b) => cpu::with_f32(b, |b| b.to_vec())?,
        None => vec![0f32; two_inner],
    };
    let mut out = vec![0f32; rows * inner];
    let block = ROW_BLOCK.min(rows).max(1);
    let mut proj = vec![0f32; block * two_inner];
    cpu::with_f32(x, |xs| {
        cpu::with_f32(weight, |w| {
            for (out_blk, x_blk) in out.chunks_mut(block * inner).zip(xs.chunks(block * in_f)) {
                let m = x_blk.len() / in_f;
                let proj = &mut proj[..m * two_inner];
                gemm_xwt(proj, x_blk, w, m, two_inner, in_f, false);
                geglu_epilogue(out_blk, proj, &bias_data, inner);
            }
        })
    })??;
    let mut out_shape = lead.to_vec();
    out_shape.push(inner);
    cpu::f32_tensor(out, out_shape)
}

/// `out[r, j] = (p[r, j] + b[j]) · gelu(p[r, inner + j] + b[inner + j])` for every row `r` of the projection `p`.
/// Parallel over rows; each element's value depends on its inputs only, so any split gives the same bits.
fn geglu_epilogue(out: &mut [f32], proj: &[f32], bias: &[f32], inner: usize) {
    use rayon::prelude::*;
    let (bv, bg) = bias.split_at(inner);
    const ROWS_PER_TASK: usize = 16;
    out.par_chunks_mut(ROWS_PER_TASK * inner).zip(proj.par_chunks(ROWS_PER_TASK * 2 * inner)).for_each(|(o, p)| {
        for (orow, prow) in o.chunks_exact_mut(inner).zip(p.chunks_exact(2 * inner)) {
            let (value, gate) = prow.split_at(inner);
            for ((((y, &v), &g), &bv), &bg) in orow.iter_mut().zip(value).zip(gate).zip(bv).zip(bg) {
                *y = (v + bv) * gelu_erf(g + bg);
            }
        }
    });
}

/// The candle composition of [`geglu`] (linear, narrow, `gelu_erf`, product): the path for f16/bf16 and CUDA, and the
/// kernel's test reference.
pub fn geglu_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let h = linear(x, weight, bias)?;
    let inner = h.dim(D::Minus1)? / 2;
    let value = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
    Ok((value * gate)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn value_times_gelu_of_gate() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32]], &dev).unwrap();
        let w = Tensor::new(&[[2f32], [1.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = super::geglu(&x, &w, None).unwrap().to_vec2().unwrap();
        // gelu(1) = 0.8413447
        assert!((y[0][0] - 2.0 * 0.841_344_7).abs() < 1e-5, "{}", y[0][0]);
    }

    /// Against the composition with candle's matmul and `gelu_erf` (the reference computes its projection with the
    /// same GEMM, so the difference is the bias-add order and our erf approximation).
    #[test]
    fn kernel_matches_composition() {
        let dev = Device::Cpu;
        let mut worst = 0f32;
        // (lead dims, in, inner): SD widths with few rows, a multi-block row count, and odd sizes.
        for &(lead, k, inner) in &[(&[2usize, 64][..], 320usize, 1280usize), (&[1, 1100], 64, 40), (&[2, 16], 640, 2560), (&[3, 5], 7, 9), (&[1], 1, 1)] {
            let mut shape = lead.to_vec();
            shape.push(k);
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let w = (Tensor::randn(0f32, 1.5, (2 * inner, k), &dev).unwrap() / (k as f64).sqrt()).unwrap();
            let b = Tensor::randn(0f32, 0.5, 2 * inner, &dev).unwrap();
            for bias in [Some(&b), None] {
                let y = super::geglu(&x, &w, bias).unwrap();
                let r = super::geglu_reference(&x, &w, bias).unwrap();
                assert_eq!(y.dims(), r.dims());
                let (d, m) = crate::ops::cpu::testing::max_err(&y, &r);
                worst = worst.max(d / m.max(1.0));
                assert!(d <= 2e-6 * m.max(1.0), "{shape:?} inner {inner}: max err {d} (max |y| {m})");
            }
        }
        println!("geglu kernel vs composition: worst max-abs error / max(1, max |y|) = {worst:e}");
    }

    #[test]
    fn kernel_is_deterministic_and_thread_count_independent() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 600, 320), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.06, (2 * 640, 320), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 2 * 640, &dev).unwrap();
        crate::ops::cpu::testing::assert_thread_count_independent(&|| super::geglu(&x, &w, Some(&b)).unwrap());
    }

    #[test]
    fn bad_shapes_and_other_dtypes() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        assert!(super::geglu(&x, &Tensor::ones((5, 4), DType::F32, &dev).unwrap(), None).is_err()); // odd width
        assert!(super::geglu(&x, &Tensor::ones((6, 5), DType::F32, &dev).unwrap(), None).is_err());
        let w = Tensor::ones((6, 4), DType::F32, &dev).unwrap();
        assert!(super::geglu(&x, &w, Some(&Tensor::ones(5, DType::F32, &dev).unwrap())).is_err());
        let yh = super::geglu(&x.to_dtype(DType::F16).unwrap(), &w.to_dtype(DType::F16).unwrap(), None).unwrap();
        assert_eq!(yh.dtype(), DType::F16);
    }
}
