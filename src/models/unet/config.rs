//! `UNetConfig`: the supported subset of diffusers' `UNet2DConditionModel` config.json (SD 1.x / 2.x).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::config_util::{
    bounded, is_bool_all, is_num, is_num_all, is_str, parse_object, require, require_null, typed, OneOrMany,
    MAX_CHANNELS, MAX_LAYERS_PER_BLOCK,
};

/// The kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// Resnets only (`DownBlock2D` / `UpBlock2D`).
    Plain,
    /// Resnets each followed by a `Transformer2DModel` (`CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`).
    CrossAttn,
}

/// A normalised UNet configuration: per-block lists expanded, unsupported options rejected.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<BlockType>,
    pub up_block_types: Vec<BlockType>,
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// Attention heads per down block (diffusers' `attention_head_dim` for these models, or `num_attention_heads`).
    pub attention_heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    /// `sample_size` from the file (latent side), informational.
    pub sample_size: Option<usize>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    #[serde(default = "default_down")]
    down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    up_block_types: Vec<String>,
    #[serde(default = "default_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    attention_head_dim: Option<OneOrMany<usize>>,
    #[serde(default)]
    num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default = "default_cross")]
    cross_attention_dim: OneOrMany<usize>,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default)]
    norm_num_groups: Option<usize>,
    #[serde(default)]
    norm_eps: Option<f64>,
    #[serde(default)]
    flip_sin_to_cos: Option<bool>,
    #[serde(default)]
    freq_shift: Option<f64>,
    #[serde(default)]
    downsample_padding: Option<usize>,
    #[serde(default)]
    mid_block_scale_factor: Option<f64>,
    #[serde(default)]
    sample_size: Option<serde_json::Value>,
}

fn four() -> usize {
    4
}
fn default_down() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".into());
    v
}
fn default_up() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn two() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn default_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}

impl UNetConfig {
    /// Read `config.json` of a diffusers `unet/` folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text)
    }

    /// Parse the text of a diffusers UNet config.json. Keys this implementation does not support, when set to
    /// anything but their default, give `Error::Unsupported` naming the key and value.
    pub fn from_json(text: &str) -> Result<Self> {
        let m = parse_object(text, "unet config")?;
        for key in [
            "addition_embed_type",
            "class_embed_type",
            "num_class_embeds",
            "time_cond_proj_dim",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "reverse_transformer_layers_per_block",
            "cross_attention_norm",
            "projection_class_embeddings_input_dim",
            "addition_time_embed_dim",
        ] {
            require_null(&m, key)?;
        }
        require(&m, "act_fn", |v| is_str(v, "silu") || is_str(v, "swish"))?;
        require(&m, "time_embedding_type", |v| is_str(v, "positional"))?;
        require(&m, "resnet_time_scale_shift", |v| is_str(v, "default"))?;
        require(&m, "resnet_skip_time_act", |v| is_bool_all(v, false))?;
        require(&m, "resnet_out_scale_factor", |v| is_num(v, 1.0))?;
        require(&m, "dual_cross_attention", |v| is_bool_all(v, false))?;
        require(&m, "only_cross_attention", |v| is_bool_all(v, false))?;
        require(&m, "mid_block_only_cross_attention", |v| is_bool_all(v, false))?;
        require(&m, "class_embeddings_concat", |v| is_bool_all(v, false))?;
        require(&m, "center_input_sample", |v| is_bool_all(v, false))?;
        require(&m, "transformer_layers_per_block", |v| is_num_all(v, 1.0))?;
        require(&m, "conv_in_kernel", |v| is_num(v, 3.0))?;
        require(&m, "conv_out_kernel", |v| is_num(v, 3.0))?;
        require(&m, "attention_type", |v| is_str(v, "default"))?;
        match m.get("mid_block_type") {
            None => {}
            Some(v) if is_str(v, "UNetMidBlock2DCrossAttn") => {}
            Some(v) => return Err(Error::unsupported(format!("config key mid_block_type = {v}"))),
        }
        if let Some(v) = m.get("norm_num_groups") {
            if v.is_null() {
                return Err(Error::unsupported("config key norm_num_groups = null"));
            }
        }
        check_bounds(&m)?;
        let raw: Raw = typed(&m, "unet config")?;
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(Error::format(format!(
                "unet config: {} block_out_channels, {} down blocks, {} up blocks",
                n,
                raw.down_block_types.len(),
                raw.up_block_types.len()
            )));
        }
        let kind = |key: &str, s: &str, plain: &str, cross: &str| -> Result<BlockType> {
            if s == plain {
                Ok(BlockType::Plain)
            } else if s == cross {
                Ok(BlockType::CrossAttn)
            } else {
                Err(Error::unsupported(format!("config key {key} contains \"{s}\"")))
            }
        };
        let down = raw
            .down_block_types
            .iter()
            .map(|s| kind("down_block_types", s, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up = raw
            .up_block_types
            .iter()
            .map(|s| kind("up_block_types", s, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let cross = raw.cross_attention_dim.expand("cross_attention_dim", n)?;
        if cross.iter().any(|&c| c != cross[0]) {
            return Err(Error::unsupported(format!("config key cross_attention_dim = {cross:?} (per-block values)")));
        }
        let heads_src = match (&raw.num_attention_heads, &raw.attention_head_dim) {
            (Some(h), _) => ("num_attention_heads", h.clone()),
            (None, Some(h)) => ("attention_head_dim", h.clone()),
            (None, None) => ("attention_head_dim", OneOrMany::One(8)),
        };
        let heads = heads_src.1.expand(heads_src.0, n)?;
        for (i, (&c, &h)) in raw.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(Error::format(format!("unet config: block {i} has {c} channels, not divisible into {h} heads")));
            }
        }
        let groups = raw.norm_num_groups.unwrap_or(32);
        if let Some(&c) = raw.block_out_channels.iter().find(|&&c| c % groups != 0) {
            return Err(Error::format(format!("unet config: {c} channels not divisible into {groups} groups")));
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            down_block_types: down,
            up_block_types: up,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block.expand("layers_per_block", n)?,
            attention_heads: heads,
            cross_attention_dim: cross[0],
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            norm_num_groups: groups,
            norm_eps: raw.norm_eps.unwrap_or(1e-5),
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(true),
            freq_shift: raw.freq_shift.unwrap_or(0.0),
            downsample_padding: raw.downsample_padding.unwrap_or(1),
            mid_block_scale_factor: raw.mid_block_scale_factor.unwrap_or(1.0),
            sample_size: raw.sample_size.and_then(|v| v.as_u64()).map(|v| v as usize),
        })
    }
}

/// Every count and size a UNet config.json sets, bounded before anything is sized from it.
fn check_bounds(m: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    for key in ["in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "norm_num_groups"] {
        bounded(m, key, 1, MAX_CHANNELS)?;
    }
    for key in ["attention_head_dim", "num_attention_heads"] {
        bounded(m, key, 1, MAX_CHANNELS)?;
    }
    bounded(m, "layers_per_block", 1, MAX_LAYERS_PER_BLOCK)?;
    bounded(m, "downsample_padding", 0, 2)?;
    bounded(m, "sample_size", 1, MAX_CHANNELS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_defaults_and_sdxl_rejected() {
        let c = UNetConfig::from_json(r#"{"_class_name":"UNet2DConditionModel","cross_attention_dim":768,"attention_head_dim":8}"#).unwrap();
        assert_eq!(c.attention_heads, vec![8; 4]);
        assert_eq!(c.layers_per_block, vec![2; 4]);
        let e = UNetConfig::from_json(r#"{"addition_embed_type":"text_time"}"#).unwrap_err().to_string();
        assert!(e.contains("addition_embed_type") && e.contains("text_time"), "{e}");
        let e = UNetConfig::from_json(r#"{"down_block_types":["A","B","C","D"]}"#).unwrap_err().to_string();
        assert!(e.contains("down_block_types"), "{e}");
        let c = UNetConfig::from_json(r#"{"attention_head_dim":[5,10,20,20],"use_linear_projection":true}"#).unwrap();
        assert_eq!(c.attention_heads, vec![5, 10, 20, 20]);
    }

    #[test]
    fn hostile_numbers_are_format_errors_naming_the_key() {
        for (key, value) in [
            ("layers_per_block", "4294967295"),
            ("downsample_padding", "65535"),
            ("in_channels", "4294967296"),
            ("block_out_channels", "[32, 18446744073709551615]"),
            ("cross_attention_dim", "1e300"),
            ("attention_head_dim", "9223372036854775808"),
        ] {
            let e = UNetConfig::from_json(&format!("{{\"{key}\": {value}}}")).unwrap_err();
            assert!(matches!(e, Error::Format(_)), "{key}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }
}
