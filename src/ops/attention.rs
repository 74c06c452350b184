//! Multi-head scaled dot-product attention, `softmax(q kᵀ · scale) v`, processed in query chunks so the score matrix
//! never exists whole.
//!
//! **Scratch.** For a chunk of `c` query rows the op holds at most three f32 score-sized buffers
//! (`3 · 4 · B · H · c · Nk` bytes: the scores, the shifted exponent, the probabilities) plus the chunk's output.
//! `c` is chosen so that this stays within [`ATTENTION_SCRATCH_BYTES`] (64 MiB), or the budget given to
//! [`attention_with_budget`]; one query row is the minimum. Inputs split into heads (`[B·H, N, D]` copies of q, k, v)
//! and the merged output come on top; [`attention_scratch_bytes`] adds them up.
//!
//! **Precision.** Softmax runs in f32 for every compute dtype. With `upcast` (diffusers' `upcast_attention`, SD 2.x)
//! the `q kᵀ` product is also taken in f32; otherwise it is taken in the compute dtype.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Default bound on the score buffers of one query chunk, in bytes.
pub const ATTENTION_SCRATCH_BYTES: u64 = 64 << 20;

/// Attention over `q` `[B, Nq, H·D]`, `k` and `v` `[B, Nk, H·D]` with `heads` heads; returns `[B, Nq, H·D]` in q's dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, upcast: bool) -> Result<Tensor> {
    attention_with_budget(q, k, v, heads, scale, upcast, ATTENTION_SCRATCH_BYTES)
}

/// Query rows per chunk so that three f32 score buffers of `[batch·heads, rows, nk]` fit in `budget` bytes (≥ 1).
pub fn attention_chunk_rows(batch: usize, heads: usize, nk: usize, budget: u64) -> usize {
    let per_row = 3 * 4 * (batch * heads * nk.max(1)) as u64;
    ((budget / per_row.max(1)) as usize).max(1)
}

/// Peak transient bytes of [`attention`] beyond its inputs q, k, v and its output: head-split copies of q, k, v and
/// of the output, plus the chunk's score buffers and output chunk.
pub fn attention_scratch_bytes(batch: usize, heads: usize, nq: usize, nk: usize, head_dim: usize, dtype: DType) -> u64 {
    let e = dtype.size_in_bytes() as u64;
    let rows = attention_chunk_rows(batch, heads, nk, ATTENTION_SCRATCH_BYTES).min(nq) as u64;
    let bh = (batch * heads) as u64;
    let split = bh * ((2 * nq + 2 * nk) * head_dim) as u64 * e; // q, k, v split + output before merge
    let chunk_scores = 3 * 4 * bh * rows * nk as u64;
    let chunk_out = bh * rows * head_dim as u64 * e;
    split + chunk_scores + chunk_out
}

/// [`attention`] with an explicit bound on the score buffers (in bytes) — the chunking knob, exposed for tests.
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
}
