//! CLIP text encoders: transformers' `CLIPTextModel` (SD 1.x: last layer; SD 2.x: penultimate; FLUX: pooled) and
//! `CLIPTextModelWithProjection` (SDXL's OpenCLIP bigG: penultimate states + projected pooled), with clip-skip.
//!
//! Block keys (see [`block_of`]), fetched once per forward in this order and dropped before the next:
//! `{p}embeddings`, `{p}encoder.layers.{i}`, `{p}final_layer_norm`, `text_projection` (with projection only), where
//! `{p}` is `text_model.` in the hub's folders and single files, and empty where transformers 5 saved a
//! `CLIPTextModel` itself ([`KeyLayout`]).
//!
//! **clip-skip** follows diffusers exactly: `clip_skip = k` selects `hidden_states[-(k + 1)]` (hidden_states[0] is the
//! embeddings, [i] the output of layer i): `StableDiffusionPipeline.encode_prompt` applies the final LayerNorm to
//! it ([`ClipOutput::clip_skipped`]; k = 1 is the penultimate layer), `StableDiffusionXLPipeline` takes
//! `hidden_states[-(k + 2)]` without the norm ([`ClipOutput::penultimate`]). k = 0 is no skip.

mod blocks;
mod config;
mod estimate;
mod model;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use blocks::block_of;
pub use config::{Activation, ClipKind, ClipTextConfig};
pub use model::ClipOutput;

use crate::error::{Error, Result};
use crate::ops::OpTarget;
use crate::weights::WeightSource;

/// How a checkpoint names the text model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// `text_model.embeddings.…`, `text_model.encoder.layers.N.…` (hub folders, `CLIPTextModelWithProjection`).
    Prefixed,
    /// `embeddings.…`, `encoder.layers.N.…` (transformers 5's `CLIPTextModel.save_pretrained`).
    Bare,
}

impl KeyLayout {
    /// The layout of a checkpoint from its tensor names; `Format` if it has no CLIP token embedding.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut bare = false;
        for n in names {
            if n == "text_model.embeddings.token_embedding.weight" {
                return Ok(KeyLayout::Prefixed);
            }
            bare |= n == "embeddings.token_embedding.weight";
        }
        if bare {
            Ok(KeyLayout::Bare)
        } else {
            Err(Error::format(
                "no CLIP text encoder tensors (text_model.embeddings.token_embedding.weight)",
            ))
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            KeyLayout::Prefixed => "text_model.",
            KeyLayout::Bare => "",
        }
    }
}

/// A CLIP text encoder: its configuration and key layout. It holds no tensors; [`Self::encode`] fetches each block
/// from a [`WeightSource`] (resident weights, or a `memory::ModelCache` lock that streams them).
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    config: ClipTextConfig,
    layout: KeyLayout,
}

impl ClipTextEncoder {
    /// An encoder for `config` whose checkpoint uses `layout`.
    pub fn new(config: ClipTextConfig, layout: KeyLayout) -> Self {
        Self { config, layout }
    }

    /// Read a diffusers text-encoder folder (`text_encoder/`, `text_encoder_2/`): `config.json`, and the key layout
    /// from the header of its weights file ([`Self::weights_file`]). Reads no tensor data.
    pub fn load_config(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut config = ClipTextConfig::from_json(&text)?;
        let weights = Self::weights_file(dir)?;
        let names = safetensors_names(&weights)?;
        let layout = KeyLayout::detect(names.iter().map(String::as_str))
            .map_err(|e| Error::format(format!("{}: {e}", weights.display())))?;
        // A config without `architectures` (written by `config.save_pretrained` alone) says nothing about the
        // projection: the weights do.
        let architectures = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("architectures").cloned());
        if architectures.is_none() && names.iter().any(|n| n == "text_projection.weight") {
            config.kind = ClipKind::WithProjection;
        }
        Ok(Self { config, layout })
    }

    /// The weights file of a text-encoder folder: `model.safetensors`, else `model.fp16.safetensors`, else the
    /// shard index of either (`model.safetensors.index.json`).
    pub fn weights_file(dir: &Path) -> Result<PathBuf> {
        crate::weights::find_weights(dir, &["model.safetensors", "model.fp16.safetensors"]).ok_or_else(|| {
            Error::format(format!(
                "{}: no model.safetensors or model.fp16.safetensors (or their .index.json)",
                dir.display()
            ))
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The checkpoint's key layout.
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// Encode token ids `[B, S]` (u32 or i64; S ≤ `max_position_embeddings`, 77 for every CLIP) without clip-skip.
    /// Outputs are in `w`'s compute dtype on its device. Errors: `InvalidArgument` for bad ids, `Format` for missing
    /// or misshapen weights (naming the tensor).
    pub fn encode(&self, w: &dyn WeightSource, ids: &Tensor) -> Result<ClipOutput> {
        self.encode_with_clip_skip(w, ids, 0)
    }

    /// [`Self::encode`] with diffusers' `clip_skip` (0 = none, 1 = penultimate layer, …; < `num_hidden_layers`).
    pub fn encode_with_clip_skip(&self, w: &dyn WeightSource, ids: &Tensor, clip_skip: usize) -> Result<ClipOutput> {
        if clip_skip >= self.config.num_hidden_layers {
            return Err(Error::invalid(format!(
                "text encoder: clip_skip {clip_skip} needs more than {} layers",
                self.config.num_hidden_layers
            )));
        }
        model::forward(&self.config, self.layout.prefix(), w, ids, clip_skip + 1, clip_skip)
    }

    /// Peak bytes of activations of one [`Self::encode`] (any clip-skip) for `batch` prompts of `seq` tokens on
    /// `target` (weights excluded: the manager counts those).
    pub fn working_bytes(&self, batch: usize, seq: usize, target: impl Into<OpTarget>) -> u64 {
        estimate::working_bytes(&self.config, batch, seq, target.into())
    }

    /// Every tensor the forward reads, with its shape, in this checkpoint's layout. A checkpoint may carry extras
    /// (`text_model.embeddings.position_ids` of older exports), which are not read.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.config;
        let (p, ch, ffn) = (self.layout.prefix(), c.hidden_size, c.intermediate_size);
        let mut out = vec![
            (format!("{p}embeddings.token_embedding.weight"), vec![c.vocab_size, ch]),
            (
                format!("{p}embeddings.position_embedding.weight"),
                vec![c.max_position_embeddings, ch],
            ),
        ];
        for i in 0..c.num_hidden_layers {
            let l = format!("{p}encoder.layers.{i}");
            for n in ["layer_norm1", "layer_norm2"] {
                out.push((format!("{l}.{n}.weight"), vec![ch]));
                out.push((format!("{l}.{n}.bias"), vec![ch]));
            }
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("{l}.self_attn.{n}.weight"), vec![ch, ch]));
                out.push((format!("{l}.self_attn.{n}.bias"), vec![ch]));
            }
            out.push((format!("{l}.mlp.fc1.weight"), vec![ffn, ch]));
            out.push((format!("{l}.mlp.fc1.bias"), vec![ffn]));
            out.push((format!("{l}.mlp.fc2.weight"), vec![ch, ffn]));
            out.push((format!("{l}.mlp.fc2.bias"), vec![ch]));
        }
        out.push((format!("{p}final_layer_norm.weight"), vec![ch]));
        out.push((format!("{p}final_layer_norm.bias"), vec![ch]));
        if c.kind == ClipKind::WithProjection {
            out.push(("text_projection.weight".into(), vec![c.projection_dim, ch]));
        }
        out
    }

    /// The block keys one forward fetches, in order.
    pub fn block_keys(&self) -> Vec<String> {
        let p = self.layout.prefix();
        let mut keys = vec![format!("{p}embeddings")];
        keys.extend((0..self.config.num_hidden_layers).map(|i| format!("{p}encoder.layers.{i}")));
        keys.push(format!("{p}final_layer_norm"));
        if self.config.kind == ClipKind::WithProjection {
            keys.push("text_projection".into());
        }
        keys
    }
}

/// The tensor names in a safetensors file's header (the data is not read). The header is bounded at 100 MiB.
pub(crate) fn safetensors_names(path: &Path) -> Result<Vec<String>> {
    Ok(crate::weights::tensor_shapes(path)?.into_iter().map(|(name, _)| name).collect())
}
