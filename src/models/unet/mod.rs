//! diffusers' `UNet2DConditionModel` for SD 1.x / 2.x and SDXL, computing block by block from a [`WeightSource`].
//!
//! The family's files: `config.rs` ([`UNetConfig`], config.json), this model, `blocks.rs` (the streaming unit of a
//! checkpoint tensor, [`block_of`]), `estimate.rs` (working memory of a forward,
//! [`UNet2DConditionModel::working_bytes`]) and `shapes.rs` (the checkpoint a config expects,
//! [`UNet2DConditionModel::tensor_shapes`]).
//!
//! Blocks, in execution order: `time_embedding`, `add_embedding` (SDXL), `conv_in`, `down_blocks.{i}.resnets.{j}`,
//! per attention `down_blocks.{i}.attentions.{j}` (norm, proj_in), `….transformer_blocks.{k}` (one per layer) and
//! `….proj_out`, `down_blocks.{i}.downsamplers.0`, the mid block likewise, the up blocks likewise with
//! `up_blocks.{i}.upsamplers.0`, then `conv_norm_out`, `conv_out`. Each is fetched once per forward and dropped
//! before the next is fetched.

pub mod blocks;
mod config;
mod estimate;
mod shapes;

use std::path::Path;

pub use blocks::block_of;
pub use config::{BlockType, TextTimeConfig, UNetConfig};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::models::blocks::{
    linear_from, norm_silu_block, Bias, ConvSpec, DownsampleSpec, ExpectedTensors, ResnetSpec, TransformerSpec,
    UpsampleSpec,
};
use crate::ops::timestep_embedding;
use crate::weights::WeightSource;

/// SDXL's added conditioning for one UNet call (rows pair with the sample's rows, e.g. `[uncond; cond]` under
/// classifier-free guidance).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled text embeddings `[B, P]` (`sampling.cond_pooled` / `sampling.uncond_pooled`; SDXL: P = 1280).
    pub text_embeds: Tensor,
    /// Micro-conditioning `[B, 6]`: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels
    /// (`sampling.time_ids`).
    pub time_ids: Tensor,
}

struct DownBlock {
    resnets: Vec<ResnetSpec>,
    attentions: Vec<TransformerSpec>,
    downsample: Option<DownsampleSpec>,
}

struct UpBlock {
    resnets: Vec<ResnetSpec>,
    attentions: Vec<TransformerSpec>,
    upsample: Option<UpsampleSpec>,
}

/// The UNet: a configuration and the plan of blocks derived from it. It holds no tensors.
pub struct UNet2DConditionModel {
    config: UNetConfig,
    temb_dim: usize,
    conv_in: ConvSpec,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetSpec; 2],
    mid_attention: TransformerSpec,
    up: Vec<UpBlock>,
    conv_out: ConvSpec,
}

impl UNet2DConditionModel {
    /// Build the block plan for `config`.
    pub fn new(config: UNetConfig) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let resnet = |key: String, cin: usize, cout: usize, scale: f64| ResnetSpec {
            key,
            cin,
            cout,
            temb: Some(temb_dim),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            out_scale: scale,
        };
        let transformer = |key: String, channels: usize, heads: usize, depth: usize| TransformerSpec {
            key,
            channels,
            heads,
            cross_dim: c.cross_attention_dim,
            depth,
            linear_proj: c.use_linear_projection,
            upcast: c.upcast_attention,
            groups: c.norm_num_groups,
        };
        // Channel counts of the skip connections, pushed as the down path produces them.
        let mut skips = vec![ch[0]];
        let mut down = Vec::with_capacity(n);
        let mut cin = ch[0];
        for i in 0..n {
            let cout = ch[i];
            let mut b = DownBlock { resnets: vec![], attentions: vec![], downsample: None };
            for j in 0..c.layers_per_block[i] {
                let rin = if j == 0 { cin } else { cout };
                b.resnets.push(resnet(format!("down_blocks.{i}.resnets.{j}"), rin, cout, 1.0));
                if c.down_block_types[i] == BlockType::CrossAttn {
                    b.attentions.push(transformer(
                        format!("down_blocks.{i}.attentions.{j}"),
                        cout,
                        c.attention_heads[i],
                        c.transformer_layers[i],
                    ));
                }
                skips.push(cout);
            }
            if i + 1 < n {
                b.downsample =
                    Some(DownsampleSpec { key: format!("down_blocks.{i}.downsamplers.0"), c: cout, padding: c.downsample_padding });
                skips.push(cout);
            }
            down.push(b);
            cin = cout;
        }
        let cm = ch[n - 1];
        let ms = c.mid_block_scale_factor;
        let mid_resnets =
            [resnet("mid_block.resnets.0".into(), cm, cm, ms), resnet("mid_block.resnets.1".into(), cm, cm, ms)];
        let mid_attention =
            transformer("mid_block.attentions.0".into(), cm, c.attention_heads[n - 1], c.transformer_layers[n - 1]);
        let mut up = Vec::with_capacity(n);
        let mut prev = cm;
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let layers = c.layers_per_block[n - 1 - i] + 1;
            let heads = c.attention_heads[n - 1 - i];
            let depth = c.transformer_layers[n - 1 - i];
            let mut b = UpBlock { resnets: vec![], attentions: vec![], upsample: None };
            for j in 0..layers {
                let skip = skips.pop().ok_or_else(|| Error::format("unet config: more up resnets than skips"))?;
                let rin = if j == 0 { prev } else { cout };
                b.resnets.push(resnet(format!("up_blocks.{i}.resnets.{j}"), rin + skip, cout, 1.0));
                if c.up_block_types[i] == BlockType::CrossAttn {
                    b.attentions.push(transformer(format!("up_blocks.{i}.attentions.{j}"), cout, heads, depth));
                }
            }
            if i + 1 < n {
                b.upsample = Some(UpsampleSpec { key: format!("up_blocks.{i}.upsamplers.0"), c: cout });
            }
            up.push(b);
            prev = cout;
        }
        if !skips.is_empty() {
            return Err(Error::format("unet config: skip connections left over"));
        }
        Ok(Self {
            conv_in: ConvSpec::new("conv_in", c.in_channels, ch[0], 3),
            conv_out: ConvSpec::new("conv_out", ch[0], c.out_channels, 3),
            temb_dim,
            down,
            mid_resnets,
            mid_attention,
            up,
            config,
        })
    }

    /// Read `config.json` and build the model.
    pub fn from_config_file(path: &Path) -> Result<Self> {
        Self::new(UNetConfig::from_file(path)?)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// What the model needs besides the sample, timestep and text embeddings: `Some((P, 6))` for SDXL's
    /// text_time conditioning (pooled text embeddings `[B, P]` and time ids `[B, 6]`), None for SD 1.x / 2.x.
    pub fn needs_added_cond(&self) -> Option<(usize, usize)> {
        self.config.text_time.map(|tt| (tt.pooled_dim(), TextTimeConfig::TIME_IDS))
    }

    /// Every tensor the forward reads, with its shape (checked against a checkpoint at load).
    pub fn expected_tensors(&self) -> ExpectedTensors {
        let mut t = ExpectedTensors::default();
        let c0 = self.config.block_out_channels[0];
        t.linear("time_embedding", "linear_1", c0, self.temb_dim, true);
        t.linear("time_embedding", "linear_2", self.temb_dim, self.temb_dim, true);
        if let Some(tt) = self.config.text_time {
            t.linear("add_embedding", "linear_1", tt.projection_input_dim, self.temb_dim, true);
            t.linear("add_embedding", "linear_2", self.temb_dim, self.temb_dim, true);
        }
        self.conv_in.expect(&mut t);
        for blk in &self.down {
            blk.resnets.iter().for_each(|r| r.expect(&mut t));
            blk.attentions.iter().for_each(|a| a.expect(&mut t));
            if let Some(d) = &blk.downsample {
                d.expect(&mut t);
            }
        }
        self.mid_resnets.iter().for_each(|r| r.expect(&mut t));
        self.mid_attention.expect(&mut t);
        for blk in &self.up {
            blk.resnets.iter().for_each(|r| r.expect(&mut t));
            blk.attentions.iter().for_each(|a| a.expect(&mut t));
            if let Some(u) = &blk.upsample {
                u.expect(&mut t);
            }
        }
        t.add("conv_norm_out.weight", &[c0]);
        t.add("conv_norm_out.bias", &[c0]);
        self.conv_out.expect(&mut t);
        t
    }

    /// Predict the noise (or v) for `sample` `[B, in_channels, h, w]` at `timestep` given `encoder_hidden_states`
    /// `[B, S, cross_attention_dim]`, for models without added conditioning (SD 1.x / 2.x); see [`Self::forward_with`].
    pub fn forward(&self, w: &dyn WeightSource, sample: &Tensor, timestep: f64, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.forward_with(w, sample, timestep, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with SDXL's added conditioning, which is required exactly when [`Self::needs_added_cond`]
    /// says so (missing, misshapen or unexpected conditioning is [`Error::InvalidArgument`] naming
    /// `sampling.cond_pooled` / `sampling.time_ids` and the expected shape). Inputs are moved to `w`'s device and
    /// dtype; the result `[B, out_channels, h, w]` is in the compute dtype `w.dtype()`.
    pub fn forward_with(
        &self,
        w: &dyn WeightSource,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (dt, dev) = (w.dtype(), w.device());
        let (b, cin, _, _) = sample.dims4()?;
        if cin != c.in_channels {
            return Err(Error::invalid(format!("unet: sample has {cin} channels, model expects {}", c.in_channels)));
        }
        let (eb, _, ed) = encoder_hidden_states.dims3()?;
        if eb != b || ed != c.cross_attention_dim {
            return Err(Error::invalid(format!(
                "unet: encoder_hidden_states {:?} does not match batch {b} and cross_attention_dim {}",
                encoder_hidden_states.dims(),
                c.cross_attention_dim
            )));
        }
        self.check_added(b, added)?;
        let ctx = encoder_hidden_states.to_device(dev)?.to_dtype(dt)?;
        let mut x = sample.to_device(dev)?.to_dtype(dt)?;

        let c0 = c.block_out_channels[0];
        let temb_act = {
            let t = timestep_embedding(&vec![timestep; b], c0, c.flip_sin_to_cos, c.freq_shift, dev)?.to_dtype(dt)?;
            let bw = w.fetch("time_embedding")?;
            let h = linear_from(&bw, "linear_1", &t, c0, self.temb_dim, Bias::Required)?.silu()?;
            let mut emb = linear_from(&bw, "linear_2", &h, self.temb_dim, self.temb_dim, Bias::Required)?;
            drop(bw);
            if let (Some(tt), Some(a)) = (c.text_time, added) {
                emb = (emb + self.text_time_embedding(w, tt, a, b)?)?;
            }
            // Every resnet applies SiLU to the embedding before its projection: do it once here.
            emb.silu()?
        };

        x = self.conv_in.forward(w, &x)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward(w, &x, Some(&temb_act))?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(w, &x, &ctx)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &blk.downsample {
                x = d.forward(w, &x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(w, &x, Some(&temb_act))?;
        x = self.mid_attention.forward(w, &x, &ctx)?;
        x = self.mid_resnets[1].forward(w, &x, Some(&temb_act))?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| Error::format("unet: skip stack exhausted"))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                drop(skip);
                x = r.forward(w, &x, Some(&temb_act))?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(w, &x, &ctx)?;
                }
            }
            if let Some(u) = &blk.upsample {
                // 2× unless the skip this resolution meets is another size (odd latent sides).
                let (_, _, sh, sw) = skips.last().ok_or_else(|| Error::format("unet: skip stack exhausted"))?.dims4()?;
                x = u.forward(w, &x, (sh, sw))?;
            }
        }
        x = norm_silu_block(w, "conv_norm_out", &x, c0, c.norm_num_groups, c.norm_eps)?;
        self.conv_out.forward(w, &x)
    }

    /// Reject added conditioning that is missing, misshapen, or given to a model that takes none.
    fn check_added(&self, b: usize, added: Option<&AddedCond>) -> Result<()> {
        match (self.needs_added_cond(), added) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(Error::invalid(
                "unet: this model takes no added conditioning (sampling.cond_pooled / sampling.time_ids are for SDXL-style models)",
            )),
            (Some((p, n)), None) => Err(Error::invalid(format!(
                "unet: this model needs sampling.cond_pooled [{b}, {p}] and sampling.time_ids [{b}, {n}] (SDXL text_time conditioning)"
            ))),
            (Some((p, n)), Some(a)) => {
                if a.text_embeds.dims() != [b, p] {
                    return Err(Error::invalid(format!(
                        "unet: sampling.cond_pooled has shape {:?}, expected [{b}, {p}]",
                        a.text_embeds.dims()
                    )));
                }
                if a.time_ids.dims() != [b, n] {
                    return Err(Error::invalid(format!(
                        "unet: sampling.time_ids has shape {:?}, expected [{b}, {n}]",
                        a.time_ids.dims()
                    )));
                }
                Ok(())
            }
        }
    }

    /// `add_embedding(cat[text_embeds, sinusoidal(time_ids)])` (diffusers' `get_aug_embed`, "text_time"):
    /// `[B, temb_dim]` in the compute dtype.
    fn text_time_embedding(&self, w: &dyn WeightSource, tt: TextTimeConfig, a: &AddedCond, b: usize) -> Result<Tensor> {
        let c = &self.config;
        let (dt, dev) = (w.dtype(), w.device());
        let ids: Vec<f64> = a.time_ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        if let Some(v) = ids.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("unet: sampling.time_ids holds {v}")));
        }
        let time = timestep_embedding(&ids, tt.time_embed_dim, c.flip_sin_to_cos, c.freq_shift, dev)?
            .reshape((b, TextTimeConfig::TIME_IDS * tt.time_embed_dim))?;
        let text = a.text_embeds.to_device(dev)?.to_dtype(DType::F32)?;
        let input = Tensor::cat(&[&text, &time], 1)?.to_dtype(dt)?;
        let bw = w.fetch("add_embedding")?;
        let h = linear_from(&bw, "linear_1", &input, tt.projection_input_dim, self.temb_dim, Bias::Required)?.silu()?;
        linear_from(&bw, "linear_2", &h, self.temb_dim, self.temb_dim, Bias::Required)
    }
}
