//! f32 CPU conv2d (square kernel, symmetric padding, bias fused), writing the NCHW output in place.
//!
//! Per batch element the conv is `out[Cout, P] = W[Cout, Cin·k²] · col[Cin·k², P]` over the `P = Hout·Wout` output
//! positions. The column matrix is never built whole: the positions are cut into tiles and the input channels into
//! chunks (`chunk·k²` ≈ the depth gemm blocks at anyway), and one reused buffer per task holds `col[chunk·k², tile]`.
//! gemm writes straight into the output (rows `Cout` at stride `P`, columns the tile's positions), accumulating over
//! the chunks; the tile is prefilled with the bias, so the bias costs no extra pass. 1×1 stride-1 unpadded convs read
//! the input itself as the column matrix.
//!
//! Determinism: the tiling depends on the shape only, every output element belongs to exactly one task, and gemm
//! does not split the depth across threads, so results are bit-identical for any thread count and either
//! parallelisation (rayon over tasks, or gemm's own threads inside a task).

use candle_core::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

use super::{f32_tensor, threads, winograd, with_f32};
use crate::error::{Error, Result};
use crate::ops::cancel;

/// Column buffer per task, in f32s (2 MiB).
const COL_BUDGET: usize = 512 * 1024;
/// Target depth (`chunk·k²`) of one gemm call: gemm blocks its depth at about 512 itself, so larger chunks would
/// not save passes over the output tile, and smaller ones let the position tile grow within [`COL_BUDGET`].
const DEPTH_TARGET: usize = 512;
/// Positions per tile on the 1×1 path (no column buffer; the tile only splits the work).
const DIRECT_TILE: usize = 1024;
/// Tiles are multiples of this (gemm's widest f32 microkernel row count), except a whole short image.
const TILE_ALIGN: usize = 16;
/// Slack for gemm's packing buffers: one microkernel's rounding (its widest f32 microkernel is 64 × 6, AVX-512).
const GEMM_PACK_SLACK: usize = 64;

/// Upper bound of the f32s gemm 0.19 allocates in one call `dst[m, n] += lhs[m, depth] · rhs[depth, n]` with a
/// unit-stride lhs column and rhs column, as the kernel calls it (m = positions, n = Cout): it packs the rhs (the
/// weights) only when m exceeds 128 microkernel rows (2048 with AVX2, 8192 with AVX-512; always on aarch64), and
/// prepacks the lhs only when m ≤ 2·mc (mc ≤ 8 microkernel rows, so m ≤ 512). Its per-thread L2 slab is
/// persistent, not per call.
pub(super) fn gemm_pack_f32s(m: usize, n: usize, depth: usize) -> usize {
    let rhs = if cfg!(target_arch = "aarch64") || m > 2048 { depth * (n + GEMM_PACK_SLACK) } else { 0 };
    let lhs = if m <= 512 { depth * (m + GEMM_PACK_SLACK) } else { 0 };
    rhs + lhs
}

/// Conv geometry: input `[b, cin, h, w]`, weight `[cout, cin, k, k]`, output `[b, cout, oh, ow]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geom {
    pub(crate) fn new(x: (usize, usize, usize, usize), wt: (usize, usize, usize, usize), stride: usize, pad: usize) -> Result<Self> {
        let (b, cin, h, w) = x;
        let (cout, wcin, kh, kw) = wt;
        if cin != wcin {
            return Err(Error::invalid(format!("conv2d: input has {cin} channels, weight expects {wcin}")));
        }
        if kh != kw || kh == 0 {
            return Err(Error::invalid(format!("conv2d: kernel must be square and non-empty, got {kh}×{kw}")));
        }
        if stride == 0 {
            return Err(Error::invalid("conv2d: stride must be at least 1"));
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            return Err(Error::invalid(format!("conv2d: padded input {}×{} is smaller than the {kh}×{kw} kernel", h + 2 * pad, w + 2 * pad)));
        }
        let (oh, ow) = ((h + 2 * pad - kh) / stride + 1, (w + 2 * pad - kw) / stride + 1);
        Ok(Geom { b, cin, h, w, cout, k: kh, stride, pad, oh, ow })
    }

    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1×1 stride-1 unpadded conv: the input plane is the column matrix.
    fn direct(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// How the work is cut: `positions` output positions per tile, `channels` input channels per gemm call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiling {
    pub positions: usize,
    pub channels: usize,
    /// Hand gemm the weights as lhs (`out = W·col`) instead of `outᵀ = colᵀ·Wᵀ`; gemm normalises both to the same
    /// call (it orients by the output's unit stride), kept to measure that.
    pub weights_lhs: bool,
    /// Tiles per block on the Winograd path ([`winograd`]); 0 for im2col + gemm.
    pub winograd: usize,
}

impl Tiling {
    /// The default tiling, a function of the shape only (never of the thread count, for determinism).
    pub(crate) fn for_geom(g: &Geom) -> Tiling {
        let k2 = g.k * g.k;
        let p = g.positions().max(1);
        if g.direct() {
            let tiles = p.div_ceil(DIRECT_TILE);
            return Tiling { positions: p.div_ceil(tiles).next_multiple_of(TILE_ALIGN).min(p), channels: g.cin.max(1), weights_lhs: false, winograd: 0 };
        }
        let chunks = g.cin.div_ceil((DEPTH_TARGET / k2).max(1)).max(1);
        let channels = g.cin.div_ceil(chunks).max(1);
        let max_tile = (COL_BUDGET / (channels * k2)).max(TILE_ALIGN) / TILE_ALIGN * TILE_ALIGN;
        let tiles = p.div_ceil(max_tile);
        let winograd = if winograd::applies(g) { winograd::block_tiles(g) } else { 0 };
        Tiling { positions: p.div_ceil(tiles).next_multiple_of(TILE_ALIGN).min(p), channels, weights_lhs: false, winograd }
    }

    fn tiles(&self, g: &Geom) -> usize {
        g.positions().div_ceil(self.positions)
    }

    /// f32s of one task's column buffer.
    fn col_len(&self, g: &Geom) -> usize {
        if g.direct() {
            0
        } else {
            self.channels.min(g.cin) * g.k * g.k * self.positions
        }
    }

    /// Whether tasks run in parallel (gemm single-threaded inside) rather than one by one with gemm's threads: when
    /// there are enough of them to share evenly.
    fn outer_parallel(&self, g: &Geom, threads: usize) -> bool {
        let tasks = g.b * self.tiles(g);
        threads > 1 && tasks >= threads && (tasks % threads == 0 || tasks >= 4 * threads)
    }

    /// Upper bound of the transient f32s of a conv run with this tiling on `threads` threads: the column buffers
    /// alive at once, and gemm's packed copies of its operands in each running call.
    fn scratch_f32s(&self, g: &Geom, threads: usize) -> usize {
        if self.winograd > 0 {
            return winograd::scratch_f32s(g, self.winograd, threads);
        }
        let live = if self.outer_parallel(g, threads) { threads.min(g.b * self.tiles(g)) } else { 1 };
        let depth = self.channels.min(g.cin) * g.k * g.k;
        let np = self.positions.min(g.positions());
        live * (self.col_len(g) + gemm_pack_f32s(np, g.cout, depth))
    }
}

/// Upper bound of the transient bytes of [`conv2d`] on contiguous f32 inputs (a strided `x` or weight is first
/// copied whole by [`with_f32`]) with the global rayon pool, for an output `[b, cout, oh, ow]` and padding `pad` —
/// the path the kernel takes for that geometry (im2col + gemm, the direct 1×1 path, or Winograd for 3×3 stride-1
/// padding-1 convs), which is what decides the scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scratch_bytes_bound(b: usize, cin: usize, cout: usize, oh: usize, ow: usize, k: usize, stride: usize, pad: usize) -> u64 {
    // The tiling and the scratch depend on the output size; the input size is the one that gives it.
    let (oh, ow) = (oh.max(1), ow.max(1));
    let input = |o: usize| ((o - 1) * stride + k).saturating_sub(2 * pad).max(1);
    let g = Geom { b, cin, h: input(oh), w: input(ow), cout, k, stride, pad, oh, ow };
    Tiling::for_geom(&g).scratch_f32s(&g, threads()) as u64 * 4
}

/// `x` `[B, Cin, H, W]` ⋆ `weight` `[Cout, Cin, k, k]` + `bias` `[Cout]`, all f32 on the CPU.
pub(crate) fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let g = Geom::new(x.dims4()?, weight.dims4()?, stride, padding)?;
    conv2d_tiled(x, weight, bias, &g, Tiling::for_geom(&g))
}

/// [`conv2d`] with an explicit tiling (tests force tiny tiles through it; the benchmark varies it).
pub(crate) fn conv2d_tiled(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: &Geom, t: Tiling) -> Result<Tensor> {
    if let Some(b) = bias {
        if b.dims() != [g.cout] {
            return Err(Error::invalid(format!("conv2d: bias has shape {:?}, expected [{}]", b.dims(), g.cout)));
        }
    }
    if t.positions == 0 || t.channels == 0 {
        return Err(Error::invalid("conv2d: tiles must be non-empty"));
    }
    let mut out = vec![0f32; g.b * g.cout * g.positions()];
    with_f32(x, |xs| -> Result<()> {
        with_f32(weight, |ws| match bias {
            Some(b) => with_f32(b, |bs| run(xs, ws, Some(bs), &mut out, g, t))?,
            None => run(xs, ws, None, &mut out, g, t),
        })?
    })??;
    f32_tensor(out, (g.b, g.cout, g.oh, g.ow))
}

/// The output pointer shared by the tasks, each writing its own disjoint positions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (distinct batch elements or position ranges), and the buffer
// outlives the parallel loop that uses it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn run(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], g: &Geom, t: Tiling) -> Result<()> {
    if x.len() != g.b * g.cin * g.h * g.w || w.len() != g.cout * g.cin * g.k * g.k || out.len() != g.b * g.cout * g.positions() {
        return Err(Error::invalid("conv2d: buffer sizes do not match the shapes"));
    }
    if out.is_empty() {
        return Ok(());
    }
    if t.winograd > 0 {
        if g.k != 3 || g.stride != 1 || g.pad != 1 {
            return Err(Error::invalid("conv2d: the Winograd path takes 3×3 stride-1 padding-1 convs only"));
        }
        return winograd::run(x, w, bias, out, g, t.winograd);
    }
    let tiles = t.tiles(g);
    let tasks = g.b * tiles;
    let nthreads = threads();
    let optr = OutPtr(out.as_mut_ptr());
    let task = |i: usize, col: &mut Vec<f32>, par: Parallelism| {
        let (b, tile) = (i / tiles, i % tiles);
        let p0 = tile * t.positions;
        let np = t.positions.min(g.positions() - p0);
        // SAFETY: `out` is live and exclusively borrowed for the whole of `run`; this task's elements (batch `b`,
        // channels 0..Cout, positions p0..p0+np) are written by no other task.
        unsafe { conv_task(x, w, bias, optr, g, t, b, p0, np, col, par) }
    };
    // The call's cancel is polled between chunks of tasks (between tasks when each task is parallel itself).
    if t.outer_parallel(g, nthreads) {
        cancel::par_for_each_checked(tasks, cancel::chunk_for(nthreads), Vec::new, |col, i| {
            task(i, col, Parallelism::None)
        })?;
    } else {
        let mut col = Vec::new();
        for i in 0..tasks {
            cancel::check()?;
            task(i, &mut col, Parallelism::Rayon(nthreads));
        }
    }
    Ok(())
}

/// One task: output positions `p0..p0+np` of batch element `b`, all output channels.
///
/// # Safety
/// `out.0` points to the `[B, Cout, P]` output, and no other thread touches this task's elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn conv_task(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: OutPtr,
    g: &Geom,
    t: Tiling,
    b: usize,
    p0: usize,
    np: usize,
    col: &mut Vec<f32>,
    par: Parallelism,
) {
    let p = g.positions();
    let k2 = g.k * g.k;
    let depth_all = g.cin * k2;
    let dst = out.0.add(b * g.cout * p + p0);
    if let Some(bias) = bias {
        for (co, &v) in bias.iter().enumerate() {
            // SAFETY: row `co` of this task's tile, in bounds (p0 + np ≤ P) and written by this task only.
            std::slice::from_raw_parts_mut(dst.add(co * p), np).fill(v);
        }
    }
    let xb = &x[b * g.cin * g.h * g.w..(b + 1) * g.cin * g.h * g.w];
    let mut c0 = 0;
    while c0 < g.cin {
        let cc = t.channels.min(g.cin - c0);
        let depth = cc * k2;
        // The column operand `col[depth, np]` (position-contiguous) and its row stride.
        let (cols, col_rs): (&[f32], usize) = if g.direct() {
            (&xb[c0 * p + p0..], p)
        } else {
            if col.len() < depth * np {
                col.resize(depth * np, 0.0);
            }
            im2col(xb, g, c0, cc, p0, np, &mut col[..depth * np], matches!(par, Parallelism::Rayon(n) if n > 1));
            (&col[..depth * np], np)
        };
        let wts = &w[c0 * k2..];
        let read_dst = bias.is_some() || c0 > 0;
        // SAFETY: the operands cover the strided extents gemm reads (cols: `depth` rows of `np` at stride `col_rs`
        // within the slice; weights: `Cout` rows of `depth` at stride Cin·k²; dst: `Cout` rows of `np` at stride P
        // within this task's part of the output).
        if t.weights_lhs {
            // out[co, q] = Σ W[co, d] · col[d, q]
            gemm::gemm(
                g.cout, np, depth, dst, 1, p as isize, read_dst, wts.as_ptr(), 1, depth_all as isize, cols.as_ptr(), 1,
                col_rs as isize, 1.0, 1.0, false, false, false, par,
            );
        } else {
            // outᵀ[q, co] = Σ colᵀ[q, d] · Wᵀ[d, co]
            gemm::gemm(
                np, g.cout, depth, dst, p as isize, 1, read_dst, cols.as_ptr(), col_rs as isize, 1, wts.as_ptr(),
                depth_all as isize, 1, 1.0, 1.0, false, false, false, par,
            );
        }
        c0 += cc;
    }
}

/// Fill `col[(ci - c0)·k² + ky·k + kx, q]` with the input pixel under kernel tap (ky, kx) for output position
/// `p0 + q` (zero where it falls in the padding), for channels `c0..c0+cc`. Rows are independent, so `parallel`
/// spreads them over the rayon pool (used when gemm, not the tasks, carries the parallelism).
#[allow(clippy::too_many_arguments)]
fn im2col(xb: &[f32], g: &Geom, c0: usize, cc: usize, p0: usize, np: usize, col: &mut [f32], parallel: bool) {
    let k2 = g.k * g.k;
    let row = |r: usize, dst: &mut [f32]| {
        let (ci, tap) = (c0 + r / k2, r % k2);
        let (ky, kx) = (tap / g.k, tap % g.k);
        let plane = &xb[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        // Output columns whose input column ox·s + kx - pad lies inside 0..W.
        let ox_lo = g.pad.saturating_sub(kx).div_ceil(g.stride).min(g.ow);
        let ox_hi = if g.w + g.pad > kx { ((g.w - 1 + g.pad - kx) / g.stride + 1).min(g.ow) } else { 0 }.max(ox_lo);
        let (mut q, mut pos) = (0, p0);
        while q < np {
            let (oy, ox0) = (pos / g.ow, pos % g.ow);
            let ox1 = (ox0 + np - q).min(g.ow);
            let seg = &mut dst[q..q + ox1 - ox0];
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            if iy < 0 || iy >= g.h as isize {
                seg.fill(0.0);
            } else {
                let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                // Split this row segment into left padding, inside, right padding.
                let (a, c) = (ox_lo.clamp(ox0, ox1), ox_hi.clamp(ox0, ox1));
                seg[..a - ox0].fill(0.0);
                seg[c - ox0..].fill(0.0);
                let inside = &mut seg[a - ox0..c - ox0];
                if !inside.is_empty() {
                    let ix0 = a * g.stride + kx - g.pad;
                    if g.stride == 1 {
                        inside.copy_from_slice(&src[ix0..ix0 + inside.len()]);
                    } else {
                        for (d, s) in inside.iter_mut().zip(src[ix0..].iter().step_by(g.stride)) {
                            *d = *s;
                        }
                    }
                }
            }
            q += ox1 - ox0;
            pos += ox1 - ox0;
        }
    };
    if parallel {
        col.par_chunks_mut(np).enumerate().for_each(|(r, dst)| row(r, dst));
    } else {
        col.chunks_mut(np).enumerate().for_each(|(r, dst)| row(r, dst));
    }
    debug_assert_eq!(col.len(), cc * k2 * np);
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{conv2d_tiled, Geom, Tiling};
    use crate::ops::conv2d::conv2d_reference;

    /// Deterministic values in [-1, 1).
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Max |kernel − candle conv2d + bias| over the output, relative to the output's max magnitude.
    #[allow(clippy::too_many_arguments)]
    fn rel_err(b: usize, cin: usize, h: usize, w: usize, cout: usize, k: usize, stride: usize, pad: usize, tile: Option<(usize, usize)>, bias: bool) -> f32 {
        let x = rand(&[b, cin, h, w], 1);
        let wt = rand(&[cout, cin, k, k], 2);
        let bs = rand(&[cout], 3);
        let bs = bias.then_some(&bs);
        let g = Geom::new(x.dims4().unwrap(), wt.dims4().unwrap(), stride, pad).unwrap();
        let mut t = Tiling::for_geom(&g);
        if let Some((positions, channels)) = tile {
            t.positions = positions;
            t.channels = channels;
        }
        let y = conv2d_tiled(&x, &wt, bs, &g, t).unwrap();
        let r = conv2d_reference(&x, &wt, bs, stride, pad).unwrap();
        assert_eq!(y.dims(), r.dims());
        let mag = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let err = (y - &r).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        err / mag.max(1e-30)
    }

    const TOL: f32 = 1e-5;

    #[test]
    fn conv_matches_candle_over_shapes() {
        // (b, cin, h, w, cout, k, stride, pad, forced (positions, channels) tile)
        let cases: &[(usize, usize, usize, usize, usize, usize, usize, usize, Option<(usize, usize)>)] = &[
            (2, 5, 7, 9, 6, 3, 1, 1, None),
            (2, 5, 7, 9, 6, 3, 1, 1, Some((4, 2))), // tiles shorter than a row, channel chunks of 2
            (2, 7, 9, 11, 5, 3, 2, 1, None),
            (2, 7, 9, 11, 5, 3, 2, 1, Some((5, 3))),
            (2, 6, 10, 9, 4, 3, 2, 0, Some((3, 4))),
            (2, 3, 6, 5, 7, 3, 1, 0, Some((7, 1))),
            (2, 13, 5, 7, 4, 1, 1, 0, None),
            (2, 13, 5, 7, 4, 1, 1, 0, Some((3, 13))), // 1×1 direct path, tiles shorter than a row
            (2, 13, 5, 7, 4, 1, 2, 0, Some((2, 5))),  // 1×1 stride 2 goes through im2col
            (2, 9, 5, 7, 4, 1, 1, 1, Some((6, 4))),   // padded 1×1
            (2, 4, 3, 3, 3, 3, 1, 1, Some((1, 1))),   // one position per tile
            (2, 67, 17, 19, 33, 3, 1, 1, None),
            (2, 67, 17, 19, 33, 3, 1, 1, Some((48, 16))),
            (1, 4, 33, 31, 40, 3, 1, 1, None),        // conv_in-like: Cin = 4
            (1, 40, 31, 29, 3, 3, 1, 1, None),        // conv_out-like: Cout = 3
            (2, 70, 37, 35, 24, 3, 2, 1, None),       // more than one default channel chunk, stride 2
        ];
        for &(b, cin, h, w, cout, k, s, p, tile) in cases {
            for bias in [true, false] {
                let e = rel_err(b, cin, h, w, cout, k, s, p, tile, bias);
                eprintln!("conv {b}x{cin}x{h}x{w} -> {cout} k{k} s{s} p{p} tile {tile:?} bias {bias}: rel err {e:.2e}");
                assert!(e <= TOL, "conv {b}x{cin}x{h}x{w} -> {cout} k{k} s{s} p{p} tile {tile:?} bias {bias}: rel err {e}");
            }
        }
    }

    #[test]
    fn conv_operand_orders_agree() {
        let x = rand(&[2, 19, 11, 13], 4);
        let wt = rand(&[23, 19, 3, 3], 5);
        let bs = rand(&[23], 6);
        let g = Geom::new(x.dims4().unwrap(), wt.dims4().unwrap(), 1, 1).unwrap();
        let t = Tiling { positions: 40, channels: 7, weights_lhs: false, winograd: 0 };
        let a: Vec<f32> = conv2d_tiled(&x, &wt, Some(&bs), &g, t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let t = Tiling { weights_lhs: true, ..t };
        let b: Vec<f32> = conv2d_tiled(&x, &wt, Some(&bs), &g, t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let err = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5, "operand orders differ by {err}");
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    #[test]
    fn conv_is_deterministic_across_runs_and_thread_counts() {
        // One task (gemm's threads inside), four tasks (rayon over tasks), and a 1×1 conv.
        let cases = [(1, 64, 32, 32, 64, 3, 1, 1), (2, 48, 40, 40, 32, 3, 1, 1), (2, 96, 24, 24, 80, 1, 1, 0)];
        for (b, cin, h, w, cout, k, s, p) in cases {
            let x = rand(&[b, cin, h, w], 7);
            let wt = rand(&[cout, cin, k, k], 8);
            let bs = rand(&[cout], 9);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| bits(&super::conv2d(&x, &wt, Some(&bs), s, p).unwrap()))
            };
            let one = run(1);
            assert_eq!(one, run(1), "run to run, 1 thread");
            let two = run(2);
            assert_eq!(two, run(2), "run to run, 2 threads");
            assert_eq!(one, two, "1 vs 2 threads");
        }
    }

    #[test]
    fn conv_rejects_bad_shapes() {
        let x = rand(&[1, 4, 5, 5], 1);
        let wt = rand(&[3, 4, 3, 3], 2);
        assert!(super::conv2d(&x, &wt, Some(&rand(&[4], 3)), 1, 1).is_err(), "bias length");
        assert!(super::conv2d(&x, &rand(&[3, 5, 3, 3], 2), None, 1, 1).is_err(), "channels");
        assert!(super::conv2d(&rand(&[1, 4, 2, 2], 1), &wt, None, 1, 0).is_err(), "kernel larger than input");
        assert!(super::conv2d(&x, &wt, None, 0, 1).is_err(), "stride 0");
        assert!(super::conv2d(&x, &rand(&[3, 4, 3, 2], 2), None, 1, 1).is_err(), "non-square kernel");
    }
}

#[cfg(test)]
mod bench {
    use std::time::Instant;

    use candle_core::{Device, Tensor};

    use super::{conv2d_tiled, Geom, Tiling};
    use crate::ops::conv2d::conv2d_reference;

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }

    fn time<R>(f: impl FnOnce() -> R) -> f64 {
        let t = Instant::now();
        std::hint::black_box(f());
        t.elapsed().as_secs_f64() * 1e3
    }

    /// SD1.5 shapes: candle conv2d + bias vs the kernel (both operand orders, and with gemm forced to pack the
    /// weights on every call), interleaved, medians; plus gemm's cost of packing the weights once per call.
    #[test]
    #[ignore = "benchmark: RAYON_NUM_THREADS=2 cargo test --release --lib ops::cpu::conv2d::bench -- --ignored --nocapture"]
    fn bench_sd_shapes() {
        let only = std::env::var("CONV_BENCH_ONLY").ok();
        let variants = std::env::var("CONV_BENCH_VARIANTS").map(|v| v == "1").unwrap_or(true);
        // (name, batch, cin, cout, size, k, stride, pad)
        let shapes = [
            ("unet 320->320 3x3 64x64 b2", 2, 320, 320, 64, 3, 1, 1),
            ("unet 640->640 3x3 32x32 b2", 2, 640, 640, 32, 3, 1, 1),
            ("unet 1280->1280 3x3 16x16 b2", 2, 1280, 1280, 16, 3, 1, 1),
            ("unet 1280->1280 3x3 8x8 b2", 2, 1280, 1280, 8, 3, 1, 1),
            ("unet 320->320 3x3 s2 64x64 b2", 2, 320, 320, 64, 3, 2, 1),
            ("unet conv_in 4->320 64x64 b2", 2, 4, 320, 64, 3, 1, 1),
            ("unet 640->1280 1x1 16x16 b2", 2, 640, 1280, 16, 1, 1, 0),
            ("vae 512->512 3x3 64x64", 1, 512, 512, 64, 3, 1, 1),
            ("vae 512->512 3x3 128x128", 1, 512, 512, 128, 3, 1, 1),
            ("vae 512->512 3x3 256x256", 1, 512, 512, 256, 3, 1, 1),
            ("vae 256->256 3x3 512x512", 1, 256, 256, 512, 3, 1, 1),
            ("vae 128->128 3x3 512x512", 1, 128, 128, 512, 3, 1, 1),
            ("vae 128->3 3x3 512x512", 1, 128, 3, 512, 3, 1, 1),
        ];
        println!("threads {}", rayon::current_num_threads());
        for (name, b, cin, cout, hw, k, s, p) in shapes {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let dev = Device::Cpu;
            let x = (Tensor::rand(0f32, 1., (b, cin, hw, hw), &dev).unwrap() - 0.5).unwrap();
            let w = (Tensor::rand(0f32, 1., (cout, cin, k, k), &dev).unwrap() - 0.5).unwrap();
            let bias = Tensor::rand(0f32, 1., cout, &dev).unwrap();
            let g = Geom::new(x.dims4().unwrap(), w.dims4().unwrap(), s, p).unwrap();
            let t = Tiling::for_geom(&g);
            let tl = Tiling { weights_lhs: true, ..t };
            let cand = || conv2d_reference(&x, &w, Some(&bias), s, p).unwrap();
            let ours = |t: Tiling| conv2d_tiled(&x, &w, Some(&bias), &g, t).unwrap();
            let packed = || {
                gemm::set_rhs_packing_threshold(0);
                let y = ours(t);
                gemm::set_rhs_packing_threshold(gemm::DEFAULT_RHS_PACKING_THRESHOLD);
                y
            };
            let r = cand();
            let y = ours(t);
            let err = (&y - &r).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let first = time(|| ours(t));
            let reps = if first > 2000. { 3 } else if first > 300. { 5 } else { 9 };
            let (mut tc, mut to, mut tw, mut tp) = (vec![], vec![], vec![], vec![]);
            for _ in 0..reps {
                tc.push(time(cand));
                to.push(time(|| ours(t)));
                if variants {
                    tw.push(time(|| ours(tl)));
                    tp.push(time(packed));
                }
            }
            let (mc, mo) = (median(&mut tc), median(&mut to));
            let (mw, mp) = if variants { (median(&mut tw), median(&mut tp)) } else { (f64::NAN, f64::NAN) };
            // Alternative tilings to compare, e.g. CONV_BENCH_ALT=512x28,2048x14 (positions x channels).
            if let Ok(alt) = std::env::var("CONV_BENCH_ALT") {
                let alts: Vec<Tiling> = alt
                    .split(',')
                    .map(|a| {
                        let (p, c) = a.split_once('x').unwrap();
                        Tiling { positions: p.parse().unwrap(), channels: c.parse().unwrap(), weights_lhs: false, winograd: 0 }
                    })
                    .collect();
                let mut ts = vec![vec![]; alts.len() + 1];
                for _ in 0..reps {
                    ts[0].push(time(|| ours(t)));
                    for (i, a) in alts.iter().enumerate() {
                        ts[i + 1].push(time(|| ours(*a)));
                    }
                }
                let meds: Vec<String> = ts.iter_mut().map(|v| format!("{:.1}", median(v))).collect();
                println!("{name:34} default {}x{} then {alt}: {}", t.positions, t.channels, meds.join(" | "));
            }
            // Packing the weights: a gemm with 16 positions and packing forced, minus the same without packing,
            // times the number of gemm calls, divided over the threads that run them.
            let depth = t.channels.min(cin) * k * k;
            let col = vec![0.25f32; depth * 16];
            let mut dst = vec![0f32; cout * 16];
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tiny = |dst: &mut [f32]| {
                // SAFETY: col is [depth, 16]; wv holds `cout` rows of cin·k², of which gemm reads the first `depth`
                // columns; dst is [cout, 16].
                unsafe {
                    gemm::gemm(16, cout, depth, dst.as_mut_ptr(), 16, 1, false, col.as_ptr(), 16, 1, wv.as_ptr(), (cin * k * k) as isize, 1, 1.0, 1.0, false, false, false, gemm::Parallelism::None)
                }
            };
            let (mut a, mut bb) = (vec![], vec![]);
            for _ in 0..21 {
                gemm::set_rhs_packing_threshold(0);
                a.push(time(|| tiny(&mut dst)));
                gemm::set_rhs_packing_threshold(gemm::DEFAULT_RHS_PACKING_THRESHOLD);
                bb.push(time(|| tiny(&mut dst)));
            }
            let per_call = (median(&mut a) - median(&mut bb)).max(0.0);
            let tasks = b * t.tiles(&g);
            let calls = tasks * cin.div_ceil(t.channels);
            let lanes = if t.outer_parallel(&g, rayon::current_num_threads()) { rayon::current_num_threads().min(tasks) } else { 1 };
            let pack_ms = per_call * calls as f64 / lanes as f64;
            println!(
                "{name:34} candle {mc:9.2} ms | ours {mo:9.2} ms ({:5.2}x) | w-lhs {mw:9.2} | w-packed {mp:9.2} | pack/call {:.3} ms x {calls} calls / {lanes} = {pack_ms:8.2} ms ({:4.1}% of ours) | tile {}x{}ch | err {err:.1e} | reps {reps}",
                mc / mo,
                per_call,
                100. * pack_ms / mo,
                t.positions,
                t.channels,
            );
        }
    }
}
