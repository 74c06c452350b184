//! `ClipTextConfig`: transformers' `CLIPTextConfig` keys of a text encoder's config.json, every count and size bounded.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::models::config_util::parse_object;

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`: OpenAI CLIP (SD 1.x, CLIP-L).
    QuickGelu,
    /// The exact (erf) GELU: OpenCLIP ViT-H / bigG (SD 2.x, SDXL's second encoder).
    Gelu,
}

/// Which transformers class the folder holds (`architectures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipKind {
    /// `CLIPTextModel`: hidden states and the pooled EOS state.
    TextModel,
    /// `CLIPTextModelWithProjection`: also `text_embeds = text_projection(pooled)`.
    WithProjection,
}

/// A validated CLIP text-encoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub kind: ClipKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub projection_dim: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// The pooled output reads the first position whose id is this; the legacy value 2 (configs written before
    /// transformers PR #24773, e.g. SD 1.x's and SDXL's) means "the position of the largest id" instead.
    pub eos_token_id: u32,
}

/// Upper bounds that keep a hostile config.json from asking for absurd allocations (each far above any CLIP).
const MAX_VOCAB: usize = 1 << 20;
const MAX_WIDTH: usize = 1 << 14;
const MAX_FFN: usize = 1 << 16;
const MAX_LAYERS: usize = 256;
const MAX_POSITIONS: usize = 4096;

impl ClipTextConfig {
    /// Read a text encoder folder's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text)
    }

    /// Parse the text of a `CLIPTextConfig` config.json. Missing keys take transformers' defaults; a value out of
    /// range or of the wrong type is a `Format` error naming the key; an unsupported activation or architecture is
    /// `Unsupported`.
    pub fn from_json(text: &str) -> Result<Self> {
        let m = parse_object(text, "text encoder config")?;
        let kind = match m.get("architectures") {
            None | Some(Value::Null) => ClipKind::TextModel,
            Some(Value::Array(a)) => match a.first().and_then(Value::as_str) {
                Some("CLIPTextModel") | None => ClipKind::TextModel,
                Some("CLIPTextModelWithProjection") => ClipKind::WithProjection,
                Some(other) => {
                    return Err(Error::unsupported(format!(
                        "text encoder config key architectures = {other}"
                    )))
                }
            },
            Some(v) => {
                return Err(Error::format(format!(
                    "text encoder config key architectures = {v} is not a list"
                )))
            }
        };
        let hidden_act = match m.get("hidden_act") {
            None | Some(Value::Null) => Activation::QuickGelu,
            Some(Value::String(s)) if s == "quick_gelu" => Activation::QuickGelu,
            Some(Value::String(s)) if s == "gelu" => Activation::Gelu,
            Some(v) => return Err(Error::unsupported(format!("text encoder config key hidden_act = {v}"))),
        };
        let c = Self {
            kind,
            vocab_size: count(&m, "vocab_size", 49408, MAX_VOCAB)?,
            hidden_size: count(&m, "hidden_size", 512, MAX_WIDTH)?,
            intermediate_size: count(&m, "intermediate_size", 2048, MAX_FFN)?,
            num_hidden_layers: count(&m, "num_hidden_layers", 12, MAX_LAYERS)?,
            num_attention_heads: count(&m, "num_attention_heads", 8, MAX_WIDTH)?,
            max_position_embeddings: count(&m, "max_position_embeddings", 77, MAX_POSITIONS)?,
            projection_dim: count(&m, "projection_dim", 512, MAX_WIDTH)?,
            hidden_act,
            layer_norm_eps: match m.get("layer_norm_eps") {
                None | Some(Value::Null) => 1e-5,
                Some(v) => match v.as_f64() {
                    Some(e) if e > 0.0 && e < 1.0 => e,
                    _ => {
                        return Err(Error::format(format!(
                            "text encoder config key layer_norm_eps = {v} is not in (0, 1)"
                        )))
                    }
                },
            },
            eos_token_id: count(&m, "eos_token_id", 49407, u32::MAX as usize)? as u32,
        };
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(Error::format(format!(
                "text encoder config key num_attention_heads = {} does not divide hidden_size = {}",
                c.num_attention_heads, c.hidden_size
            )));
        }
        if c.eos_token_id as usize >= c.vocab_size {
            return Err(Error::format(format!(
                "text encoder config key eos_token_id = {} is outside the vocabulary of {}",
                c.eos_token_id, c.vocab_size
            )));
        }
        Ok(c)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A non-negative integer key (`eos_token_id` may be 0; every other count must be ≥ 1) no larger than `max`.
fn count(m: &Map<String, Value>, key: &str, default: usize, max: usize) -> Result<usize> {
    let min = usize::from(key != "eos_token_id");
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n as usize >= min && n as usize <= max && n <= usize::MAX as u64 => Ok(n as usize),
            _ => Err(Error::format(format!(
                "text encoder config key {key} = {v} is not an integer in {min}..={max}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_config_parses_and_hostile_values_name_the_key() {
        let sd15 = r#"{"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
            "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
            "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 2, "layer_norm_eps": 1e-05}"#;
        let c = ClipTextConfig::from_json(sd15).unwrap();
        assert_eq!(
            (c.kind, c.hidden_act, c.head_dim(), c.eos_token_id),
            (ClipKind::TextModel, Activation::QuickGelu, 64, 2)
        );
        for (key, value) in [
            ("hidden_size", "1e30"),
            ("hidden_size", "0"),
            ("num_hidden_layers", "100000"),
            ("vocab_size", "-1"),
            ("intermediate_size", "\"big\""),
            ("max_position_embeddings", "1.5"),
            ("num_attention_heads", "7"),
            ("eos_token_id", "49408"),
            ("layer_norm_eps", "0"),
        ] {
            let mut m: Map<String, Value> = serde_json::from_str(sd15).unwrap();
            m.insert(key.into(), serde_json::from_str(value).unwrap());
            let text = serde_json::to_string(&m).unwrap();
            match ClipTextConfig::from_json(&text) {
                Err(Error::Format(msg)) => assert!(msg.contains(key), "{key}: {msg}"),
                other => panic!("{key} = {value}: {other:?}"),
            }
        }
        let gelu_new = sd15.replace("quick_gelu", "gelu_new");
        assert!(matches!(ClipTextConfig::from_json(&gelu_new), Err(Error::Unsupported(m)) if m.contains("hidden_act")));
    }
}
