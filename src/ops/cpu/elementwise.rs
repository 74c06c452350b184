//! Scalar math written so that loops over slices auto-vectorise (no branches, no float→int casts, no libm calls),
//! and the elementwise kernels built on it. The crate compiles for baseline x86-64 (SSE2), where libm's `expf` and
//! `erff` are scalar calls and would dominate the fused norm and GEGLU passes.

use candle_core::Tensor;
use rayon::prelude::*;

use super::{f32_tensor, is_cpu_f32, with_f32};
use crate::error::Result;

/// `ops::upsample_nearest2d`: nearest-neighbour resize of `x` `[B, C, H, W]` to `out_h × out_w`. An exact 2× of an f32
/// CPU tensor runs the parallel kernel below (candle's CPU upsample is one thread with per-element index maths);
/// anything else goes to candle.
pub fn upsample_nearest2d(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !is_cpu_f32(x) || out_h != 2 * h || out_w != 2 * w {
        return Ok(x.upsample_nearest2d(out_h, out_w)?);
    }
    let out = with_f32(x, |xs| upsample_nearest2x(xs, b * c, h, w))?;
    f32_tensor(out, (b, c, out_h, out_w))
}

/// `ops::silu`: `x·σ(x)` elementwise; f32 CPU tensors with the vectorised kernel below (candle's CPU SiLU calls
/// libm's `expf` per element), others through candle.
pub fn silu_tensor(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return Ok(x.silu()?);
    }
    let out = with_f32(x, silu_all)?;
    f32_tensor(out, x.shape())
}

/// `e^x` in f32, within 2 ulp over the whole range (flushes to 2^-126 below about −87.3, saturates near 2.4e38 above
/// about 88.4). Range reduction `x = n·ln2 + r`, |r| ≤ ln2/2, then a degree-7 Taylor polynomial for `e^r`
/// (truncation < 3e-9 relative) and `2^n` built from its exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln2 split so that n·LN2_HI is exact for |n| ≤ 128 (LN2_HI has 9 significant bits).
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer that then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.37); // keeps n in [-126, 127], a normal exponent
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()); // n as a two's-complement integer
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    p * scale
}

/// SiLU `x·σ(x) = x / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Exact-form GELU `x·Φ(x) = ½x(1 + erf(x/√2))`. `1 ± erf` comes from Abramowitz–Stegun 7.1.26
/// (`erfc z ≈ t·P(t)·e^{-z²}`, `t = 1/(1 + p z)`, |error| ≤ 1.5e-7), taken as `erfc` on the negative side so that no
/// cancellation occurs there.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_592;
    const A2: f32 = -0.284_496_736;
    const A3: f32 = 1.421_413_741;
    const A4: f32 = -1.453_152_027;
    const A5: f32 = 1.061_405_429;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let erfc = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5)))) * exp(-z * z);
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

/// Elements per parallel task of the elementwise kernels: big enough to amortise a rayon split, small enough to
/// balance over a few threads. Splits depend on the length only, so results never depend on the thread count.
const CHUNK: usize = 32 * 1024;

/// `a + b` of two same-length slices into a new buffer, in parallel.
pub(crate) fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "add: lengths differ");
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
    out
}

/// SiLU of every element into a new buffer, in parallel.
pub(crate) fn silu_all(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &v) in o.iter_mut().zip(x) {
            *o = silu(v);
        }
    });
    out
}

/// Nearest-neighbour 2× upsampling of `[planes, h, w]` to `[planes, 2h, 2w]` (each input pixel becomes a 2×2
/// block, as PyTorch's `interpolate(scale_factor=2, mode="nearest")`), in parallel over planes.
pub(crate) fn upsample_nearest2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * h * w, "upsample_nearest2x: length is not planes·h·w");
    let mut out = vec![0f32; planes * 4 * h * w];
    if out.is_empty() {
        return out;
    }
    // One task per output row pair; both rows of a pair copy the same widened input row.
    out.par_chunks_mut(4 * w).zip(x.par_chunks(w)).for_each(|(o, row)| {
        let (top, bottom) = o.split_at_mut(2 * w);
        for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
            pair[0] = v;
            pair[1] = v;
        }
        bottom.copy_from_slice(top);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
    }

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "exp worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1.2e-38 && exp(-200.0) >= 0.0);
        assert!(exp(200.0) > 2e38 && exp(200.0).is_finite());
    }

    #[test]
    fn silu_and_gelu_match_f64_formulas() {
        let (mut ws, mut wg) = (0f64, 0f64);
        let mut x = -20.0f32;
        while x < 20.0 {
            let xd = x as f64;
            let s = xd / (1.0 + (-xd).exp());
            ws = ws.max((silu(x) as f64 - s).abs() / s.abs().max(1.0));
            // Φ from the f64 complementary error function, via the f64 reference erfc below.
            let g = 0.5 * xd * erfc64(-xd / std::f64::consts::SQRT_2);
            wg = wg.max((gelu_erf(x) as f64 - g).abs() / xd.abs().max(1.0));
            x += 0.000_913;
        }
        assert!(ws < 3e-7, "silu worst error {ws:e}");
        assert!(wg < 3e-7, "gelu worst error {wg:e}");
    }

    /// erfc in f64 by its continued fraction / series, accurate to ~1e-13 (reference only).
    fn erfc64(z: f64) -> f64 {
        if z < 0.0 {
            return 2.0 - erfc64(-z);
        }
        if z < 3.0 {
            // erf series: 2/√π Σ (-1)^n z^(2n+1) / (n! (2n+1))
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // Lentz continued fraction for erfc.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f)
        }
    }

    #[test]
    fn tensor_wrappers_match_candle() {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 3, 5, 7), &dev).unwrap();
        let up = upsample_nearest2d(&x, 10, 14).unwrap();
        let want = x.upsample_nearest2d(10, 14).unwrap();
        let (u, w): (Vec<f32>, Vec<f32>) =
            (up.flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
        assert_eq!(u, w);
        let strided = x.transpose(2, 3).unwrap();
        let (u, w): (Vec<f32>, Vec<f32>) = (
            upsample_nearest2d(&strided, 14, 10).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
            strided.upsample_nearest2d(14, 10).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(u, w);
        assert_eq!(upsample_nearest2d(&x, 7, 9).unwrap().dims(), &[2, 3, 7, 9]); // not 2×: candle
        assert!(upsample_nearest2d(&x.flatten_all().unwrap(), 4, 4).is_err());
        let s = silu_tensor(&x).unwrap();
        let d = (&s - x.silu().unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        assert_eq!(silu_tensor(&x.to_dtype(DType::F16).unwrap()).unwrap().dtype(), DType::F16);
    }

    #[test]
    fn parallel_kernels_match_scalar_loops_and_ignore_thread_count() {
        let n = 3 * CHUNK + 17;
        let a: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 997) as f32) / 91.0).collect();
        let one = pool(1).install(|| (add(&a, &b), silu_all(&a), upsample_nearest2x(&a[..6 * 5 * 7], 6, 5, 7)));
        let two = pool(2).install(|| (add(&a, &b), silu_all(&a), upsample_nearest2x(&a[..6 * 5 * 7], 6, 5, 7)));
        assert_eq!(one, two);
        for i in 0..n {
            assert_eq!(one.0[i], a[i] + b[i]);
            assert_eq!(one.1[i], silu(a[i]));
        }
        let up = &one.2;
        for p in 0..6 {
            for y in 0..10 {
                for x in 0..14 {
                    assert_eq!(up[(p * 10 + y) * 14 + x], a[(p * 5 + y / 2) * 7 + x / 2]);
                }
            }
        }
    }
}
