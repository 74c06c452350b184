//! The SD 1.x / 2.x UNet (`UNet2DConditionModel`), computing block by block from a [`WeightSource`].
//!
//! Block keys follow the checkpoint: `time_embedding`, `conv_in`, `down_blocks.{i}.resnets.{j}`,
//! `down_blocks.{i}.attentions.{j}`, `down_blocks.{i}.downsamplers.0`, `mid_block.resnets.{0,1}`,
//! `mid_block.attentions.0`, `up_blocks.{i}.resnets.{j}`, `up_blocks.{i}.attentions.{j}`,
//! `up_blocks.{i}.upsamplers.0`, `conv_norm_out`, `conv_out`. Each is fetched once per forward, in that execution
//! order, and dropped before the next is fetched.

mod config;

use std::path::Path;

pub use config::{BlockType, UNetConfig};

use candle_core::Tensor;

use crate::ops::OpTarget;
use crate::error::{Error, Result};
use crate::models::blocks::{
    act, conv_scratch, norm_silu_block, Bias, ConvSpec, DownsampleSpec, ExpectedTensors, Peak, ResnetSpec,
    TransformerSpec, UpsampleSpec,
};
use crate::ops::{self, linear, timestep_embedding};
use crate::weights::WeightSource;

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
        let transformer = |key: String, channels: usize, heads: usize| TransformerSpec {
            key,
            channels,
            heads,
            cross_dim: c.cross_attention_dim,
            depth: 1,
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
                    b.attentions.push(transformer(format!("down_blocks.{i}.attentions.{j}"), cout, c.attention_heads[i]));
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
        let mid_attention = transformer("mid_block.attentions.0".into(), cm, c.attention_heads[n - 1]);
        let mut up = Vec::with_capacity(n);
        let mut prev = cm;
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let layers = c.layers_per_block[n - 1 - i] + 1;
            let heads = c.attention_heads[n - 1 - i];
            let mut b = UpBlock { resnets: vec![], attentions: vec![], upsample: None };
            for j in 0..layers {
                let skip = skips.pop().ok_or_else(|| Error::format("unet config: more up resnets than skips"))?;
                let rin = if j == 0 { prev } else { cout };
                b.resnets.push(resnet(format!("up_blocks.{i}.resnets.{j}"), rin + skip, cout, 1.0));
                if c.up_block_types[i] == BlockType::CrossAttn {
                    b.attentions.push(transformer(format!("up_blocks.{i}.attentions.{j}"), cout, heads));
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

    /// Every tensor the forward reads, with its shape (checked against a checkpoint at load).
    pub fn expected_tensors(&self) -> ExpectedTensors {
        let mut t = ExpectedTensors::default();
        let c0 = self.config.block_out_channels[0];
        t.linear("time_embedding", "linear_1", c0, self.temb_dim, true);
        t.linear("time_embedding", "linear_2", self.temb_dim, self.temb_dim, true);
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
    /// `[B, S, cross_attention_dim]`. Inputs are moved to `w`'s device and dtype; the result `[B, out_channels, h, w]`
    /// is in the compute dtype `w.dtype()`.
    pub fn forward(&self, w: &dyn WeightSource, sample: &Tensor, timestep: f64, encoder_hidden_states: &Tensor) -> Result<Tensor> {
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
        let ctx = encoder_hidden_states.to_device(dev)?.to_dtype(dt)?;
        let mut x = sample.to_device(dev)?.to_dtype(dt)?;

        let c0 = c.block_out_channels[0];
        let temb_act = {
            let t = timestep_embedding(&vec![timestep; b], c0, c.flip_sin_to_cos, c.freq_shift, dev)?.to_dtype(dt)?;
            let bw = w.fetch("time_embedding")?;
            let h = crate::models::blocks::linear_from(&bw, "linear_1", &t, c0, self.temb_dim, Bias::Required)?.silu()?;
            let wt = bw.get_shaped("linear_2.weight", &[self.temb_dim, self.temb_dim])?;
            let bt = bw.get_shaped("linear_2.bias", &[self.temb_dim])?;
            // Every resnet applies SiLU to the embedding before its projection: do it once here.
            linear(&h, &wt, Some(&bt))?.silu()?
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

    /// Peak bytes of activations one forward needs beyond the weights, for `batch` latents of `h`×`w` and a text
    /// sequence of `seq_len` tokens in `dtype`.
    ///
    /// Derived by walking the forward's plan with the same structure as [`Self::forward`] and tracking live
    /// tensors: inputs, the time embedding, the skip connections held for the up path (every resnet/attention output
    /// and downsample of the down path), and the current activation; at each op the transient buffers are added on
    /// top — for a resnet the GroupNorm f32 scratch (`3·4·elems`), the conv im2col (`B·h·w·Cin·9` elements) plus the
    /// un-permuted GEMM result, the intermediate activations; for a transformer the token copies, q/k/v, and
    /// [`ops::attention_scratch_bytes`] (chunked scores, ≤ 64 MiB per chunk), the GEGLU's 8·C-wide projection; for
    /// each up resnet the concatenated input `[B, Cin+Cskip, h, w]`. The estimate is the maximum of live + transient
    /// over the walk. Weights of the block in use are not included (the manager counts those).
    pub fn working_bytes(&self, batch: usize, h: usize, w: usize, seq_len: usize, dtype: impl Into<OpTarget>) -> u64 {
        let dtype: OpTarget = dtype.into();
        let c = &self.config;
        let e = dtype.size_in_bytes() as u64;
        let b = batch;
        let mut p = Peak::default();
        p.alloc(act(b, c.in_channels, h * w, dtype)); // sample
        p.alloc((b * seq_len * c.cross_attention_dim) as u64 * e); // ctx
        p.alloc(2 * (b * self.temb_dim) as u64 * e);
        let c0 = c.block_out_channels[0];
        let (mut hh, mut ww) = (h, w);
        p.transient(conv_scratch(b, c.in_channels, c0, hh * ww, 3, dtype));
        p.alloc(act(b, c0, hh * ww, dtype));
        let mut skip_sizes = vec![(c0, hh, ww)]; // the conv_in output doubles as the first skip
        let mut cur = act(b, c0, hh * ww, dtype);
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                r.mem(&mut p, b, hh * ww, dtype);
                if let Some(a) = blk.attentions.get(j) {
                    a.mem(&mut p, b, hh * ww, seq_len, dtype);
                }
                // The output stays as a skip; the new current activation is the same tensor.
                skip_sizes.push((r.cout, hh, ww));
                cur = act(b, r.cout, hh * ww, dtype);
            }
            if let Some(d) = &blk.downsample {
                let (nh, nw) = d.out_size(hh, ww);
                let y = act(b, d.c, nh * nw, dtype);
                p.transient(ops::conv2d_scratch_bytes(b, d.c, d.c, nh, nw, 3, 2, 1, dtype) + y);
                p.alloc(y);
                (hh, ww) = (nh, nw);
                skip_sizes.push((d.c, hh, ww));
                cur = y;
            }
        }
        let _ = cur;
        let hw = hh * ww;
        self.mid_resnets[0].mem(&mut p, b, hw, dtype);
        self.mid_attention.mem(&mut p, b, hw, seq_len, dtype);
        self.mid_resnets[1].mem(&mut p, b, hw, dtype);
        p.free(act(b, self.mid_resnets[1].cin, hw, dtype)); // the attention output it consumed
        // After the down path every skip is live; the resnet walks above left their outputs allocated, and the
        // mid block's output is the current activation.
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let (sc, sh, sw) = skip_sizes.pop().unwrap_or((0, hh, ww));
                let cat = act(b, r.cin, sh * sw, dtype);
                let prev = act(b, r.cin - sc, sh * sw, dtype);
                p.alloc(cat);
                p.free(prev + act(b, sc, sh * sw, dtype));
                r.mem(&mut p, b, sh * sw, dtype);
                p.free(cat);
                if let Some(a) = blk.attentions.get(j) {
                    a.mem(&mut p, b, sh * sw, seq_len, dtype);
                }
                (hh, ww) = (sh, sw);
            }
            if let Some(u) = &blk.upsample {
                let &(_, nh, nw) = skip_sizes.last().unwrap_or(&(0, 2 * hh, 2 * ww));
                let x = act(b, u.c, hh * ww, dtype);
                let up = act(b, u.c, nh * nw, dtype);
                p.transient(up + conv_scratch(b, u.c, u.c, nh * nw, 3, dtype) + up);
                p.alloc(up);
                p.free(x);
                (hh, ww) = (nh, nw);
            }
        }
        let x = act(b, c0, hh * ww, dtype);
        p.transient(ops::group_norm_scratch_bytes(b * c0 * hh * ww, dtype) + x);
        p.transient(x + conv_scratch(b, c0, c.out_channels, hh * ww, 3, dtype) + act(b, c.out_channels, hh * ww, dtype));
        p.peak
    }
}
