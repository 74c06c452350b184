//! The one small interface between models and the memory manager.
//!
//! A model never owns device tensors. At forward time each block (a resnet, a transformer block, a conv) asks its
//! [`WeightSource`] for its weights and holds the returned [`BlockWeights`] only while it computes. The memory
//! manager implements the trait: resident blocks come back at no cost, streamed ones are copied to the device now and
//! released when the `BlockWeights` drops. [`crate::weights::ResidentWeights`] is the plain implementation (every
//! tensor on one device) used where no budget applies.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::format::StoredFormat;

/// Something that hands a model the weights of one block on the compute device, in the compute dtype.
pub trait WeightSource: Send + Sync {
    /// The weights of `block` (a tensor-name prefix as returned by [`block_key`], e.g. `down_blocks.0.resnets.1`),
    /// valid until the returned value drops. Streamed bytes are released then.
    fn fetch(&self, block: &str) -> Result<BlockWeights>;
    /// The device the returned tensors live on (where the model computes).
    fn device(&self) -> &Device;
    /// The dtype the returned tensors have (the compute dtype).
    fn dtype(&self) -> DType;
}

/// The tensors of one block kept in a stored format (GGUF quantised blocks, fp8 bytes): for each (relative) name
/// its format and the shape the model reads, and the dtype [`BlockWeights::get`] dequantises into.
#[derive(Debug, Clone)]
pub struct StoredTensors {
    /// The compute dtype.
    pub dtype: DType,
    /// Format and shape of each stored tensor, by name relative to the block.
    pub tensors: HashMap<String, (StoredFormat, Vec<usize>)>,
}

/// The weights of one block, keyed by their names relative to the block prefix (`conv1.weight`).
///
/// Tensors in a stored format (GGUF quantised, fp8) are held as their stored bytes (a `U8` tensor on the compute
/// device) and dequantised by [`Self::get`] at that call, on that device, into a fresh tensor in the compute dtype:
/// working memory the caller should drop right after the op that uses it. So models call `get` right before the
/// matmul that needs a weight (never all weights of a block up front), and their working-memory estimates include
/// one dequantised copy of the block's largest weight ([`Self::largest_dequantised_bytes`];
/// [`crate::weights::WeightStore::largest_dequantised_bytes`] for the whole model).
pub struct BlockWeights {
    prefix: String,
    tensors: HashMap<String, Tensor>,
    /// The tensors of `tensors` that are stored bytes to dequantise on `get`.
    stored: Option<std::sync::Arc<StoredTensors>>,
    /// Held while the block computes; dropping it gives streamed bytes back to the allocator. Declared after
    /// `tensors` so it drops after them (a streamed block's tensors may view a buffer the lease returns to a pool).
    _lease: Option<Box<dyn Send + Sync>>,
}

impl BlockWeights {
    /// Wrap the tensors of block `prefix`; `lease` (if any) is dropped together with the tensors.
    pub fn new(
        prefix: impl Into<String>,
        tensors: HashMap<String, Tensor>,
        lease: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            tensors,
            stored: None,
            _lease: lease,
        }
    }

    /// Mark the tensors `stored` names as stored bytes, dequantised by [`Self::get`] (None: every tensor is dense).
    pub fn with_stored(mut self, stored: Option<std::sync::Arc<StoredTensors>>) -> Self {
        self.stored = stored;
        self
    }

    /// Bytes of the largest dequantised copy [`Self::get`] makes for this block (elements × compute dtype size of
    /// its largest stored tensor; 0 when it has none): working memory beside the block's stored bytes.
    pub fn largest_dequantised_bytes(&self) -> u64 {
        self.stored.as_ref().map_or(0, |s| {
            s.tensors
                .values()
                .map(|(_, shape)| (shape.iter().product::<usize>() * s.dtype.size_in_bytes()) as u64)
                .max()
                .unwrap_or(0)
        })
    }

    /// The tensor `name` as held: a dense tensor, or dequantised from its stored bytes into the compute dtype.
    fn read(&self, name: &str) -> Option<Result<Tensor>> {
        let t = self.tensors.get(name)?;
        match self.stored.as_ref().and_then(|s| s.tensors.get(name).map(|(f, shape)| (s.dtype, *f, shape))) {
            Some((dtype, format, shape)) => Some(
                crate::ops::dequant::dequantize(t, format, shape, dtype)
                    .map_err(|e| Error::format(format!("tensor {}: {e}", self.full_name(name)))),
            ),
            None => Some(Ok(t.clone())),
        }
    }

    /// The block prefix these weights belong to.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tensor `name` (relative to the block), or a format error naming the full tensor. A tensor in a stored
    /// format is dequantised now, on the compute device, into a new tensor (see the type's documentation).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.read(name).unwrap_or_else(|| Err(Error::format(format!("missing tensor {}", self.full_name(name)))))
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != shape {
            return Err(Error::format(format!(
                "tensor {} has shape {:?}, expected {:?}",
                self.full_name(name),
                t.dims(),
                shape
            )));
        }
        Ok(t)
    }

    /// The tensor `name` if the block has it (optional biases); dequantised like [`Self::get`] (None if that fails).
    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.read(name).and_then(|r| r.ok())
    }

    /// Whether the block has a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes of all tensors in the block as held (stored bytes for tensors in a stored format).
    pub fn bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }
}

/// A family's block partition: the streaming unit a tensor name belongs to (a prefix of the name).
pub type BlockRule = fn(&str) -> &str;

/// How a file's bytes become one component's tensors: the family's block rule and, for a component inside a
/// single-file checkpoint, where each of its tensors lies in the file (the whole file as stored otherwise).
#[derive(Clone)]
pub struct WeightLayout {
    /// Names this view of the file in the cache (`""` = the whole file; `unet`, `vae`, ... for a single file's
    /// components), so one file can back several models.
    pub view: String,
    /// The family's block rule.
    pub rule: BlockRule,
    /// The component's tensors in the file (None = every tensor of the file under its stored name).
    pub spans: Option<std::sync::Arc<Vec<TensorSpan>>>,
}

impl WeightLayout {
    /// Every tensor of the file under its stored name, partitioned by `rule`.
    pub fn whole(rule: BlockRule) -> Self {
        Self { view: String::new(), rule, spans: None }
    }
}

/// One tensor of a component as it lies in its file(s): byte ranges read in place (never rewritten) and
/// concatenated in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpan {
    /// The name the model reads (`down_blocks.0.resnets.1.conv1.weight`).
    pub name: String,
    /// Its dtype in the file.
    pub dtype: DType,
    /// The shape the model reads.
    pub shape: Vec<usize>,
    /// Where its bytes are, concatenated in this order: one part for a tensor stored whole or as a row slice; several
    /// for a tensor made of rows of others (diffusers' `to_q`/`to_k`/`to_v` read as FLUX's fused `qkv`; halves of one
    /// tensor swapped). Concatenation along dim 0 of row-major tensors is concatenation of their bytes, whatever the
    /// element format, as long as each part holds whole rows.
    pub parts: Vec<FilePart>,
    /// The stored 2-D tensor is the transpose of `shape` (OpenCLIP's `text_projection`): transposed when read. Only
    /// with a single part.
    pub transposed: bool,
}

/// A byte range of one of the files a store maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    /// Index into the store's files ([`crate::weights::shard_files`] of the path it was opened with; 0 for a
    /// single file).
    pub file: usize,
    /// Byte range in that file.
    pub bytes: std::ops::Range<usize>,
}

impl FilePart {
    /// A range of the first (or only) file.
    pub fn of(bytes: std::ops::Range<usize>) -> Self {
        Self { file: 0, bytes }
    }
}

/// Containers whose numbered children are separate blocks (each streamed or kept resident as a unit).
const BLOCK_LISTS: &[&str] = &[
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "layers", // CLIP text encoders: `text_model.encoder.layers.N`
];

/// The block a checkpoint tensor belongs to: the name up to the deepest numbered child of a block list
/// (`down_blocks.0.resnets.1.conv1.weight` → `down_blocks.0.resnets.1`;
/// `….attentions.0.transformer_blocks.3.attn1.to_q.weight` → `….attentions.0.transformer_blocks.3`), with an
/// attention's `proj_out` a block of its own (`….attentions.0.proj_out`), else its top-level module
/// (`time_embedding.linear_1.weight` → `time_embedding`; under `encoder.`/`decoder.`/`text_model.` one level
/// deeper).
///
/// Blocks are the unit of residency and of transfer: big enough for efficient copies, small enough to plan finely.
/// This is the UNet family's rule (`crate::models::unet::block_of`, which documents why), applied to every file
/// until stores take a family's rule.
pub fn block_key(name: &str) -> &str {
    let parts: Vec<&str> = name.split('.').collect();
    let mut ends = Vec::with_capacity(parts.len());
    let mut len = 0usize;
    for (i, part) in parts.iter().enumerate() {
        len += part.len() + usize::from(i > 0);
        ends.push(len);
    }
    let deepest = (1..parts.len())
        .rev()
        .find(|&i| BLOCK_LISTS.contains(&parts[i - 1]) && parts[i].parse::<usize>().is_ok());
    if let Some(i) = deepest {
        if parts[i - 1] == "attentions"
            && parts.get(i + 1) == Some(&"proj_out")
            && i + 2 < parts.len()
        {
            return &name[..ends[i + 1]];
        }
        return &name[..ends[i]];
    }
    let depth = if matches!(parts[0], "encoder" | "decoder" | "text_model") && parts.len() > 2 {
        2
    } else {
        1
    };
    &name[..ends[depth - 1]]
}

#[cfg(test)]
mod tests {
    use super::block_key;

    #[test]
    fn block_keys_follow_the_checkpoint_layout() {
        assert_eq!(
            block_key("down_blocks.0.resnets.1.conv1.weight"),
            "down_blocks.0.resnets.1"
        );
        assert_eq!(
            block_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
            "down_blocks.1.attentions.0.transformer_blocks.0"
        );
        assert_eq!(
            block_key("down_blocks.1.attentions.0.proj_out.weight"),
            "down_blocks.1.attentions.0.proj_out"
        );
        assert_eq!(
            block_key("down_blocks.0.downsamplers.0.conv.bias"),
            "down_blocks.0.downsamplers.0"
        );
        assert_eq!(
            block_key("mid_block.attentions.0.proj_in.weight"),
            "mid_block.attentions.0"
        );
        assert_eq!(
            block_key("time_embedding.linear_1.weight"),
            "time_embedding"
        );
        assert_eq!(block_key("conv_in.weight"), "conv_in");
        assert_eq!(
            block_key("decoder.up_blocks.2.resnets.0.norm1.weight"),
            "decoder.up_blocks.2.resnets.0"
        );
        assert_eq!(block_key("decoder.conv_in.weight"), "decoder.conv_in");
        assert_eq!(
            block_key("decoder.mid_block.attentions.0.to_q.weight"),
            "decoder.mid_block.attentions.0"
        );
        assert_eq!(block_key("post_quant_conv.weight"), "post_quant_conv");
    }
}
