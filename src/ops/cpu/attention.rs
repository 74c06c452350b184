//! Flash-style attention for f32 on the CPU: `softmax(q kᵀ · scale) v` with an online softmax, so neither the
//! `[H, Nq, Nk]` score matrix nor head-split copies of q, k, v ever exist.
//!
//! q is `[B, Nq, H·D]`, k and v are `[B, Nk, H·D]`, heads interleaved in the last dim as linear layers produce them;
//! head `h` of row `i` of batch `b` starts at `(b·N + i)·H·D + h·D`, and the GEMMs address it through their strides.
//! The work splits into tasks of one (batch, head, block of `bq` query rows), run in parallel on the rayon pool. A task
//! walks the keys in blocks of `bk`: `S = Q Kᵀ · scale` (GEMM), per row the running max `m` and running sum `l` are
//! updated and the accumulator rescaled by `exp(m_old − m_new)`, `S` becomes `P = exp(S − m_new)`, and `O += P V`
//! (GEMM). At the end `O / l` is written straight into the task's rows and columns of the `[B, Nq, H·D]` output.
//!
//! **Scratch.** One set per worker (at most `min(tasks, threads)` live at once): `S` (`bq·bk`), `O` (`bq·D`), `m` and `l`
//! (`bq` each), plus the GEMM's own packing buffers; [`scratch_bytes`] bounds it all.
//!
//! **Determinism.** Block sizes depend on the shape only, each output row is computed by one task in a fixed order,
//! and the GEMMs' arithmetic does not depend on their parallelism, so results are bit-identical run to run and for
//! any thread count.

use candle_core::Tensor;
use gemm::Parallelism;
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::{f32_tensor, threads, with_f32};
use crate::error::{Error, Result};

/// Problem shape: batch, query rows, key rows, heads, head size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub nq: usize,
    pub nk: usize,
    pub heads: usize,
    pub d: usize,
}

/// Query rows and key rows per block for a shape (never the thread count, so results do not depend on it).
pub(crate) fn blocks(dims: Dims) -> (usize, usize) {
    let bq = 64;
    let bk = 512;
    (bq.min(dims.nq.max(1)), bk.min(dims.nk.max(1)))
}

/// Upper bound on the transient bytes of [`attention`] beyond its inputs and output, with `threads` workers: the
/// per-worker `S`, `O`, `m`, `l` buffers and the packing buffers of the one GEMM call a worker makes at a time (gemm
/// packs at most depth × (rows + cols), each side rounded up to its register tile of at most 64). Non-contiguous
/// inputs would add a contiguous copy each (the models pass contiguous ones).
pub(crate) fn scratch_bytes(dims: Dims, threads: usize) -> u64 {
    let (bq, bk) = blocks(dims);
    let tasks = dims.b * dims.heads * dims.nq.div_ceil(bq.max(1));
    let workers = tasks.min(threads.max(1)) as u64;
    let d = dims.d;
    let own = bq * bk + bq * d + 2 * bq;
    let pack = (d * (bq + bk + 128)).max(bk * (bq + d + 128));
    workers * 4 * (own + pack) as u64
}

/// Attention for CPU f32 tensors q `[B, Nq, H·D]`, k and v `[B, Nk, H·D]`; returns `[B, Nq, H·D]`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, nq, c) = q.dims3()?;
    let (bk_, nk, ck) = k.dims3()?;
    if v.dims() != k.dims() || bk_ != b || ck != c || heads == 0 || c % heads != 0 {
        return Err(Error::invalid(format!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let dims = Dims { b, nq, nk, heads, d: c / heads };
    let (bq, bkey) = blocks(dims);
    let out = with_f32(q, |q| {
        with_f32(k, |k| with_f32(v, |v| attention_f32(q, k, v, dims, scale as f32, bq, bkey)).and_then(|r| r))
            .and_then(|r| r)
    })
    .and_then(|r| r)?;
    f32_tensor(out, (b, nq, c))
}

/// The kernel on raw row-major data with explicit block sizes (tests use small ones to exercise the tails).
pub(crate) fn attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
    bq: usize,
    bk: usize,
) -> Result<Vec<f32>> {
    let Dims { b, nq, nk, heads, d } = dims;
    let hd = heads * d;
    if q.len() != b * nq * hd || k.len() != b * nk * hd || v.len() != k.len() || bq == 0 || bk == 0 {
        return Err(Error::invalid(format!("attention kernel: buffers {}, {}, {} for {dims:?}", q.len(), k.len(), v.len())));
    }
    let mut out = vec![0f32; b * nq * hd];
    if out.is_empty() {
        return Ok(out);
    }
    if nk == 0 {
        return Err(Error::invalid("attention kernel: no keys"));
    }
    let q_blocks = nq.div_ceil(bq);
    let tasks = b * heads * q_blocks;
    // Enough tasks to keep every thread busy: single-threaded GEMMs. Otherwise the GEMMs share out the spare threads.
    let par = match threads() / tasks {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    };
    let arch = Arch::new();
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..tasks).into_par_iter().for_each_init(
        || Scratch::new(bq, bk, d),
        |s, t| {
            let qb = t % q_blocks;
            let h = (t / q_blocks) % heads;
            let bi = t / (q_blocks * heads);
            let i0 = qb * bq;
            let task = Task { q, k, v, dims, scale, bi, h, i0, rows: bq.min(nq - i0), bk, par };
            task.run(s, arch);
            // Write O / l into this task's rows i0.. and columns h·D.. of the output.
            for r in 0..task.rows {
                let start = (bi * nq + i0 + r) * hd + h * d;
                // SAFETY: `start + d ≤ out.len()` (i0 + r < nq, h < heads), `out` outlives the parallel loop, and
                // tasks own disjoint (row, head) ranges, so no other reference to these `d` floats exists.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(start), d) };
                let l = s.l[r];
                for (o, &a) in dst.iter_mut().zip(&s.o[r * d..(r + 1) * d]) {
                    *o = a / l;
                }
            }
        },
    );
    Ok(out)
}

/// The output's base pointer, shared by the tasks, each of which writes only its own (row, head) ranges.
struct OutPtr(*mut f32);
impl OutPtr {
    /// The address `offset` floats in (a method, so closures capture the whole `Sync` wrapper, not the raw field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: the pointer is only dereferenced for disjoint ranges (see the write in `attention_f32`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// One worker's buffers, reused from task to task.
struct Scratch {
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Scratch {
    fn new(bq: usize, bk: usize, d: usize) -> Self {
        Self { s: vec![0.0; bq * bk], o: vec![0.0; bq * d], m: vec![0.0; bq], l: vec![0.0; bq] }
    }
}

/// One (batch, head, query block) task.
struct Task<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dims: Dims,
    scale: f32,
    bi: usize,
    h: usize,
    i0: usize,
    rows: usize,
    bk: usize,
    par: Parallelism,
}

impl Task<'_> {
    /// Leaves the unnormalised accumulator in `s.o[..rows·D]` and the row sums in `s.l[..rows]`.
    fn run(&self, s: &mut Scratch, arch: Arch) {
        let Dims { nq, nk, heads, d, .. } = self.dims;
        let hd = heads * d;
        let rows = self.rows;
        let q_off = (self.bi * nq + self.i0) * hd + self.h * d;
        let mut j0 = 0;
        while j0 < nk {
            let cols = self.bk.min(nk - j0);
            let kv_off = (self.bi * nk + j0) * hd + self.h * d;
            let first = j0 == 0;
            // S[r, j] = scale · Σ_e q[i0 + r, h·D + e] · k[j0 + j, h·D + e]; S is rows × cols, row stride cols.
            // SAFETY: every address gemm reads is in bounds: q rows i0..i0+rows < nq and k rows j0..j0+cols ≤ nk of
            // batch bi, columns h·D..h·D+D ≤ H·D; it writes rows·cols ≤ bq·bk floats of `s.s`. No aliasing.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    d,
                    s.s.as_mut_ptr(),
                    1,
                    cols as isize,
                    false,
                    self.q.as_ptr().add(q_off),
                    1,
                    hd as isize,
                    self.k.as_ptr().add(kv_off),
                    hd as isize,
                    1,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    self.par,
                );
            }
            arch.dispatch(Softmax { s: &mut s.s[..rows * cols], cols, o: &mut s.o[..rows * d], d, m: &mut s.m, l: &mut s.l, first });
            // O (rows × D) += P (rows × cols) · V[j0.., h·D..] (cols × D).
            // SAFETY: v rows j0..j0+cols ≤ nk of batch bi, columns within head h: in bounds; `s.s` holds rows·cols
            // floats and `s.o` rows·D, and neither aliases the other nor v.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    cols,
                    s.o.as_mut_ptr(),
                    1,
                    d as isize,
                    !first,
                    s.s.as_ptr(),
                    1,
                    cols as isize,
                    self.v.as_ptr().add(kv_off),
                    1,
                    hd as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    self.par,
                );
            }
            j0 += cols;
        }
    }
}

/// The online-softmax step of one key block over all rows of a task, compiled for the best SIMD level available.
struct Softmax<'a> {
    s: &'a mut [f32],
    cols: usize,
    o: &'a mut [f32],
    d: usize,
    m: &'a mut [f32],
    l: &'a mut [f32],
    first: bool,
}

impl WithSimd for Softmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let Softmax { s, cols, o, d, m, l, first } = self;
        for (r, (srow, orow)) in s.chunks_exact_mut(cols).zip(o.chunks_exact_mut(d)).enumerate() {
            let block_max = row_max(srow);
            let m_new = if first || block_max > m[r] { block_max } else { m[r] };
            let sum = exp_sub_sum(srow, m_new);
            if first {
                l[r] = sum;
            } else {
                let corr = exp_nonpos(m[r] - m_new);
                l[r] = l[r] * corr + sum;
                if corr != 1.0 {
                    orow.iter_mut().for_each(|x| *x *= corr);
                }
            }
            m[r] = m_new;
        }
    }
}

const LANES: usize = 8;

/// Maximum of a row, in 8 independent lanes so it vectorises.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in acc.iter().chain(tail) {
        best = if v > best { v } else { best };
    }
    best
}

/// `x ← exp(x − m)` over a row, returning the sum (8 lanes, combined in a fixed order).
#[inline(always)]
fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp_nonpos(*v - m);
            *v = e;
            *a += e;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        let e = exp_nonpos(*v - m);
        *v = e;
        tail += e;
    }
    let pairs = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    ((pairs[0] + pairs[2]) + (pairs[1] + pairs[3])) + tail
}

/// `exp(x)` for `x ≤ 0` (as after subtracting a row max), to about 2 ulp; inputs below −87 give ≈ 1e-38, not 0.
/// Branch-free so that it vectorises: `x = n·ln2 + r` with `|r| ≤ ln2/2`, `exp(r)` by its degree-7 Taylor polynomial
/// (truncation error < 6e-9 relative), `2ⁿ` built in the exponent bits.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // few mantissa bits: n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n + 127 in the exponent field: t's bits are ROUND's bits plus n.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_nonpos_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let e = super::exp_nonpos(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(super::exp_nonpos(0.0), 1.0);
        assert!(super::exp_nonpos(-1e30) < 1e-37);
    }
}
