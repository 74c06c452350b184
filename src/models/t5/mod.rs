//! The T5 encoder (transformers' `T5EncoderModel`): FLUX's second text encoder (T5-XXL v1.1: gated-GELU, relative
//! position buckets, RMS layer norms), and T5 v1.0 (`relu`) encoders.
//!
//! Block keys (see [`block_of`]), fetched once per forward in this order and dropped before the next: the token table
//! (`shared`, or `encoder.embed_tokens` in a file that kept only the tied copy), `encoder.block.{i}` (block 0 also
//! holds the relative position bias every block uses), `encoder.final_layer_norm`. At T5-XXL size a block is
//! 368 MiB bf16.
//!
//! GGUF T5 files name the same tensors in llama.cpp's style: [`gguf_names`] maps them.

mod blocks;
mod config;
mod estimate;
pub mod gguf_names;
mod model;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use blocks::block_of;
pub use config::{FfActivation, T5EncoderConfig};
pub use model::relative_position_bucket;

use crate::error::{Error, Result};
use crate::models::text_encoder::{HiddenLayer, TextEncoder, TextEncoding};
use crate::models::ExpectedTensors;
use crate::ops::OpTarget;
use crate::weights::{BlockRule, WeightSource};

/// A T5 encoder: its configuration and the block of its token table. It holds no tensors; [`Self::encode`] fetches
/// each block from a [`WeightSource`].
#[derive(Debug, Clone)]
pub struct T5Encoder {
    config: T5EncoderConfig,
    embedding: String,
}

impl T5Encoder {
    /// An encoder for `config` whose token table is the block `embedding` (`shared` or `encoder.embed_tokens`).
    pub fn new(config: T5EncoderConfig, embedding: impl Into<String>) -> Self {
        Self { config, embedding: embedding.into() }
    }

    /// Read a transformers T5 encoder folder (FLUX's `text_encoder_2/`): `config.json`, and the name of the token
    /// table from the header of its weights file ([`Self::weights_file`]). Reads no tensor data.
    pub fn load_config(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config = T5EncoderConfig::from_json(&text).map_err(|e| match e {
            Error::Format(m) => Error::format(format!("{}: {m}", path.display())),
            Error::Unsupported(m) => Error::unsupported(format!("{}: {m}", path.display())),
            other => other,
        })?;
        let weights = Self::weights_file(dir)?;
        let names = crate::models::clip::safetensors_names(&weights)?;
        let embedding = Self::embedding_block(names.iter().map(String::as_str))
            .map_err(|e| Error::format(format!("{}: {e}", weights.display())))?;
        Ok(Self { config, embedding })
    }

    /// The token table's block among a checkpoint's tensor names: `shared` (transformers' name), else
    /// `encoder.embed_tokens` (its tied copy), else a `Format` error.
    pub fn embedding_block<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<String> {
        let mut tied = false;
        for n in names {
            if n == "shared.weight" {
                return Ok("shared".into());
            }
            tied |= n == "encoder.embed_tokens.weight";
        }
        if tied {
            Ok("encoder.embed_tokens".into())
        } else {
            Err(Error::format("no T5 token table (shared.weight or encoder.embed_tokens.weight)"))
        }
    }

    /// The weights file of a T5 encoder folder: `model.safetensors`, else `model.fp16.safetensors`.
    pub fn weights_file(dir: &Path) -> Result<PathBuf> {
        crate::models::clip::ClipTextEncoder::weights_file(dir)
    }

    /// The configuration.
    pub fn config(&self) -> &T5EncoderConfig {
        &self.config
    }

    /// Encode token ids `[B, S]` (u32 or i64, S ≤ 4096) as FLUX does: no attention mask, pads take
    /// part. Returns `last_hidden_state` `[B, S, d_model]` (after the final norm) on `w`'s device, in its compute
    /// dtype — f32 when that is f16 (T5 overflows f16). Errors: `InvalidArgument` for bad ids, `Format` for missing
    /// or misshapen weights (naming the tensor).
    pub fn encode(&self, w: &dyn WeightSource, ids: &Tensor) -> Result<Tensor> {
        model::forward(&self.config, &self.embedding, w, ids, None)
    }

    /// [`Self::encode`] with transformers' `attention_mask` (`[B·S]` row-major, 1 = token, 0 = pad): masked keys
    /// take no attention. Every row needs at least one 1.
    pub fn encode_masked(&self, w: &dyn WeightSource, ids: &Tensor, mask: &[u32]) -> Result<Tensor> {
        model::forward(&self.config, &self.embedding, w, ids, Some(mask))
    }

    /// Peak bytes of activations of one [`Self::encode`] for `batch` prompts of `seq` tokens on `target` (weights
    /// excluded except one working copy of the largest, see the estimate's module).
    pub fn working_bytes(&self, batch: usize, seq: usize, target: impl Into<OpTarget>) -> u64 {
        estimate::working_bytes(&self.config, batch, seq, target.into())
    }

    /// Bytes of the largest block weight in the activation dtype: the working copy `BlockWeights::get` makes when it
    /// dequantises a GGUF/fp8 weight just before its matmul. [`Self::working_bytes`] counts such a copy only where it
    /// exists today (f16 compute widens every weight to f32); a quantised model's estimate adds this.
    pub fn largest_weight_bytes(&self, target: impl Into<OpTarget>) -> u64 {
        estimate::largest_weight_bytes(&self.config, target.into())
    }

    /// Every tensor the forward reads, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.config;
        let (d, inner, ff) = (c.d_model, c.inner_dim(), c.d_ff);
        let mut out = vec![(format!("{}.weight", self.embedding), vec![c.vocab_size, d])];
        for i in 0..c.num_layers {
            let p = format!("encoder.block.{i}.layer");
            out.push((format!("{p}.0.layer_norm.weight"), vec![d]));
            for n in ["q", "k", "v"] {
                out.push((format!("{p}.0.SelfAttention.{n}.weight"), vec![inner, d]));
            }
            out.push((format!("{p}.0.SelfAttention.o.weight"), vec![d, inner]));
            if i == 0 {
                out.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![c.relative_attention_num_buckets, c.num_heads],
                ));
            }
            out.push((format!("{p}.1.layer_norm.weight"), vec![d]));
            let ups: &[&str] = if c.gated { &["wi_0", "wi_1"] } else { &["wi"] };
            for n in ups {
                out.push((format!("{p}.1.DenseReluDense.{n}.weight"), vec![ff, d]));
            }
            out.push((format!("{p}.1.DenseReluDense.wo.weight"), vec![d, ff]));
        }
        out.push(("encoder.final_layer_norm.weight".into(), vec![d]));
        out
    }

    /// The block keys one forward fetches, in order.
    pub fn block_keys(&self) -> Vec<String> {
        let mut keys = vec![self.embedding.clone()];
        keys.extend((0..self.config.num_layers).map(|i| format!("encoder.block.{i}")));
        keys.push("encoder.final_layer_norm".into());
        keys
    }
}

impl TextEncoder for T5Encoder {
    fn name(&self) -> &'static str {
        "T5EncoderModel"
    }

    fn hidden_size(&self) -> usize {
        self.config.d_model
    }

    /// Only `last_hidden_state` (`HiddenLayer::Last`): FLUX's input; there is no pooled output.
    fn encode(&self, w: &dyn WeightSource, ids: &Tensor, layer: HiddenLayer) -> Result<TextEncoding> {
        if layer != HiddenLayer::Last {
            return Err(Error::invalid(format!(
                "T5 encoder: only the last hidden state is computed, {layer:?} was asked for"
            )));
        }
        Ok(TextEncoding { hidden: T5Encoder::encode(self, w, ids)?, pooled: None })
    }

    fn working_bytes(&self, batch: usize, seq: usize, target: OpTarget) -> u64 {
        T5Encoder::working_bytes(self, batch, seq, target)
    }

    fn expected_tensors(&self) -> ExpectedTensors {
        ExpectedTensors(T5Encoder::expected_tensors(self))
    }

    fn block_rule(&self) -> BlockRule {
        block_of
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::DType;

    use super::*;

    /// T5-XXL (FLUX's `text_encoder_2`): 4.762 B parameters, one block 192.9 M = 368 MiB bf16, under the 512 MiB
    /// streaming-unit bound; the token table is its own 251 MiB unit.
    #[test]
    fn xxl_streams_in_units_under_the_bound() {
        let c = T5EncoderConfig::from_json(
            r#"{"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24, "vocab_size": 32128,
                "feed_forward_proj": "gated-gelu"}"#,
        )
        .unwrap();
        let enc = T5Encoder::new(c, "shared");
        let mut units: HashMap<String, u64> = HashMap::new();
        for (name, shape) in enc.expected_tensors() {
            *units.entry(block_of(&name).to_string()).or_default() += shape.iter().product::<usize>() as u64;
        }
        let mut keys: Vec<&String> = units.keys().collect();
        keys.sort();
        let mut want = enc.block_keys();
        want.sort();
        assert_eq!(keys, want.iter().collect::<Vec<_>>());
        assert_eq!(units.values().sum::<u64>(), 4_762_310_656);
        assert_eq!(units["encoder.block.1"], 192_946_176);
        assert_eq!(units["encoder.block.0"], 192_946_176 + 32 * 64);
        let largest = units.values().map(|p| p * 2).max().unwrap();
        assert_eq!(largest, units["encoder.block.0"] * 2);
        assert!(largest <= 512 << 20 && largest >> 20 == 368, "{largest}");
        assert_eq!(units["shared"] * 2 >> 20, 251);
        // Activations of one 512-token prompt in bf16 (candle's compositions, no kernels), and the working copy of
        // the largest weight (wi_0) a quantised file adds.
        let work = enc.working_bytes(1, 512, DType::BF16);
        eprintln!("T5-XXL, one 512-token prompt, bf16: working memory estimate {} MiB", work >> 20);
        assert!(work < 160 << 20, "{work}");
        assert_eq!(enc.largest_weight_bytes(DType::BF16), 10240 * 4096 * 2);
    }
}
