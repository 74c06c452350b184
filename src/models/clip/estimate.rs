//! Working memory of one CLIP text-encoder forward: the activations it allocates beyond the weights.

use candle_core::DType;

use super::config::{Activation, ClipTextConfig};
use crate::models::blocks::Peak;
use crate::ops::OpTarget;

/// Peak bytes of activations of [`super::ClipTextEncoder::encode`] for `batch` prompts of `seq` tokens on
/// `target`, for any `clip_skip` (it counts the two hidden states clip-skip may hold).
///
/// A walk over the forward with the same structure, tracking live tensors (X = one `[B, S, C]` activation, F = one
/// `[B, S, intermediate]`, Sc = one f32 `[B, H, S, S]` score buffer): the embedding lookup and sum (2X); per layer the
/// input and output hidden states, LayerNorm out, q/k/v, their head-split copies (≤ 5X at once), the scores, shifted
/// exponent and probabilities (≤ 2 Sc at once; the inputs are dropped as their copies appear), the attention output
/// and its merged copy, then the MLP (fc1 out, the activation's temporaries: 3F for quick_gelu, 2F for GELU); the final LayerNorm of the last
/// and the clip-skipped states; pooled and projected rows. On the candle compositions (f16/bf16, CUDA) LayerNorm
/// adds its f32 temporaries (≤ 4 f32 X) and attention f32 copies of q and k; those are counted there.
pub(crate) fn working_bytes(c: &ClipTextConfig, batch: usize, seq: usize, target: OpTarget) -> u64 {
    let e = target.size_in_bytes() as u64;
    let (b, s) = (batch as u64, seq as u64);
    let x = b * s * c.hidden_size as u64 * e;
    let f = b * s * c.intermediate_size as u64 * e;
    let sc = b * c.num_attention_heads as u64 * s * s * 4;
    let row_stats = 2 * b * c.num_attention_heads as u64 * s * 4;
    // The compositions' extra f32 buffers: LayerNorm's f32 copy, centred values, squares, normalised values; the
    // f32 copies of q and k heads when the compute dtype is narrower.
    let composite = !target.cpu_kernels;
    let x32 = b * s * c.hidden_size as u64 * 4;
    let ln_scratch = if composite { 4 * x32 } else { 0 };
    let qk32 = if composite && target.dtype != DType::F32 {
        2 * x32
    } else {
        0
    };

    let mut p = Peak::default();
    p.alloc(b * s * 4 + s * s * 4); // host ids, causal mask
    p.transient(b * s * 8 + b * s * 4 + 2 * x); // ids read as i64, on the device; token rows, their sum with positions
    p.alloc(x); // hidden state
    p.alloc(2 * x); // the states clip-skip keeps (penultimate, skipped)
                    // One encoder layer; `x` (its input) stays live throughout.
    p.transient(x + ln_scratch); // LayerNorm 1
    p.alloc(3 * x); // q, k, v
    p.transient((2 * x).max(x + qk32)); // head-split copies of q then k (+ the k copy before its transpose)
    p.transient(sc.max(qk32)); // after q and k are dropped: v, the q/k copies and the scores
    p.free(2 * x); // q, k
    p.transient(2 * sc + row_stats); // v and two score buffers
    p.transient(x + sc + x); // head-split v, probabilities, output
    p.free(x); // v
    p.transient(3 * x); // the merged output copy and out_proj's output
    p.alloc(x); // new hidden state
    p.transient(x + ln_scratch + f); // LayerNorm 2 and fc1
                                     // The activation: quick_gelu's input, a temporary and its output; the exact GELU's input and output.
    p.transient(if c.hidden_act == Activation::QuickGelu {
        3 * f
    } else {
        2 * f
    });
    p.transient(f + 2 * x); // fc2's input and output, the residual sum
    p.free(x); // the layer's input
               // Final LayerNorm of the last and the clip-skipped states, pooled and projected rows.
    p.transient(2 * x + ln_scratch + b * (c.hidden_size + c.projection_dim) as u64 * e);
    p.peak
}
