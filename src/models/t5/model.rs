//! The forward of transformers' `T5EncoderModel`, block by block from a [`WeightSource`]: token embedding (no
//! positions, no scaling); per block a pre-RMS-norm self-attention with the relative position bias and a
//! pre-RMS-norm feed-forward, each with a residual; the final RMS norm (`last_hidden_state`).
//!
//! - **Relative position bias**: only block 0 holds `relative_attention_bias` (`[num_buckets, heads]`); transformers
//!   computes the `[heads, S, S]` bias there and passes it on to every later block. Here the tiny table is copied
//!   out of block 0 and each attention chunk gathers its own slice of the bias (never the whole `[heads, S, S]`).
//! - **No `1/√d` scaling** of the scores (T5 folds it into its initialisation).
//! - **No padding mask** by default: FLUX feeds the padded ids without one (diffusers' `_get_t5_prompt_embeds`,
//!   BFL's `HFEmbedder`), so pads attend and are attended to like any token. An optional key mask reproduces
//!   transformers with `attention_mask` (masked keys get −∞ before the softmax).
//! - **Precision**: scores, bias, mask and softmax in f32 whatever the compute dtype; activations and matmuls in the
//!   compute dtype, except that an f16 compute dtype runs T5 in f32 (T5 overflows f16: transformers keeps `wo` in
//!   f32 and clamps; BFL runs it in bf16). Each weight is then widened to f32 right before its matmul.

use candle_core::{DType, Device, Tensor, D};

use super::config::{FfActivation, T5EncoderConfig};
use crate::error::{Error, Result};
use crate::ops::ATTENTION_SCRATCH_BYTES;
use crate::weights::{BlockWeights, WeightSource};

/// Longest sequence accepted (BFL runs 256 / 512; the bucket rule is defined for any length).
pub(crate) const MAX_SEQUENCE: usize = 4096;

/// The dtype activations run in for a compute dtype: f16 is widened to f32 (see the module doc).
pub(crate) fn activation_dtype(compute: DType) -> DType {
    if compute == DType::F16 {
        DType::F32
    } else {
        compute
    }
}

/// Run the encoder on `ids` `[B, S]` (u32 or i64). `embedding` is the block of the token table (`shared` or
/// `encoder.embed_tokens`). `mask` (`[B·S]`, 1 = attend, 0 = masked key) is transformers' `attention_mask`; `None`
/// is FLUX's use. Returns `last_hidden_state` `[B, S, d_model]` in the activation dtype on `w`'s device.
pub(crate) fn forward(
    c: &T5EncoderConfig,
    embedding: &str,
    w: &dyn WeightSource,
    ids: &Tensor,
    mask: Option<&[u32]>,
) -> Result<Tensor> {
    let dev = w.device();
    let dt = activation_dtype(w.dtype());
    let (b, s) = ids
        .dims2()
        .map_err(|_| Error::invalid(format!("T5 encoder: ids must be [batch, seq], got {:?}", ids.dims())))?;
    if b == 0 || s == 0 || s > MAX_SEQUENCE {
        return Err(Error::invalid(format!(
            "T5 encoder: ids {:?} need 1..={MAX_SEQUENCE} positions and a batch of at least 1",
            ids.dims()
        )));
    }
    let host_ids = token_ids(ids, c.vocab_size)?;
    let mask = match mask {
        None => None,
        Some(m) => Some(key_mask(m, b, s, dev)?),
    };
    let d = c.d_model;
    let mut x = {
        let bw = w.fetch(embedding)?;
        let table = bw.get_shaped("weight", &[c.vocab_size, d])?;
        let ids_dev = Tensor::from_vec(host_ids, b * s, dev)?;
        table.index_select(&ids_dev, 0)?.reshape((b, s, d))?.to_dtype(dt)?
    };
    let buckets = bucket_table(s, c.relative_attention_num_buckets, c.relative_attention_max_distance);
    let mut bias_table: Option<Tensor> = None;
    for i in 0..c.num_layers {
        let bw = w.fetch(&format!("encoder.block.{i}"))?;
        if i == 0 {
            let t = bw.get_shaped(
                "layer.0.SelfAttention.relative_attention_bias.weight",
                &[c.relative_attention_num_buckets, c.num_heads],
            )?;
            // A copy: a streamed block's tensors may view a buffer that goes back to the manager with the block.
            bias_table = Some(t.to_dtype(DType::F32)?.copy()?);
        }
        let table = bias_table.as_ref().ok_or_else(|| Error::format("T5 encoder: no relative position bias"))?;
        let attn =
            Attention { heads: c.num_heads, d_kv: c.d_kv, bias_table: table, buckets: &buckets, mask: mask.as_ref() };
        x = block(c, &bw, x, &attn, dt)?;
    }
    let bw = w.fetch("encoder.final_layer_norm")?;
    let g = weight(&bw, "weight", &[d], dt)?;
    crate::ops::rms_norm(&x, &g, c.layer_norm_epsilon)
}

/// One `T5Block`: `x + o(attn(norm0(x)))`, then `+ ff(norm1(·))`.
fn block(c: &T5EncoderConfig, bw: &BlockWeights, x: Tensor, attn: &Attention, dt: DType) -> Result<Tensor> {
    let (d, inner, ff) = (c.d_model, c.inner_dim(), c.d_ff);
    let eps = c.layer_norm_epsilon;
    let mut h = crate::ops::rms_norm(&x, &weight(bw, "layer.0.layer_norm.weight", &[d], dt)?, eps)?;
    // Each weight is fetched right before its matmul and dropped after it (a quantised weight is dequantised on get).
    let q = proj(bw, "layer.0.SelfAttention.q", &h, d, inner, dt)?;
    let k = proj(bw, "layer.0.SelfAttention.k", &h, d, inner, dt)?;
    let v = proj(bw, "layer.0.SelfAttention.v", &h, d, inner, dt)?;
    drop(h);
    let mut o = attn.forward(q, k, v, ATTENTION_SCRATCH_BYTES)?;
    o = proj(bw, "layer.0.SelfAttention.o", &o, inner, d, dt)?;
    let x = (x + o)?;
    h = crate::ops::rms_norm(&x, &weight(bw, "layer.1.layer_norm.weight", &[d], dt)?, eps)?;
    let y = if c.gated {
        let mut g = proj(bw, "layer.1.DenseReluDense.wi_0", &h, d, ff, dt)?;
        g = activation(&g, c.activation)?;
        let u = proj(bw, "layer.1.DenseReluDense.wi_1", &h, d, ff, dt)?;
        drop(h);
        g = (g * u)?;
        proj(bw, "layer.1.DenseReluDense.wo", &g, ff, d, dt)?
    } else {
        let mut g = proj(bw, "layer.1.DenseReluDense.wi", &h, d, ff, dt)?;
        drop(h);
        g = activation(&g, c.activation)?;
        proj(bw, "layer.1.DenseReluDense.wo", &g, ff, d, dt)?
    };
    Ok((x + y)?)
}

/// The tensor `name` of the block with `shape`, in the activation dtype.
fn weight(bw: &BlockWeights, name: &str, shape: &[usize], dt: DType) -> Result<Tensor> {
    Ok(bw.get_shaped(name, shape)?.to_dtype(dt)?)
}

/// A bias-free linear layer `{name}.weight` `[out, inp]`.
fn proj(bw: &BlockWeights, name: &str, x: &Tensor, inp: usize, out: usize, dt: DType) -> Result<Tensor> {
    let wt = weight(bw, &format!("{name}.weight"), &[out, inp], dt)?;
    crate::ops::linear(x, &wt, None)
}

fn activation(x: &Tensor, act: FfActivation) -> Result<Tensor> {
    Ok(match act {
        FfActivation::GeluNew => x.gelu()?, // candle's `gelu` is the tanh approximation
        FfActivation::Gelu => x.gelu_erf()?,
        FfActivation::Relu => x.relu()?,
        FfActivation::Silu => x.silu()?,
    })
}

/// transformers' `T5Attention._relative_position_bucket` for bidirectional attention, computed as torch computes it
/// (the logarithmic part in f32, truncated): half the buckets for keys after the query, in each half `nb/4` exact
/// distances then logarithmic bins up to `max_distance`, all larger distances in the last bin.
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let base = if relative_position > 0 { half } else { 0 };
    let n = relative_position.unsigned_abs() as i64;
    let max_exact = half / 2;
    if n < max_exact {
        return (base + n) as u32;
    }
    // torch: `max_exact + (log(n.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact))
    // .to(long)`, the Python float divisor rounded to f32 by the op.
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let scaled = ((n as f32) / (max_exact as f32)).ln() / log_ratio * ((half - max_exact) as f32);
    let large = (max_exact + scaled as i64).min(half - 1);
    (base + large) as u32
}

/// Buckets of every relative position `j − i` of a sequence of `s`, indexed by `j − i + s − 1`.
fn bucket_table(s: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    (0..2 * s - 1).map(|r| relative_position_bucket(r as i64 - (s as i64 - 1), num_buckets, max_distance)).collect()
}

/// `[B, 1, 1, S]` f32: 0 where the mask is 1, −∞ where it is 0. Every row must attend to at least one key.
fn key_mask(mask: &[u32], b: usize, s: usize, dev: &Device) -> Result<Tensor> {
    if mask.len() != b * s || mask.iter().any(|&m| m > 1) {
        return Err(Error::invalid(format!(
            "T5 encoder: the attention mask must have {b}×{s} entries of 0 or 1, got {}",
            mask.len()
        )));
    }
    if mask.chunks(s).any(|row| row.iter().all(|&m| m == 0)) {
        return Err(Error::invalid("T5 encoder: an attention mask row masks every token"));
    }
    let v: Vec<f32> = mask.iter().map(|&m| if m == 1 { 0.0 } else { f32::NEG_INFINITY }).collect();
    Ok(Tensor::from_vec(v, (b, 1, 1, s), dev)?)
}

/// T5 self-attention: `softmax(q kᵀ + bias (+ mask)) v` per head, unscaled. Its own chunked composition (the
/// attention kernels of `crate::ops::attention` take no additive bias): heads, and if one head's scores exceed the
/// budget also query rows, are processed in chunks whose f32 scratch — the chunk's gathered bias and at most two
/// score-sized buffers — stays within the budget. At T5-XXL size (64 heads, 512 tokens, batch 1) a head's scores are
/// 1 MiB, so 21 heads go per chunk at the default 64 MiB.
pub(crate) struct Attention<'a> {
    pub heads: usize,
    pub d_kv: usize,
    /// `[num_buckets, heads]` f32.
    pub bias_table: &'a Tensor,
    /// Bucket of each relative position (`j − i + S − 1`).
    pub buckets: &'a [u32],
    /// `[B, 1, 1, S]` additive key mask.
    pub mask: Option<&'a Tensor>,
}

/// (heads per chunk, query rows per chunk) keeping a chunk's f32 scratch within `budget` bytes.
pub(crate) fn attention_chunks(batch: usize, heads: usize, s: usize, budget: u64) -> (usize, usize) {
    let per_row = per_head_row_bytes(batch, s);
    let per_head = per_row * s as u64;
    if per_head <= budget {
        (((budget / per_head) as usize).clamp(1, heads), s)
    } else {
        (1, ((budget / per_row) as usize).clamp(1, s))
    }
}

/// f32 scratch of one (head, query row): at most two score rows over the batch and one row of gathered bias live at
/// once (the bias is gathered, then transposed, before the scores exist).
pub(crate) fn per_head_row_bytes(batch: usize, s: usize) -> u64 {
    (4 * s * (1 + 2 * batch).max(2)) as u64
}

impl Attention<'_> {
    /// `q`, `k`, `v` `[B, S, heads·d_kv]` (consumed, so their memory goes as soon as their head-split copies exist);
    /// returns `[B, S, heads·d_kv]` in q's dtype.
    pub fn forward(&self, q: Tensor, k: Tensor, v: Tensor, budget: u64) -> Result<Tensor> {
        let (b, s, inner) = q.dims3()?;
        let (h, dk) = (self.heads, self.d_kv);
        if inner != h * dk || k.dims() != q.dims() || v.dims() != q.dims() || self.buckets.len() != 2 * s - 1 {
            return Err(Error::invalid(format!(
                "T5 attention: q {:?}, k {:?}, v {:?} with {h} heads of {dk}",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        let dt = q.dtype();
        let dev = q.device().clone();
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, s, h, dk))?.transpose(1, 2)?.contiguous()?) };
        let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
        let (hc, rows) = attention_chunks(b, h, s, budget);
        let mut heads_out = Vec::with_capacity(h.div_ceil(hc));
        for h0 in (0..h).step_by(hc) {
            let hn = hc.min(h - h0);
            let kt = kh.narrow(1, h0, hn)?.to_dtype(DType::F32)?.transpose(2, 3)?.contiguous()?; // [B, hn, dk, S]
            let vc = vh.narrow(1, h0, hn)?.contiguous()?; // [B, hn, S, dk]
            let table = self.bias_table.narrow(1, h0, hn)?.contiguous()?; // [buckets, hn]
            let mut rows_out = Vec::with_capacity(s.div_ceil(rows));
            for r0 in (0..s).step_by(rows) {
                let rn = rows.min(s - r0);
                let idx: Vec<u32> =
                    (r0..r0 + rn).flat_map(|i| (0..s).map(move |j| j + s - 1 - i)).map(|r| self.buckets[r]).collect();
                let idx = Tensor::from_vec(idx, rn * s, &dev)?;
                let bias = table.index_select(&idx, 0)?.t()?.contiguous()?.reshape((1, hn, rn, s))?;
                let qc = qh.narrow(1, h0, hn)?.narrow(2, r0, rn)?.to_dtype(DType::F32)?.contiguous()?;
                let mut scores = qc.matmul(&kt)?; // [B, hn, rn, S]
                drop(qc);
                scores = scores.broadcast_add(&bias)?;
                drop(bias);
                if let Some(m) = self.mask {
                    scores = scores.broadcast_add(m)?;
                }
                let max = scores.max_keepdim(D::Minus1)?;
                scores = scores.broadcast_sub(&max)?;
                scores = scores.exp()?;
                let sum = scores.sum_keepdim(D::Minus1)?;
                scores = scores.broadcast_div(&sum)?;
                let probs = scores.to_dtype(dt)?;
                drop(scores);
                rows_out.push(probs.matmul(&vc)?);
            }
            heads_out.push(if rows_out.len() == 1 { rows_out.remove(0) } else { Tensor::cat(&rows_out, 2)? });
        }
        drop((qh, kh, vh));
        let out = if heads_out.len() == 1 { heads_out.remove(0) } else { Tensor::cat(&heads_out, 1)? };
        drop(heads_out);
        Ok(out.transpose(1, 2)?.reshape((b, s, inner))?)
    }
}

/// The ids as u32 on the host, each checked against the vocabulary.
fn token_ids(ids: &Tensor, vocab: usize) -> Result<Vec<u32>> {
    let flat = ids.flatten_all()?;
    let v: Vec<i64> = match ids.dtype() {
        DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => flat.to_vec1::<i64>()?,
        other => return Err(Error::invalid(format!("T5 encoder: ids must be u32 or i64, got {other:?}"))),
    };
    v.into_iter()
        .map(|id| {
            u32::try_from(id).ok().filter(|&u| (u as usize) < vocab).ok_or_else(|| {
                Error::invalid(format!("T5 encoder: token id {id} is outside the vocabulary of {vocab}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full-matrix reference: all heads at once, the whole `[H, S, S]` bias.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, a: &Attention) -> Tensor {
        let (b, s, _) = q.dims3().unwrap();
        let (h, dk) = (a.heads, a.d_kv);
        let sp = |t: &Tensor| t.reshape((b, s, h, dk)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let idx: Vec<u32> = (0..s).flat_map(|i| (0..s).map(move |j| a.buckets[j + s - 1 - i])).collect();
        let idx = Tensor::from_vec(idx, s * s, &Device::Cpu).unwrap();
        let bias = a.bias_table.index_select(&idx, 0).unwrap().t().unwrap().reshape((1, h, s, s)).unwrap();
        let mut sc = sp(q).matmul(&sp(k).t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        if let Some(m) = a.mask {
            sc = sc.broadcast_add(m).unwrap();
        }
        let p = candle_nn_softmax(&sc);
        p.matmul(&sp(v)).unwrap().transpose(1, 2).unwrap().reshape((b, s, h * dk)).unwrap()
    }

    fn candle_nn_softmax(x: &Tensor) -> Tensor {
        let m = x.max_keepdim(D::Minus1).unwrap();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    #[test]
    fn chunked_attention_equals_the_full_matrix() {
        let dev = Device::Cpu;
        let (b, s, h, dk) = (2, 23, 5, 6);
        let q = Tensor::randn(0f32, 1.0, (b, s, h * dk), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, s, h * dk), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, s, h * dk), &dev).unwrap();
        let table = Tensor::randn(0f32, 1.0, (8, h), &dev).unwrap();
        let buckets = bucket_table(s, 8, 10);
        let mask_rows: Vec<u32> = (0..b * s).map(|i| u32::from(i % s < 17 - 5 * (i / s))).collect();
        let mask = key_mask(&mask_rows, b, s, &dev).unwrap();
        for m in [None, Some(&mask)] {
            let a = Attention { heads: h, d_kv: dk, bias_table: &table, buckets: &buckets, mask: m };
            let want = reference(&q, &k, &v, &a);
            let unit = per_head_row_bytes(b, s);
            // All heads at once; 2 heads per chunk; 1 head and 4 rows; the one-row minimum.
            for budget in [u64::MAX, 2 * s as u64 * unit, 4 * unit, 1] {
                let got = a.forward(q.clone(), k.clone(), v.clone(), budget).unwrap();
                let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-5, "budget {budget}: {err}");
            }
        }
        assert_eq!(attention_chunks(1, 64, 512, 64 << 20), (21, 512));
        assert_eq!(attention_chunks(1, 4, 100, per_head_row_bytes(1, 100) * 7), (1, 7));
    }

    #[test]
    fn buckets_follow_the_rule() {
        // Real T5 (32 buckets, 128): keys before the query in 0..16, after in 16..32; distance 0..7 exact.
        assert_eq!(relative_position_bucket(0, 32, 128), 0);
        assert_eq!(relative_position_bucket(-3, 32, 128), 3);
        assert_eq!(relative_position_bucket(3, 32, 128), 19);
        assert_eq!(relative_position_bucket(-10_000, 32, 128), 15);
        assert_eq!(relative_position_bucket(10_000, 32, 128), 31);
        let t = bucket_table(4, 32, 128);
        assert_eq!(t, vec![3, 2, 1, 0, 17, 18, 19]);
    }
}
