//! Winograd F(2×2, 3×3) for 3×3, stride-1, padding-1 f32 convs (bias fused), writing the NCHW output in place.
//!
//! Each 2×2 output tile comes from a 4×4 input patch: `Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`, summed over the input
//! channels. The sum over channels is, for each of the 16 transformed positions ξ, a GEMM
//! `M_ξ[Cout, tiles] = U_ξ[Cout, Cin] · V_ξ[Cin, tiles]`: 16 multiplications per 4 outputs instead of 36, i.e. 2.25×
//! fewer GEMM flops than im2col, for the price of the transforms (linear in Cin·tiles and Cout·tiles, small against
//! the GEMMs at the channel counts where it is dispatched).
//!
//! Memory: the transformed weights `U` (16·Cout·Cin, 16/9 of the weights) are computed per call — weights are
//! streamed per call in this runtime, so a cache would hold a second copy of every conv's weights, and the transform
//! costs a few % of the conv at most (measured, see BENCHMARKS.md). Wide convs run in output-channel groups, so at
//! most 25 MiB of `U` exist at once and stay hot across the blocks. The tiles are cut into blocks, so the rest of
//! the scratch (transformed input + products per task) does not grow with the image.
//!
//! Determinism: the blocks depend on the shape only, every output element belongs to one tile of one block, and
//! gemm does not split the depth across threads, so results are bit-identical for any thread count.
//!
//! Accuracy: the transforms only add, subtract and halve, so the result stays within ~1e-6 of the direct conv
//! relative to the output's magnitude in f32 (tests: ≤ 1.2e-6 at Cin up to 1280, asserted ≤ 1e-5).

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv2d::{gemm_pack_f32s, Geom};
use super::threads;
use crate::error::Result;
use crate::ops::cancel;

/// Tiles per block are multiples of this (gemm's f32 microkernel rows), and at least it.
const TILE_ALIGN: usize = 16;
/// f32s of one task's block buffers, transformed input `V` (16·Cin·T) plus products `M` (16·Cout·T): 16 MiB. Each
/// block multiplies all 16 `U_ξ` (16·Cin·Cout) by its tiles, so the tiles per block set how often `U` is read per
/// conv: with 4 MiB the 640-channel convs got 48 tiles (26 MiB of `U` read per 48 tiles) and ran 7–10 % slower than
/// with 128 (the SD UNet's convs at 64×64 and 32×32 latents, measured).
const BLOCK_BUDGET: usize = 4 * 1024 * 1024;
/// Tiles of one row handled at once by the transforms (their row buffers live on the stack).
const PIECE: usize = 64;
/// The most Cin·Cout of one output-channel group: transformed weights of at most 25 MiB live at once. Wider convs run
/// in groups (4 at 1280², each transforming the input again: ~0.3 % of its GEMM work).
const GROUP_CHANNELS: usize = 640 * 640;
/// The widest conv measured faster with Winograd: SD's UNet 2560 → 1280 (0.92× the im2col CPU time at 16×16,
/// batch 2; 1280² 0.77× there and 0.6× at 32×32, in groups; ungrouped they were slower, their 105 MiB of transformed
/// weights read from memory by every block).
const MAX_CHANNELS: usize = 2560 * 1280;
const MIN_TILES: usize = 128;

/// Whether the Winograd path computes this conv: 3×3, stride 1, padding 1, and shapes where it measured faster
/// than im2col + gemm (BENCHMARKS.md, "CPU Winograd 3×3 conv"): enough channels that the GEMMs dominate the
/// transforms, and enough tiles that the transformed weights (16/9 of the weights, per call) are amortised.
pub(crate) fn applies(g: &Geom) -> bool {
    g.k == 3
        && g.stride == 1
        && g.pad == 1
        && g.cin >= 64
        && g.cout >= 64
        && g.cin * g.cout <= MAX_CHANNELS
        && g.b * tiles_per_image(g) >= MIN_TILES
}

fn tiles_per_image(g: &Geom) -> usize {
    g.oh.div_ceil(2) * g.ow.div_ceil(2)
}

/// Output channels per group (a function of the shape only): all of them up to [`GROUP_CHANNELS`], else equal
/// groups of at most that many weights each, so the transformed weights of one group stay within 25 MiB.
fn group_channels(g: &Geom) -> usize {
    let groups = (g.cin * g.cout).div_ceil(GROUP_CHANNELS).max(1);
    g.cout.div_ceil(groups).max(1)
}

/// Tiles per block for this shape (a function of the shape only, for determinism): wide enough that gemm reuses
/// each transformed weight over many tiles (Cin/4, at least 32), at most [`BLOCK_BUDGET`] f32s of buffers per task.
pub(crate) fn block_tiles(g: &Geom) -> usize {
    let budget = (BLOCK_BUDGET / (16 * (g.cin + group_channels(g))).max(1)) / TILE_ALIGN * TILE_ALIGN;
    let t = (g.cin / 4).next_multiple_of(TILE_ALIGN).clamp(32, 128).min(budget).max(TILE_ALIGN);
    // Balanced blocks: the same number of blocks with fewer tiles each, and an even number of a few, so that two
    // threads share them (5 blocks of 1920 → 640 at 32×32 ran one by one, 1.3× the CPU time of 6 in parallel).
    let total = g.b * tiles_per_image(g);
    let mut blocks = total.div_ceil(t);
    if blocks > 1 && blocks < 16 && blocks % 2 == 1 {
        blocks += 1;
    }
    total.div_ceil(blocks).next_multiple_of(TILE_ALIGN).min(t)
}

/// Whether blocks run in parallel (gemm single-threaded inside) rather than one by one with gemm's threads.
fn outer_parallel(blocks: usize, threads: usize) -> bool {
    threads > 1 && blocks >= threads && (blocks % threads == 0 || blocks >= 4 * threads)
}

/// Upper bound of the transient f32s of [`run`] with `t` tiles per block on `threads` threads: one group's
/// transformed weights, each live task's block buffers, and gemm's packed operands in each running call.
pub(crate) fn scratch_f32s(g: &Geom, t: usize, threads: usize) -> usize {
    let blocks = (g.b * tiles_per_image(g)).div_ceil(t);
    let live = if outer_parallel(blocks, threads) { threads.min(blocks) } else { 1 };
    let cg = group_channels(g);
    16 * cg * g.cin + live * (16 * (g.cin + cg) * t + gemm_pack_f32s(t, cg, g.cin))
}

/// An output pointer shared by parallel tasks, each writing its own elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (distinct tiles, or distinct weight rows), and the buffer
// outlives the loop using it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer, through a method so closures capture the whole `Sync` wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Consecutive tiles of one tile row: batch element `b`, tile row `ty`, tile columns `tx..tx + len`, at index `k`
/// in the block. The transforms work on such runs (at most [`PIECE`] long), so they read and write whole rows.
#[derive(Clone, Copy)]
struct Run {
    b: usize,
    ty: usize,
    tx: usize,
    len: usize,
    k: usize,
}

/// The runs covering tiles `t0..t1` (flattened over batch, tile rows, tile columns).
fn runs(g: &Geom, t0: usize, t1: usize) -> Vec<Run> {
    let (ntx, per_img) = (g.ow.div_ceil(2), tiles_per_image(g));
    let mut out = Vec::new();
    let mut j = t0;
    while j < t1 {
        let (b, r) = (j / per_img, j % per_img);
        let (ty, tx) = (r / ntx, r % ntx);
        let len = (ntx - tx).min(t1 - j).min(PIECE);
        out.push(Run { b, ty, tx, len, k: j - t0 });
        j += len;
    }
    out
}

/// The conv of [`Geom`] `g` (3×3, stride 1, pad 1) with `t` tiles per block, into `out` `[B, Cout, H, W]`, one
/// output-channel group ([`group_channels`]) after the other. `Cancelled` (the output partly written) when the
/// call running on this thread is cancelled: polled between chunks of blocks.
pub(crate) fn run(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], g: &Geom, t: usize) -> Result<()> {
    assert!(g.k == 3 && g.stride == 1 && g.pad == 1 && g.oh == g.h && g.ow == g.w && t > 0);
    assert!(
        x.len() == g.b * g.cin * g.h * g.w && w.len() == g.cout * g.cin * 9 && out.len() == g.b * g.cout * g.h * g.w
    );
    let nthreads = threads();
    let total = g.b * tiles_per_image(g);
    let blocks = total.div_ceil(t);
    let optr = OutPtr(out.as_mut_ptr());
    let cg = group_channels(g);
    let mut c0 = 0;
    while c0 < g.cout {
        let cos = c0..(c0 + cg).min(g.cout);
        let u = transform_weights(&w[cos.start * g.cin * 9..cos.end * g.cin * 9], cos.len(), g.cin);
        let block = |i: usize, buf: &mut Vec<f32>, par: Parallelism| {
            let (t0, t1) = (i * t, ((i + 1) * t).min(total));
            let runs = runs(g, t0, t1);
            buf.resize(16 * (g.cin + cos.len()) * t, 0.0);
            let (v, m) = buf.split_at_mut(16 * g.cin * t);
            let parallel = matches!(par, Parallelism::Rayon(n) if n > 1);
            transform_input(x, g, &runs, t, v, parallel);
            multiply(&u, v, m, g.cin, cos.len(), t1 - t0, t, par);
            // SAFETY: `out` is live and exclusively borrowed for the whole of `run`; this block's tiles of this
            // group's channels are written by no other block.
            unsafe { transform_output(m, bias, optr, g, cos.clone(), &runs, t, parallel) };
        };
        if outer_parallel(blocks, nthreads) {
            cancel::par_for_each_checked(blocks, cancel::chunk_for(nthreads), Vec::new, |buf, i| {
                block(i, buf, Parallelism::None)
            })?;
        } else {
            let mut buf = Vec::new();
            for i in 0..blocks {
                cancel::check()?;
                block(i, &mut buf, Parallelism::Rayon(nthreads));
            }
        }
        c0 = cos.end;
    }
    Ok(())
}

/// Input channels the weight transform handles at once, as SIMD lanes.
const WLANES: usize = 8;

/// `U_ξ = G g Gᵀ` for `L` kernels side by side, `G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]]`.
#[inline(always)]
fn kernel_transform<const L: usize>(g: &[[f32; L]; 9]) -> [[f32; L]; 16] {
    let mut u = [[0f32; L]; 16];
    // t = G g (4×3), then U = t Gᵀ (4×4); index 3·row + column.
    let mut t = [[0f32; L]; 12];
    for j in 0..3 {
        for l in 0..L {
            let (g0, g1, g2) = (g[j][l], g[3 + j][l], g[6 + j][l]);
            t[j][l] = g0;
            t[3 + j][l] = 0.5 * (g0 + g1 + g2);
            t[6 + j][l] = 0.5 * (g0 - g1 + g2);
            t[9 + j][l] = g2;
        }
    }
    for i in 0..4 {
        for l in 0..L {
            let (r0, r1, r2) = (t[3 * i][l], t[3 * i + 1][l], t[3 * i + 2][l]);
            u[4 * i][l] = r0;
            u[4 * i + 1][l] = 0.5 * (r0 + r1 + r2);
            u[4 * i + 2][l] = 0.5 * (r0 - r1 + r2);
            u[4 * i + 3][l] = r2;
        }
    }
    u
}

/// `U[ξ][co][ci] = (G g[co][ci] Gᵀ)[ξ]`: gemm reads `U_ξ` as `[Cin, Cout]` at column stride Cin. [`WLANES`] input
/// channels at a time, so the arithmetic vectorises; parallel over the output channels.
fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    let uptr = OutPtr(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each_init(Vec::new, |uc: &mut Vec<f32>, co| {
        // This channel's 16 rows of Cin, built contiguously, then copied to their planes.
        uc.resize(16 * cin, 0.0);
        let wc = &w[co * cin * 9..(co + 1) * cin * 9];
        let mut ci = 0;
        while ci + WLANES <= cin {
            let mut g = [[0f32; WLANES]; 9];
            for (l, k) in wc[ci * 9..(ci + WLANES) * 9].chunks_exact(9).enumerate() {
                for (gi, &v) in g.iter_mut().zip(k) {
                    gi[l] = v;
                }
            }
            for (xi, lanes) in kernel_transform(&g).iter().enumerate() {
                uc[xi * cin + ci..xi * cin + ci + WLANES].copy_from_slice(lanes);
            }
            ci += WLANES;
        }
        for ci in ci..cin {
            let g: [[f32; 1]; 9] = std::array::from_fn(|i| [wc[ci * 9 + i]]);
            for (xi, lane) in kernel_transform(&g).iter().enumerate() {
                uc[xi * cin + ci] = lane[0];
            }
        }
        for (xi, row) in uc.chunks_exact(cin).enumerate() {
            // SAFETY: row (ξ, co) of `u` (16·Cout·Cin long) is written by this task only, while `u` is borrowed by
            // nothing else.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), uptr.get().add((xi * cout + co) * cin), cin) };
        }
    });
    u
}

/// `V[ci][ξ][k] = (Bᵀ d B)[ξ]` for each tile's 4×4 input patch `d` (zero outside the image), with
/// `Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]]`; `t` is the block's tile stride. Per run of tiles the
/// vertical half (`Bᵀ d`) is done on whole input rows and the horizontal half reads them at stride 2, both loops
/// the compiler vectorises.
fn transform_input(x: &[f32], g: &Geom, runs: &[Run], t: usize, v: &mut [f32], parallel: bool) {
    let (h, w) = (g.h, g.w);
    let channel = |ci: usize, vc: &mut [f32]| {
        // Input rows 2·ty − 1 + i over columns 2·tx − 1 .. 2·(tx + len) + 1, zero in the padding.
        let mut rows = [[0f32; 2 * PIECE + 2]; 4];
        for r in runs {
            let plane = &x[(r.b * g.cin + ci) * h * w..][..h * w];
            let n = 2 * r.len + 2;
            let x0 = 2 * r.tx; // input column of row element 1
            for (i, row) in rows.iter_mut().enumerate() {
                let row = &mut row[..n];
                let iy = (2 * r.ty + i).wrapping_sub(1);
                if iy >= h {
                    row.fill(0.0);
                    continue;
                }
                let src = &plane[iy * w..(iy + 1) * w];
                // Element e holds column x0 + e − 1.
                let lo = usize::from(x0 == 0);
                let hi = n.min(w + 1 - x0);
                row[..lo].fill(0.0);
                row[lo..hi].copy_from_slice(&src[x0 + lo - 1..x0 + hi - 1]);
                row[hi..].fill(0.0);
            }
            // Bᵀ d: s0 = d0 − d2, s1 = d1 + d2, s2 = d2 − d1, s3 = d1 − d3.
            let [d0, d1, d2, d3] = &mut rows;
            for e in 0..n {
                let (a, b, c, d) = (d0[e], d1[e], d2[e], d3[e]);
                d0[e] = a - c;
                d1[e] = b + c;
                d2[e] = c - b;
                d3[e] = b - d;
            }
            // (Bᵀ d) B per row: v0 = s[2k] − s[2k+2], v1 = s[2k+1] + s[2k+2], v2 = s[2k+2] − s[2k+1], v3 = s[2k+1] − s[2k+3].
            for (i, s) in rows.iter().enumerate() {
                let [o0, o1, o2, o3] = [0, 1, 2, 3].map(|j| (4 * i + j) * t + r.k);
                let (v0, rest) = vc[o0..o3 + r.len].split_at_mut(o1 - o0);
                let (v1, rest) = rest.split_at_mut(o2 - o1);
                let (v2, v3) = rest.split_at_mut(o3 - o2);
                for k in 0..r.len {
                    let (a, b, c, d) = (s[2 * k], s[2 * k + 1], s[2 * k + 2], s[2 * k + 3]);
                    v0[k] = a - c;
                    v1[k] = b + c;
                    v2[k] = c - b;
                    v3[k] = b - d;
                }
            }
        }
    };
    if parallel {
        v.par_chunks_mut(16 * t).take(g.cin).enumerate().for_each(|(ci, vc)| channel(ci, vc));
    } else {
        v.chunks_mut(16 * t).take(g.cin).enumerate().for_each(|(ci, vc)| channel(ci, vc));
    }
}

/// `M[co][ξ][k] = Σ_ci U[co][ξ][ci] · V[ci][ξ][k]` for the block's `nt` tiles and one group's `cout` output
/// channels: 16 GEMMs, written as `Mᵀ_ξ[k, co] = Vᵀ_ξ[k, ci] · Uᵀ_ξ[ci, co]` so the tiles are gemm's unit-stride
/// rows, as in the im2col path.
#[allow(clippy::too_many_arguments)]
fn multiply(u: &[f32], v: &[f32], m: &mut [f32], cin: usize, cout: usize, nt: usize, t: usize, par: Parallelism) {
    assert!(u.len() == 16 * cout * cin && v.len() >= 16 * cin * t && m.len() >= 16 * cout * t && nt <= t);
    for xi in 0..16 {
        // SAFETY: lhs V_ξ: element (k, ci) at ξ·t + ci·16t + k < 16·Cin·t; rhs U_ξ: (ci, co) at (ξ·Cout + co)·Cin + ci
        // < 16·Cout·Cin; dst M_ξ: (k, co) at ξ·t + co·16t + k < 16·Cout·t — all within the slices asserted above.
        unsafe {
            gemm::gemm(
                nt,
                cout,
                cin,
                m.as_mut_ptr().add(xi * t),
                (16 * t) as isize,
                1,
                false,
                v.as_ptr().add(xi * t),
                (16 * t) as isize,
                1,
                u.as_ptr().add(xi * cout * cin),
                cin as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
}

/// `Y = Aᵀ M A + bias` per tile and output channel, `Aᵀ = [[1,1,1,0],[0,1,−1,−1]]`, written where the 2×2 tile lies
/// inside the output (odd sizes cut the last row/column of tiles), for the group's output channels `cos` (`m` holds
/// theirs only). Per run, both output rows are built whole and copied, so the loops vectorise.
///
/// # Safety
/// `out.0` points to the `[B, Cout, H, W]` output, and no other thread writes these runs' elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_output(
    m: &[f32],
    bias: Option<&[f32]>,
    out: OutPtr,
    g: &Geom,
    cos: std::ops::Range<usize>,
    runs: &[Run],
    t: usize,
    parallel: bool,
) {
    let (oh, ow) = (g.oh, g.ow);
    let channel = |j: usize, mc: &[f32]| {
        let co = cos.start + j;
        let b0 = bias.map_or(0.0, |b| b[co]);
        let mut row = [0f32; 2 * PIECE];
        for r in runs {
            let mx = |xi: usize| &mc[xi * t + r.k..][..r.len];
            let n = (2 * r.len).min(ow - 2 * r.tx);
            for i in 0..2 {
                let oy = 2 * r.ty + i;
                if oy >= oh {
                    break;
                }
                // Row i of Aᵀ M, for the four columns j: i = 0: m0j + m1j + m2j; i = 1: m1j − m2j − m3j.
                let (ra, rb, rc) = if i == 0 { (0, 4, 8) } else { (4, 8, 12) };
                let sgn = if i == 0 { 1.0 } else { -1.0 };
                let [c0, c1, c2, c3] = [0, 1, 2, 3].map(|j| (mx(ra + j), mx(rb + j), mx(rc + j)));
                for k in 0..r.len {
                    let sj = |c: (&[f32], &[f32], &[f32])| c.0[k] + sgn * (c.1[k] + c.2[k]);
                    let (s0, s1, s2, s3) = (sj(c0), sj(c1), sj(c2), sj(c3));
                    row[2 * k] = s0 + s1 + s2 + b0;
                    row[2 * k + 1] = s1 - s2 - s3 + b0;
                }
                // SAFETY: row oy, columns 2·tx .. 2·tx + n of (b, co) lie inside the output and belong to this run.
                let dst = out.get().add(((r.b * g.cout + co) * oh + oy) * ow + 2 * r.tx);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, n);
            }
        }
    };
    if parallel {
        m.par_chunks(16 * t).take(cos.len()).enumerate().for_each(|(j, mc)| channel(j, mc));
    } else {
        m.chunks(16 * t).take(cos.len()).enumerate().for_each(|(j, mc)| channel(j, mc));
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::super::conv2d::{conv2d_tiled, Geom, Tiling};
    use super::super::testing::{assert_thread_count_independent, max_err};
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

    /// The conv through the Winograd path with `block` tiles per block (None: the default), and through im2col.
    fn both(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, block: Option<usize>) -> (Tensor, Tensor) {
        let g = Geom::new(x.dims4().unwrap(), w.dims4().unwrap(), 1, 1).unwrap();
        let t = Tiling::for_geom(&g);
        let wino = Tiling { winograd: block.unwrap_or_else(|| super::block_tiles(&g)), ..t };
        let im2col = Tiling { winograd: 0, ..t };
        (conv2d_tiled(x, w, bias, &g, wino).unwrap(), conv2d_tiled(x, w, bias, &g, im2col).unwrap())
    }

    /// Relative error bound reached (max |Winograd − candle| / max |candle|): ≤ 1.2e-6 over these cases.
    const TOL: f32 = 1e-5;

    #[test]
    fn winograd_matches_im2col_and_candle_at_sd_channel_counts() {
        // (b, cin, cout, h, w, forced tiles per block): UNet and VAE channel counts at cut-down sizes, odd sizes
        // (a cut last row/column of tiles), batch 2 (blocks spanning two images), tiny images, tiny Cin/Cout.
        type Case = (usize, usize, usize, usize, usize, Option<usize>);
        let cases: &[Case] = &[
            (2, 320, 320, 9, 11, None),
            (2, 320, 320, 9, 11, Some(16)),
            (2, 640, 640, 7, 5, Some(16)),
            (1, 1280, 1280, 5, 6, None),
            (2, 1280, 1280, 4, 4, Some(16)),
            // Output-channel groups: 3 of 214, 214, 212 channels (Cin·Cout > 640²).
            (2, 1920, 640, 6, 5, Some(16)),
            (1, 512, 512, 17, 13, None),
            (1, 512, 512, 17, 13, Some(32)),
            (1, 512, 256, 8, 8, None),
            (2, 256, 256, 12, 15, Some(16)),
            (2, 128, 128, 15, 16, None),
            (1, 128, 3, 9, 9, None),
            (1, 4, 320, 9, 9, None),
            (2, 64, 64, 1, 1, None),
            (2, 64, 64, 2, 1, None),
            (1, 64, 64, 1, 7, Some(16)),
            (1, 64, 64, 3, 133, Some(128)), // a tile row longer than one transform piece
            (2, 64, 72, 5, 150, Some(96)),
        ];
        for &(b, cin, cout, h, w, block) in cases {
            let x = rand(&[b, cin, h, w], 1);
            let wt = rand(&[cout, cin, 3, 3], 2);
            let bs = rand(&[cout], 3);
            for bias in [Some(&bs), None] {
                let (y, y2) = both(&x, &wt, bias, block);
                let r = conv2d_reference(&x, &wt, bias, 1, 1).unwrap();
                assert_eq!(y.dims(), r.dims());
                let (e, m) = max_err(&y, &r);
                let (e2, m2) = max_err(&y, &y2);
                let (rel, rel2) = (e / m.max(1e-30), e2 / m2.max(1e-30));
                let what = format!("{b}x{cin}x{h}x{w} -> {cout} block {block:?} bias {}", bias.is_some());
                eprintln!("winograd {what}: rel err vs candle {rel:.2e}, vs im2col {rel2:.2e}");
                assert!(rel <= TOL && rel2 <= TOL, "winograd {what}: rel err vs candle {rel}, vs im2col {rel2}");
            }
        }
    }

    #[test]
    fn winograd_is_deterministic_across_runs_and_thread_counts() {
        // Blocks run in parallel (many blocks) and one by one with gemm's threads (one block).
        // The last case runs in two output-channel groups (704·640 > 640²).
        let cases = [(2, 96, 80, 24, Some(16)), (1, 64, 72, 14, None), (2, 48, 40, 9, Some(32)), (2, 704, 640, 10, Some(16))];
        for (b, cin, cout, hw, block) in cases {
            let x = rand(&[b, cin, hw, hw], 7);
            let wt = rand(&[cout, cin, 3, 3], 8);
            let bs = rand(&[cout], 9);
            assert_thread_count_independent(&|| both(&x, &wt, Some(&bs), block).0);
        }
    }

    #[test]
    fn winograd_is_dispatched_for_large_3x3_convs_only() {
        let g = |b, c, hw, k, s, p| Geom::new((b, c, hw, hw), (c, c, k, k), s, p).unwrap();
        assert!(Tiling::for_geom(&g(1, 512, 64, 3, 1, 1)).winograd > 0);
        assert_eq!(Tiling::for_geom(&g(1, 512, 64, 3, 2, 1)).winograd, 0, "stride 2");
        assert_eq!(Tiling::for_geom(&g(1, 512, 64, 1, 1, 0)).winograd, 0, "1×1");
        assert_eq!(Tiling::for_geom(&g(1, 512, 64, 3, 1, 0)).winograd, 0, "unpadded");
        // The UNet's wide convs (in output-channel groups) from 128 tiles on; not beyond 2560 · 1280 channels.
        let wide = |b, cin, cout, hw| Geom::new((b, cin, hw, hw), (cout, cin, 3, 3), 1, 1).unwrap();
        assert!(Tiling::for_geom(&wide(2, 1280, 1280, 16)).winograd > 0);
        assert!(Tiling::for_geom(&wide(2, 2560, 1280, 16)).winograd > 0);
        assert!(Tiling::for_geom(&wide(2, 1920, 640, 32)).winograd > 0);
        assert_eq!(Tiling::for_geom(&wide(2, 1280, 1280, 8)).winograd, 0, "32 tiles");
        assert_eq!(Tiling::for_geom(&wide(1, 2560, 2560, 32)).winograd, 0, "beyond 2560 · 1280");
    }
}

#[cfg(test)]
mod bench {
    use std::time::Instant;

    use candle_core::{Device, Tensor};

    use super::super::conv2d::{conv2d_tiled, Geom, Tiling};

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    fn time<R>(f: impl FnOnce() -> R) -> f64 {
        let t = Instant::now();
        std::hint::black_box(f());
        t.elapsed().as_secs_f64() * 1e3
    }

    /// im2col vs Winograd (default block, and `WINO_BLOCKS=16,64,...` tiles per block) at SD shapes, interleaved,
    /// medians; plus the weight transform alone.
    #[test]
    #[ignore = "benchmark: RAYON_NUM_THREADS=2 cargo test --release --lib ops::cpu::winograd::bench -- --ignored --nocapture"]
    fn bench_winograd_vs_im2col() {
        let only = std::env::var("WINO_BENCH_ONLY").ok();
        let blocks: Vec<usize> = std::env::var("WINO_BLOCKS")
            .map(|v| v.split(',').map(|b| b.parse().unwrap()).collect())
            .unwrap_or_default();
        // (name, batch, cin, cout, size)
        let shapes = [
            ("unet 320 64x64 b2", 2, 320, 320, 64),
            ("unet 320 32x32 b2", 2, 320, 320, 32),
            ("unet 640 32x32 b2", 2, 640, 640, 32),
            ("unet 640 16x16 b2", 2, 640, 640, 16),
            ("unet 1280 16x16 b2", 2, 1280, 1280, 16),
            ("unet 1280 8x8 b2", 2, 1280, 1280, 8),
            ("unet 1280 4x4 b2", 2, 1280, 1280, 4),
            ("vae 512 32x32", 1, 512, 512, 32),
            ("vae 512 64x64", 1, 512, 512, 64),
            ("vae 512 128x128", 1, 512, 512, 128),
            ("vae 512 256x256", 1, 512, 512, 256),
            ("vae 256 256x256", 1, 256, 256, 256),
            ("vae 256 512x512", 1, 256, 256, 512),
            ("vae 128 256x256", 1, 128, 128, 256),
            ("vae 128 512x512", 1, 128, 128, 512),
            ("vae 128->3 512x512", 1, 128, 3, 512),
            ("vae 4->512 64x64", 1, 4, 512, 64),
        ];
        println!("threads {}", rayon::current_num_threads());
        for (name, b, cin, cout, hw) in shapes {
            if only.as_deref().is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let dev = Device::Cpu;
            let x = (Tensor::rand(0f32, 1., (b, cin, hw, hw), &dev).unwrap() - 0.5).unwrap();
            let w = (Tensor::rand(0f32, 1., (cout, cin, 3, 3), &dev).unwrap() - 0.5).unwrap();
            let bias = Tensor::rand(0f32, 1., cout, &dev).unwrap();
            let g = Geom::new(x.dims4().unwrap(), w.dims4().unwrap(), 1, 1).unwrap();
            let t = Tiling::for_geom(&g);
            let mut variants = vec![
                ("im2col".to_string(), Tiling { winograd: 0, ..t }),
                (format!("wino {}", super::block_tiles(&g)), Tiling { winograd: super::block_tiles(&g), ..t }),
            ];
            variants.extend(blocks.iter().map(|&bl| (format!("wino {bl}"), Tiling { winograd: bl, ..t })));
            let run = |t: Tiling| conv2d_tiled(&x, &w, Some(&bias), &g, t).unwrap();
            let first = time(|| run(variants[0].1));
            let reps = if first > 2000. {
                3
            } else if first > 300. {
                5
            } else {
                9
            };
            let mut ts = vec![vec![]; variants.len()];
            for _ in 0..reps {
                for (i, v) in variants.iter().enumerate() {
                    ts[i].push(time(|| run(v.1)));
                }
            }
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut tw: Vec<f64> = (0..reps).map(|_| time(|| super::transform_weights(&wv, cout, cin))).collect();
            let base = median(&mut ts[0].clone());
            let cells: Vec<String> = variants
                .iter()
                .zip(&mut ts)
                .map(|((n, _), v)| {
                    let m = median(v);
                    format!("{n} {m:8.2} ({:.2}x)", m / base)
                })
                .collect();
            println!(
                "{name:22} {} | weight transform {:.2} ms | default {}",
                cells.join(" | "),
                median(&mut tw),
                if t.winograd > 0 { "wino" } else { "im2col" }
            );
        }
    }
}
