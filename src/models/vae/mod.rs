//! `AutoencoderKL`: the SD VAE's decoder and encoder, computing block by block from a [`WeightSource`], with an
//! exact tiled decode (`tiled_decode.rs`) for images whose activations do not fit on the device.
//!
//! Block keys: `post_quant_conv`, `decoder.conv_in`, `decoder.mid_block.resnets.{0,1}`,
//! `decoder.mid_block.attentions.0`, `decoder.up_blocks.{i}.resnets.{j}`, `decoder.up_blocks.{i}.upsamplers.0`,
//! `decoder.conv_norm_out`, `decoder.conv_out`; and for the encoder `encoder.conv_in`,
//! `encoder.down_blocks.{i}.resnets.{j}`, `encoder.down_blocks.{i}.downsamplers.0`, `encoder.mid_block.*`,
//! `encoder.conv_norm_out`, `encoder.conv_out`, `quant_conv`.

mod config;
mod tiled;
mod tiled_decode;

use std::path::Path;

pub use config::VaeConfig;

use candle_core::Tensor;

use crate::ops::OpTarget;
use crate::error::{Error, Result};
use crate::models::blocks::{
    act, conv_scratch, norm_silu_block, ConvSpec, DownsampleSpec, ExpectedTensors, Peak, ResnetSpec, UpsampleSpec,
    VaeAttentionSpec,
};
use crate::ops;
use crate::weights::WeightSource;

struct MidBlock {
    resnets: [ResnetSpec; 2],
    attention: Option<VaeAttentionSpec>,
}

impl MidBlock {
    fn new(prefix: &str, c: usize, groups: usize, attention: bool) -> Self {
        let r = |j: usize| ResnetSpec {
            key: format!("{prefix}.mid_block.resnets.{j}"),
            cin: c,
            cout: c,
            temb: None,
            groups,
            eps: 1e-6,
            out_scale: 1.0,
        };
        Self {
            resnets: [r(0), r(1)],
            attention: attention.then(|| VaeAttentionSpec { key: format!("{prefix}.mid_block.attentions.0"), channels: c, groups }),
        }
    }

    fn forward(&self, w: &dyn WeightSource, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(w, x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(w, &x)?;
        }
        self.resnets[1].forward(w, &x, None)
    }

    fn mem(&self, p: &mut Peak, b: usize, hw: usize, e: OpTarget) {
        let x = act(b, self.resnets[0].cin, hw, e);
        self.resnets[0].mem(p, b, hw, e);
        p.free(x);
        if let Some(a) = &self.attention {
            a.mem(p, b, hw, e);
        }
        self.resnets[1].mem(p, b, hw, e);
        p.free(x);
    }
}

struct Stage {
    resnets: Vec<ResnetSpec>,
    down: Option<DownsampleSpec>,
    up: Option<UpsampleSpec>,
}

/// The VAE: a configuration and the plans of its encoder and decoder. It holds no tensors.
pub struct AutoencoderKL {
    config: VaeConfig,
    enc_conv_in: ConvSpec,
    enc_stages: Vec<Stage>,
    enc_mid: MidBlock,
    enc_conv_out: ConvSpec,
    quant_conv: Option<ConvSpec>,
    post_quant_conv: Option<ConvSpec>,
    dec_conv_in: ConvSpec,
    dec_mid: MidBlock,
    dec_stages: Vec<Stage>,
    dec_conv_out: ConvSpec,
}

impl AutoencoderKL {
    /// Build the encoder and decoder plans for `config`.
    pub fn new(config: VaeConfig) -> Result<Self> {
        let ch = config.block_out_channels.clone();
        let n = ch.len();
        let g = config.norm_num_groups;
        let l = config.latent_channels;
        let resnet = |key: String, cin: usize, cout: usize| ResnetSpec { key, cin, cout, temb: None, groups: g, eps: 1e-6, out_scale: 1.0 };
        let mut enc_stages = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let resnets = (0..config.layers_per_block)
                .map(|j| resnet(format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { cout }, cout))
                .collect();
            let down = (i + 1 < n).then(|| DownsampleSpec { key: format!("encoder.down_blocks.{i}.downsamplers.0"), c: cout, padding: 0 });
            enc_stages.push(Stage { resnets, down, up: None });
            cin = cout;
        }
        let cm = ch[n - 1];
        let mut dec_stages = Vec::with_capacity(n);
        let mut prev = cm;
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| resnet(format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { cout }, cout))
                .collect();
            let up = (i + 1 < n).then(|| UpsampleSpec { key: format!("decoder.up_blocks.{i}.upsamplers.0"), c: cout });
            dec_stages.push(Stage { resnets, down: None, up });
            prev = cout;
        }
        Ok(Self {
            enc_conv_in: ConvSpec::new("encoder.conv_in", config.in_channels, ch[0], 3),
            enc_stages,
            enc_mid: MidBlock::new("encoder", cm, g, config.mid_block_add_attention),
            enc_conv_out: ConvSpec::new("encoder.conv_out", cm, 2 * l, 3),
            quant_conv: config.use_quant_conv.then(|| ConvSpec::new("quant_conv", 2 * l, 2 * l, 1)),
            post_quant_conv: config.use_post_quant_conv.then(|| ConvSpec::new("post_quant_conv", l, l, 1)),
            dec_conv_in: ConvSpec::new("decoder.conv_in", l, cm, 3),
            dec_mid: MidBlock::new("decoder", cm, g, config.mid_block_add_attention),
            dec_stages,
            dec_conv_out: ConvSpec::new("decoder.conv_out", ch[0], config.out_channels, 3),
            config,
        })
    }

    /// Read `config.json` and build the model.
    pub fn from_config_file(path: &Path) -> Result<Self> {
        Self::new(VaeConfig::from_file(path)?)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Every tensor the encoder and decoder read, with its shape (checked against a checkpoint at load).
    pub fn expected_tensors(&self) -> ExpectedTensors {
        let mut t = ExpectedTensors::default();
        let (c0, g) = (self.config.block_out_channels[0], &self.config);
        self.enc_conv_in.expect(&mut t);
        for st in self.enc_stages.iter().chain(&self.dec_stages) {
            st.resnets.iter().for_each(|r| r.expect(&mut t));
            if let Some(d) = &st.down {
                d.expect(&mut t);
            }
            if let Some(u) = &st.up {
                u.expect(&mut t);
            }
        }
        for mid in [&self.enc_mid, &self.dec_mid] {
            mid.resnets.iter().for_each(|r| r.expect(&mut t));
            if let Some(a) = &mid.attention {
                a.expect(&mut t);
            }
        }
        let cm = *g.block_out_channels.last().unwrap_or(&c0);
        t.add("encoder.conv_norm_out.weight", &[cm]);
        t.add("encoder.conv_norm_out.bias", &[cm]);
        self.enc_conv_out.expect(&mut t);
        for c in self.quant_conv.iter().chain(&self.post_quant_conv) {
            c.expect(&mut t);
        }
        self.dec_conv_in.expect(&mut t);
        t.add("decoder.conv_norm_out.weight", &[c0]);
        t.add("decoder.conv_norm_out.bias", &[c0]);
        self.dec_conv_out.expect(&mut t);
        t
    }

    /// Decode latents `z` `[B, latent_channels, h, w]` (already divided by `scaling_factor`, shift undone) to an image
    /// `[B, out_channels, h·f, w·f]` in about [-1, 1], in the compute dtype; `f` = [`VaeConfig::downscale`].
    pub fn decode(&self, w: &dyn WeightSource, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4()?;
        if c != self.config.latent_channels {
            return Err(Error::invalid(format!("vae decode: latents have {c} channels, expected {}", self.config.latent_channels)));
        }
        let mut x = z.to_device(w.device())?.to_dtype(w.dtype())?;
        if let Some(pq) = &self.post_quant_conv {
            x = pq.forward(w, &x)?;
        }
        x = self.dec_conv_in.forward(w, &x)?;
        x = self.dec_mid.forward(w, &x)?;
        for st in &self.dec_stages {
            for r in &st.resnets {
                x = r.forward(w, &x, None)?;
            }
            if let Some(u) = &st.up {
                let (_, _, h, ww) = x.dims4()?;
                x = u.forward(w, &x, (2 * h, 2 * ww))?;
            }
        }
        let c0 = self.config.block_out_channels[0];
        x = norm_silu_block(w, "decoder.conv_norm_out", &x, c0, self.config.norm_num_groups, 1e-6)?;
        self.dec_conv_out.forward(w, &x)
    }

    /// Encode an image `x` `[B, in_channels, H, W]` in [-1, 1] to the latent distribution's `(mean, logvar)`, each
    /// `[B, latent_channels, H/f, W/f]`, logvar clamped to [-30, 20] as diffusers does. Compute dtype.
    pub fn encode(&self, w: &dyn WeightSource, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.config.in_channels {
            return Err(Error::invalid(format!("vae encode: image has {c} channels, expected {}", self.config.in_channels)));
        }
        let mut x = x.to_device(w.device())?.to_dtype(w.dtype())?;
        x = self.enc_conv_in.forward(w, &x)?;
        for st in &self.enc_stages {
            for r in &st.resnets {
                x = r.forward(w, &x, None)?;
            }
            if let Some(d) = &st.down {
                x = d.forward(w, &x)?;
            }
        }
        x = self.enc_mid.forward(w, &x)?;
        let cm = *self.config.block_out_channels.last().unwrap_or(&0);
        x = norm_silu_block(w, "encoder.conv_norm_out", &x, cm, self.config.norm_num_groups, 1e-6)?;
        x = self.enc_conv_out.forward(w, &x)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(w, &x)?;
        }
        let l = self.config.latent_channels;
        let mean = x.narrow(1, 0, l)?.contiguous()?;
        let logvar = x.narrow(1, l, l)?.clamp(-30f64, 20f64)?;
        Ok((mean, logvar))
    }

    /// Peak bytes of activations [`Self::decode`] needs beyond the weights for latents of `z_shape`
    /// (`[B, C, h, w]`) in `dtype`.
    ///
    /// Walk of the decoder tracking the live activation and each op's transient buffers: a resnet at `C` channels
    /// and `P` pixels holds its input, the GroupNorm f32 scratch `3·4·B·C·P`, the conv im2col `B·P·9·C` elements
    /// plus the un-permuted GEMM result and up to two more activations; an upsample holds the 4×-larger resized
    /// input, its conv's im2col and output; the mid attention holds q, k, v and ≤ 64 MiB of chunked scores. The
    /// peak is usually the first resnet of the last up stage or the final conv, at full resolution.
    pub fn decode_working_bytes(&self, z_shape: &[usize], dtype: impl Into<OpTarget>) -> u64 {
        let dtype: OpTarget = dtype.into();
        let (b, l, h, w) = match z_shape {
            [b, l, h, w] => (*b, *l, *h, *w),
            _ => return 0,
        };
        let mut p = Peak::default();
        let cm = *self.config.block_out_channels.last().unwrap_or(&0);
        let mut hw = h * w;
        p.alloc(act(b, l, hw, dtype));
        if self.post_quant_conv.is_some() {
            p.transient(2 * act(b, l, hw, dtype));
        }
        p.transient(conv_scratch(b, l, cm, hw, 3, dtype));
        p.alloc(act(b, cm, hw, dtype));
        self.dec_mid.mem(&mut p, b, hw, dtype);
        let (mut hh, mut ww) = (h, w);
        for st in &self.dec_stages {
            for r in &st.resnets {
                r.mem(&mut p, b, hh * ww, dtype);
                p.free(act(b, r.cin, hh * ww, dtype));
            }
            if let Some(u) = &st.up {
                let x = act(b, u.c, hh * ww, dtype);
                (hh, ww) = (2 * hh, 2 * ww);
                hw = hh * ww;
                let y = act(b, u.c, hw, dtype);
                p.transient(y + conv_scratch(b, u.c, u.c, hw, 3, dtype) + y);
                p.alloc(y);
                p.free(x);
            }
        }
        let c0 = self.config.block_out_channels[0];
        let x = act(b, c0, hh * ww, dtype);
        let oc = self.config.out_channels;
        p.transient(ops::group_norm_scratch_bytes(b * c0 * hh * ww, dtype) + x);
        p.transient(x + conv_scratch(b, c0, oc, hh * ww, 3, dtype) + act(b, oc, hh * ww, dtype));
        p.peak
    }
}
