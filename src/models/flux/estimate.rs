//! Working memory of one FLUX forward: the activations and transient buffers beyond the weights, for the memory
//! manager's reservation. Checked against a counting allocator in tests/flux_memory.rs.

use crate::models::blocks::Peak;
use crate::ops::{self, OpTarget};

use super::{FluxTransformer, TIME_EMBED};

impl FluxTransformer {
    /// Peak bytes one forward needs beyond the resident weights, for `batch` latents of `h`×`w` and a text sequence
    /// of `txt_len` tokens, on `target`.
    ///
    /// Walks the forward with the same structure as [`Self::forward`], tracking what is live (the image and text
    /// streams, the conditioning vector, the rotary table) and adding each op's transients on top: the modulated
    /// LayerNorm (its output, the product, the sum), q/k RMSNorm (a contiguous copy of the head slice and its f32
    /// statistics), the rotated q and k, [`ops::attention_scratch_bytes`] (flash-style: no score matrix), the MLP's
    /// 4·D-wide hidden state and its GELU, a single block's fused `linear1` output (7·D wide) and the 5·D-wide input
    /// of `linear2`. On top of the peak comes one dense copy of the largest weight of a unit in the compute dtype: a
    /// quantised or fp8 store dequantises each weight into working memory right before its matmul.
    pub fn working_bytes(&self, batch: usize, h: usize, w: usize, txt_len: usize, target: impl Into<OpTarget>) -> u64 {
        let t: OpTarget = target.into();
        let c = &self.config;
        let e = t.size_in_bytes() as u64;
        let (b, d, hid, hd) = (batch as u64, c.hidden() as u64, c.mlp_hidden() as u64, c.attention_head_dim as u64);
        let heads = c.num_attention_heads;
        let (li, lt) = ((h / 2 * (w / 2)) as u64, txt_len as u64);
        let l = li + lt;
        // Bytes of `n` tokens of width `wd` in the compute dtype.
        let tok = |n: u64, wd: u64| b * n * wd * e;
        // Transients of ops beyond their output, by path: the own CPU kernels need none; candle's compositions
        // (f16/bf16, CUDA) take f32 statistics and a second buffer for the bias add.
        let kernels = t.cpu_kernels;
        let ln_extra = |n: u64| if kernels { 0 } else { 3 * 4 * b * n * d };
        let lin_extra = |n: u64, wd: u64| if kernels { 0 } else { tok(n, wd) };
        let rms_extra = |n: u64| {
            let f32_copy = if e == 4 { 0 } else { 4 * b * n * d };
            tok(n, d) + 3 * 4 * b * n * d + f32_copy
        };
        let rope_extra = |n: u64| ops::rope_scratch_bytes((b * n * d) as usize, t);
        let attn_scratch = ops::attention_scratch_bytes(batch, heads, l as usize, l as usize, hd as usize, t);

        let mut p = Peak::default();
        // Inputs: the latents (f32 from the host, then the compute dtype), the text states, the pooled vector.
        let latent = b * (4 * li) * (c.in_channels as u64 / 4) * e;
        p.alloc(latent);
        p.alloc(tok(lt, c.joint_attention_dim as u64));
        // The rotary table (f32 host vectors, and on other devices its tensors).
        p.alloc(2 * 4 * l * hd / 2 * if kernels { 1 } else { 2 });
        // img_in on the packed copy of the latents.
        p.transient(latent + tok(li, d) + lin_extra(li, d));
        p.alloc(tok(li, d));
        // The embedders: small, but counted ([B, 256] embeddings, [B, D] hidden states).
        p.transient(b * (TIME_EMBED as u64) * (4 + e) + 4 * b * d * e);
        p.alloc(2 * b * d * e); // vec and its SiLU
        p.transient(tok(lt, d) + lin_extra(lt, d));
        p.alloc(tok(lt, d));
        p.free(tok(lt, c.joint_attention_dim as u64) + latent);
        p.alloc(2 * d * e); // the LayerNorm's ones and zeros

        // What a modulated LayerNorm of n tokens needs on top of what is live: LN output, product, sum.
        let modulate = |p: &mut Peak, n: u64| p.transient(3 * tok(n, d) + ln_extra(n));
        for _ in 0..c.num_layers {
            p.alloc(2 * 2 * 6 * b * d * e); // both streams' modulation vectors (and their linears' outputs)
            for n in [li, lt] {
                // qkv: the modulated input, the fused linear output, then q and k normed (the output slice live).
                modulate(&mut p, n);
                p.transient(tok(n, d) + tok(n, 3 * d) + lin_extra(n, 3 * d));
                p.alloc(tok(n, 3 * d));
                p.transient(rms_extra(n) + tok(n, d));
                p.alloc(3 * tok(n, d)); // q, k, v of the stream
                p.free(tok(n, 3 * d));
            }
            // Joint q, k, v, then the rotated q and k and the attention output.
            p.alloc(3 * tok(l, d));
            p.free(3 * tok(l, d)); // the per-stream parts
            p.transient(2 * tok(l, d) + 2 * rope_extra(l) + tok(l, d) + attn_scratch);
            p.alloc(tok(l, d)); // attention output
            p.free(3 * tok(l, d)); // q, k, v
            for n in [li, lt] {
                // proj: contiguous slice, linear, gated product, sum (then the old stream goes).
                p.transient(4 * tok(n, d) + lin_extra(n, d));
                // MLP: modulated input, the hidden state and its GELU, the output, its gated product, the sum.
                modulate(&mut p, n);
                p.transient(tok(n, d) + 2 * tok(n, hid) + lin_extra(n, hid));
                p.transient(tok(n, hid) + 3 * tok(n, d) + lin_extra(n, d));
            }
            p.free(tok(l, d)); // attention output
            p.free(2 * 2 * 6 * b * d * e);
        }
        // The joint stream, then the single blocks.
        p.alloc(tok(l, d));
        p.free(tok(li, d) + tok(lt, d));
        let wide = 3 * d + hid;
        for _ in 0..c.num_single_layers {
            p.alloc(2 * 3 * b * d * e);
            modulate(&mut p, l);
            p.transient(tok(l, d) + tok(l, wide) + lin_extra(l, wide));
            p.alloc(tok(l, wide));
            p.transient(rms_extra(l) + tok(l, d));
            p.alloc(3 * tok(l, d)); // q, k (normed), v (contiguous)
            p.transient(2 * tok(l, d) + 2 * rope_extra(l) + tok(l, d) + attn_scratch);
            p.alloc(tok(l, d)); // attention output
            p.free(3 * tok(l, d));
            p.transient(tok(l, hid)); // GELU of the MLP slice while the linear1 output lives
            p.alloc(tok(l, hid));
            p.free(tok(l, wide));
            p.transient(tok(l, d + hid)); // cat(attention, mlp)
            p.alloc(tok(l, d + hid));
            p.free(tok(l, d) + tok(l, hid));
            p.transient(3 * tok(l, d) + lin_extra(l, d)); // linear2, gated product, sum
            p.free(tok(l, d + hid));
            p.free(2 * 3 * b * d * e);
        }
        // Final layer on the image tokens, then the unpacked copy.
        modulate(&mut p, li);
        p.transient(tok(li, d) + 2 * tok(li, c.in_channels as u64) + lin_extra(li, c.in_channels as u64));
        p.peak + self.largest_weight_bytes(e)
    }

    /// Bytes of the largest single weight in the compute dtype (element size `e`): the dense copy a quantised store
    /// makes right before that weight's matmul (FLUX.1: `single_blocks.N.linear1`, 126 MiB in bf16).
    fn largest_weight_bytes(&self, e: u64) -> u64 {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>() as u64).max().unwrap_or(0) * e
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use crate::models::flux::{FluxConfig, FluxTransformer};
    use crate::ops::OpTarget;

    /// FLUX.1 dev at 1024² (64×64 patches, 512 T5 tokens) in bf16 on the composition path: dominated by the single
    /// blocks' 7·D-wide linear1 output (198 MB) — a few hundred MiB, no score matrix (1–2 GB if materialised).
    #[test]
    fn flux1_estimate_at_1024_has_no_score_matrix() {
        let m = FluxTransformer::new(FluxConfig::dev()).unwrap();
        let e = m.working_bytes(1, 128, 128, 512, OpTarget::from(DType::BF16));
        let cpu = m.working_bytes(1, 128, 128, 512, OpTarget::new(&Device::Cpu, DType::F32));
        println!("FLUX.1 dev 1024x1024 working memory: bf16 composition {} MiB, CPU f32 {} MiB", e >> 20, cpu >> 20);
        assert!(e > 400 << 20 && e < 2 << 30, "{e}");
        assert!(m.working_bytes(1, 64, 64, 512, OpTarget::from(DType::BF16)) < e);
    }
}
