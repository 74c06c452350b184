//! The diffusers configs a single file needs (it carries no `config.json`), in the order diffusers'
//! `from_single_file` uses them: (1) a diffusers folder given by the caller (`config=`): `<component>/config.json`;
//! (2) the family's standard config when the key shapes agree with it (diffusers' `infer_diffusers_model_type` +
//! `DIFFUSERS_DEFAULT_PIPELINE_PATHS`); (3) a config derived from the shapes, with what shapes cannot tell (head
//! counts, v-prediction, the VAE's latent scale) from an LDM "original config" next to the file (`<stem>.yaml`,
//! read as diffusers' `create_unet_diffusers_config_from_ldm` / `create_vae_diffusers_config_from_ldm` read it),
//! else from the family's convention. LDM fixes `norm_num_groups` at 32 and so does the derived config.
//!
//! The standard configs below are the `config.json` files of stable-diffusion-v1-5/stable-diffusion-v1-5,
//! stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0 (the repos diffusers falls back
//! to), reduced to the keys that differ from the classes' defaults. They were written from those files as
//! quoted in diffusers' docs and tests; the hub itself could not be reached to re-check them byte for byte.

use std::path::Path;

use serde_json::{json, Value};

use super::detect::Family;
use super::{Component, ComponentMap, SingleFileMap};
use crate::error::{Error, Result};

/// Read `<stem>.yaml` (or `<stem>.json`) next to the checkpoint, if there is one.
pub fn read_sidecar(path: &Path) -> Result<Option<Value>> {
    for ext in ["yaml", "json"] {
        let p = path.with_extension(ext);
        if !p.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let v: Value = if ext == "json" {
            serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", p.display())))?
        } else {
            serde_saphyr::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", p.display())))?
        };
        return Ok(Some(v));
    }
    Ok(None)
}

/// `model.params` of an LDM/SGM original config.
fn model_params(sidecar: Option<&Value>) -> Option<&Value> {
    sidecar?.get("model")?.get("params")
}

/// `unet_config.params` (LDM) or `network_config.params` (SGM).
fn unet_params(sidecar: Option<&Value>) -> Option<&Value> {
    let p = model_params(sidecar)?;
    p.get("unet_config").or_else(|| p.get("network_config"))?.get("params")
}

/// The scheduler's `prediction_type` for this file: a `v_pred` marker key → v_prediction; else the sidecar's
/// `parameterization: v` (absent = epsilon, as in LDM); without either, the family's standard (SD 2.x →
/// v_prediction, as diffusers' SD 2.1 default).
pub fn prediction_type(sf: &SingleFileMap) -> &'static str {
    if sf.has_marker("v_pred") {
        return "v_prediction";
    }
    match model_params(sf.sidecar()) {
        Some(p) if p.get("parameterization").and_then(Value::as_str) == Some("v") => "v_prediction",
        Some(_) => "epsilon",
        None if sf.family() == Family::Sd2 => "v_prediction",
        None => "epsilon",
    }
}

/// The scheduler config a pipeline built from this file uses: `<config_dir>/scheduler/scheduler_config.json`
/// when a config folder was given, else the family's standard one with this file's `prediction_type` and, for a
/// `ztsnr` marker, `rescale_betas_zero_snr: true` (which the sampler refuses by name if it does not implement it).
pub fn scheduler_config(sf: &SingleFileMap) -> Result<Value> {
    if let Some(dir) = sf.config_dir() {
        let p = dir.join("scheduler").join("scheduler_config.json");
        if p.is_file() {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            return serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", p.display())));
        }
    }
    let mut cfg = standard_scheduler(sf.family());
    cfg["prediction_type"] = json!(prediction_type(sf));
    if sf.zero_terminal_snr() {
        cfg["rescale_betas_zero_snr"] = json!(true);
    }
    Ok(cfg)
}

/// The family's standard `scheduler_config.json` (SD 1.5: PNDM; SD 2.1: DDIM, v-prediction; SDXL base: Euler,
/// leading spacing).
pub fn standard_scheduler(family: Family) -> Value {
    let mut cfg = json!({
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
        "trained_betas": null,
    });
    match family {
        Family::Sd1 => cfg["_class_name"] = json!("PNDMScheduler"),
        Family::Sd2 => {
            cfg["_class_name"] = json!("DDIMScheduler");
            cfg["prediction_type"] = json!("v_prediction");
        }
        Family::Sdxl => {
            cfg["_class_name"] = json!("EulerDiscreteScheduler");
            cfg["prediction_type"] = json!("epsilon");
            cfg["interpolation_type"] = json!("linear");
            cfg["timestep_spacing"] = json!("leading");
            cfg["use_karras_sigmas"] = json!(false);
            cfg["sample_max_value"] = json!(1.0);
        }
    }
    cfg
}

pub(crate) fn component_config(sf: &SingleFileMap, map: &ComponentMap) -> Result<Value> {
    if let Some(dir) = sf.config_dir() {
        let p = dir.join(map.component.name()).join("config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        return serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", p.display())));
    }
    let what = |e: String| Error::invalid(format!("{}: {}: {e}", sf.source(), map.component));
    match map.component {
        Component::Unet => unet_config(sf, map).map_err(what),
        Component::Vae => Ok(vae_config(sf, map)),
        Component::TextEncoder | Component::TextEncoder2 => text_encoder_config(sf, map).map_err(what),
    }
}

fn shape<'a>(map: &'a ComponentMap, name: &str) -> Option<&'a [usize]> {
    map.get(name).map(|e| e.shape.as_slice())
}

fn dim(map: &ComponentMap, name: &str, i: usize) -> std::result::Result<usize, String> {
    shape(map, name).and_then(|s| s.get(i).copied()).ok_or_else(|| format!("missing {name}"))
}

/// Count `prefix<N>.` indices among the entries.
fn count(map: &ComponentMap, prefix: &str) -> usize {
    map.entries
        .iter()
        .filter_map(|e| e.internal_name.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

fn has_prefix(map: &ComponentMap, prefix: &str) -> bool {
    map.entries.iter().any(|e| e.internal_name.starts_with(prefix))
}

/// Ints as one int when all equal (diffusers' configs write `1`, SDXL's writes `[1, 2, 10]`).
fn int_or_list(v: &[usize]) -> Value {
    if v.windows(2).all(|w| w[0] == w[1]) {
        json!(v[0])
    } else {
        json!(v)
    }
}

fn unet_config(sf: &SingleFileMap, map: &ComponentMap) -> std::result::Result<Value, String> {
    let family = sf.family();
    let levels = count(map, "down_blocks.");
    let layers = count(map, "down_blocks.0.resnets.");
    let mut channels = Vec::new();
    let mut down = Vec::new();
    let mut up = Vec::new();
    let mut depth = Vec::new();
    for b in 0..levels {
        channels.push(dim(map, &format!("down_blocks.{b}.resnets.0.conv2.weight"), 0)?);
        let attn = has_prefix(map, &format!("down_blocks.{b}.attentions."));
        down.push(if attn { "CrossAttnDownBlock2D" } else { "DownBlock2D" });
        let up_attn = has_prefix(map, &format!("up_blocks.{b}.attentions."));
        up.push(if up_attn { "CrossAttnUpBlock2D" } else { "UpBlock2D" });
        depth.push(if attn { count(map, &format!("down_blocks.{b}.attentions.0.transformer_blocks.")) } else { 1 });
    }
    // Any attention tells the context width and the projection kind (LDM: 1x1 conv; SD 2.x/SDXL: linear).
    let first = |suffix: &str| map.entries.iter().find(|e| e.internal_name.ends_with(suffix)).map(|e| &e.shape);
    let context = first(".attn2.to_k.weight").and_then(|s| s.get(1).copied()).ok_or("no cross-attention")?;
    let linear = first(".proj_in.weight").is_some_and(|s| s.len() == 2);
    let mid_attn = has_prefix(map, "mid_block.attentions.");
    let mut cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": dim(map, "conv_in.weight", 1)?,
        "out_channels": dim(map, "conv_out.weight", 0)?,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": if mid_attn { Value::from("UNetMidBlock2DCrossAttn") } else { Value::Null },
        "cross_attention_dim": context,
        "use_linear_projection": linear,
        "transformer_layers_per_block": int_or_list(&depth),
        "upcast_attention": family == Family::Sd2,
        "norm_num_groups": 32,
        "sample_size": match family { Family::Sd1 => 64, Family::Sd2 => 96, Family::Sdxl => 128 },
    });
    if let Some(adm) = shape(map, "add_embedding.linear_1.weight").map(|s| s[1]) {
        // adm = pooled text embedding + 6 time ids × addition_time_embed_dim (SDXL: 1280 + 6 × 256).
        let pooled = sf
            .component(Component::TextEncoder2)
            .ok()
            .and_then(|m| shape(m, "text_projection.weight").map(|s| s[0]))
            .unwrap_or(1280);
        let time = adm
            .checked_sub(pooled)
            .filter(|d| d % 6 == 0)
            .map(|d| d / 6)
            .ok_or_else(|| format!("add_embedding input {adm} is not pooled ({pooled}) + 6 × time embedding"))?;
        cfg["addition_embed_type"] = json!("text_time");
        cfg["addition_time_embed_dim"] = json!(time);
        cfg["projection_class_embeddings_input_dim"] = json!(adm);
    } else if let Some(s) = shape(map, "class_embedding.linear_1.weight") {
        cfg["class_embed_type"] = json!("projection");
        cfg["projection_class_embeddings_input_dim"] = json!(s[1]);
    }
    cfg["attention_head_dim"] = heads(sf, &channels)?;
    if let Some(std) = standard_unet(family) {
        if agrees(&cfg, &std, &["attention_head_dim", "sample_size", "upcast_attention"])
            && unet_params(sf.sidecar()).is_none()
        {
            return Ok(std);
        }
    }
    Ok(cfg)
}

/// diffusers' `attention_head_dim` (a head count, despite the name), as `create_unet_diffusers_config_from_ldm`
/// computes it from `num_heads` / `num_head_channels`; without a sidecar, the family's convention (SD 1.x: 8 heads;
/// SD 2.x and SDXL: 64-channel heads).
fn heads(sf: &SingleFileMap, channels: &[usize]) -> std::result::Result<Value, String> {
    let per_channels = |c: usize| -> std::result::Result<Value, String> {
        let v: Vec<usize> = channels.iter().map(|ch| ch / c).collect();
        if c == 0 || channels.iter().any(|ch| ch % c != 0) {
            return Err(format!(
                "head counts cannot be inferred ({c}-channel heads do not divide {channels:?}): put the LDM config \
                 next to the file (<stem>.yaml with num_heads or num_head_channels) or pass a diffusers config folder"
            ));
        }
        Ok(json!(v))
    };
    if let Some(p) = unet_params(sf.sidecar()) {
        if let Some(n) = p.get("num_heads").filter(|v| !v.is_null() && v.as_i64() != Some(-1)) {
            return Ok(n.clone());
        }
        if let Some(c) = p.get("num_head_channels").and_then(Value::as_u64) {
            return per_channels(c as usize);
        }
    }
    match sf.family() {
        Family::Sd1 => Ok(json!(8)),
        Family::Sd2 | Family::Sdxl => per_channels(64),
    }
}

/// Every derived key of `cfg` (except `ignore`) has the same value in `std` (absent there = null): the shapes
/// say this is the standard model.
fn agrees(cfg: &Value, std: &Value, ignore: &[&str]) -> bool {
    let (Some(cfg), Some(std)) = (cfg.as_object(), std.as_object()) else {
        return false;
    };
    cfg.iter().filter(|(k, _)| !ignore.contains(&k.as_str())).all(|(k, v)| std.get(k).map_or(v.is_null(), |s| s == v))
}

fn vae_config(sf: &SingleFileMap, map: &ComponentMap) -> Value {
    let family = sf.family();
    let levels = count(map, "encoder.down_blocks.");
    let channels: Vec<usize> = (0..levels)
        .filter_map(|b| shape(map, &format!("encoder.down_blocks.{b}.resnets.0.conv2.weight")).map(|s| s[0]))
        .collect();
    let scale = model_params(sf.sidecar())
        .and_then(|p| p.get("scale_factor"))
        .and_then(Value::as_f64)
        .unwrap_or(if family == Family::Sdxl { 0.13025 } else { 0.18215 });
    let cfg = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": shape(map, "encoder.conv_in.weight").map_or(3, |s| s[1]),
        "out_channels": shape(map, "decoder.conv_out.weight").map_or(3, |s| s[0]),
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": count(map, "encoder.down_blocks.0.resnets."),
        "latent_channels": shape(map, "decoder.conv_in.weight").map_or(4, |s| s[1]),
        "norm_num_groups": 32,
        "sample_size": match family { Family::Sd1 => 512, Family::Sd2 => 768, Family::Sdxl => 1024 },
        "scaling_factor": scale,
        "force_upcast": true,
        "use_quant_conv": has_prefix(map, "quant_conv."),
        "use_post_quant_conv": has_prefix(map, "post_quant_conv."),
        "mid_block_add_attention": has_prefix(map, "encoder.mid_block.attentions."),
    });
    let std = standard_vae(family);
    if agrees(&cfg, &std, &["sample_size", "scaling_factor"]) && model_params(sf.sidecar()).is_none() {
        return std;
    }
    cfg
}

fn text_encoder_config(sf: &SingleFileMap, map: &ComponentMap) -> std::result::Result<Value, String> {
    let hidden = dim(map, "text_model.embeddings.token_embedding.weight", 1)?;
    let projection = shape(map, "text_projection.weight").map(|s| s[0]);
    let open_clip =
        sf.family() != Family::Sd1 && map.component == Component::TextEncoder2 || sf.family() == Family::Sd2;
    let cfg = json!({
        "architectures": [if projection.is_some() { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "vocab_size": dim(map, "text_model.embeddings.token_embedding.weight", 0)?,
        "max_position_embeddings": dim(map, "text_model.embeddings.position_embedding.weight", 0)?,
        "hidden_size": hidden,
        "intermediate_size": dim(map, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "num_hidden_layers": count(map, "text_model.encoder.layers."),
        "hidden_act": if open_clip { "gelu" } else { "quick_gelu" },
        "projection_dim": projection.unwrap_or(hidden),
        "layer_norm_eps": 1e-5,
    });
    let std = standard_text_encoder(sf.family(), map.component);
    if agrees(
        &cfg,
        &std,
        // A CLIPTextModel has no projection: its projection_dim is not in the file (SD 2.1's config says 512).
        if projection.is_some() {
            &["num_attention_heads"][..]
        } else {
            &["num_attention_heads", "projection_dim"][..]
        },
    ) {
        return Ok(std);
    }
    // Every CLIP/OpenCLIP text tower SD uses has 64-wide heads (768/12, 1024/16, 1280/20).
    if hidden % 64 != 0 {
        return Err(format!(
            "the number of attention heads of a {hidden}-wide text encoder cannot be inferred (not a multiple of \
             64): pass a diffusers config folder"
        ));
    }
    let mut cfg = cfg;
    cfg["num_attention_heads"] = json!(hidden / 64);
    Ok(cfg)
}

/// The family's standard UNet config (see the module doc for the source).
pub fn standard_unet(family: Family) -> Option<Value> {
    let sd = |heads: Value, context: usize, linear: bool, upcast: bool, sample: usize| {
        json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": context,
            "attention_head_dim": heads,
            "use_linear_projection": linear,
            "transformer_layers_per_block": 1,
            "upcast_attention": upcast,
            "norm_num_groups": 32,
            "sample_size": sample,
        })
    };
    Some(match family {
        Family::Sd1 => sd(json!(8), 768, false, false, 64),
        Family::Sd2 => sd(json!([5, 10, 20, 20]), 1024, true, true, 96),
        Family::Sdxl => json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": true,
            "transformer_layers_per_block": [1, 2, 10],
            "upcast_attention": false,
            "norm_num_groups": 32,
            "sample_size": 128,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }),
    })
}

/// The family's standard VAE config.
pub fn standard_vae(family: Family) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": match family { Family::Sd1 => 512, Family::Sd2 => 768, Family::Sdxl => 1024 },
        "scaling_factor": if family == Family::Sdxl { 0.13025 } else { 0.18215 },
        "force_upcast": true,
        "use_quant_conv": true,
        "use_post_quant_conv": true,
        "mid_block_add_attention": true,
    })
}

/// The family's standard text-encoder config (transformers `CLIPTextConfig` keys).
pub fn standard_text_encoder(family: Family, c: Component) -> Value {
    let clip = |arch: &str, hidden: usize, inter: usize, heads: usize, layers: usize, act: &str, proj: usize| {
        json!({
            "architectures": [arch],
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "hidden_act": act,
            "projection_dim": proj,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        })
    };
    match (family, c) {
        (Family::Sd2, _) => clip("CLIPTextModel", 1024, 4096, 16, 23, "gelu", 512),
        (Family::Sdxl, Component::TextEncoder2) => {
            clip("CLIPTextModelWithProjection", 1280, 5120, 20, 32, "gelu", 1280)
        }
        _ => clip("CLIPTextModel", 768, 3072, 12, 12, "quick_gelu", 768),
    }
}
