//! `T5EncoderConfig`: the keys of transformers' `T5Config` an encoder reads from config.json, every count bounded.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::models::config_util::parse_object;

/// The feed-forward activation (`feed_forward_proj`'s last part; `"gated-gelu"` means `gelu_new`, as transformers
/// maps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfActivation {
    /// The tanh approximation `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (`gelu_new`; T5 v1.1, FLUX's T5-XXL).
    GeluNew,
    /// The exact (erf) GELU: `"gelu"` without gating (`"gated-gelu"` is [`Self::GeluNew`] in transformers).
    Gelu,
    /// `max(x, 0)` (T5 v1.0: `"relu"`).
    Relu,
    /// `x · sigmoid(x)` (`silu`, `swish`).
    Silu,
}

/// A validated T5 encoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct T5EncoderConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head (`inner_dim = num_heads · d_kv` may differ from `d_model`).
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub activation: FfActivation,
    /// `wo(act(wi_0 x) · wi_1 x)` (v1.1) rather than `wo(act(wi x))` (v1.0).
    pub gated: bool,
}

const MAX_VOCAB: usize = 1 << 20;
const MAX_WIDTH: usize = 1 << 16;
const MAX_LAYERS: usize = 256;
const MAX_HEADS: usize = 1024;
const MAX_BUCKETS: usize = 1 << 12;
const MAX_DISTANCE: usize = 1 << 20;

impl T5EncoderConfig {
    /// Parse the text of a `T5Config` config.json. Missing keys take transformers' defaults (t5-small's widths, `relu`
    /// like `T5Config`); a value out of range or of the wrong type is a `Format` error naming the key; an activation
    /// transformers would reject, or one not listed in [`FfActivation`], is `Unsupported`.
    pub fn from_json(text: &str) -> Result<Self> {
        let m = parse_object(text, "T5 config")?;
        let proj = match m.get("feed_forward_proj") {
            None | Some(Value::Null) => "relu",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(Error::format(format!("T5 config key feed_forward_proj = {v} is not a string"))),
        };
        let (activation, gated) = feed_forward(proj)?;
        let c = Self {
            vocab_size: count(&m, "vocab_size", 32128, MAX_VOCAB)?,
            d_model: count(&m, "d_model", 512, MAX_WIDTH)?,
            d_kv: count(&m, "d_kv", 64, MAX_WIDTH)?,
            d_ff: count(&m, "d_ff", 2048, MAX_WIDTH * 4)?,
            num_layers: count(&m, "num_layers", 6, MAX_LAYERS)?,
            num_heads: count(&m, "num_heads", 8, MAX_HEADS)?,
            relative_attention_num_buckets: count(&m, "relative_attention_num_buckets", 32, MAX_BUCKETS)?,
            relative_attention_max_distance: count(&m, "relative_attention_max_distance", 128, MAX_DISTANCE)?,
            layer_norm_epsilon: match m.get("layer_norm_epsilon") {
                None | Some(Value::Null) => 1e-6,
                Some(v) => match v.as_f64() {
                    Some(e) if e > 0.0 && e < 1.0 => e,
                    _ => return Err(Error::format(format!("T5 config key layer_norm_epsilon = {v} is not in (0, 1)"))),
                },
            },
            activation,
            gated,
        };
        if c.num_heads * c.d_kv > MAX_WIDTH {
            return Err(Error::format(format!(
                "T5 config keys num_heads = {} and d_kv = {} give an attention width over {MAX_WIDTH}",
                c.num_heads, c.d_kv
            )));
        }
        // The bidirectional buckets split in halves, each half again into exact and logarithmic buckets.
        if c.relative_attention_num_buckets < 4 {
            return Err(Error::format(format!(
                "T5 config key relative_attention_num_buckets = {} is below 4",
                c.relative_attention_num_buckets
            )));
        }
        if c.relative_attention_max_distance <= c.relative_attention_num_buckets / 4 {
            return Err(Error::format(format!(
                "T5 config key relative_attention_max_distance = {} must exceed num_buckets / 4 = {}",
                c.relative_attention_max_distance,
                c.relative_attention_num_buckets / 4
            )));
        }
        Ok(c)
    }

    /// `num_heads · d_kv`: the width of q, k, v and of `o`'s input.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// transformers' `T5Config.__post_init__`: `"{act}"` or `"gated-{act}"`, with `"gated-gelu"` meaning `gelu_new`.
fn feed_forward(proj: &str) -> Result<(FfActivation, bool)> {
    let parts: Vec<&str> = proj.split('-').collect();
    let (gated, act) = match parts.as_slice() {
        [act] => (false, *act),
        ["gated", act] => (true, *act),
        _ => return Err(Error::unsupported(format!("T5 config key feed_forward_proj = {proj:?}"))),
    };
    let activation = match (proj, act) {
        ("gated-gelu", _) | (_, "gelu_new") => FfActivation::GeluNew,
        (_, "gelu") => FfActivation::Gelu,
        (_, "relu") => FfActivation::Relu,
        (_, "silu" | "swish") => FfActivation::Silu,
        _ => return Err(Error::unsupported(format!("T5 config key feed_forward_proj = {proj:?}"))),
    };
    Ok((activation, gated))
}

/// A positive integer key no larger than `max`.
fn count(m: &Map<String, Value>, key: &str, default: usize, max: usize) -> Result<usize> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= max as u64 => Ok(n as usize),
            _ => Err(Error::format(format!("T5 config key {key} = {v} is not an integer in 1..={max}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLUX's `text_encoder_2/config.json` (google/t5-v1_1-xxl as saved by transformers 4.43).
    const XXL: &str = r#"{"_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0, "is_encoder_decoder": true, "is_gated_act": true, "layer_norm_epsilon": 1e-06,
        "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": true,
        "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": true,
        "vocab_size": 32128}"#;

    #[test]
    fn xxl_config_parses_and_hostile_values_name_the_key() {
        let c = T5EncoderConfig::from_json(XXL).unwrap();
        assert_eq!((c.d_model, c.inner_dim(), c.d_ff, c.num_layers), (4096, 4096, 10240, 24));
        assert_eq!((c.activation, c.gated, c.relative_attention_max_distance), (FfActivation::GeluNew, true, 128));
        for (key, value) in [
            ("d_model", "0"),
            ("d_model", "1e30"),
            ("num_layers", "100000"),
            ("vocab_size", "-1"),
            ("d_ff", "\"big\""),
            ("num_heads", "1.5"),
            ("layer_norm_epsilon", "0"),
            ("relative_attention_num_buckets", "2"),
            ("relative_attention_max_distance", "8"),
            ("feed_forward_proj", "3"),
        ] {
            let mut m: Map<String, Value> = serde_json::from_str(XXL).unwrap();
            m.insert(key.into(), serde_json::from_str(value).unwrap());
            match T5EncoderConfig::from_json(&serde_json::to_string(&m).unwrap()) {
                Err(Error::Format(msg)) => assert!(msg.contains(key), "{key}: {msg}"),
                other => panic!("{key} = {value}: {other:?}"),
            }
        }
    }

    #[test]
    fn feed_forward_names_follow_transformers() {
        assert_eq!(feed_forward("gated-gelu").unwrap(), (FfActivation::GeluNew, true));
        assert_eq!(feed_forward("gelu").unwrap(), (FfActivation::Gelu, false));
        assert_eq!(feed_forward("relu").unwrap(), (FfActivation::Relu, false));
        assert_eq!(feed_forward("gated-silu").unwrap(), (FfActivation::Silu, true));
        assert_eq!(feed_forward("gated-gelu_new").unwrap(), (FfActivation::GeluNew, true));
        for bad in ["gated-gelu-x", "tanh", "ungated-relu", ""] {
            assert!(
                matches!(feed_forward(bad), Err(Error::Unsupported(m)) if m.contains("feed_forward_proj")),
                "{bad}"
            );
        }
        // T5Config's own default is "relu" (v1.0).
        let c = T5EncoderConfig::from_json("{}").unwrap();
        assert_eq!((c.activation, c.gated), (FfActivation::Relu, false));
    }
}

impl T5EncoderConfig {
    /// The configuration a checkpoint's tensor shapes give (transformers' names: `shared.weight` or
    /// `encoder.embed_tokens.weight`, `encoder.block.N.…`), for files that come without a config.json (a
    /// `t5xxl_*.safetensors`, a T5 GGUF). The relative-attention maximum distance and the norm epsilon are not in
    /// the shapes: T5's 128 and 1e-6 (every T5 v1.1 size uses them); the feed-forward is gated-gelu when the file
    /// has `wi_0`/`wi_1` (v1.1), relu otherwise (v1.0).
    pub fn from_shapes(shapes: &std::collections::HashMap<String, Vec<usize>>) -> Result<Self> {
        let get = |name: &str| shapes.get(name).filter(|s| s.len() == 2).map(|s| (s[0], s[1]));
        let (vocab, d_model) = get("shared.weight")
            .or_else(|| get("encoder.embed_tokens.weight"))
            .ok_or_else(|| Error::format("no T5 token table (shared.weight or encoder.embed_tokens.weight)"))?;
        let attn = "encoder.block.0.layer.0.SelfAttention";
        let (buckets, heads) = get(&format!("{attn}.relative_attention_bias.weight"))
            .ok_or_else(|| Error::format(format!("no {attn}.relative_attention_bias.weight [buckets, heads]")))?;
        let (inner, _) =
            get(&format!("{attn}.q.weight")).ok_or_else(|| Error::format(format!("no {attn}.q.weight")))?;
        let ff = "encoder.block.0.layer.1.DenseReluDense";
        let (d_ff, gated) = match (get(&format!("{ff}.wi_0.weight")), get(&format!("{ff}.wi.weight"))) {
            (Some((d_ff, _)), _) => (d_ff, true),
            (None, Some((d_ff, _))) => (d_ff, false),
            _ => return Err(Error::format(format!("no {ff}.wi_0.weight or {ff}.wi.weight"))),
        };
        let layers = (0..)
            .take_while(|i| shapes.contains_key(&format!("encoder.block.{i}.layer.0.layer_norm.weight")))
            .count();
        if heads == 0 || inner % heads != 0 {
            return Err(Error::format(format!("T5 attention: {inner} features do not split into {heads} heads")));
        }
        let json = serde_json::json!({
            "vocab_size": vocab, "d_model": d_model, "d_kv": inner / heads, "d_ff": d_ff, "num_layers": layers,
            "num_heads": heads, "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": if gated { "gated-gelu" } else { "relu" },
        });
        Self::from_json(&json.to_string())
    }
}
