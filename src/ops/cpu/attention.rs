//! Flash-style attention for f32 on the CPU: `softmax(q kᵀ · scale) v` with an online softmax, so neither the
//! `[H, Nq, Nk]` score matrix nor head-split copies of q, k, v ever exist.
//!
//! q is `[B, Nq, H·D]`, k and v are `[B, Nk, H·D]`, heads interleaved in the last dim as linear layers produce them;
//! head `h` of row `i` of batch `b` starts at `(b·N + i)·H·D + h·D`, and the GEMMs address it through their strides.
//! The work splits into tasks of one (batch, head, block of `bq` query rows), run in parallel on the rayon pool. A task
//! walks the keys in blocks of `bk`: `S = Q Kᵀ · scale` (GEMM), per row the running max `m` and running sum `l` are
//! updated and the accumulator rescaled by `exp(m_old − m_new)`, `S` becomes `P = exp(S − m_new)`, and `O += P V`
//! (GEMM). At the end `O / l` is written straight into the task's rows and columns of the `[B, Nq, H·D]` output; when
//! all keys fit in one block (cross-attention), `P` is normalised first and the `P V` GEMM writes the output itself.
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

/// Query rows and key rows per block for a shape — never the thread count, so results do not depend on it.
/// Measured on SD shapes (2 threads, AVX2): 256 × 512 for small heads, 256 × 256 for D ≥ 80 (the score block stays
/// within L2 next to the V block). Query blocks halve (down to 64) while the shape gives fewer than 32 tasks, so that
/// the pool has work to share.
pub(crate) fn blocks(dims: Dims) -> (usize, usize) {
    let bk = if dims.d <= 64 { 512 } else { 256 };
    let mut bq = 256;
    while bq > 64 && dims.b * dims.heads * dims.nq.div_ceil(bq) < 32 {
        bq /= 2;
    }
    (bq.min(dims.nq.max(1)), bk.min(dims.nk.max(1)))
}

/// Upper bound on the transient bytes of [`attention`] beyond its inputs and output, with `threads` workers: the
/// per-worker `S`, `O`, `m`, `l` buffers and the packing buffers of the one GEMM call a worker makes at a time (gemm
/// packs at most depth × (rows + cols) plus its alignment and register-tile padding, which depends on the CPU's
/// kernel: 256 elements per side covers the AVX-512 kernels, measured at b2 n1024 h8 d40, where 128 covered AVX2's
/// only). Non-contiguous inputs would add a contiguous copy each (the models pass contiguous ones).
pub(crate) fn scratch_bytes(dims: Dims, threads: usize) -> u64 {
    let (bq, bk) = blocks(dims);
    let tasks = dims.b * dims.heads * dims.nq.div_ceil(bq.max(1));
    let workers = tasks.min(threads.max(1)) as u64;
    let d = dims.d;
    let own = bq * bk + 2 * bq * d + bk * d + 4 * bq;
    let pack = (d * (bq + bk + 256)).max(bk * (bq + d + 256));
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
    // In chunks of tasks, polling the call's cancel between them.
    crate::ops::cancel::par_for_each_checked(
        tasks,
        crate::ops::cancel::chunk_for(threads()),
        || Scratch::new(bq, bk, d),
        |s, t| {
            let qb = t % q_blocks;
            let h = (t / q_blocks) % heads;
            let bi = t / (q_blocks * heads);
            let i0 = qb * bq;
            let task = Task { q, k, v, out: &out_ptr, dims, scale, bi, h, i0, rows: bq.min(nq - i0), bk, par };
            if task.run(s, arch) {
                return;
            }
            // Write O / l into this task's rows i0.. and columns h·D.. of the output (O is stored transposed).
            let rows = task.rows;
            for (inv, &l) in s.corr[..rows].iter_mut().zip(&s.l[..rows]) {
                *inv = 1.0 / l;
            }
            for r in 0..rows {
                let start = (bi * nq + i0 + r) * hd + h * d;
                // SAFETY: `start + d ≤ out.len()` (i0 + r < nq, h < heads), `out` outlives the parallel loop, and
                // tasks own disjoint (row, head) ranges, so no other reference to these `d` floats exists.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(start), d) };
                let inv = s.corr[r];
                for (o, line) in dst.iter_mut().zip(s.o.chunks_exact(rows)) {
                    *o = line[r] * inv;
                }
            }
        },
    )?;
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
// SAFETY: the pointer is only written through for disjoint (row, head) ranges, one task each (see `attention_f32`
// and `Task::run`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// One worker's buffers, reused from task to task. Everything is stored query-minor (transposed: `[key][query]`,
/// `[e][query]`) so that the GEMMs read and write it without repacking and the softmax vectorises across queries.
struct Scratch {
    /// `Sᵀ`, then `Pᵀ`: `cols × rows`.
    s: Vec<f32>,
    /// `Oᵀ`, the unnormalised accumulator: `D × rows`.
    o: Vec<f32>,
    /// `Qᵀ` of the task's block: `D × rows`.
    qt: Vec<f32>,
    /// The key block, contiguous: `cols × D`.
    kb: Vec<f32>,
    /// Running max and running sum per query row.
    m: Vec<f32>,
    l: Vec<f32>,
    /// Per key block: the new max, then the block's row sums; the accumulator's rescale factors.
    blk: Vec<f32>,
    corr: Vec<f32>,
}

impl Scratch {
    fn new(bq: usize, bk: usize, d: usize) -> Self {
        let z = |n: usize| vec![0f32; n];
        Self { s: z(bq * bk), o: z(bq * d), qt: z(bq * d), kb: z(bk * d), m: z(bq), l: z(bq), blk: z(bq), corr: z(bq) }
    }
}

/// One (batch, head, query block) task.
struct Task<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a OutPtr,
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
    /// Leaves the unnormalised accumulator `Oᵀ` in `s.o[..D·rows]` and the row sums in `s.l[..rows]` and returns
    /// false; or, when all keys fit in one block (cross-attention), normalises `P` and lets the `P V` GEMM write the
    /// task's part of the output directly, and returns true.
    fn run(&self, s: &mut Scratch, arch: Arch) -> bool {
        let Dims { nq, nk, heads, d, .. } = self.dims;
        let hd = heads * d;
        let rows = self.rows;
        // Qᵀ once per task: gemm wants the m-side operand with unit row stride.
        let q0 = (self.bi * nq + self.i0) * hd + self.h * d;
        for (e, line) in s.qt.chunks_exact_mut(rows).take(d).enumerate() {
            for (r, x) in line.iter_mut().enumerate() {
                *x = self.q[q0 + r * hd + e];
            }
        }
        let single = nk <= self.bk;
        let mut j0 = 0;
        while j0 < nk {
            let cols = self.bk.min(nk - j0);
            let kv_off = (self.bi * nk + j0) * hd + self.h * d;
            let first = j0 == 0;
            // The key block, contiguous: gemm reads this operand in place (no packing), and rows H·D apart would
            // be fetched from far caches at every use.
            for (j, kb) in s.kb.chunks_exact_mut(d).take(cols).enumerate() {
                let src = kv_off + j * hd;
                kb.copy_from_slice(&self.k[src..src + d]);
            }
            // Sᵀ[j, r] = scale · Σ_e q[i0 + r, h·D + e] · k[j0 + j, h·D + e], at j·rows + r.
            // SAFETY: gemm reads `s.qt[..D·rows]` and `s.kb[..cols·D]` and writes `s.s[..rows·cols]`, all within
            // their buffers (bq·D, bk·D, bq·bk long); the three are distinct allocations.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    d,
                    s.s.as_mut_ptr(),
                    rows as isize,
                    1,
                    false,
                    s.qt.as_ptr(),
                    rows as isize,
                    1,
                    s.kb.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    self.par,
                );
            }
            arch.dispatch(Softmax {
                s: &mut s.s[..rows * cols],
                o: &mut s.o[..rows * d],
                m: &mut s.m[..rows],
                l: &mut s.l[..rows],
                blk: &mut s.blk[..rows],
                corr: &mut s.corr[..rows],
                first,
                normalize: single,
            });
            // Oᵀ[e, r] (at e·rows + r) += Σ_j P[r, j] · v[j0 + j, h·D + e]; with a single key block, straight into
            // out[b, i0 + r, h·D + e] instead (row stride H·D).
            let (dst, dst_cs, dst_rs) = if single {
                (self.out.at((self.bi * nq + self.i0) * hd + self.h * d), 1, hd as isize)
            } else {
                (s.o.as_mut_ptr(), rows as isize, 1)
            };
            // SAFETY: v rows j0..j0+cols ≤ nk of batch bi, columns within head h: in bounds; `s.s` holds rows·cols
            // floats and `s.o` D·rows. The output rows i0..i0+rows < nq at columns h·D..h·D+D are in bounds and
            // belong to this task alone (tasks own disjoint (row, head) ranges; `out` outlives the parallel loop).
            // No destination aliases a source.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    cols,
                    dst,
                    dst_cs,
                    dst_rs,
                    !first,
                    s.s.as_ptr(),
                    rows as isize,
                    1,
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
        single
    }
}

/// The online-softmax step of one key block for all rows of a task, compiled for the best SIMD level available.
/// `s` is `Sᵀ` (one line of `rows` per key) and becomes `Pᵀ`; `o` is `Oᵀ` (one line of `rows` per head channel).
struct Softmax<'a> {
    s: &'a mut [f32],
    o: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    blk: &'a mut [f32],
    corr: &'a mut [f32],
    first: bool,
    /// Divide `P` by the row sums (single key block: `P` is final).
    normalize: bool,
}

impl WithSimd for Softmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Softmax { s, o, m, l, blk, corr, first, normalize } = self;
        let rows = m.len();
        // New running max: the block's max over its keys, and the old max.
        blk.copy_from_slice(&s[..rows]);
        for line in s.chunks_exact(rows).skip(1) {
            zip_map(simd, blk, line, |a, b| simd.max_f32s(a, b));
        }
        if !first {
            zip_map(simd, blk, m, |a, b| simd.max_f32s(a, b));
            // corr = exp(m_old − m_new), then m = m_new.
            corr.copy_from_slice(m);
            zip_map(simd, corr, blk, |a, b| exp_nonpos(simd, simd.sub_f32s(a, b)));
        }
        m.copy_from_slice(blk);
        // P = exp(S − m), summed per row (key after key, so in a fixed order) into blk.
        blk.fill(0.0);
        for line in s.chunks_exact_mut(rows) {
            let (lh, lt) = S::as_mut_simd_f32s(line);
            let (mh, mt) = S::as_simd_f32s(m);
            let (bh, bt) = S::as_mut_simd_f32s(blk);
            for ((x, &mv), acc) in lh.iter_mut().zip(mh).zip(bh.iter_mut()) {
                *x = exp_nonpos(simd, simd.sub_f32s(*x, mv));
                *acc = simd.add_f32s(*acc, *x);
            }
            if !lt.is_empty() {
                let e = exp_nonpos(simd, simd.sub_f32s(simd.partial_load_f32s(lt), simd.partial_load_f32s(mt)));
                simd.partial_store_f32s(lt, e);
                let acc = simd.add_f32s(simd.partial_load_f32s(bt), e);
                simd.partial_store_f32s(bt, acc);
            }
        }
        if first {
            l.copy_from_slice(blk);
            if normalize {
                corr.iter_mut().zip(&*l).for_each(|(c, &l)| *c = 1.0 / l);
                for line in s.chunks_exact_mut(rows) {
                    zip_map(simd, line, corr, |a, b| simd.mul_f32s(a, b));
                }
            }
        } else {
            zip_map(simd, l, corr, |a, b| simd.mul_f32s(a, b));
            zip_map(simd, l, blk, |a, b| simd.add_f32s(a, b));
            for line in o.chunks_exact_mut(rows) {
                zip_map(simd, line, corr, |a, b| simd.mul_f32s(a, b));
            }
        }
    }
}

/// `a[i] = f(a[i], b[i])` a SIMD vector at a time, the remainder as one partial vector (`a`, `b` of equal length).
#[inline(always)]
fn zip_map<S: Simd>(simd: S, a: &mut [f32], b: &[f32], f: impl Fn(S::f32s, S::f32s) -> S::f32s) {
    let (ah, at) = S::as_mut_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    for (x, &y) in ah.iter_mut().zip(bh) {
        *x = f(*x, y);
    }
    if !at.is_empty() {
        let r = f(simd.partial_load_f32s(at), simd.partial_load_f32s(bt));
        simd.partial_store_f32s(at, r);
    }
}

/// 1.5·2²³: adding it rounds an f32 of magnitude < 2²² to an integer, which then sits in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4; // few mantissa bits: n·LN2_HI is exact
const LN2_LO: f32 = -2.121_944_4e-4;
const MIN_ARG: f32 = -87.0;
/// 1/7!, 1/6!, …, 1/1!, 1/0!, highest degree first.
const TAYLOR: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `exp(x)` for `x ≤ 0` (as after subtracting a row max) on a SIMD vector, to about 2 ulp; inputs below −87 give
/// ≈ 1e-38, not 0. Branch-free: `x = n·ln2 + r` with `|r| ≤ ln2/2`, `exp(r)` by its degree-7 Taylor polynomial
/// (truncation error < 6e-9 relative), `2ⁿ` built in the exponent bits. Every lane goes through this one function
/// (row tails as partial vectors), so a value's result does not depend on where it sits.
#[inline(always)]
fn exp_nonpos<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
    let x = simd.max_f32s(x, simd.splat_f32s(MIN_ARG));
    let t = simd.mul_add_e_f32s(x, simd.splat_f32s(std::f32::consts::LOG2_E), simd.splat_f32s(ROUND));
    let n = simd.sub_f32s(t, simd.splat_f32s(ROUND));
    let r = simd.negate_mul_add_e_f32s(n, simd.splat_f32s(LN2_HI), x);
    let r = simd.negate_mul_add_e_f32s(n, simd.splat_f32s(LN2_LO), r);
    let mut p = simd.splat_f32s(TAYLOR[0]);
    for &c in &TAYLOR[1..] {
        p = simd.mul_add_e_f32s(p, r, simd.splat_f32s(c));
    }
    // n + 127 in the exponent field: t's bits are ROUND's bits plus n.
    let e = simd.sub_u32s(simd.transmute_u32s_f32s(t), simd.splat_u32s(ROUND.to_bits() - 127));
    let two_n = simd.transmute_f32s_u32s(simd.wrapping_dyn_shl_u32s(e, simd.splat_u32s(23)));
    simd.mul_f32s(p, two_n)
}

#[cfg(test)]
mod tests {
    /// `exp_nonpos` against f64 `exp` over its whole range, at the best SIMD level here and in plain scalar code.
    #[test]
    fn exp_nonpos_is_accurate() {
        struct Exp<'a>(&'a mut [f32]);
        impl pulp::WithSimd for Exp<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, simd: S) {
                let zeros = vec![0f32; self.0.len()];
                super::zip_map(simd, self.0, &zeros, |x, _| super::exp_nonpos(simd, x));
            }
        }
        let xs: Vec<f32> = (0..=87_000).map(|i| -0.001 * i as f32).chain([-87.5, -1e30, -0.0]).collect();
        for level in ["best", "scalar"] {
            let mut ys = xs.clone();
            if level == "best" {
                pulp::Arch::new().dispatch(Exp(&mut ys));
            } else {
                pulp::WithSimd::with_simd(Exp(&mut ys), pulp::Scalar::new());
            }
            let mut worst = 0f64;
            for (&x, &y) in xs.iter().zip(&ys).filter(|(&x, _)| x >= -87.0) {
                let r = (x as f64).exp();
                worst = worst.max(((y as f64 - r) / r).abs());
            }
            assert!(worst < 3e-7, "{level}: {worst}");
            assert_eq!(ys[xs.len() - 1], 1.0);
            assert!(ys[xs.len() - 2] < 1e-37 && ys[xs.len() - 3] < 1e-37);
        }
    }
}
