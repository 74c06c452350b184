//! Building blocks shared by the UNet and the VAE: each fetches its own weights by block key, computes, and drops
//! them before returning (so a streamed block's bytes go back to the manager at once).
//!
//! Tensor names inside a block are those of the diffusers checkpoint, relative to the block key
//! (`norm1.weight`, `conv1.weight`, `transformer_blocks.0.attn1.to_q.weight`, ...).

use candle_core::Tensor;

use crate::ops::OpTarget;
use crate::error::Result;
use crate::ops::{self, attention, conv2d, geglu, group_norm, layer_norm, linear};
use crate::weights::{BlockWeights, WeightSource};

/// A convolution block (`conv_in`, `conv_out`, `quant_conv`, ...): `weight` `[cout, cin, k, k]` and `bias` `[cout]`.
#[derive(Debug, Clone)]
pub(crate) struct ConvSpec {
    pub key: String,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
}

impl ConvSpec {
    pub fn new(key: impl Into<String>, cin: usize, cout: usize, k: usize) -> Self {
        Self { key: key.into(), cin, cout, k }
    }

    /// Fetch, convolve (stride 1, "same" padding), drop the weights.
    pub fn forward(&self, w: &dyn WeightSource, x: &Tensor) -> Result<Tensor> {
        let bw = w.fetch(&self.key)?;
        conv_from(&bw, "", x, self.cin, self.cout, self.k, 1, self.k / 2)
    }
}

/// Convolution with the tensors `{name}weight`/`{name}bias` of an already fetched block.
pub(crate) fn conv_from(
    bw: &BlockWeights,
    name: &str,
    x: &Tensor,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let weight = bw.get_shaped(&format!("{name}weight"), &[cout, cin, k, k])?;
    let bias = bw.get_shaped(&format!("{name}bias"), &[cout])?;
    conv2d(x, &weight, Some(&bias), stride, padding)
}

/// Linear layer `{name}.weight` `[out, in]` with a required (`bias`) or optional bias `{name}.bias` `[out]`
/// (`weight`/`bias` when `name` is empty: a block that is one linear layer).
pub(crate) fn linear_from(bw: &BlockWeights, name: &str, x: &Tensor, inp: usize, out: usize, bias: Bias) -> Result<Tensor> {
    let dot = if name.is_empty() { "" } else { "." };
    let weight = bw.get_shaped(&format!("{name}{dot}weight"), &[out, inp])?;
    let b_name = format!("{name}{dot}bias");
    let b = match bias {
        Bias::Required => Some(bw.get_shaped(&b_name, &[out])?),
        Bias::IfPresent if bw.contains(&b_name) => Some(bw.get_shaped(&b_name, &[out])?),
        Bias::IfPresent => None,
    };
    linear(x, &weight, b.as_ref())
}

/// Whether a linear layer's bias must exist.
#[derive(Clone, Copy)]
pub(crate) enum Bias {
    Required,
    IfPresent,
}

/// Group norm with `{name}.weight`/`{name}.bias` `[c]`, optional fused SiLU.
pub(crate) fn norm_from(bw: &BlockWeights, name: &str, x: &Tensor, c: usize, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let weight = bw.get_shaped(&format!("{name}.weight"), &[c])?;
    let bias = bw.get_shaped(&format!("{name}.bias"), &[c])?;
    group_norm(x, groups, &weight, &bias, eps, silu)
}

/// The final `GroupNorm → SiLU` of a UNet/encoder/decoder (`conv_norm_out`, its own block).
pub(crate) fn norm_silu_block(w: &dyn WeightSource, key: &str, x: &Tensor, c: usize, groups: usize, eps: f64) -> Result<Tensor> {
    let bw = w.fetch(key)?;
    let weight = bw.get_shaped("weight", &[c])?;
    let bias = bw.get_shaped("bias", &[c])?;
    group_norm(x, groups, &weight, &bias, eps, true)
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm = "default"`, SiLU, pre-norm.
#[derive(Debug, Clone)]
pub(crate) struct ResnetSpec {
    pub key: String,
    pub cin: usize,
    pub cout: usize,
    /// Width of the time embedding, if the block takes one (`time_emb_proj`).
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The output is divided by this (`output_scale_factor`).
    pub out_scale: f64,
}

impl ResnetSpec {
    /// `temb_act` is the time embedding after SiLU (`[B, temb]`), required when `self.temb` is set.
    pub fn forward(&self, w: &dyn WeightSource, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let bw = w.fetch(&self.key)?;
        let (b, _, _, _) = x.dims4()?;
        let mut h = norm_from(&bw, "norm1", x, self.cin, self.groups, self.eps, true)?;
        h = conv_from(&bw, "conv1.", &h, self.cin, self.cout, 3, 1, 1)?;
        if let (Some(tc), Some(t)) = (self.temb, temb_act) {
            let t = linear_from(&bw, "time_emb_proj", t, tc, self.cout, Bias::Required)?;
            h = h.broadcast_add(&t.reshape((b, self.cout, 1, 1))?)?;
        }
        h = norm_from(&bw, "norm2", &h, self.cout, self.groups, self.eps, true)?;
        h = conv_from(&bw, "conv2.", &h, self.cout, self.cout, 3, 1, 1)?;
        let mut out = if self.cin != self.cout {
            let s = conv_from(&bw, "conv_shortcut.", x, self.cin, self.cout, 1, 1, 0)?;
            (s + h)?
        } else {
            (x + h)?
        };
        if self.out_scale != 1.0 {
            out = (out / self.out_scale)?;
        }
        Ok(out)
    }

    pub fn mem(&self, p: &mut Peak, b: usize, hw: usize, e: OpTarget) {
        let x = act(b, self.cin, hw, e);
        let y = act(b, self.cout, hw, e);
        p.transient(ops::group_norm_scratch_bytes(b * self.cin * hw, e) + x);
        p.alloc(x); // h = norm1(x)
        p.transient(conv_scratch(b, self.cin, self.cout, hw, 3, e) + y);
        p.alloc(y);
        p.free(x); // h = conv1(h)
        p.transient(y); // + temb
        p.transient(ops::group_norm_scratch_bytes(b * self.cout * hw, e) + y); // norm2 (old h freed after)
        p.transient(conv_scratch(b, self.cout, self.cout, hw, 3, e) + 2 * y); // conv2 while norm2 output and h live
        if self.cin != self.cout {
            p.transient(2 * y + y); // shortcut conv (1×1: bias-add copy) + sum
        }
        p.transient(2 * y); // sum, h
        p.free(y);
        p.alloc(y); // output
    }
}

/// diffusers' `Downsample2D` with a conv: stride 2; padding 1, or padding 0 after a one-pixel right/bottom zero pad
/// (the VAE encoder's choice).
#[derive(Debug, Clone)]
pub(crate) struct DownsampleSpec {
    pub key: String,
    pub c: usize,
    pub padding: usize,
}

impl DownsampleSpec {
    pub fn forward(&self, w: &dyn WeightSource, x: &Tensor) -> Result<Tensor> {
        let bw = w.fetch(&self.key)?;
        if self.padding == 0 {
            let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            conv_from(&bw, "conv.", &padded, self.c, self.c, 3, 2, 0)
        } else {
            conv_from(&bw, "conv.", x, self.c, self.c, 3, 2, self.padding)
        }
    }

    /// Output spatial size for an input of `h`×`w`.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let f = |n: usize| if self.padding == 0 { (n + 1 - 3) / 2 + 1 } else { (n + 2 * self.padding - 3) / 2 + 1 };
        (f(h), f(w))
    }
}

/// diffusers' `Upsample2D` with a conv: nearest-neighbour resize to `target` (2× unless the skip it meets says
/// otherwise), then a 3×3 conv.
#[derive(Debug, Clone)]
pub(crate) struct UpsampleSpec {
    pub key: String,
    pub c: usize,
}

impl UpsampleSpec {
    pub fn forward(&self, w: &dyn WeightSource, x: &Tensor, target: (usize, usize)) -> Result<Tensor> {
        let bw = w.fetch(&self.key)?;
        let up = ops::upsample_nearest2d(x, target.0, target.1)?;
        conv_from(&bw, "conv.", &up, self.c, self.c, 3, 1, 1)
    }
}

/// diffusers' `Transformer2DModel` (continuous input) around `BasicTransformerBlock`s: GroupNorm, proj_in (1×1 conv
/// or linear), per layer self-attention, cross-attention and a GEGLU feed-forward (each pre-LayerNorm, residual),
/// proj_out, residual.
///
/// Fetched as `depth + 2` blocks, each once and in order: `{key}` (norm, proj_in), `{key}.transformer_blocks.{i}`
/// per layer, `{key}.proj_out` — so SDXL's 10-layer 1280-channel stacks stream in 66 MiB units, not 669 MiB ones
/// (the partition of `crate::models::unet::block_of`).
#[derive(Debug, Clone)]
pub(crate) struct TransformerSpec {
    pub key: String,
    pub channels: usize,
    pub heads: usize,
    pub cross_dim: usize,
    pub depth: usize,
    pub linear_proj: bool,
    pub upcast: bool,
    pub groups: usize,
}

impl TransformerSpec {
    pub fn forward(&self, w: &dyn WeightSource, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = x.dims4()?;
        let n = hh * ww;
        let mut h = {
            let bw = w.fetch(&self.key)?;
            let h = norm_from(&bw, "norm", x, c, self.groups, 1e-6, false)?;
            if self.linear_proj {
                let h = h.permute((0, 2, 3, 1))?.reshape((b, n, c))?;
                linear_from(&bw, "proj_in", &h, c, c, Bias::Required)?
            } else {
                let h = conv_from(&bw, "proj_in.", &h, c, c, 1, 1, 0)?;
                h.permute((0, 2, 3, 1))?.reshape((b, n, c))?
            }
        };
        for i in 0..self.depth {
            let bw = w.fetch(&format!("{}.transformer_blocks.{i}", self.key))?;
            h = self.layer(&bw, h, ctx)?;
        }
        let bw = w.fetch(&format!("{}.proj_out", self.key))?;
        if self.linear_proj {
            h = linear_from(&bw, "", &h, c, c, Bias::Required)?;
            h = h.reshape((b, hh, ww, c))?.permute((0, 3, 1, 2))?;
        } else {
            h = h.reshape((b, hh, ww, c))?.permute((0, 3, 1, 2))?.contiguous()?;
            h = conv_from(&bw, "", &h, c, c, 1, 1, 0)?;
        }
        Ok((h + x)?)
    }

    /// One `BasicTransformerBlock` on tokens `h` `[B, N, C]`, its weights in `bw`.
    fn layer(&self, bw: &BlockWeights, mut h: Tensor, ctx: &Tensor) -> Result<Tensor> {
        let c = self.channels;
        let ln = |name: &str, t: &Tensor| -> Result<Tensor> {
            let weight = bw.get_shaped(&format!("{name}.weight"), &[c])?;
            let bias = bw.get_shaped(&format!("{name}.bias"), &[c])?;
            layer_norm(t, &weight, &bias, 1e-5)
        };
        let n1 = ln("norm1", &h)?;
        let a = self.attn(bw, "attn1", &n1, &n1, c)?;
        drop(n1);
        h = (h + a)?;
        let n2 = ln("norm2", &h)?;
        let a = self.attn(bw, "attn2", &n2, ctx, self.cross_dim)?;
        drop(n2);
        h = (h + a)?;
        let n3 = ln("norm3", &h)?;
        let inner = 4 * c;
        let pw = bw.get_shaped("ff.net.0.proj.weight", &[2 * inner, c])?;
        let pb = bw.get_shaped("ff.net.0.proj.bias", &[2 * inner])?;
        let g = geglu(&n3, &pw, Some(&pb))?;
        drop(n3);
        let f = linear_from(bw, "ff.net.2", &g, inner, c, Bias::Required)?;
        drop(g);
        Ok((h + f)?)
    }

    fn attn(&self, bw: &BlockWeights, name: &str, x: &Tensor, ctx: &Tensor, kv_dim: usize) -> Result<Tensor> {
        let c = self.channels;
        let q = linear_from(bw, &format!("{name}.to_q"), x, c, c, Bias::IfPresent)?;
        let k = linear_from(bw, &format!("{name}.to_k"), ctx, kv_dim, c, Bias::IfPresent)?;
        let v = linear_from(bw, &format!("{name}.to_v"), ctx, kv_dim, c, Bias::IfPresent)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let o = attention(&q, &k, &v, self.heads, scale, self.upcast)?;
        drop((q, k, v));
        linear_from(bw, &format!("{name}.to_out.0"), &o, c, c, Bias::Required)
    }

    pub fn mem(&self, p: &mut Peak, b: usize, hw: usize, seq: usize, e: OpTarget) {
        let c = self.channels;
        let x = act(b, c, hw, e);
        let es = e.size_in_bytes() as u64;
        p.transient(ops::group_norm_scratch_bytes(b * c * hw, e) + x);
        p.alloc(x); // normed
        p.transient(2 * x); // proj_in + permute copy
        p.alloc(x);
        p.free(x); // h (tokens)
        let ctx_kv = (b * seq * c) as u64 * es;
        let d = c / self.heads;
        let attn_self = ops::attention_scratch_bytes(b, self.heads, hw, hw, d, e);
        let attn_cross = ops::attention_scratch_bytes(b, self.heads, hw, seq, d, e);
        let (self_attn, cross_attn, ff) = if e.cpu_kernels {
            // Self-attention: LN out, q, k, v, the attention output (to_out's comes after q, k, v are dropped).
            // Cross-attention: LN out, q, the context's k and v, the output. GEGLU: LN out, its projection chunk
            // (≤ 512 rows × 8c f32), its 4c-wide result; then the result and ff.net.2's output.
            let chunk = (b * hw).min(512) as u64 * 8 * c as u64 * 4;
            (5 * x + attn_self, 3 * x + 2 * ctx_kv + attn_cross, 5 * x + chunk)
        } else {
            // The compositions: LN out, q, k, v, scratch, output, projection, + the residual sum; the GEGLU's 8c-wide
            // projection, gelu (4c) and product (4c).
            (
                x + 3 * x + attn_self + 2 * x + x,
                x + x + 2 * ctx_kv + attn_cross + 2 * x + x,
                x + 8 * x + 4 * x + 4 * x + x + x,
            )
        };
        p.transient(self_attn.max(cross_attn).max(ff).max(2 * x)); // 2x: each residual sum
        p.transient(3 * x); // proj_out + permute/copy
        p.free(x);
        p.alloc(x); // output
    }
}

/// The VAE's single-head self-attention block (`Attention` with GroupNorm, biases, residual connection).
#[derive(Debug, Clone)]
pub(crate) struct VaeAttentionSpec {
    pub key: String,
    pub channels: usize,
    pub groups: usize,
}

impl VaeAttentionSpec {
    pub fn forward(&self, w: &dyn WeightSource, x: &Tensor) -> Result<Tensor> {
        let bw = w.fetch(&self.key)?;
        let (b, c, hh, ww) = x.dims4()?;
        let n = hh * ww;
        let mut h = norm_from(&bw, "group_norm", x, c, self.groups, 1e-6, false)?;
        h = h.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?;
        // Checkpoints converted by old diffusers versions name the projections query/key/value/proj_attn.
        let legacy = !bw.contains("to_q.weight") && bw.contains("query.weight");
        let (qn, kn, vn, on) = if legacy { ("query", "key", "value", "proj_attn") } else { ("to_q", "to_k", "to_v", "to_out.0") };
        let q = linear_from(&bw, qn, &h, c, c, Bias::Required)?;
        let k = linear_from(&bw, kn, &h, c, c, Bias::Required)?;
        let v = linear_from(&bw, vn, &h, c, c, Bias::Required)?;
        drop(h);
        let o = attention(&q, &k, &v, 1, 1.0 / (c as f64).sqrt(), true)?;
        drop((q, k, v));
        let o = linear_from(&bw, on, &o, c, c, Bias::Required)?;
        let o = o.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        Ok((o + x)?)
    }

    pub fn mem(&self, p: &mut Peak, b: usize, hw: usize, e: OpTarget) {
        let x = act(b, self.channels, hw, e);
        p.transient(ops::group_norm_scratch_bytes(b * self.channels * hw, e) + x);
        let attn = 3 * x + ops::attention_scratch_bytes(b, 1, hw, hw, self.channels, e) + x;
        p.transient(2 * x + attn); // normed + transposed copy, q k v, scratch, out
        p.transient(3 * x); // proj, transpose, sum
        p.alloc(x);
        p.free(x);
    }
}

/// Bytes of an activation `[b, c, hw]`.
pub(crate) fn act(b: usize, c: usize, hw: usize, e: OpTarget) -> u64 {
    (b * c * hw * e.size_in_bytes()) as u64
}

/// Conv scratch for a "same" conv (stride 1, padding k/2) on `hw` positions, taken as a near-square image (the
/// estimates carry positions, not shapes; latents are square or close to it, and the kernel's path depends on the
/// number of 2×2 output tiles, which a 1-wide image would overstate twofold).
pub(crate) fn conv_scratch(b: usize, cin: usize, cout: usize, hw: usize, k: usize, e: OpTarget) -> u64 {
    let h = hw.isqrt().max(1);
    ops::conv2d_scratch_bytes(b, cin, cout, h, hw.div_ceil(h), k, 1, k / 2, e)
}

/// Live-bytes bookkeeping for the working-memory estimates: `live` is what persists between ops (the current
/// activation, skip connections, embeddings), `peak` the largest `live + transient` seen.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Peak {
    pub live: u64,
    pub peak: u64,
}

impl Peak {
    pub fn alloc(&mut self, bytes: u64) {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
    }
    pub fn free(&mut self, bytes: u64) {
        self.live = self.live.saturating_sub(bytes);
    }
    /// Bytes that exist only during the current op, on top of what is live.
    pub fn transient(&mut self, bytes: u64) {
        self.peak = self.peak.max(self.live + bytes);
    }
}

/// The tensors a model's forward reads, with their shapes: what a checkpoint must hold. A tensor with
/// alternatives (an optional bias, legacy attention names) is listed by its required names only.
#[derive(Debug, Default, Clone)]
pub struct ExpectedTensors(pub Vec<(String, Vec<usize>)>);

impl ExpectedTensors {
    pub(crate) fn add(&mut self, name: impl Into<String>, shape: &[usize]) {
        self.0.push((name.into(), shape.to_vec()));
    }
    /// `{key}.{name}weight` `[cout, cin, k, k]` and `{key}.{name}bias` `[cout]`.
    pub(crate) fn conv(&mut self, key: &str, name: &str, cin: usize, cout: usize, k: usize) {
        self.add(format!("{key}.{name}weight"), &[cout, cin, k, k]);
        self.add(format!("{key}.{name}bias"), &[cout]);
    }
    /// `{key}.{name}.weight` and `.bias`, both `[c]` (a norm).
    pub(crate) fn norm(&mut self, key: &str, name: &str, c: usize) {
        self.add(format!("{key}.{name}.weight"), &[c]);
        self.add(format!("{key}.{name}.bias"), &[c]);
    }
    /// `{key}.{name}.weight` `[out, inp]`, and its bias `[out]` when required.
    pub(crate) fn linear(&mut self, key: &str, name: &str, inp: usize, out: usize, bias: bool) {
        self.add(format!("{key}.{name}.weight"), &[out, inp]);
        if bias {
            self.add(format!("{key}.{name}.bias"), &[out]);
        }
    }
}

impl ConvSpec {
    pub(crate) fn expect(&self, t: &mut ExpectedTensors) {
        t.conv(&self.key, "", self.cin, self.cout, self.k);
    }
}

impl ResnetSpec {
    pub(crate) fn expect(&self, t: &mut ExpectedTensors) {
        t.norm(&self.key, "norm1", self.cin);
        t.conv(&self.key, "conv1.", self.cin, self.cout, 3);
        if let Some(tc) = self.temb {
            t.linear(&self.key, "time_emb_proj", tc, self.cout, true);
        }
        t.norm(&self.key, "norm2", self.cout);
        t.conv(&self.key, "conv2.", self.cout, self.cout, 3);
        if self.cin != self.cout {
            t.conv(&self.key, "conv_shortcut.", self.cin, self.cout, 1);
        }
    }
}

impl DownsampleSpec {
    pub(crate) fn expect(&self, t: &mut ExpectedTensors) {
        t.conv(&self.key, "conv.", self.c, self.c, 3);
    }
}

impl UpsampleSpec {
    pub(crate) fn expect(&self, t: &mut ExpectedTensors) {
        t.conv(&self.key, "conv.", self.c, self.c, 3);
    }
}

impl TransformerSpec {
    pub(crate) fn expect(&self, t: &mut ExpectedTensors) {
        let (k, c) = (self.key.as_str(), self.channels);
        t.norm(k, "norm", c);
        if self.linear_proj {
            t.linear(k, "proj_in", c, c, true);
            t.linear(k, "proj_out", c, c, true);
        } else {
            t.conv(k, "proj_in.", c, c, 1);
            t.conv(k, "proj_out.", c, c, 1);
        }
        for i in 0..self.depth {
            let p = format!("{k}.transformer_blocks.{i}");
            for n in ["norm1", "norm2", "norm3"] {
                t.norm(&p, n, c);
            }
            for (attn, kv) in [("attn1", c), ("attn2", self.cross_dim)] {
                t.linear(&p, &format!("{attn}.to_q"), c, c, false);
                t.linear(&p, &format!("{attn}.to_k"), kv, c, false);
                t.linear(&p, &format!("{attn}.to_v"), kv, c, false);
                t.linear(&p, &format!("{attn}.to_out.0"), c, c, true);
            }
            t.linear(&p, "ff.net.0.proj", c, 8 * c, true);
            t.linear(&p, "ff.net.2", 4 * c, c, true);
        }
    }
}

impl VaeAttentionSpec {
    /// Lists the current names (`to_q`…); a checkpoint with the legacy names (`query`…) is matched by the caller.
    pub(crate) fn expect(&self, t: &mut ExpectedTensors) {
        let (k, c) = (self.key.as_str(), self.channels);
        t.norm(k, "group_norm", c);
        for n in ["to_q", "to_k", "to_v", "to_out.0"] {
            t.linear(k, n, c, c, true);
        }
    }
}
