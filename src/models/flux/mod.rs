//! The FLUX.1 transformer (dev and schnell), computing unit by unit from a [`WeightSource`] in BFL names.
//!
//! The family's files: `config.rs` ([`FluxConfig`]: diffusers config.json or a BFL checkpoint's shapes), this model,
//! `blocks.rs` (the streaming units, [`block_of`]), `estimate.rs` (working memory,
//! [`FluxTransformer::working_bytes`]). The forward is BFL's `Flux.forward` (`src/flux/model.py`, `modules/layers.py`)
//! = diffusers' `FluxTransformer2DModel.forward` (../shared/MODELS.md §1.2):
//!
//! ```text
//! img = img_in(pack(latents))                 # [B, h/2·w/2, 64] → [B, L_img, D]
//! vec = time_in(emb(t)) + guidance_in(emb(g)) [dev] + vector_in(pooled)
//! txt = txt_in(t5_states)
//! pe  = rope(cat(txt_ids = 0, img_ids = (0, row, col)))
//! for double block: per stream s: mod_s = s_mod(silu(vec)); qkv_s = s_attn.qkv((1+scale1)·LN(x_s)+shift1),
//!                   q/k RMS-normed per head; joint attention over cat(txt, img) with pe;
//!                   x_s += gate1·s_attn.proj(attn_s); x_s += gate2·s_mlp((1+scale2)·LN(x_s)+shift2)
//! x = cat(txt, img)
//! for single block: (shift, scale, gate) = modulation(silu(vec)); [qkv | mlp] = linear1((1+scale)·LN(x)+shift);
//!                   x += gate·linear2(cat(attn(qkv, pe), gelu_tanh(mlp)))
//! out = final_layer.linear((1+scale)·LN(x_img)+shift)   # (shift, scale) = adaLN_modulation.1(silu(vec))
//! return unpack(out)
//! ```
//!
//! Units (see [`block_of`]), fetched in this order, each once, each dropped before the next: `img_in`, `time_in`,
//! `guidance_in` (dev), `vector_in`, `txt_in`; per double block `img_mod`, `txt_mod`, `img_attn`, `txt_attn`,
//! `img_attn.proj`, `img_mlp`, `txt_attn.proj`, `txt_mlp`; `single_blocks.N`; `final_layer`. Inside a unit every weight
//! is taken with [`BlockWeights::get`] right before the matmul that uses it and dropped after (a quantised store
//! dequantises at that moment).
//!
//! **Timestep and guidance.** [`FluxTransformer::forward`] takes the scheduler's timestep `t` ∈ [0, 1000] (σ·1000,
//! as the UNet takes its timesteps); like diffusers' pipeline it hands the model `t/1000` in f32, which the model
//! multiplies by 1000 before the sinusoidal embedding. The distilled guidance of dev is a per-row vector `[B]` (the
//! pipeline's `--guidance`, e.g. 3.5), also multiplied by 1000 (BFL `timestep_embedding(guidance, 256)`); through
//! [`crate::models::Denoiser`] it is the conditioning tensor `sampling.guidance` `[B]`.

mod blocks;
mod config;
mod estimate;

pub use blocks::block_of;
pub use config::{FluxConfig, FLUX1_AXES_DIMS_ROPE, MLP_RATIO, ROPE_THETA};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::models::blocks::{linear_from, Bias, ExpectedTensors};
use crate::models::conditioning::{
    BatchedConditioning, CondSpec, Conditioning, Dim, COND_EMBEDDINGS, COND_POOLED, GUIDANCE,
};
use crate::models::Denoiser;
use crate::ops::OpTarget;
use crate::ops::{attention, layer_norm, rms_norm, timestep_embedding, RopeTable};
use crate::weights::{BlockWeights, WeightSource};

/// Width of the sinusoidal time and guidance embeddings (BFL `timestep_embedding(t, 256)`).
const TIME_EMBED: usize = 256;
/// eps of the modulated LayerNorms and of the q/k RMSNorms.
const EPS: f64 = 1e-6;

/// The FLUX transformer: a configuration; it holds no tensors.
pub struct FluxTransformer {
    config: FluxConfig,
}

/// What every block of one forward shares: the conditioning vector after SiLU, the rotary table, the LayerNorm's
/// unit weight and zero bias.
struct Shared {
    vec_act: Tensor,
    rope: RopeTable,
    ones: Tensor,
    zeros: Tensor,
}

impl FluxTransformer {
    /// The model for `config`.
    pub fn new(config: FluxConfig) -> Result<Self> {
        Ok(Self { config })
    }

    /// Read a diffusers `transformer/config.json`.
    pub fn from_config_file(path: &std::path::Path) -> Result<Self> {
        Self::new(FluxConfig::from_file(path)?)
    }

    /// The configuration.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Every tensor the forward reads (BFL names) with its shape, in forward order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.expected_tensors().0
    }

    /// Every tensor the forward reads (BFL names) with its shape: what a checkpoint must hold.
    pub fn expected_tensors(&self) -> ExpectedTensors {
        let c = &self.config;
        let (d, hd, mlp) = (c.hidden(), c.attention_head_dim, c.mlp_hidden());
        let mut t = ExpectedTensors::default();
        t.linear("img_in", "", c.in_channels, d, true);
        let mut embedder = |key: &str, inp: usize| {
            t.linear(key, "in_layer", inp, d, true);
            t.linear(key, "out_layer", d, d, true);
        };
        embedder("time_in", TIME_EMBED);
        if c.guidance_embeds {
            embedder("guidance_in", TIME_EMBED);
        }
        embedder("vector_in", c.pooled_projection_dim);
        t.linear("txt_in", "", c.joint_attention_dim, d, true);
        for i in 0..c.num_layers {
            let b = format!("double_blocks.{i}");
            for s in ["img", "txt"] {
                t.linear(&b, &format!("{s}_mod.lin"), d, 6 * d, true);
            }
            for s in ["img", "txt"] {
                t.linear(&b, &format!("{s}_attn.qkv"), d, 3 * d, true);
                t.add(format!("{b}.{s}_attn.norm.query_norm.scale"), &[hd]);
                t.add(format!("{b}.{s}_attn.norm.key_norm.scale"), &[hd]);
            }
            for s in ["img", "txt"] {
                t.linear(&b, &format!("{s}_attn.proj"), d, d, true);
                t.linear(&b, &format!("{s}_mlp.0"), d, mlp, true);
                t.linear(&b, &format!("{s}_mlp.2"), mlp, d, true);
            }
        }
        for i in 0..c.num_single_layers {
            let b = format!("single_blocks.{i}");
            t.linear(&b, "modulation.lin", d, 3 * d, true);
            t.linear(&b, "linear1", d, 3 * d + mlp, true);
            t.add(format!("{b}.norm.query_norm.scale"), &[hd]);
            t.add(format!("{b}.norm.key_norm.scale"), &[hd]);
            t.linear(&b, "linear2", d + mlp, d, true);
        }
        t.linear("final_layer", "adaLN_modulation.1", d, 2 * d, true);
        t.linear("final_layer", "linear", d, c.in_channels, true);
        // `ExpectedTensors::linear` with an empty name writes `key..weight`: tidy those to `key.weight`.
        for (name, _) in t.0.iter_mut() {
            *name = name.replace("..", ".");
        }
        t
    }

    /// Pack latents `[B, C, h, w]` into tokens `[B, h/2·w/2, 4C]` (2×2 patches, channel-major within a token:
    /// feature `c·4 + py·2 + px`; diffusers `_pack_latents`). `h` and `w` must be even.
    pub fn pack(latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        if h % 2 == 1 || w % 2 == 1 {
            return Err(Error::invalid(format!("flux: latents {h}x{w} must have even sides (2x2 patches)")));
        }
        Ok(latents.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((
            b,
            (h / 2) * (w / 2),
            c * 4,
        ))?)
    }

    /// The inverse of [`Self::pack`]: tokens `[B, h/2·w/2, 4C]` back to `[B, C, h, w]`.
    pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, l, f) = tokens.dims3()?;
        if l != (h / 2) * (w / 2) || f % 4 != 0 {
            return Err(Error::invalid(format!("flux: {l} tokens of {f} features do not unpack to {h}x{w}")));
        }
        let c = f / 4;
        Ok(tokens.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))?)
    }

    /// The positions of one forward's tokens: text tokens all zero, then image patch `r·(w/2) + c` at `(0, r, c)`
    /// (diffusers `_prepare_latent_image_ids`, BFL `prepare`).
    pub fn position_ids(txt_len: usize, h: usize, w: usize) -> Vec<Vec<f64>> {
        let mut ids = vec![vec![0.0; 3]; txt_len];
        for r in 0..h / 2 {
            for c in 0..w / 2 {
                ids.push(vec![0.0, r as f64, c as f64]);
            }
        }
        ids
    }

    /// Predict the flow (velocity) for `latents` `[B, C, h, w]` (C = in_channels / 4, h and w even) at scheduler
    /// timestep `timestep` ∈ [0, 1000], given the T5 states `txt` `[B, L_txt, joint_attention_dim]`
    /// (`sampling.cond_embeddings`), the CLIP pooled vector `pooled` `[B, pooled_projection_dim]`
    /// (`sampling.cond_pooled`) and, for dev, the distilled guidance `[B]` (`sampling.guidance`). Inputs move to
    /// `w`'s device and dtype; the result `[B, C, h, w]` is in the compute dtype. Misshapen or missing inputs are
    /// INVALID_ARGUMENT naming the conditioning tensor and the shape expected.
    pub fn forward(
        &self,
        w: &dyn WeightSource,
        latents: &Tensor,
        timestep: f64,
        txt: &Tensor,
        pooled: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (dt, dev) = (w.dtype(), w.device());
        let (b, ch, h, wd) = latents.dims4()?;
        if ch != c.latent_channels() || h % 2 == 1 || wd % 2 == 1 || h == 0 || wd == 0 {
            return Err(Error::invalid(format!(
                "flux: latents {:?}, expected [B, {}, h, w] with even h and w",
                latents.dims(),
                c.latent_channels()
            )));
        }
        let txt_len = match txt.dims() {
            &[tb, l, j] if tb == b && j == c.joint_attention_dim && l > 0 => l,
            d => {
                return Err(Error::invalid(format!(
                    "flux: sampling.cond_embeddings has shape {d:?}, expected [{b}, S, {}]",
                    c.joint_attention_dim
                )))
            }
        };
        if pooled.dims() != [b, c.pooled_projection_dim] {
            return Err(Error::invalid(format!(
                "flux: sampling.cond_pooled has shape {:?}, expected [{b}, {}]",
                pooled.dims(),
                c.pooled_projection_dim
            )));
        }
        if !timestep.is_finite() {
            return Err(Error::invalid(format!("flux: timestep {timestep} is not finite")));
        }
        let guidance: Option<Vec<f64>> =
            match (c.guidance_embeds, guidance) {
                (true, Some(g)) => {
                    let v: Vec<f64> = if g.dims() == [b] {
                        g.to_dtype(DType::F64)?.to_vec1()?
                    } else {
                        return Err(Error::invalid(format!(
                            "flux: sampling.guidance has shape {:?}, expected [{b}]",
                            g.dims()
                        )));
                    };
                    if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                        return Err(Error::invalid(format!("flux: sampling.guidance holds {x}")));
                    }
                    Some(v)
                }
                (true, None) => {
                    return Err(Error::invalid(format!(
                        "flux: this model (dev) needs its distilled guidance sampling.guidance [{b}]"
                    )))
                }
                (false, Some(_)) => return Err(Error::invalid(
                    "flux: this model (schnell) takes no guidance (sampling.guidance is for guidance-distilled models)",
                )),
                (false, None) => None,
            };
        let d = c.hidden();

        let mut img = {
            let x = Self::pack(&latents.to_device(dev)?.to_dtype(dt)?)?;
            let bw = w.fetch("img_in")?;
            linear_from(&bw, "", &x, c.in_channels, d, Bias::Required)?
        };
        let vec = {
            // diffusers: the pipeline passes t/1000, the model multiplies by 1000, both in f32.
            let t = ((timestep / 1000.0) as f32 * 1000.0) as f64;
            let mut vec = self.mlp_embedder(w, "time_in", &self.time_embedding(&vec![t; b], w)?, TIME_EMBED)?;
            if let Some(g) = &guidance {
                let g: Vec<f64> = g.iter().map(|&x| (x as f32 * 1000.0) as f64).collect();
                vec = (vec + self.mlp_embedder(w, "guidance_in", &self.time_embedding(&g, w)?, TIME_EMBED)?)?;
            }
            let p = pooled.to_device(dev)?.to_dtype(dt)?;
            (vec + self.mlp_embedder(w, "vector_in", &p, c.pooled_projection_dim)?)?
        };
        let mut txt = {
            let x = txt.to_device(dev)?.to_dtype(dt)?;
            let bw = w.fetch("txt_in")?;
            linear_from(&bw, "", &x, c.joint_attention_dim, d, Bias::Required)?
        };
        let s = Shared {
            vec_act: vec.silu()?,
            rope: RopeTable::new(&Self::position_ids(txt_len, h, wd), &c.axes_dims_rope, ROPE_THETA)?,
            ones: Tensor::ones(d, dt, dev)?,
            zeros: Tensor::zeros(d, dt, dev)?,
        };
        drop(vec);
        for i in 0..c.num_layers {
            (img, txt) = self.double_block(w, i, img, txt, &s)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        drop((txt, img));
        for i in 0..c.num_single_layers {
            x = self.single_block(w, i, x, &s)?;
        }
        let img = x.narrow(1, txt_len, x.dim(1)? - txt_len)?;
        drop(x);
        let out = {
            let bw = w.fetch("final_layer")?;
            let m = linear_from(&bw, "adaLN_modulation.1", &s.vec_act, d, 2 * d, Bias::Required)?;
            let (shift, scale) = (chunk(&m, 0, d)?, chunk(&m, 1, d)?);
            let x = modulate(&img, &shift, &scale, &s)?;
            drop(img);
            linear_from(&bw, "linear", &x, d, c.in_channels, Bias::Required)?
        };
        Self::unpack(&out, h, wd)
    }

    /// The sinusoidal embedding of already scaled values (`[cos | sin]`, 256 wide) in the compute dtype.
    fn time_embedding(&self, values: &[f64], w: &dyn WeightSource) -> Result<Tensor> {
        Ok(timestep_embedding(values, TIME_EMBED, true, 0.0, w.device())?.to_dtype(w.dtype())?)
    }

    /// BFL's `MLPEmbedder`: `out_layer(silu(in_layer(x)))` of unit `key`.
    fn mlp_embedder(&self, w: &dyn WeightSource, key: &str, x: &Tensor, inp: usize) -> Result<Tensor> {
        let d = self.config.hidden();
        let bw = w.fetch(key)?;
        let h = linear_from(&bw, "in_layer", x, inp, d, Bias::Required)?.silu()?;
        linear_from(&bw, "out_layer", &h, d, d, Bias::Required)
    }

    /// The `n` modulation vectors `[B, 1, D]` of a `lin` (6 for a double-block stream, 3 for a single block).
    fn modulation(&self, bw: &BlockWeights, name: &str, s: &Shared, n: usize) -> Result<Vec<Tensor>> {
        let d = self.config.hidden();
        let m = linear_from(bw, name, &s.vec_act, d, n * d, Bias::Required)?;
        (0..n).map(|i| chunk(&m, i, d)).collect()
    }

    /// q, k, v `[B, L, D]` of one stream: its fused qkv linear of `x`, q and k RMS-normed per head.
    fn qkv(&self, bw: &BlockWeights, qkv: &str, norm: &str, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let d = c.hidden();
        let y = linear_from(bw, qkv, x, d, 3 * d, Bias::Required)?;
        let q = self.head_norm(bw, &format!("{norm}.query_norm.scale"), &y.narrow(2, 0, d)?)?;
        let k = self.head_norm(bw, &format!("{norm}.key_norm.scale"), &y.narrow(2, d, d)?)?;
        let v = y.narrow(2, 2 * d, d)?.contiguous()?;
        Ok((q, k, v))
    }

    /// RMSNorm over each head's features (eps 1e-6, learnable scale; f32 statistics).
    fn head_norm(&self, bw: &BlockWeights, name: &str, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, l, d) = x.dims3()?;
        let scale = bw.get_shaped(name, &[c.attention_head_dim])?;
        let y = rms_norm(&x.reshape((b, l, c.num_attention_heads, c.attention_head_dim))?, &scale, EPS)?;
        Ok(y.reshape((b, l, d))?)
    }

    /// Joint attention over q, k, v `[B, L, D]` (text tokens first) with the rotary embedding on q and k.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, s: &Shared) -> Result<Tensor> {
        let c = &self.config;
        let q = s.rope.apply(q)?;
        let k = s.rope.apply(k)?;
        attention(&q, &k, v, c.num_attention_heads, 1.0 / (c.attention_head_dim as f64).sqrt(), false)
    }

    /// One double-stream block on `img` `[B, L_img, D]` and `txt` `[B, L_txt, D]`.
    fn double_block(
        &self,
        w: &dyn WeightSource,
        i: usize,
        img: Tensor,
        txt: Tensor,
        s: &Shared,
    ) -> Result<(Tensor, Tensor)> {
        let key = |sub: &str| format!("double_blocks.{i}.{sub}");
        let img_mod = self.modulation(&w.fetch(&key("img_mod"))?, "lin", s, 6)?;
        let txt_mod = self.modulation(&w.fetch(&key("txt_mod"))?, "lin", s, 6)?;
        let (qi, ki, vi) = {
            let bw = w.fetch(&key("img_attn"))?;
            self.qkv(&bw, "qkv", "norm", &modulate(&img, &img_mod[0], &img_mod[1], s)?)?
        };
        let (qt, kt, vt) = {
            let bw = w.fetch(&key("txt_attn"))?;
            self.qkv(&bw, "qkv", "norm", &modulate(&txt, &txt_mod[0], &txt_mod[1], s)?)?
        };
        let q = Tensor::cat(&[&qt, &qi], 1)?;
        let k = Tensor::cat(&[&kt, &ki], 1)?;
        let v = Tensor::cat(&[&vt, &vi], 1)?;
        drop((qi, ki, vi, qt, kt, vt));
        let a = self.attention(&q, &k, &v, s)?;
        drop((q, k, v));
        let (lt, li) = (txt.dim(1)?, img.dim(1)?);
        let (at, ai) = (a.narrow(1, 0, lt)?, a.narrow(1, lt, li)?);
        let img = self.stream_out(w, &key("img_attn.proj"), &key("img_mlp"), img, &ai, &img_mod, s)?;
        drop(ai);
        let txt = self.stream_out(w, &key("txt_attn.proj"), &key("txt_mlp"), txt, &at, &txt_mod, s)?;
        Ok((img, txt))
    }

    /// After the joint attention, one stream: `x += gate1·proj(attn)`, `x += gate2·mlp(mod2(LN(x)))`.
    #[allow(clippy::too_many_arguments)]
    fn stream_out(
        &self,
        w: &dyn WeightSource,
        proj: &str,
        mlp: &str,
        x: Tensor,
        attn: &Tensor,
        m: &[Tensor],
        s: &Shared,
    ) -> Result<Tensor> {
        let (d, hid) = (self.config.hidden(), self.config.mlp_hidden());
        let x = {
            let bw = w.fetch(proj)?;
            let p = linear_from(&bw, "", &attn.contiguous()?, d, d, Bias::Required)?;
            (x + p.broadcast_mul(&m[2])?)?
        };
        let bw = w.fetch(mlp)?;
        let h = linear_from(&bw, "0", &modulate(&x, &m[3], &m[4], s)?, d, hid, Bias::Required)?.gelu()?;
        let y = linear_from(&bw, "2", &h, hid, d, Bias::Required)?;
        drop(h);
        Ok((x + y.broadcast_mul(&m[5])?)?)
    }

    /// One single-stream block on `x` = cat(txt, img) `[B, L, D]`.
    fn single_block(&self, w: &dyn WeightSource, i: usize, x: Tensor, s: &Shared) -> Result<Tensor> {
        let (d, hid) = (self.config.hidden(), self.config.mlp_hidden());
        let bw = w.fetch(&format!("single_blocks.{i}"))?;
        let m = self.modulation(&bw, "modulation.lin", s, 3)?;
        let y = linear_from(&bw, "linear1", &modulate(&x, &m[0], &m[1], s)?, d, 3 * d + hid, Bias::Required)?;
        let q = self.head_norm(&bw, "norm.query_norm.scale", &y.narrow(2, 0, d)?)?;
        let k = self.head_norm(&bw, "norm.key_norm.scale", &y.narrow(2, d, d)?)?;
        let v = y.narrow(2, 2 * d, d)?.contiguous()?;
        let a = self.attention(&q, &k, &v, s)?;
        drop((q, k, v));
        let mlp = y.narrow(2, 3 * d, hid)?.gelu()?;
        drop(y);
        let h = Tensor::cat(&[&a, &mlp], 2)?;
        drop((a, mlp));
        let out = linear_from(&bw, "linear2", &h, d + hid, d, Bias::Required)?;
        drop(h);
        Ok((x + out.broadcast_mul(&m[2])?)?)
    }
}

impl Denoiser for FluxTransformer {
    fn name(&self) -> &'static str {
        "FluxTransformer2DModel"
    }

    fn latent_channels(&self) -> usize {
        self.config.latent_channels()
    }

    /// Per latent pixel a single block's fused linear1 output holds (3·D + 4·D)/4 values (a token covers 2×2 pixels).
    fn widest_channels(&self) -> usize {
        (3 * self.config.hidden() + self.config.mlp_hidden()).div_ceil(4)
    }

    /// `sampling.cond_embeddings` `[B, S, joint_attention_dim]` (T5 states), `sampling.cond_pooled`
    /// `[B, pooled_projection_dim]` (CLIP pooled) and, for dev, `sampling.guidance` `[B]`. No negative pair: FLUX
    /// runs one forward per step.
    fn conditioning(&self) -> Vec<CondSpec> {
        let c = &self.config;
        let mut specs = vec![
            CondSpec::required(COND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(c.joint_attention_dim)]),
            CondSpec::required(COND_POOLED, vec![Dim::Batch, Dim::Is(c.pooled_projection_dim)]),
        ];
        if c.guidance_embeds {
            specs.push(CondSpec::required(GUIDANCE, vec![Dim::Batch]));
        }
        specs
    }

    fn classifier_free_guidance(&self) -> bool {
        false
    }

    /// `t` is the scheduler's timestep in [0, 1000] (σ·1000).
    fn forward(&self, w: &dyn WeightSource, x: &Tensor, t: f64, cond: &BatchedConditioning) -> Result<Tensor> {
        FluxTransformer::forward(self, w, x, t, cond.get("embeddings")?, cond.get("pooled")?, cond.get_opt("guidance"))
    }

    fn working_bytes(&self, batch: usize, h: usize, w: usize, cond: &Conditioning, target: OpTarget) -> u64 {
        let seq = cond.get(COND_EMBEDDINGS).and_then(|t| t.dims().get(1).copied()).unwrap_or(512);
        FluxTransformer::working_bytes(self, batch, h, w, seq, target)
    }
}

/// Chunk `i` of width `d` of a modulation output `[B, n·D]`, as `[B, 1, D]`.
fn chunk(m: &Tensor, i: usize, d: usize) -> Result<Tensor> {
    Ok(m.narrow(1, i * d, d)?.unsqueeze(1)?)
}

/// `(1 + scale)·LN(x) + shift` (LayerNorm without affine, eps 1e-6); shift and scale `[B, 1, D]`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, s: &Shared) -> Result<Tensor> {
    let n = layer_norm(x, &s.ones, &s.zeros, EPS)?;
    Ok(n.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}
