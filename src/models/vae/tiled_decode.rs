//! The decoder run layer by layer over tiles ([`super::tiled`]): exact, with device memory bounded by the tile.

use candle_core::{Device, Tensor};

use super::tiled::{conv3x3_tile, conv3x3_tile_bytes, load, map_tiles, stats_tile_bytes, GroupStats, TileNorm};
use super::AutoencoderKL;
use crate::ops::OpTarget;
use crate::error::{Error, Result};
use crate::models::blocks::{act, ConvSpec, ResnetSpec, UpsampleSpec};
use crate::ops::{conv2d, conv2d_scratch_bytes};
use crate::weights::WeightSource;

/// One decoder layer's geometry for the tiled path: batch, channels and the tile size in pixels at its resolution.
struct Geometry {
    dev: Device,
    /// Tile side at latent resolution; a layer at `s`× the latent resolution uses `s·tile` pixel tiles, so every
    /// layer has the same tile grid.
    tile: usize,
}

impl Geometry {
    /// Tile side in pixels for an activation `h` pixels high whose latent is `latent_h` high.
    fn tile_at(&self, h: usize, latent_h: usize) -> usize {
        self.tile * (h / latent_h).max(1)
    }
}

impl AutoencoderKL {
    /// Decode `z` like [`Self::decode`], one layer at a time over a grid of tiles of `tile_latent`×`tile_latent`
    /// latents (scaled with each layer's resolution). Every full activation is kept in host memory; the device
    /// holds one tile's input (with a 1-pixel halo) and output at a time, so device working memory depends on the
    /// tile size, not the image size (see [`Self::decode_tiled_working_bytes`]).
    ///
    /// Exact up to summation-order rounding: convs read their halo, GroupNorms use statistics gathered over all
    /// tiles first, and the mid-block attention runs whole (it is at latent resolution, 1/f² of the image).
    /// Exact tiles need no overlap. Returns the image on
    /// the host (CPU), in the compute dtype. Each block is fetched once and released before the next fetch.
    pub fn decode_tiled(&self, w: &dyn WeightSource, z: &Tensor, tile_latent: usize) -> Result<Tensor> {
        let (_, c, lh, _) = z.dims4()?;
        if tile_latent == 0 {
            return Err(Error::invalid("vae decode_tiled: tile size 0"));
        }
        if c != self.config.latent_channels {
            return Err(Error::invalid(format!("vae decode: latents have {c} channels, expected {}", self.config.latent_channels)));
        }
        let g = Geometry { dev: w.device().clone(), tile: tile_latent };
        let mut x = z.to_device(&Device::Cpu)?.to_dtype(w.dtype())?;
        if let Some(pq) = &self.post_quant_conv {
            x = conv1x1_tiled(w, pq, &x, g.tile, &g.dev)?;
        }
        x = conv3x3_tiled(w, &self.dec_conv_in, &x, g.tile, &g.dev)?;
        x = resnet_tiled(w, &self.dec_mid.resnets[0], &x, g.tile, &g.dev)?;
        if let Some(a) = &self.dec_mid.attention {
            // Global attention at latent resolution: run whole on the device.
            x = a.forward(w, &x.to_device(&g.dev)?)?.to_device(&Device::Cpu)?;
        }
        x = resnet_tiled(w, &self.dec_mid.resnets[1], &x, g.tile, &g.dev)?;
        for st in &self.dec_stages {
            for r in &st.resnets {
                x = resnet_tiled(w, r, &x, g.tile_at(x.dim(2)?, lh), &g.dev)?;
            }
            if let Some(u) = &st.up {
                x = upsample_tiled(w, u, &x, g.tile_at(2 * x.dim(2)?, lh), &g.dev)?;
            }
        }
        let c0 = self.config.block_out_channels[0];
        let norm = {
            let bw = w.fetch("decoder.conv_norm_out")?;
            let stats = GroupStats::gather(&x, self.config.norm_num_groups, g.tile_at(x.dim(2)?, lh), &g.dev)?;
            // Copies of the affine parameters: the norm is applied inside conv_out's tiles, after this block is released.
            TileNorm::detached(&stats, &bw.get_shaped("weight", &[c0])?, &bw.get_shaped("bias", &[c0])?, 1e-6, true, &g.dev)?
        };
        let bw = w.fetch(&self.dec_conv_out.key)?;
        let (weight, bias) = conv_weights(&bw, "", &self.dec_conv_out)?;
        let (b, _, h, wd) = x.dims4()?;
        map_tiles((b, self.dec_conv_out.cout, h, wd), g.tile_at(h, lh), |r| {
            conv3x3_tile(&x, r, 1, Some(&norm), &weight, &bias, &g.dev)
        })
    }

    /// Peak device bytes of activations [`Self::decode_tiled`] needs beyond the weights, for latents of `z_shape`
    /// (`[B, C, h, w]`) and `tile_latent` tiles in `dtype`: the largest single tile op (the norm-statistics pass,
    /// a 3×3 conv with its halo'd input, f32 norm temporaries, im2col scratch and output, plus the residual's
    /// inputs), or the mid-block attention run whole at latent resolution. Only that attention term grows with
    /// the image (at 1/f² of its pixels); everything else is set by the tile size. Host memory (a few full
    /// activations) is not counted.
    pub fn decode_tiled_working_bytes(&self, z_shape: &[usize], tile_latent: usize, dtype: impl Into<OpTarget>) -> u64 {
        let dtype: OpTarget = dtype.into();
        let (b, l, h, w) = match z_shape {
            [b, l, h, w] => (*b, *l, *h, *w),
            _ => return 0,
        };
        let e = dtype;
        // Tile sides at `s`× latent resolution.
        let side = |s: usize| ((tile_latent * s).min(h * s), (tile_latent * s).min(w * s));
        let mut peak = 0u64;
        let (th, tw) = side(1);
        if self.post_quant_conv.is_some() {
            peak = peak.max(2 * act(b, l, th * tw, e) + conv2d_scratch_bytes(b, l, l, th, tw, 1, 1, 0, e));
        }
        peak = peak.max(conv3x3_tile_bytes(b, l, self.dec_conv_in.cout, th, tw, 1, false, e));
        for r in &self.dec_mid.resnets {
            peak = peak.max(resnet_tile_bytes(r, b, th, tw, e));
        }
        if let Some(a) = &self.dec_mid.attention {
            let mut p = crate::models::blocks::Peak::default();
            p.alloc(act(b, a.channels, h * w, e)); // its input, copied whole to the device
            a.mem(&mut p, b, h * w, e);
            peak = peak.max(p.peak);
        }
        let mut s = 1;
        for st in &self.dec_stages {
            let (th, tw) = side(s);
            for r in &st.resnets {
                peak = peak.max(resnet_tile_bytes(r, b, th, tw, e));
            }
            if let Some(u) = &st.up {
                s *= 2;
                let (th, tw) = side(s);
                peak = peak.max(conv3x3_tile_bytes(b, u.c, u.c, th, tw, 2, false, e));
            }
        }
        let (th, tw) = side(s);
        let c0 = self.config.block_out_channels[0];
        peak = peak.max(stats_tile_bytes(b, c0, th, tw, e));
        peak.max(conv3x3_tile_bytes(b, c0, self.dec_conv_out.cout, th, tw, 1, true, e))
    }
}

/// A fetched conv's weight `[cout, cin, k, k]` and bias.
fn conv_weights(bw: &crate::weights::BlockWeights, name: &str, c: &ConvSpec) -> Result<(Tensor, Tensor)> {
    Ok((bw.get_shaped(&format!("{name}weight"), &[c.cout, c.cin, c.k, c.k])?, bw.get_shaped(&format!("{name}bias"), &[c.cout])?))
}

/// A stand-alone 1×1 conv block, tile by tile.
fn conv1x1_tiled(w: &dyn WeightSource, c: &ConvSpec, x: &Tensor, tile: usize, dev: &Device) -> Result<Tensor> {
    let bw = w.fetch(&c.key)?;
    let (weight, bias) = conv_weights(&bw, "", c)?;
    let (b, _, h, wd) = x.dims4()?;
    map_tiles((b, c.cout, h, wd), tile, |r| conv2d(&load(x, r, dev)?, &weight, Some(&bias), 1, 0))
}

/// A stand-alone 3×3 conv block, tile by tile.
fn conv3x3_tiled(w: &dyn WeightSource, c: &ConvSpec, x: &Tensor, tile: usize, dev: &Device) -> Result<Tensor> {
    let bw = w.fetch(&c.key)?;
    let (weight, bias) = conv_weights(&bw, "", c)?;
    let (b, _, h, wd) = x.dims4()?;
    map_tiles((b, c.cout, h, wd), tile, |r| conv3x3_tile(x, r, 1, None, &weight, &bias, dev))
}

/// Nearest 2× upsample + 3×3 conv, tile by tile (each tile upsamples its own source window).
fn upsample_tiled(w: &dyn WeightSource, u: &UpsampleSpec, x: &Tensor, tile: usize, dev: &Device) -> Result<Tensor> {
    let bw = w.fetch(&u.key)?;
    let spec = ConvSpec::new(&u.key, u.c, u.c, 3);
    let (weight, bias) = conv_weights(&bw, "conv.", &spec)?;
    let (b, _, h, wd) = x.dims4()?;
    map_tiles((b, u.c, 2 * h, 2 * wd), tile, |r| conv3x3_tile(x, r, 2, None, &weight, &bias, dev))
}

/// A VAE resnet block (no time embedding): `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, with a 1×1 shortcut
/// conv when the channel count changes. Two tiled passes (one per conv), each after a statistics pass for its norm;
/// the residual is added per tile in the second.
fn resnet_tiled(w: &dyn WeightSource, r: &ResnetSpec, x: &Tensor, tile: usize, dev: &Device) -> Result<Tensor> {
    if r.temb.is_some() {
        return Err(Error::invalid(format!("{}: tiled resnets take no time embedding", r.key)));
    }
    let bw = w.fetch(&r.key)?;
    let (b, _, h, wd) = x.dims4()?;
    let norm = |name: &str, t: &Tensor, c: usize| -> Result<TileNorm> {
        let stats = GroupStats::gather(t, r.groups, tile, dev)?;
        TileNorm::new(&stats, &bw.get_shaped(&format!("{name}.weight"), &[c])?, &bw.get_shaped(&format!("{name}.bias"), &[c])?, r.eps, true, dev)
    };
    let (w1, b1) = conv_weights(&bw, "conv1.", &ConvSpec::new("", r.cin, r.cout, 3))?;
    let n1 = norm("norm1", x, r.cin)?;
    let hid = map_tiles((b, r.cout, h, wd), tile, |t| conv3x3_tile(x, t, 1, Some(&n1), &w1, &b1, dev))?;
    drop(n1);
    let (w2, b2) = conv_weights(&bw, "conv2.", &ConvSpec::new("", r.cout, r.cout, 3))?;
    let shortcut = if r.cin != r.cout { Some(conv_weights(&bw, "conv_shortcut.", &ConvSpec::new("", r.cin, r.cout, 1))?) } else { None };
    let n2 = norm("norm2", &hid, r.cout)?;
    map_tiles((b, r.cout, h, wd), tile, |t| {
        let y = conv3x3_tile(&hid, t, 1, Some(&n2), &w2, &b2, dev)?;
        let skip = load(x, t, dev)?;
        let skip = match &shortcut {
            Some((ws, bs)) => conv2d(&skip, ws, Some(bs), 1, 0)?,
            None => skip,
        };
        let out = (skip + y)?;
        Ok(if r.out_scale != 1.0 { (out / r.out_scale)? } else { out })
    })
}

/// Peak device bytes of one tile of [`resnet_tiled`]: its statistics passes, conv1, and conv2 followed by the
/// shortcut (conv2's output lives while the input tile is loaded, 1×1-convolved and added).
fn resnet_tile_bytes(r: &ResnetSpec, b: usize, th: usize, tw: usize, e: OpTarget) -> u64 {
    let px = th * tw;
    let y = act(b, r.cout, px, e);
    let shortcut = if r.cin != r.cout { conv2d_scratch_bytes(b, r.cin, r.cout, th, tw, 1, 1, 0, e) + y } else { 0 };
    let residual = y + act(b, r.cin, px, e) + shortcut + y;
    stats_tile_bytes(b, r.cin, th, tw, e)
        .max(stats_tile_bytes(b, r.cout, th, tw, e))
        .max(conv3x3_tile_bytes(b, r.cin, r.cout, th, tw, 1, true, e))
        .max(conv3x3_tile_bytes(b, r.cout, r.cout, th, tw, 1, true, e))
        .max(residual)
}
