//! Working memory of one T5 encoder forward: the activations it allocates beyond the weights, plus one copy of the
//! largest weight of a block in the activation dtype (what `BlockWeights::get` makes when it dequantises a GGUF/fp8
//! weight or widens an f16 one, held only during its matmul).

use candle_core::DType;

use super::config::T5EncoderConfig;
use super::model::{activation_dtype, attention_chunks, per_head_row_bytes};
use crate::models::blocks::Peak;
use crate::ops::{OpTarget, ATTENTION_SCRATCH_BYTES};

/// Peak bytes of activations of [`super::T5Encoder::encode`] for `batch` prompts of `seq` tokens on `target`.
///
/// A walk over the forward tracking live tensors (X = one `[B, S, d_model]` activation, Q = one `[B, S, heads·d_kv]`,
/// F = one `[B, S, d_ff]`, all in the activation dtype; W = the largest weight of a block in that dtype): the token
/// lookup; per block the RMS norm (its f32 temporaries), q/k/v, their head-split copies, one attention chunk (its f32
/// score, bias and q/k copies, bounded by the chunking), the gathered and merged output, `o`, the residual; the
/// gated feed-forward (both up-projections live together, then their product); the final norm.
pub(crate) fn working_bytes(c: &T5EncoderConfig, batch: usize, seq: usize, target: OpTarget) -> u64 {
    let dt = activation_dtype(target.dtype);
    let e = dt.size_in_bytes() as u64;
    let f32_act = dt == DType::F32;
    let (b, s) = (batch as u64, seq as u64);
    let (d, inner, ff) = (c.d_model as u64, c.inner_dim() as u64, c.d_ff as u64);
    let x = b * s * d * e;
    let q = b * s * inner * e;
    let f = b * s * ff * e;
    let x32 = b * s * d * 4;
    // rms_norm beside its output: the normalised values (and in f32 compute nothing else: the f32 "copy" is x), or
    // the f32 copy, the normalised values and their f32 product before the cast.
    let rms = if f32_act { x32 } else { 3 * x32 };
    let w = weight_copy_bytes(c, target) + gemm_pack_bytes(c, target);

    // One attention chunk: its gathered bias and score buffers (bounded by the chunking), the f32 copies of its q
    // rows and k heads (k also transposed; one copy each in f32 compute), its v heads, the bucket indices (host and
    // device).
    let (hc, rows) = attention_chunks(batch, c.num_heads, seq, ATTENTION_SCRATCH_BYTES);
    let (hc, rows) = (hc as u64, rows as u64);
    let dk = c.d_kv as u64;
    let copies = if f32_act { 1 } else { 2 };
    let v_copy = if hc < c.num_heads as u64 { b * hc * s * dk * e } else { 0 };
    let chunk = per_head_row_bytes(batch, seq) * hc * rows
        + copies * b * hc * rows * dk * 4
        + copies * b * hc * s * dk * 4
        + v_copy
        + 2 * rows * s * 4;

    let mut p = Peak::default();
    p.alloc(b * s * 4 + (2 * s) * 4); // host ids, bucket table
    p.transient(b * s * 8 + b * s * 4 + 2 * x + b * s * 4); // ids read as i64, on the device; rows, converted; mask
    p.alloc(x); // hidden state
                // Self-attention; `x` stays live throughout.
    p.transient(rms + x);
    p.alloc(x); // h
    for _ in 0..3 {
        p.transient(w + q);
        p.alloc(q); // q, k, v
    }
    p.free(x); // h
    p.transient(q); // each head-split copy exists beside its input, which then goes
    p.transient(chunk + q); // a chunk beside the split copies and the outputs gathered so far
    p.free(3 * q); // split copies
    p.transient(2 * q); // gathered outputs and their concatenation, then it and its merged copy
    p.alloc(q); // attention output
    p.transient(w + x); // o
    p.free(q);
    p.transient(2 * x); // o's output and the residual sum
                        // Feed-forward.
    p.transient(rms + x);
    p.alloc(x); // h
    p.transient(w + f);
    p.alloc(f); // wi_0 (wi)
    p.transient(f); // its activation
    if c.gated {
        p.transient(w + f);
        p.alloc(f); // wi_1
        p.free(x); // h
        p.transient(f); // the product
        p.free(f);
    } else {
        p.free(x);
    }
    p.transient(w + x); // wo
    p.transient(2 * x); // its output and the residual sum
    p.free(f);
    // Final norm and its output.
    p.transient(rms + x);
    p.peak
}

/// Of [`working_bytes`], the working copy of the largest block weight that `get` makes: with an f16 compute dtype
/// every weight is widened to f32 just before its matmul. (A GGUF/fp8 weight dequantised on get makes one too: the
/// quantised-weights loader adds that figure, [`largest_weight_bytes`] in the activation dtype.)
pub(crate) fn weight_copy_bytes(c: &T5EncoderConfig, target: OpTarget) -> u64 {
    if target.dtype == DType::F16 {
        largest_weight_bytes(c, target)
    } else {
        0
    }
}

/// Elements of the largest block weight (`wi_0`/`wi_1`/`wo`, or q/k/v/o when wider) times the activation dtype's size.
pub(crate) fn largest_weight_bytes(c: &T5EncoderConfig, target: OpTarget) -> u64 {
    let e = activation_dtype(target.dtype).size_in_bytes() as u64;
    c.inner_dim().max(c.d_ff) as u64 * c.d_model as u64 * e
}

/// The f32 CPU kernel's GEMM (the `gemm` crate) may pack its weight operand: up to the whole weight in f32, measured
/// for T5's shapes (e.g. `[1024, 256]` at 77 rows: all of it; `[1280, 512]`: nothing). Counted on the paths that run
/// the f32 CPU linear: f32 on the CPU, and f16 compute, which runs T5 in f32. cuBLAS packs nothing of ours.
fn gemm_pack_bytes(c: &T5EncoderConfig, target: OpTarget) -> u64 {
    if target.cpu_kernels || (target.dtype == DType::F16 && !target.cuda_kernels) {
        c.inner_dim().max(c.d_ff) as u64 * c.d_model as u64 * 4
    } else {
        0
    }
}
