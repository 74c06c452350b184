//! Model families: which components a pipeline has, how its prompt becomes conditioning, and how to tell the
//! family from what is on disk.
//!
//! The architectures live one folder each (`unet/`, `vae/`, `clip/`, ...); a family is the recipe that combines
//! them (SD 1.x: CLIP-L last hidden state into the UNet; SDXL: two CLIP encoders' penultimate states, a pooled
//! embedding and micro-conditioning). Adding a family is adding a variant here and its prompt rule in
//! `api::pipeline`; the sampler and the C API stay as they are. The enum itself lives with single-file detection
//! (`weights::single_file`), the lowest layer that must name a family; this module adds what the layers above need.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// A pipeline family (the same type single-file detection returns).
pub use crate::weights::single_file::Family;

impl Family {
    /// Text encoder component names (their tokenizer folders are found beside them: `tokenizer`, `tokenizer_2`).
    pub fn text_encoders(self) -> &'static [&'static str] {
        match self {
            Self::Sd1 | Self::Sd2 => &["text_encoder"],
            Self::Sdxl | Self::Flux => &["text_encoder", "text_encoder_2"],
        }
    }

    /// The family of a diffusers pipeline folder: `model_index.json`'s `_class_name`, refined by the UNet's
    /// config (SD 1.x and 2.x share a pipeline class; the cross-attention width tells them apart).
    pub fn of_pipeline_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model_index.json");
        let unet_config = dir.join("unet").join("config.json");
        let class = if index.exists() {
            let json = read_json(&index)?;
            json.get("_class_name").and_then(Value::as_str).unwrap_or("").to_string()
        } else {
            String::new()
        };
        match class.as_str() {
            "StableDiffusionXLPipeline" => Ok(Self::Sdxl),
            "FluxPipeline" => Ok(Self::Flux),
            "StableDiffusionPipeline" | "" if unet_config.exists() => Self::of_unet_config(&read_json(&unet_config)?),
            "" => Err(Error::invalid(format!(
                "{}: not a diffusers pipeline folder (no model_index.json, no unet/config.json)",
                dir.display()
            ))),
            other => Err(Error::unsupported(format!(
                "{}: pipeline {other} (supported: StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline)",
                index.display()
            ))),
        }
    }

    /// The family of a `UNet2DConditionModel` config.
    pub fn of_unet_config(json: &Value) -> Result<Self> {
        if json.get("addition_embed_type").and_then(Value::as_str) == Some("text_time") {
            return Ok(Self::Sdxl);
        }
        match json.get("cross_attention_dim").and_then(Value::as_u64) {
            Some(1024) => Ok(Self::Sd2),
            _ => Ok(Self::Sd1),
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_configs_tell_the_families_apart() {
        let sd1: Value = serde_json::json!({"cross_attention_dim": 768});
        let sd2: Value = serde_json::json!({"cross_attention_dim": 1024});
        let xl: Value = serde_json::json!({"cross_attention_dim": 2048, "addition_embed_type": "text_time"});
        assert_eq!(Family::of_unet_config(&sd1).unwrap(), Family::Sd1);
        assert_eq!(Family::of_unet_config(&sd2).unwrap(), Family::Sd2);
        assert_eq!(Family::of_unet_config(&xl).unwrap(), Family::Sdxl);
    }

    #[test]
    fn shipped_pipelines_are_detected() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(Family::of_pipeline_dir(&root.join("tests/fixtures/tiny-sd-random")).unwrap(), Family::Sd1);
        // The tiny SD 2.x-style fixture has a 40-wide cross-attention: its prompt rule is SD 1.x's (diffusers'
        // SD 2.x text encoders already end at the penultimate layer), so the width is what tells them apart.
        assert_eq!(Family::of_pipeline_dir(&root.join("tests/fixtures/tiny-sd2/model")).unwrap(), Family::Sd1);
        let e = Family::of_pipeline_dir(&root.join("src")).unwrap_err().to_string();
        assert!(e.contains("not a diffusers pipeline folder"), "{e}");
    }
}
