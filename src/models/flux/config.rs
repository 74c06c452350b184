//! The FLUX.1 transformer's configuration: from a diffusers `FluxTransformer2DModel` config.json, or derived from the
//! tensor shapes of a BFL-layout checkpoint (single files and GGUF carry no config).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::config_util::{bounded, parse_object, require, MAX_CHANNELS};

/// FLUX.1's rotary axes (BFL `axes_dim`, diffusers `axes_dims_rope`) for its 128-wide heads.
pub const FLUX1_AXES_DIMS_ROPE: [usize; 3] = [16, 56, 56];

/// The RoPE base (BFL `theta`, diffusers `FluxPosEmbed(theta=10000)`).
pub const ROPE_THETA: f64 = 10000.0;

/// Hidden width of the MLPs over the model width (BFL `mlp_ratio`; diffusers hard-codes 4).
pub const MLP_RATIO: usize = 4;

/// A FLUX transformer (FLUX.1 dev: guidance embedding; schnell: none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FluxConfig {
    /// Features of a packed latent token: latent channels × 2 × 2 (FLUX.1: 64 = 16 × 4).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Double-stream blocks (FLUX.1: 19).
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    /// Single-stream blocks (FLUX.1: 38).
    #[serde(default = "default_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Width of the text encoder states (T5-XXL: 4096).
    #[serde(default = "default_joint")]
    pub joint_attention_dim: usize,
    /// Width of the pooled text vector (CLIP-L: 768).
    #[serde(default = "default_pooled")]
    pub pooled_projection_dim: usize,
    /// FLUX.1 dev's distilled guidance embedding (`guidance_in`).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Features of each head per position axis (sum = head dim, each even).
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn default_in_channels() -> usize {
    64
}
fn default_layers() -> usize {
    19
}
fn default_single_layers() -> usize {
    38
}
fn default_head_dim() -> usize {
    128
}
fn default_heads() -> usize {
    24
}
fn default_joint() -> usize {
    4096
}
fn default_pooled() -> usize {
    768
}
fn default_axes() -> Vec<usize> {
    FLUX1_AXES_DIMS_ROPE.to_vec()
}

impl FluxConfig {
    /// FLUX.1 dev.
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: default_axes(),
        }
    }

    /// FLUX.1 schnell (no guidance embedding).
    pub fn schnell() -> Self {
        Self { guidance_embeds: false, ..Self::dev() }
    }

    /// Parse a diffusers `FluxTransformer2DModel` config.json (keys the model does not implement with a value other
    /// than the default are refused by name).
    pub fn from_json(text: &str) -> Result<Self> {
        let obj = parse_object(text, "flux config")?;
        require(&obj, "patch_size", |v| v.as_u64() == Some(1))?;
        // Sizes are bounded before they size anything (a hostile file is refused by name).
        for (key, min, max) in [
            ("in_channels", 4, MAX_CHANNELS),
            ("num_layers", 0, 1024),
            ("num_single_layers", 0, 1024),
            ("attention_head_dim", 2, 4096),
            ("num_attention_heads", 1, 1024),
            ("joint_attention_dim", 1, MAX_CHANNELS),
            ("pooled_projection_dim", 1, MAX_CHANNELS),
            ("axes_dims_rope", 2, 4096),
        ] {
            bounded(&obj, key, min, max)?;
        }
        let in_channels = obj.get("in_channels").and_then(|v| v.as_u64());
        require(&obj, "out_channels", |v| v.as_u64().is_some() && v.as_u64() == in_channels)?;
        let c: Self = serde_json::from_value(serde_json::Value::Object(obj))
            .map_err(|e| Error::format(format!("flux config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Read a config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| Error::format(format!("{}: {e}", path.display())))
    }

    /// The config a BFL-layout checkpoint's shapes give (names without a prefix, e.g. `img_in.weight` [D, in]):
    /// widths from the embedders, block counts from the highest block numbers, heads from the q/k norm width, dev
    /// from the presence of `guidance_in`. The rotary axes cannot be read from shapes: `axes_dims_rope` when given,
    /// else FLUX.1's (16, 56, 56), which needs 128-wide heads.
    pub fn from_bfl_shapes(shapes: &BTreeMap<String, Vec<usize>>, axes_dims_rope: Option<&[usize]>) -> Result<Self> {
        let shape = |name: &str| -> Result<&Vec<usize>> {
            shapes.get(name).ok_or_else(|| Error::format(format!("flux checkpoint: no tensor {name}")))
        };
        let dim = |name: &str, i: usize| -> Result<usize> {
            let s = shape(name)?;
            s.get(i).copied().ok_or_else(|| Error::format(format!("flux checkpoint: {name} has shape {s:?}")))
        };
        let count = |prefix: &str| -> usize {
            shapes
                .keys()
                .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(0, |n| n + 1)
        };
        let hidden = dim("img_in.weight", 0)?;
        let head_dim = dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)
            .or_else(|_| dim("single_blocks.0.norm.query_norm.scale", 0))?;
        if head_dim == 0 || hidden % head_dim != 0 {
            return Err(Error::format(format!(
                "flux checkpoint: width {hidden} is not a multiple of head dim {head_dim}"
            )));
        }
        let axes = match axes_dims_rope {
            Some(a) => a.to_vec(),
            None if head_dim == 128 => default_axes(),
            None => {
                return Err(Error::invalid(format!(
                    "flux checkpoint: {head_dim}-wide heads are not FLUX.1's (128): pass a config giving axes_dims_rope"
                )))
            }
        };
        let c = Self {
            in_channels: dim("img_in.weight", 1)?,
            num_layers: count("double_blocks."),
            num_single_layers: count("single_blocks."),
            attention_head_dim: head_dim,
            num_attention_heads: hidden / head_dim,
            joint_attention_dim: dim("txt_in.weight", 1)?,
            pooled_projection_dim: dim("vector_in.in_layer.weight", 1)?,
            guidance_embeds: shapes.contains_key("guidance_in.in_layer.weight"),
            axes_dims_rope: axes,
        };
        c.validate()?;
        Ok(c)
    }

    /// Model width (heads × head dim; FLUX.1: 3072).
    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Width of the MLPs (FLUX.1: 12288).
    pub fn mlp_hidden(&self) -> usize {
        MLP_RATIO * self.hidden()
    }

    /// Channels of the unpacked latents (FLUX.1: 16).
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::format(format!("flux config: {what}")));
        if self.in_channels == 0 || self.in_channels % 4 != 0 {
            return bad(format!("in_channels {} is not 4 × latent channels (2×2 patches)", self.in_channels));
        }
        if self.attention_head_dim == 0 || self.num_attention_heads == 0 || self.joint_attention_dim == 0 {
            return bad("zero-sized heads or text width".into());
        }
        if self.pooled_projection_dim == 0 || self.num_layers + self.num_single_layers == 0 {
            return bad("no pooled width or no blocks".into());
        }
        let sum: usize = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 == 1 || *d == 0) {
            return bad(format!(
                "axes_dims_rope {:?} must be even and add up to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_flux1_and_unsupported_keys_are_named() {
        let c = FluxConfig::from_json(r#"{"_class_name": "FluxTransformer2DModel", "guidance_embeds": true}"#).unwrap();
        assert_eq!(c, FluxConfig::dev());
        assert_eq!((c.hidden(), c.mlp_hidden(), c.latent_channels()), (3072, 12288, 16));
        let e = FluxConfig::from_json(r#"{"patch_size": 2}"#).unwrap_err().to_string();
        assert!(e.contains("patch_size"), "{e}");
        let e = FluxConfig::from_json(r#"{"axes_dims_rope": [16, 56, 58]}"#).unwrap_err().to_string();
        assert!(e.contains("axes_dims_rope"), "{e}");
    }
}
