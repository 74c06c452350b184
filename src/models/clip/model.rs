//! The forward of transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`, block by block from a
//! [`WeightSource`]: token + position embeddings; per layer pre-LayerNorm causal self-attention and pre-LayerNorm MLP,
//! each with a residual; the final LayerNorm; the pooled state at the EOS position; the projection.
//!
//! No padding mask: diffusers passes none (`text_encoder.config.use_attention_mask` is unset for every SD / SDXL
//! encoder), so pads attend like any token behind the causal mask, as in the reference.

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, ClipKind, ClipTextConfig};
use crate::error::{Error, Result};
use crate::models::blocks::{linear_from, Bias};
use crate::ops::layer_norm;
use crate::weights::{BlockWeights, WeightSource};

/// What one forward returns; every tensor in the compute dtype on the compute device.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `final_layer_norm(hidden_states[-1])` `[B, S, C]`: transformers' `last_hidden_state` (SD 1.x, FLUX).
    pub last_hidden_state: Tensor,
    /// `hidden_states[-(clip_skip + 2)]` without the final norm `[B, S, C]`: what diffusers' SDXL pipeline feeds the
    /// UNet from both encoders (`hidden_states[-2]` when `clip_skip` is 0). (Through the [`TextEncoder`] trait:
    /// the raw state `HiddenLayer::Skip(n)` asks for.)
    ///
    /// [`TextEncoder`]: crate::models::text_encoder::TextEncoder
    pub penultimate: Tensor,
    /// `final_layer_norm(hidden_states[-(clip_skip + 1)])` `[B, S, C]`: diffusers' `StableDiffusionPipeline`
    /// `encode_prompt` with `clip_skip` (equal to `last_hidden_state` when `clip_skip` is 0).
    pub clip_skipped: Tensor,
    /// The final-LN state at the EOS position `[B, C]` (transformers' `pooler_output`; FLUX's pooled CLIP input).
    pub pooled: Tensor,
    /// `text_projection(pooled)` `[B, projection_dim]` for `CLIPTextModelWithProjection` (SDXL's pooled input).
    pub text_embeds: Option<Tensor>,
}

/// Run the encoder on `ids` `[B, S]` (u32 or i64 token ids, S ≤ `max_position_embeddings`). `prefix` is the key
/// prefix of the text model's tensors (`text_model.` or empty). [`ClipOutput::penultimate`] is
/// `hidden_states[-(raw + 1)]` and [`ClipOutput::clip_skipped`] `final_layer_norm(hidden_states[-(normed + 1)])`
/// (both ≤ `num_hidden_layers`; diffusers' `clip_skip = k` is `raw = k + 1, normed = k`).
pub(crate) fn forward(
    c: &ClipTextConfig,
    prefix: &str,
    w: &dyn WeightSource,
    ids: &Tensor,
    raw: usize,
    normed: usize,
) -> Result<ClipOutput> {
    let dev = w.device();
    let (b, s) = ids
        .dims2()
        .map_err(|_| Error::invalid(format!("text encoder: ids must be [batch, seq], got {:?}", ids.dims())))?;
    if b == 0 || s == 0 || s > c.max_position_embeddings {
        return Err(Error::invalid(format!(
            "text encoder: ids {:?} need 1..={} positions and a batch of at least 1",
            ids.dims(),
            c.max_position_embeddings
        )));
    }
    let layers = c.num_hidden_layers;
    if raw > layers || normed > layers {
        return Err(Error::invalid(format!(
            "text encoder: hidden states {raw} and {normed} layers from the end, the model has {layers} layers"
        )));
    }
    let host_ids = token_ids(ids, c.vocab_size)?;
    let ids_dev = Tensor::from_vec(host_ids.clone(), b * s, dev)?;
    let ch = c.hidden_size;

    // hidden_states[i]: 0 = embeddings, i = output of layer i. Keep the two that are asked for.
    let (raw_index, normed_index) = (layers - raw, layers - normed);
    let mut x = {
        let bw = w.fetch(&format!("{prefix}embeddings"))?;
        let tok = bw.get_shaped("token_embedding.weight", &[c.vocab_size, ch])?;
        let pos = bw.get_shaped("position_embedding.weight", &[c.max_position_embeddings, ch])?;
        let e = tok.index_select(&ids_dev, 0)?.reshape((b, s, ch))?;
        e.broadcast_add(&pos.narrow(0, 0, s)?)?
    };
    drop(ids_dev);
    let mut penultimate = (raw_index == 0).then(|| x.clone());
    let mut skipped = (normed_index == 0).then(|| x.clone());
    let mask = causal_mask(s, dev)?;
    for i in 0..layers {
        let bw = w.fetch(&format!("{prefix}encoder.layers.{i}"))?;
        x = encoder_layer(c, &bw, &x, &mask)?;
        drop(bw);
        if i + 1 == raw_index {
            penultimate = Some(x.clone());
        }
        if i + 1 == normed_index && normed_index != layers {
            skipped = Some(x.clone());
        }
    }
    let (last_hidden_state, clip_skipped) = {
        let bw = w.fetch(&format!("{prefix}final_layer_norm"))?;
        let (g, bias) = (bw.get_shaped("weight", &[ch])?, bw.get_shaped("bias", &[ch])?);
        let last = layer_norm(&x, &g, &bias, c.layer_norm_eps)?;
        drop(x);
        let skipped = match skipped {
            Some(h) => layer_norm(&h, &g, &bias, c.layer_norm_eps)?,
            None => last.clone(),
        };
        (last, skipped)
    };
    let penultimate = penultimate.ok_or_else(|| Error::format("text encoder: no penultimate state"))?;
    let pooled = pool(&last_hidden_state, &eos_positions(&host_ids, b, s, c.eos_token_id))?;
    let text_embeds = match c.kind {
        ClipKind::TextModel => None,
        ClipKind::WithProjection => {
            let bw = w.fetch("text_projection")?;
            let wt = bw.get_shaped("weight", &[c.projection_dim, ch])?;
            Some(crate::ops::linear(&pooled, &wt, None)?) // `nn.Linear(hidden, projection_dim, bias=False)`
        }
    };
    Ok(ClipOutput {
        last_hidden_state,
        penultimate,
        clip_skipped,
        pooled,
        text_embeds,
    })
}

/// One `CLIPEncoderLayer`: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
fn encoder_layer(c: &ClipTextConfig, bw: &BlockWeights, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let ch = c.hidden_size;
    let ln = |name: &str, t: &Tensor| -> Result<Tensor> {
        let g = bw.get_shaped(&format!("{name}.weight"), &[ch])?;
        let b = bw.get_shaped(&format!("{name}.bias"), &[ch])?;
        layer_norm(t, &g, &b, c.layer_norm_eps)
    };
    let h = ln("layer_norm1", x)?;
    let q = linear_from(bw, "self_attn.q_proj", &h, ch, ch, Bias::Required)?;
    let k = linear_from(bw, "self_attn.k_proj", &h, ch, ch, Bias::Required)?;
    let v = linear_from(bw, "self_attn.v_proj", &h, ch, ch, Bias::Required)?;
    drop(h);
    // Reassigning `o` and `h` frees each intermediate as soon as the next exists (shadowing would keep them alive).
    let mut o = causal_attention(q, k, v, c.num_attention_heads, mask)?;
    o = linear_from(bw, "self_attn.out_proj", &o, ch, ch, Bias::Required)?;
    let x = (x + o)?;
    let mut h = ln("layer_norm2", &x)?;
    h = linear_from(bw, "mlp.fc1", &h, ch, c.intermediate_size, Bias::Required)?;
    h = activation(&h, c.hidden_act)?;
    h = linear_from(bw, "mlp.fc2", &h, c.intermediate_size, ch, Bias::Required)?;
    Ok((x + h)?)
}

/// `quick_gelu(x) = x · sigmoid(1.702 x)` or the exact GELU, in the input dtype.
fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Gelu => x.gelu_erf()?,
        Activation::QuickGelu => {
            let mut sig = (x * -1.702)?;
            sig = sig.exp()?;
            sig = sig.affine(1.0, 1.0)?;
            sig = sig.recip()?;
            (x * sig)?
        }
    })
}

/// `[S, S]` f32: 0 on and below the diagonal, −∞ above (a token sees itself and earlier tokens).
fn causal_mask(s: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..s * s)
        .map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(m, (s, s), dev)?)
}

/// Causal multi-head attention over `[B, S, H·D]` q, k, v (scale `1/√D`); scores, mask and softmax in f32 as
/// transformers computes them (`softmax(..., dtype=float32)`), the weighted sum in the compute dtype. The sequence is
/// at most 77 tokens, so the `[B, H, S, S]` scores are small (bigG, batch 2: 0.9 MiB).
fn causal_attention(q: Tensor, k: Tensor, v: Tensor, heads: usize, mask: &Tensor) -> Result<Tensor> {
    let (b, s, ch) = q.dims3()?;
    let d = ch / heads;
    let dt = q.dtype();
    let split = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()?) };
    // Each input is dropped as soon as its head-split copy exists, each score buffer as soon as the next does.
    let mut scores = {
        let qh = split(&q)?.to_dtype(DType::F32)?;
        drop(q);
        let kt = split(&k)?.to_dtype(DType::F32)?.transpose(2, 3)?.contiguous()?;
        drop(k);
        qh.matmul(&kt)?
    };
    scores = scores.affine(1.0 / (d as f64).sqrt(), 0.0)?;
    scores = scores.broadcast_add(mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let mut probs = scores.broadcast_sub(&max)?;
    drop(scores);
    probs = probs.exp()?;
    let sum = probs.sum_keepdim(D::Minus1)?;
    probs = probs.broadcast_div(&sum)?.to_dtype(dt)?;
    let vh = split(&v)?;
    drop(v);
    let o = probs.matmul(&vh)?;
    drop((probs, vh));
    Ok(o.transpose(1, 2)?.reshape((b, s, ch))?)
}

/// The ids as u32 on the host, each checked against the vocabulary.
fn token_ids(ids: &Tensor, vocab: usize) -> Result<Vec<u32>> {
    let flat = ids.flatten_all()?;
    let v: Vec<i64> = match ids.dtype() {
        DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => flat.to_vec1::<i64>()?,
        other => {
            return Err(Error::invalid(format!(
                "text encoder: ids must be u32 or i64, got {other:?}"
            )))
        }
    };
    v.into_iter()
        .map(|id| {
            u32::try_from(id).ok().filter(|&u| (u as usize) < vocab).ok_or_else(|| {
                Error::invalid(format!(
                    "text encoder: token id {id} is outside the vocabulary of {vocab}"
                ))
            })
        })
        .collect()
}

/// transformers' pooling positions: with the legacy `eos_token_id` 2, the first position of the largest id (the
/// EOS 49407 of the standard vocabulary); otherwise the first position of `eos_token_id` (0 when absent, like
/// `argmax` of an all-zero mask).
pub(crate) fn eos_positions(ids: &[u32], b: usize, s: usize, eos: u32) -> Vec<usize> {
    (0..b)
        .map(|r| {
            let row = &ids[r * s..(r + 1) * s];
            if eos == 2 {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&x| x == max).unwrap_or(0)
            } else {
                row.iter().position(|&x| x == eos).unwrap_or(0)
            }
        })
        .collect()
}

/// `h[r, pos[r], :]` for each row: `[B, C]`.
fn pool(h: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let rows = pos
        .iter()
        .enumerate()
        .map(|(r, &p)| h.get(r)?.get(p))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}
