//! `VaeConfig`: diffusers' `AutoencoderKL` config.json (SD 1.x / 2.x / SDXL-style VAEs).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::models::config_util::{bounded, is_str, parse_object, require, typed, MAX_CHANNELS, MAX_LAYERS_PER_BLOCK};

/// The AutoencoderKL configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// diffusers' `force_upcast` (default true): decode in f32 when the compute dtype is f16, whose range the SDXL
    /// VAE's activations overflow. Read it with [`VaeConfig::force_upcast`].
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_channels() -> Vec<usize> {
    vec![64]
}

impl VaeConfig {
    /// Read `config.json` of a diffusers `vae/` folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text)
    }

    /// Parse the text of a diffusers AutoencoderKL config.json; unsupported settings give `Error::Unsupported`.
    pub fn from_json(text: &str) -> Result<Self> {
        let m = parse_object(text, "vae config")?;
        require(&m, "act_fn", |v| is_str(v, "silu") || is_str(v, "swish"))?;
        require(&m, "down_block_types", |v| {
            v.as_array().is_some_and(|a| a.iter().all(|s| is_str(s, "DownEncoderBlock2D")))
        })?;
        require(&m, "up_block_types", |v| {
            v.as_array().is_some_and(|a| a.iter().all(|s| is_str(s, "UpDecoderBlock2D")))
        })?;
        if let Some(c) = m.get("_class_name").and_then(|v| v.as_str()) {
            if c != "AutoencoderKL" {
                return Err(Error::unsupported(format!("config key _class_name = \"{c}\"")));
            }
        }
        for key in ["in_channels", "out_channels", "block_out_channels", "latent_channels", "norm_num_groups"] {
            bounded(&m, key, 1, MAX_CHANNELS)?;
        }
        bounded(&m, "layers_per_block", 1, MAX_LAYERS_PER_BLOCK)?;
        let cfg: VaeConfig = typed(&m, "vae config")?;
        let n = cfg.block_out_channels.len();
        for key in ["down_block_types", "up_block_types"] {
            if let Some(a) = m.get(key).and_then(|v| v.as_array()) {
                if a.len() != n {
                    return Err(Error::format(format!("vae config: {key} has {} entries, expected {n}", a.len())));
                }
            }
        }
        if n == 0 || cfg.block_out_channels.iter().any(|c| c % cfg.norm_num_groups != 0) {
            return Err(Error::format(format!(
                "vae config: block_out_channels {:?} with {} groups",
                cfg.block_out_channels, cfg.norm_num_groups
            )));
        }
        Ok(cfg)
    }

    /// Whether a pipeline must decode this VAE in f32 rather than f16 (diffusers' `force_upcast`; the SDXL VAE sets
    /// it because its fp16 activations overflow to NaN; fp16-fixed finetunes clear it).
    pub fn force_upcast(&self) -> bool {
        self.force_upcast
    }

    /// Pixels per latent along each side: `2^(blocks − 1)`.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/stable-diffusion-xl-base-1.0 vae/config.json as shipped.
    const SDXL_VAE: &str = r#"{"_class_name":"AutoencoderKL","_diffusers_version":"0.20.0.dev0","act_fn":"silu",
        "block_out_channels":[128,256,512,512],"down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D",
        "DownEncoderBlock2D","DownEncoderBlock2D"],"force_upcast":true,"in_channels":3,"latent_channels":4,
        "layers_per_block":2,"norm_num_groups":32,"out_channels":3,"sample_size":1024,"scaling_factor":0.13025,
        "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]}"#;

    #[test]
    fn sdxl_vae_keys() {
        let c = VaeConfig::from_json(SDXL_VAE).unwrap();
        assert_eq!(c.scaling_factor, 0.13025);
        assert!(c.force_upcast());
        assert_eq!(c.shift_factor, None);
        assert_eq!(c.downscale(), 8);
        // shift_factor null (as diffusers writes it) is accepted; an fp16-fixed VAE clears force_upcast.
        let fixed = SDXL_VAE.replace("\"force_upcast\":true", "\"force_upcast\":false,\"shift_factor\":null");
        let c = VaeConfig::from_json(&fixed).unwrap();
        assert!(!c.force_upcast());
        assert_eq!(c.shift_factor, None);
        // Absent, it defaults to true like diffusers' AutoencoderKL.
        let c = VaeConfig::from_json(&SDXL_VAE.replace("\"force_upcast\":true,", "")).unwrap();
        assert!(c.force_upcast());
    }

    #[test]
    fn hostile_numbers_are_format_errors_naming_the_key() {
        for (key, value) in [
            ("layers_per_block", "4294967295"),
            ("latent_channels", "18446744073709551616"),
            ("block_out_channels", "[64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64]"),
        ] {
            let e = VaeConfig::from_json(&format!("{{\"{key}\": {value}}}")).unwrap_err();
            assert!(matches!(e, Error::Format(_)), "{key}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }
}
