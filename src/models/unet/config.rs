//! `UNetConfig`: the supported subset of diffusers' `UNet2DConditionModel` config.json (SD 1.x / 2.x / SDXL).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::config_util::{
    bounded, is_bool_all, is_num, is_str, parse_object, require, require_null, typed, OneOrMany,
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
    /// `BasicTransformerBlock`s per attention of each down block (`transformer_layers_per_block`; SDXL [1, 2, 10]).
    /// Up blocks use the list reversed, the mid block its last entry, as diffusers does.
    pub transformer_layers: Vec<usize>,
    /// SDXL's `addition_embed_type: "text_time"` micro-conditioning, when the model has it.
    pub text_time: Option<TextTimeConfig>,
}

/// SDXL's added conditioning: pooled text embeddings `[B, pooled_dim]` ++ the sinusoidal embedding (width
/// `time_embed_dim` each) of the six `time_ids` → `add_embedding` (linear_1, SiLU, linear_2), added to the time
/// embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim` (SDXL: 256).
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim` = `pooled_dim + 6·time_embed_dim` (SDXL: 2816).
    pub projection_input_dim: usize,
}

impl TextTimeConfig {
    /// Number of micro-conditioning values per sample: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
    pub const TIME_IDS: usize = 6;

    /// Width of the pooled text embedding (SDXL: 1280).
    pub fn pooled_dim(&self) -> usize {
        self.projection_input_dim - Self::TIME_IDS * self.time_embed_dim
    }
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
    upcast_attention: Option<bool>,
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
    #[serde(default)]
    transformer_layers_per_block: Option<OneOrMany<usize>>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
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
        // An int or one int per block; per-layer lists (asymmetric UNets) are not supported.
        require(&m, "transformer_layers_per_block", |v| v.is_u64() || v.as_array().is_some_and(|a| a.iter().all(|x| x.is_u64())))?;
        require(&m, "addition_embed_type", |v| is_str(v, "text_time"))?;
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
        let transformer_layers =
            raw.transformer_layers_per_block.clone().unwrap_or(OneOrMany::One(1)).expand("transformer_layers_per_block", n)?;
        if transformer_layers.contains(&0) {
            return Err(Error::format(format!("unet config: transformer_layers_per_block = {transformer_layers:?}")));
        }
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some(_) => {
                let (Some(time_embed_dim), Some(projection_input_dim)) =
                    (raw.addition_time_embed_dim, raw.projection_class_embeddings_input_dim)
                else {
                    return Err(Error::format(
                        "unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                    ));
                };
                if time_embed_dim == 0 || projection_input_dim <= TextTimeConfig::TIME_IDS * time_embed_dim {
                    return Err(Error::format(format!(
                        "unet config: projection_class_embeddings_input_dim {projection_input_dim} leaves no room for a pooled text \
                         embedding beside 6 x addition_time_embed_dim {time_embed_dim}"
                    )));
                }
                Some(TextTimeConfig { time_embed_dim, projection_input_dim })
            }
        };
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
            upcast_attention: raw.upcast_attention.unwrap_or(false),
            norm_num_groups: groups,
            norm_eps: raw.norm_eps.unwrap_or(1e-5),
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(true),
            freq_shift: raw.freq_shift.unwrap_or(0.0),
            downsample_padding: raw.downsample_padding.unwrap_or(1),
            mid_block_scale_factor: raw.mid_block_scale_factor.unwrap_or(1.0),
            sample_size: raw.sample_size.and_then(|v| v.as_u64()).map(|v| v as usize),
            transformer_layers,
            text_time,
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
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sd15_defaults_and_sdxl_rejected() {
        let c = UNetConfig::from_json(r#"{"_class_name":"UNet2DConditionModel","cross_attention_dim":768,"attention_head_dim":8}"#).unwrap();
        assert_eq!(c.attention_heads, vec![8; 4]);
        assert_eq!(c.layers_per_block, vec![2; 4]);
        let e = UNetConfig::from_json(r#"{"addition_embed_type":"text_time"}"#).unwrap_err().to_string();
        assert!(e.contains("addition_time_embed_dim"), "{e}");
        let e = UNetConfig::from_json(r#"{"addition_embed_type":"image"}"#).unwrap_err().to_string();
        assert!(e.contains("addition_embed_type") && e.contains("image"), "{e}");
        let e = UNetConfig::from_json(r#"{"transformer_layers_per_block":[[1,1],[2,2],[3,3],[4,4]]}"#).unwrap_err().to_string();
        assert!(e.contains("transformer_layers_per_block"), "{e}");
        let e = UNetConfig::from_json(r#"{"down_block_types":["A","B","C","D"]}"#).unwrap_err().to_string();
        assert!(e.contains("down_block_types"), "{e}");
        let c = UNetConfig::from_json(r#"{"attention_head_dim":[5,10,20,20],"use_linear_projection":true}"#).unwrap();
        assert_eq!(c.attention_heads, vec![5, 10, 20, 20]);
        assert_eq!(c.transformer_layers, vec![1; 4]);
        assert!(c.text_time.is_none());
    }

    /// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json as shipped (keys at their values).
    pub(crate) const SDXL_BASE: &str = r#"{"_class_name":"UNet2DConditionModel","_diffusers_version":"0.19.0.dev0",
        "act_fn":"silu","addition_embed_type":"text_time","addition_embed_type_num_heads":64,"addition_time_embed_dim":256,
        "attention_head_dim":[5,10,20],"block_out_channels":[320,640,1280],"center_input_sample":false,
        "class_embed_type":null,"class_embeddings_concat":false,"conv_in_kernel":3,"conv_out_kernel":3,
        "cross_attention_dim":2048,"cross_attention_norm":null,
        "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],"downsample_padding":1,
        "dual_cross_attention":false,"encoder_hid_dim":null,"encoder_hid_dim_type":null,"flip_sin_to_cos":true,
        "freq_shift":0,"in_channels":4,"layers_per_block":2,"mid_block_only_cross_attention":null,
        "mid_block_scale_factor":1,"mid_block_type":"UNetMidBlock2DCrossAttn","norm_eps":1e-05,"norm_num_groups":32,
        "num_attention_heads":null,"num_class_embeds":null,"only_cross_attention":false,"out_channels":4,
        "projection_class_embeddings_input_dim":2816,"resnet_out_scale_factor":1.0,"resnet_skip_time_act":false,
        "resnet_time_scale_shift":"default","sample_size":128,"time_cond_proj_dim":null,"time_embedding_act_fn":null,
        "time_embedding_dim":null,"time_embedding_type":"positional","timestep_post_act":null,
        "transformer_layers_per_block":[1,2,10],"up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
        "upcast_attention":null,"use_linear_projection":true}"#;

    #[test]
    fn sdxl_base_config() {
        let c = UNetConfig::from_json(SDXL_BASE).unwrap();
        assert_eq!(c.down_block_types, vec![BlockType::Plain, BlockType::CrossAttn, BlockType::CrossAttn]);
        assert_eq!(c.transformer_layers, vec![1, 2, 10]);
        assert_eq!(c.attention_heads, vec![5, 10, 20]);
        assert_eq!(c.cross_attention_dim, 2048);
        assert!(c.use_linear_projection);
        let tt = c.text_time.unwrap();
        assert_eq!((tt.time_embed_dim, tt.projection_input_dim, tt.pooled_dim()), (256, 2816, 1280));
        let bad = SDXL_BASE.replace("2816", "1536");
        let e = UNetConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("projection_class_embeddings_input_dim"), "{e}");
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
