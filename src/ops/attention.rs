//! Multi-head scaled dot-product attention, `softmax(q kᵀ · scale) v`, without ever holding the whole score matrix.
//!
//! **Paths.** When q, k and v are all f32 CPU tensors, [`attention`] runs the flash-style kernel of
//! `ops::cpu::attention` (online softmax over key blocks, no head-split copies, output written in place; see there).
//! CUDA tensors (a `cuda` build) of the head sizes the CUDA kernel has (`kernels/attention.cu`: f16/bf16 on tensor
//! cores, f32) run that kernel, with no scratch beyond the output. Otherwise it runs the candle composition
//! [`attention_with_budget`], which processes the queries in chunks; that composition is also the reference the
//! kernels are tested against.
//!
//! **Scratch of the composition.** For a chunk of `c` query rows it holds at most three f32 score-sized buffers
//! (`3 · 4 · B · H · c · Nk` bytes: the scores, the shifted exponent, the probabilities) plus the chunk's output.
//! `c` is chosen so that this stays within [`ATTENTION_SCRATCH_BYTES`] (64 MiB), or the budget given to
//! [`attention_with_budget`]; one query row is the minimum. Inputs split into heads (`[B·H, N, D]` copies of q, k, v)
//! and the merged output come on top. The kernel needs far less (per worker thread one `bq × bk` score block and one
//! `bq × D` accumulator); [`attention_scratch_bytes`] gives each path's figure.
//!
//! **Precision.** Softmax runs in f32 for every compute dtype. With `upcast` (diffusers' `upcast_attention`, SD 2.x)
//! the `q kᵀ` product is also taken in f32; otherwise it is taken in the compute dtype (f32 on the kernel path).

use candle_core::{DType, Tensor, D};

use super::cpu;
use super::OpTarget;
use crate::error::{Error, Result};

/// Default bound on the score buffers of one query chunk, in bytes.
pub const ATTENTION_SCRATCH_BYTES: u64 = 64 << 20;

/// Attention over `q` `[B, Nq, H·D]`, `k` and `v` `[B, Nk, H·D]` with `heads` heads; returns `[B, Nq, H·D]` in q's dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, upcast: bool) -> Result<Tensor> {
    super::activation::enter(super::activation::bytes_like(q, q.elem_count()))?;
    if cpu::is_cpu_f32(q) && cpu::is_cpu_f32(k) && cpu::is_cpu_f32(v) {
        return cpu::attention::attention(q, k, v, heads, scale);
    }
    // The CUDA kernel takes q·kᵀ from the f16/bf16 inputs with f32 accumulation, which is what `upcast` asks for;
    // shapes it does not take (including invalid ones) go to the composition, which reports them.
    #[cfg(feature = "cuda")]
    if heads > 0 && q.rank() == 3 && q.dim(2)? % heads == 0 && super::cuda::attention::supported(q, k, v, q.dim(2)? / heads) {
        return Ok(super::cuda::attention::attention(q, k, v, heads, scale)?);
    }
    attention_with_budget(q, k, v, heads, scale, upcast, ATTENTION_SCRATCH_BYTES)
}

/// Query rows per chunk so that three f32 score buffers of `[batch·heads, rows, nk]` fit in `budget` bytes (≥ 1).
pub fn attention_chunk_rows(batch: usize, heads: usize, nk: usize, budget: u64) -> usize {
    let per_row = 3 * 4 * (batch * heads * nk.max(1)) as u64;
    ((budget / per_row.max(1)) as usize).max(1)
}

/// Peak transient bytes of [`attention`] beyond its inputs q, k, v and its output, on the path `target` selects
/// ([`OpTarget::new`]; a bare `DType` means the composition's):
/// - the candle composition (CUDA, f16/bf16): head-split copies of q, k, v and of the output, plus the chunk's score
///   buffers and output chunk;
/// - the f32 CPU kernel: per worker thread (global rayon pool) a score block, an accumulator and GEMM packing
///   buffers — a few MiB at most for the shapes of SD, far below the composition's figure.
pub fn attention_scratch_bytes(
    batch: usize,
    heads: usize,
    nq: usize,
    nk: usize,
    head_dim: usize,
    target: impl Into<OpTarget>,
) -> u64 {
    let target = target.into();
    if target.cuda_kernels && super::cuda::geometry::attention(head_dim, target.dtype).is_some() {
        return 0; // reads q, k, v in place, writes only its output
    }
    if target.cpu_kernels {
        let dims = cpu::attention::Dims { b: batch, nq, nk, heads, d: head_dim };
        cpu::attention::scratch_bytes(dims, cpu::threads())
    } else {
        composition_scratch_bytes(batch, heads, nq, nk, head_dim, target.dtype)
    }
}

/// Peak transient bytes of the composition [`attention_with_budget`] at the default budget.
fn composition_scratch_bytes(batch: usize, heads: usize, nq: usize, nk: usize, head_dim: usize, dtype: DType) -> u64 {
    let e = dtype.size_in_bytes() as u64;
    let rows = attention_chunk_rows(batch, heads, nk, ATTENTION_SCRATCH_BYTES).min(nq) as u64;
    let bh = (batch * heads) as u64;
    let split = bh * ((2 * nq + 2 * nk) * head_dim) as u64 * e; // q, k, v split + output before merge
    let chunk_scores = 3 * 4 * bh * rows * nk as u64;
    let chunk_out = bh * rows * head_dim as u64 * e;
    split + chunk_scores + chunk_out
}

/// The candle composition (the path of [`attention`] for f16/bf16 and CUDA, and the reference for the CPU kernel) with
/// an explicit bound on the score buffers (in bytes) — the chunking knob, exposed for tests. Runs on any device/dtype.
pub fn attention_with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
    budget: u64,
) -> Result<Tensor> {
    let (b, nq, c) = q.dims3()?;
    let (bk, nk, ck) = k.dims3()?;
    if v.dims() != k.dims() || bk != b || ck != c || heads == 0 || c % heads != 0 {
        return Err(Error::invalid(format!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let dtype = q.dtype();
    let d = c / heads;
    let split = |t: &Tensor, n: usize| -> Result<Tensor> {
        Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((b * heads, n, d))?)
    };
    let score_dtype = if upcast { DType::F32 } else { dtype };
    let qh = split(q, nq)?.to_dtype(score_dtype)?;
    let kt = split(k, nk)?.to_dtype(score_dtype)?.t()?.contiguous()?; // [BH, D, Nk]
    let vh = split(v, nk)?;
    let rows = attention_chunk_rows(b, heads, nk, budget).min(nq);
    let mut outs = Vec::with_capacity(nq.div_ceil(rows));
    let mut start = 0;
    while start < nq {
        let n = rows.min(nq - start);
        let qc = qh.narrow(1, start, n)?;
        let scores = qc.matmul(&kt)?.to_dtype(DType::F32)?;
        let scores = (scores * scale)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let exp = scores.broadcast_sub(&max)?.exp()?;
        drop(scores);
        let sum = exp.sum_keepdim(D::Minus1)?;
        let probs = exp.broadcast_div(&sum)?.to_dtype(dtype)?;
        drop(exp);
        outs.push(probs.matmul(&vh)?);
        start += n;
    }
    let out = if outs.len() == 1 { outs.pop().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(&outs, 1)? };
    drop(outs);
    Ok(out.reshape((b, heads, nq, d))?.transpose(1, 2)?.contiguous()?.reshape((b, nq, c))?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, D};

    /// The plain composition: full score matrix, f32 softmax.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, nq, c) = q.dims3().unwrap();
        let nk = k.dim(1).unwrap();
        let d = c / heads;
        let sp = |t: &Tensor, n| t.reshape((b, n, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (qh, kh, vh) = (sp(q, nq), sp(k, nk), sp(v, nk));
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
        let m = s.max_keepdim(D::Minus1).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&vh).unwrap().transpose(1, 2).unwrap().reshape((b, nq, c)).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn chunked_equals_unchunked() {
        let dev = Device::Cpu;
        let (b, nq, nk, c, h) = (2, 37, 23, 16, 4);
        let q = Tensor::randn(0f32, 1.0, (b, nq, c), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, nk, c), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, nk, c), &dev).unwrap();
        let scale = 1.0 / ((c / h) as f64).sqrt();
        let r = reference(&q, &k, &v, h, scale);
        let whole = super::attention_with_budget(&q, &k, &v, h, scale, false, u64::MAX).unwrap();
        // 3 query rows per chunk, and the 1-row minimum.
        let per_row = 3 * 4 * (b * h * nk) as u64;
        let three = super::attention_with_budget(&q, &k, &v, h, scale, false, 3 * per_row).unwrap();
        let one = super::attention_with_budget(&q, &k, &v, h, scale, false, 1).unwrap();
        assert!(max_diff(&whole, &r) < 1e-6, "{}", max_diff(&whole, &r));
        assert!(max_diff(&three, &whole) < 1e-6, "{}", max_diff(&three, &whole));
        assert!(max_diff(&one, &whole) < 1e-6, "{}", max_diff(&one, &whole));
        assert_eq!(super::attention_chunk_rows(b, h, nk, 3 * per_row), 3);
    }

    #[test]
    fn long_sequences_are_chunked_within_budget() {
        // 4096 tokens (a 64×64 latent), 8 heads: the full score matrix would be 512 MiB in f32.
        let rows = super::attention_chunk_rows(1, 8, 4096, super::ATTENTION_SCRATCH_BYTES);
        assert!(rows < 4096);
        assert!(3 * 4 * 8 * 4096 * rows as u64 <= super::ATTENTION_SCRATCH_BYTES);
    }

    #[test]
    fn f16_with_upcast_is_close_to_f32() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 20, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 9, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 9, 8), &dev).unwrap();
        let r = super::attention(&q, &k, &v, 2, 0.5, false).unwrap();
        let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let o = super::attention(&h(&q), &h(&k), &h(&v), 2, 0.5, true).unwrap();
        assert_eq!(o.dtype(), DType::F16);
        assert!(max_diff(&o, &r) < 1e-2);
    }
    /// The CPU kernel (through `attention`) against the full-softmax reference, over head sizes of SD/SDXL/FLUX and
    /// the VAE, cross-attention key counts, and sizes that are not multiples of the block sizes.
    #[test]
    fn cpu_kernel_matches_reference() {
        let dev = Device::Cpu;
        // (batch, Nq, Nk, heads, D, scale): blocks are 64 queries × 512 keys, so 70 / 600 / 1100 leave tails, and
        // scale 1.0 gives logits of a few units so the running max changes between key blocks.
        let cases = [
            (2, 100, 77, 8, 40, None),
            (2, 130, 130, 2, 80, None),
            (1, 70, 600, 2, 160, Some(1.0)),
            (2, 65, 1100, 3, 64, Some(1.0)),
            (1, 150, 150, 1, 512, None),
            (1, 1, 5, 2, 40, None),
            (2, 33, 1, 2, 128, None),
        ];
        for (b, nq, nk, h, d, scale) in cases {
            let q = Tensor::randn(0f32, 1.0, (b, nq, h * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, nk, h * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, nk, h * d), &dev).unwrap();
            let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
            let r = reference(&q, &k, &v, h, scale);
            let o = super::attention(&q, &k, &v, h, scale, false).unwrap();
            assert_eq!(o.dims(), &[b, nq, h * d]);
            let mag = r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let err = max_diff(&o, &r);
            eprintln!("b={b} nq={nq} nk={nk} h={h} d={d}: max abs err {err:.2e} (|ref| ≤ {mag:.2})");
            assert!(err <= 1e-5 * mag, "b={b} nq={nq} nk={nk} h={h} d={d}: {err}");
        }
    }

    /// Tiny blocks (7 queries × 13 keys) so that every task has several key blocks and query/key tails.
    #[test]
    fn cpu_kernel_small_blocks_match_reference() {
        let dev = Device::Cpu;
        let (b, nq, nk, h, d) = (2, 37, 50, 4, 40);
        let q = Tensor::randn(0f32, 1.0, (b, nq, h * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, nk, h * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, nk, h * d), &dev).unwrap();
        let r = reference(&q, &k, &v, h, 0.8);
        let data = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dims = crate::ops::cpu::attention::Dims { b, nq, nk, heads: h, d };
        for (bq, bk) in [(7, 13), (1, 1), (37, 50), (64, 512)] {
            let o = crate::ops::cpu::attention::attention_f32(&data(&q), &data(&k), &data(&v), dims, 0.8, bq, bk).unwrap();
            let o = Tensor::from_vec(o, (b, nq, h * d), &dev).unwrap();
            let err = max_diff(&o, &r);
            eprintln!("blocks {bq}×{bk}: max abs err {err:.2e}");
            assert!(err <= 1e-5, "blocks {bq}×{bk}: {err}");
        }
    }

    /// Bit-identical run to run and with 1, 2 or 3 threads, both when tasks outnumber threads (single-threaded GEMMs)
    /// and when there is a single task (the GEMMs go parallel), with several key blocks and with one (Nk = 77).
    #[test]
    fn cpu_kernel_is_deterministic_across_thread_counts() {
        let dev = Device::Cpu;
        for (b, nq, nk, h, d) in [(2, 150, 700, 3, 40), (1, 50, 700, 1, 512), (2, 150, 77, 3, 40), (1, 50, 77, 1, 512)] {
            let q = Tensor::randn(0f32, 1.0, (b, nq, h * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, nk, h * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, nk, h * d), &dev).unwrap();
            let run = |n: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
                pool.install(|| super::attention(&q, &k, &v, h, 1.0, false).unwrap())
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let one = bits(run(1));
            assert_eq!(one, bits(run(1)), "run to run");
            assert_eq!(one, bits(run(2)), "1 vs 2 threads");
            assert_eq!(one, bits(run(3)), "1 vs 3 threads");
        }
    }

    #[test]
    fn cpu_kernel_rejects_bad_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 12), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 5, 12), DType::F32, &dev).unwrap();
        let v8 = Tensor::zeros((1, 5, 8), DType::F32, &dev).unwrap();
        assert!(super::attention(&q, &k, &v8, 3, 1.0, false).is_err());
        assert!(super::attention(&q, &k, &k, 5, 1.0, false).is_err());
        assert!(super::attention(&q, &k, &k, 0, 1.0, false).is_err());
    }

    /// The bound covers both paths, and the kernel's own share is small at SD's largest self-attention.
    #[test]
    fn scratch_bound_covers_both_paths() {
        let dims = crate::ops::cpu::attention::Dims { b: 2, nq: 4096, nk: 4096, heads: 8, d: 40 };
        let kernel = crate::ops::cpu::attention::scratch_bytes(dims, 16);
        let total = super::attention_scratch_bytes(2, 8, 4096, 4096, 40, DType::F32);
        assert!(total >= kernel && total >= super::composition_scratch_bytes(2, 8, 4096, 4096, 40, DType::F32));
        eprintln!("kernel {kernel} B (16 threads), {} B (2 threads); bound {total} B", crate::ops::cpu::attention::scratch_bytes(dims, 2));
        assert!(kernel < 32 << 20, "{kernel}");
    }
}
