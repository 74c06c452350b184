//! Group and layer normalisation in one pass of statistics and one output pass, f32 in and out.
//!
//! Statistics: each slice (a group, a row) is cut into fixed blocks of [`BLOCK`] elements; within a block the mean
//! and the sum of squared deviations are computed two-pass in f32 lanes (the block sits in L1, so the second pass
//! costs no memory traffic, and each lane sums at most `BLOCK / LANES` terms), and the blocks are merged in f64
//! (Chan et al.'s pairwise update). That is the accuracy of a two-pass f64 computation to ~1e-7 relative while
//! reading the input from memory once. Blocks depend on the shape only, and each slice is reduced by one thread in
//! a fixed order, so the result is identical whatever the thread count.

use rayon::prelude::*;

use super::elementwise::silu;

const LANES: usize = 16;
const BLOCK: usize = 256;

/// Sum of a block in `LANES` independent f32 accumulators (vectorisable), combined in f64.
#[inline(always)]
fn block_sum(xs: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let (chunks, rest) = xs.as_chunks::<LANES>(); // fixed-size arrays: the lane loop becomes whole-register adds
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let tail: f64 = rest.iter().map(|&v| v as f64).sum();
    acc.iter().map(|&v| v as f64).sum::<f64>() + tail
}

/// `(Σ(x − m), Σ(x − m)²)` of a block, same lane scheme.
#[inline(always)]
fn block_centred(xs: &[f32], m: f32) -> (f64, f64) {
    let mut s1 = [0f32; LANES];
    let mut s2 = [0f32; LANES];
    let (chunks, rest) = xs.as_chunks::<LANES>();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    let (mut t1, mut t2) = (0f64, 0f64);
    for &v in rest {
        let d = (v - m) as f64;
        t1 += d;
        t2 += d * d;
    }
    (s1.iter().map(|&v| v as f64).sum::<f64>() + t1, s2.iter().map(|&v| v as f64).sum::<f64>() + t2)
}

/// Mean and biased variance of `xs` (see the module comment).
pub(crate) fn moments(xs: &[f32]) -> (f64, f64) {
    let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for blk in xs.chunks(BLOCK) {
        let nb = blk.len() as f64;
        let m = (block_sum(blk) / nb) as f32;
        let (d1, d2) = block_centred(blk, m);
        // Exact block mean and squared deviations about it, from the sums about the rounded mean `m`.
        let mb = m as f64 + d1 / nb;
        let m2b = (d2 - d1 * d1 / nb).max(0.0);
        let total = n + nb;
        let delta = mb - mean;
        mean += delta * nb / total;
        m2 += m2b + delta * delta * n * nb / total;
        n = total;
    }
    if n == 0.0 {
        return (0.0, 0.0);
    }
    (mean, m2 / n)
}

/// `out = (x − mean)·scale + shift`, then SiLU when asked (one pass; the branch is outside the loops). Centring
/// before scaling (rather than folding the mean into the shift) keeps the cancellation exact when values sit close to
/// the mean.
#[inline(always)]
fn centre_scale_shift(out: &mut [f32], x: &[f32], mean: f32, scale: f32, shift: f32, silu_after: bool) {
    if silu_after {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu((v - mean) * scale + shift);
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - mean) * scale + shift;
        }
    }
}

/// Group norm of `x` `[batch, channels, spatial]` (row-major, `spatial` = product of the trailing dims) into `out`:
/// per (batch, group) mean and biased variance, then `y = (x − mean)·(w[c]/√(var + eps)) + b[c]`, SiLU when
/// `silu_after`. Parallel over (batch, group).
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm(
    x: &[f32],
    out: &mut [f32],
    channels: usize,
    spatial: usize,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    silu_after: bool,
) {
    let per_group = channels / groups;
    let group_len = per_group * spatial;
    assert!(groups > 0 && channels % groups == 0 && weight.len() == channels && bias.len() == channels);
    assert!(x.len() == out.len() && group_len > 0 && x.len() % group_len == 0);
    out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (o, xs))| {
        let (mean, var) = moments(xs);
        let inv_std = 1.0 / (var + eps).sqrt();
        let c0 = (i % groups) * per_group;
        for (j, (oc, xc)) in o.chunks_mut(spatial).zip(xs.chunks(spatial)).enumerate() {
            let scale = (inv_std * weight[c0 + j] as f64) as f32;
            centre_scale_shift(oc, xc, mean as f32, scale, bias[c0 + j], silu_after);
        }
    });
}

/// Rows per parallel task of [`layer_norm`] (a fixed split, so results do not depend on the thread count).
const ROWS_PER_TASK: usize = 64;

/// Layer norm over the last dimension: `x` is `rows × width` row-major; `y = (x − mean)/√(var + eps)·w + b` per
/// row. Parallel over blocks of rows.
pub(crate) fn layer_norm(x: &[f32], out: &mut [f32], width: usize, weight: &[f32], bias: &[f32], eps: f64) {
    assert!(width > 0 && weight.len() == width && bias.len() == width);
    assert!(x.len() == out.len() && x.len() % width == 0);
    let task = ROWS_PER_TASK * width;
    out.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(o, xs)| {
        for (orow, xrow) in o.chunks_mut(width).zip(xs.chunks(width)) {
            let (mean, var) = moments(xrow);
            let inv_std = 1.0 / (var + eps).sqrt();
            // Centre before scaling (not `x·a − mean·a`): exact zeros stay zeros when a row is constant.
            let (m, a) = (mean as f32, inv_std as f32);
            for (((y, &v), &w), &b) in orow.iter_mut().zip(xrow).zip(weight).zip(bias) {
                *y = (v - m) * a * w + b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_match_f64_two_pass_even_with_a_large_offset() {
        for &(n, offset) in &[(1usize, 0f32), (7, 1.0), (255, -3.0), (256, 0.5), (40_961, 100.0), (100_003, 1000.0)] {
            let xs: Vec<f32> = (0..n).map(|i| offset + ((i * 7919 % 1013) as f32 - 506.0) / 300.0).collect();
            let mean64 = xs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var64 = xs.iter().map(|&v| (v as f64 - mean64).powi(2)).sum::<f64>() / n as f64;
            let (mean, var) = moments(&xs);
            assert!((mean - mean64).abs() <= 1e-7 * var64.sqrt() + 1e-12 * mean64.abs(), "n {n}: mean {mean} vs {mean64}");
            assert!((var - var64).abs() <= 2e-7 * var64 + 1e-30, "n {n}: var {var} vs {var64}");
        }
    }
}
