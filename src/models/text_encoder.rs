//! The interface the API calls on any text encoder (CLIP-L, OpenCLIP, and T5 next): token ids in, the hidden
//! states a family asks for and a pooled vector out. The tokenizer that makes the ids travels beside it.

use candle_core::Tensor;

use crate::error::Result;
use crate::models::ExpectedTensors;
use crate::ops::OpTarget;
use crate::weights::{BlockRule, WeightSource};

/// Which hidden states a family feeds its denoiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// The last layer's output after the final layer norm (SD 1.x/2.x `last_hidden_state`).
    Last,
    /// The output of the layer `n` from the end, without the final norm (`hidden_states[-(n+1)]`: SDXL uses
    /// `Skip(1)`, the penultimate layer).
    Skip(usize),
    /// The output of the layer `n` from the end with the final norm applied (diffusers' `clip_skip` for SD 1.x).
    SkipNormed(usize),
}

/// What an encoder returns for a batch of prompts.
#[derive(Debug, Clone)]
pub struct TextEncoding {
    /// `[B, S, D]` hidden states of the requested layer (f32 on the CPU).
    pub hidden: Tensor,
    /// `[B, P]` pooled output (CLIP: final-LN state at the first EOS, projected when the model has a projection).
    pub pooled: Option<Tensor>,
}

/// A text encoder that computes block by block from a [`WeightSource`].
pub trait TextEncoder: Send + Sync {
    /// A short name for messages (`CLIPTextModel`).
    fn name(&self) -> &'static str;
    /// Width of its hidden states.
    fn hidden_size(&self) -> usize;
    /// Encode `ids` `[B, S]` (u32).
    fn encode(&self, w: &dyn WeightSource, ids: &Tensor, layer: HiddenLayer) -> Result<TextEncoding>;
    /// Peak activation bytes of one encode of `batch` sequences of `seq` tokens on `target`.
    fn working_bytes(&self, batch: usize, seq: usize, target: OpTarget) -> u64;
    /// Every tensor the encoder reads, with its shape (checked against the checkpoint at load).
    fn expected_tensors(&self) -> ExpectedTensors;
    /// Its checkpoints' streaming units.
    fn block_rule(&self) -> BlockRule;
}

/// Turns a prompt into the fixed-length ids its encoder takes.
pub trait PromptTokenizer: Send + Sync {
    /// The ids of `prompt`, truncated and padded to the encoder's length.
    fn tokenize(&self, prompt: &str) -> Result<Vec<u32>>;
}

impl TextEncoder for crate::models::clip::ClipTextEncoder {
    fn name(&self) -> &'static str {
        match self.config().kind {
            crate::models::clip::ClipKind::WithProjection => "CLIPTextModelWithProjection",
            _ => "CLIPTextModel",
        }
    }

    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }

    fn encode(&self, w: &dyn WeightSource, ids: &Tensor, layer: HiddenLayer) -> Result<TextEncoding> {
        let skip = match layer {
            HiddenLayer::Last => 0,
            // `penultimate` is hidden_states[-(clip_skip + 2)]: Skip(n) asks for hidden_states[-(n + 1)].
            HiddenLayer::Skip(n) => n.checked_sub(1).ok_or_else(|| {
                crate::Error::invalid("HiddenLayer::Skip(0) is the last layer without its norm: not a CLIP output")
            })?,
            HiddenLayer::SkipNormed(n) => n,
        };
        let out = self.encode_with_clip_skip(w, ids, skip)?;
        let hidden = match layer {
            HiddenLayer::Last => out.last_hidden_state,
            HiddenLayer::Skip(_) => out.penultimate,
            HiddenLayer::SkipNormed(_) => out.clip_skipped,
        };
        Ok(TextEncoding { hidden, pooled: Some(out.text_embeds.unwrap_or(out.pooled)) })
    }

    fn working_bytes(&self, batch: usize, seq: usize, target: OpTarget) -> u64 {
        crate::models::clip::ClipTextEncoder::working_bytes(self, batch, seq, target)
    }

    fn expected_tensors(&self) -> ExpectedTensors {
        ExpectedTensors(crate::models::clip::ClipTextEncoder::expected_tensors(self))
    }

    fn block_rule(&self) -> BlockRule {
        crate::models::clip::block_of
    }
}

impl PromptTokenizer for crate::text::ClipTokenizer {
    fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode(prompt)
    }
}
