//! Working memory of one UNet forward: the activations and transient buffers beyond the weights, for the memory
//! manager's reservation. Checked against a counting allocator in tests/ops_memory.rs (SD 1.x) and tests/sdxl.rs.

use crate::models::blocks::{act, conv_scratch, Peak};
use crate::ops::{self, OpTarget};

use super::UNet2DConditionModel;

impl UNet2DConditionModel {
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
        if let Some(tt) = c.text_time {
            // SDXL's add_embedding: f32 time-id embedding and the concatenated input, then its two linears.
            let input = (b * tt.projection_input_dim) as u64;
            p.transient(input * 4 * 2 + input * e + 2 * (b * self.temb_dim) as u64 * e);
        }
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
        p.transient(
            x + conv_scratch(b, c0, c.out_channels, hh * ww, 3, dtype) + act(b, c.out_channels, hh * ww, dtype),
        );
        p.peak
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use crate::models::unet::{UNet2DConditionModel, UNetConfig};
    use crate::ops::OpTarget;

    /// The real SDXL base shapes (CFG batch 2, 77 tokens, cross dim 2048): the estimate grows with the latent and is
    /// dominated by activations, not by the added embedding (checked against a counting allocator on the tiny model
    /// in tests/sdxl_memory.rs).
    #[test]
    fn sdxl_base_estimate_scales_with_latent_size() {
        let m = UNet2DConditionModel::new(UNetConfig::from_json(super::super::config::tests::SDXL_BASE).unwrap()).unwrap();
        let t = OpTarget::new(&Device::Cpu, DType::F32);
        let e64 = m.working_bytes(2, 64, 64, 77, t);
        let e128 = m.working_bytes(2, 128, 128, 77, t);
        println!("SDXL base working memory, CPU f32, batch 2: 64x64 {} MiB, 128x128 {} MiB", e64 >> 20, e128 >> 20);
        assert!(e128 > 3 * e64 && e64 > 100 << 20, "{e64} {e128}");
    }
}
