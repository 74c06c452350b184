//! Which family a single file is and which component each key belongs to, from the keys alone.
//!
//! Family (diffusers' `infer_diffusers_model_type` uses the same evidence, `CHECKPOINT_KEY_NAMES`): SGM's
//! `conditioner.embedders.*` → SDXL; OpenCLIP under `cond_stage_model.model.` → SD 2.x; CLIP under
//! `cond_stage_model.transformer.` → SD 1.x. A file without text encoders is told by its UNet: the cross-attention
//! width (`attn2.to_k.weight` [C, context]) 768 → SD 1.x, 1024 → SD 2.x, 2048 or a `label_emb` → SDXL.

use std::collections::BTreeMap;
use std::fmt;

use super::{ClipLayout, Component, StoredTensor};

/// A model family a single file can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Stable Diffusion 1.x (CLIP-L, 768-wide context).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP-H, 1024-wide context).
    Sd2,
    /// Stable Diffusion XL base (CLIP-L + OpenCLIP bigG, 2048-wide context, `text_time` embedding).
    Sdxl,
}

impl Family {
    /// Short name (`sd1`, `sd2`, `sdxl`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
        }
    }

    /// The components a pipeline of this family needs.
    pub fn components(self) -> &'static [Component] {
        match self {
            Family::Sd1 | Family::Sd2 => &[Component::Unet, Component::Vae, Component::TextEncoder],
            Family::Sdxl => &[Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2],
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        })
    }
}

/// The UNet's key prefix.
pub const UNET_PREFIX: &str = "model.diffusion_model.";

/// Where each component lives: prefix, component, text-encoder layout (None for UNet/VAE).
const PREFIXES: [(&str, Component, Option<ClipLayout>); 7] = [
    (UNET_PREFIX, Component::Unet, None),
    ("first_stage_model.", Component::Vae, None),
    ("vae.", Component::Vae, None),
    ("cond_stage_model.transformer.", Component::TextEncoder, Some(ClipLayout::Transformers)),
    ("cond_stage_model.model.", Component::TextEncoder, Some(ClipLayout::OpenClipNoProjection)),
    ("conditioner.embedders.0.transformer.", Component::TextEncoder, Some(ClipLayout::Transformers)),
    ("conditioner.embedders.1.model.", Component::TextEncoder2, Some(ClipLayout::OpenClipWithProjection)),
];

/// Top-level buffers of LDM's `LatentDiffusion` / SGM's denoiser: the training noise schedule, never weights of
/// a model (the scheduler config describes the schedule).
pub const SCHEDULE_BUFFERS: [&str; 16] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
    "denoiser.sigmas",
    "denoiser.log_sigmas",
];

/// Marker keys some checkpoints carry: `v_pred` (a v-prediction model, e.g. SDXL v-pred fine-tunes), `ztsnr`
/// (trained with zero terminal SNR). ComfyUI reads them the same way (`supported_models.py`, `SDXL.model_type`).
pub const MARKERS: [&str; 2] = ["v_pred", "ztsnr"];

/// The known extras, skipped (documented in one place):
/// - `model_ema.*`: the EMA copy of the UNet (flattened names) and its `decay`/`num_updates`; diffusers also loads
///   the non-EMA weights unless asked (`extract_ema`).
/// - [`SCHEDULE_BUFFERS`].
/// - `*.embeddings.position_ids` of the CLIP encoders (a buffer: `arange(77)`).
/// - OpenCLIP `logit_scale` (contrastive training only).
/// - [`MARKERS`]: empty tensors that flag v-prediction / zero terminal SNR (read by
///   [`SingleFileMap::prediction_type`](super::SingleFileMap::prediction_type)), and `embedding_manager.*`
///   (textual-inversion training state). stable-diffusion.cpp's `unused_tensors` and ComfyUI's
///   `supported_models.py` skip or read the same keys.
/// - SD 2.x only: `cond_stage_model.model.text_projection` (its `CLIPTextModel` has no projection) and
///   `cond_stage_model.model.transformer.resblocks.23.*` (SD 2 uses the penultimate layer; diffusers' text encoder
///   has 23 layers and drops this one: `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`).
pub fn is_extra(name: &str) -> bool {
    if name.starts_with("model_ema.")
        || name.starts_with("embedding_manager.")
        || SCHEDULE_BUFFERS.contains(&name)
        || MARKERS.contains(&name)
    {
        return true;
    }
    let clip = PREFIXES.iter().filter(|p| p.2.is_some()).find_map(|(p, _, _)| name.strip_prefix(p));
    let Some(rel) = clip else { return false };
    rel.ends_with("embeddings.position_ids")
        || rel == "logit_scale"
        || name == "cond_stage_model.model.text_projection"
        || name.starts_with("cond_stage_model.model.transformer.resblocks.23.")
}

/// What a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A known extra, skipped.
    Extra,
    /// No rule knows it.
    Unknown,
    /// A tensor of a component, under `prefix`.
    Part { component: Component, prefix: &'static str, clip: Option<ClipLayout> },
}

/// Classify one key.
pub fn classify(name: &str) -> Class {
    if is_extra(name) {
        return Class::Extra;
    }
    PREFIXES
        .iter()
        .find(|(p, _, _)| name.starts_with(p))
        .map_or(Class::Unknown, |&(prefix, component, clip)| Class::Part { component, prefix, clip })
}

/// The UNet's cross-attention width, from the first `attn2.to_k.weight` ([C, context]).
pub(crate) fn context_dim(stored: &BTreeMap<String, StoredTensor>) -> Option<usize> {
    stored
        .iter()
        .find(|(k, _)| k.starts_with(UNET_PREFIX) && k.ends_with(".attn2.to_k.weight"))
        .and_then(|(_, t)| t.shape.get(1).copied())
}

/// Detect the family (see the module doc); an error says what was seen.
pub(crate) fn family(stored: &BTreeMap<String, StoredTensor>) -> Result<Family, String> {
    let has = |p: &str| stored.range(p.to_string()..).next().is_some_and(|(k, _)| k.starts_with(p));
    if has("conditioner.embedders.0.model.") {
        return Err("an SDXL refiner checkpoint (OpenCLIP as embedder 0): not supported".into());
    }
    let by_encoder = if has("conditioner.embedders.") {
        Some(Family::Sdxl)
    } else if has("cond_stage_model.model.") {
        Some(Family::Sd2)
    } else if has("cond_stage_model.transformer.") {
        Some(Family::Sd1)
    } else {
        None
    };
    if let Some(f) = by_encoder {
        // A standard-width UNet must agree with its text encoder (a mismatch is a broken merge, not a model).
        let by_width = match context_dim(stored) {
            Some(768) => Some(Family::Sd1),
            Some(1024) => Some(Family::Sd2),
            Some(2048) => Some(Family::Sdxl),
            _ => None,
        };
        return match by_width {
            Some(w) if w != f => Err(format!(
                "its text encoder is {f}'s but its UNet's cross-attention width is {w}'s ({})",
                context_dim(stored).unwrap_or(0)
            )),
            _ => Ok(f),
        };
    }
    if !has(UNET_PREFIX) {
        return Err("no UNet and no text encoder (model.diffusion_model.*, cond_stage_model.*, conditioner.*): \
                    not an SD 1.x/2.x/SDXL checkpoint"
            .into());
    }
    let label_emb = stored.contains_key(&format!("{UNET_PREFIX}label_emb.0.0.weight"));
    match context_dim(stored) {
        Some(2048) => Ok(Family::Sdxl),
        _ if label_emb => Ok(Family::Sdxl),
        Some(1024) => Ok(Family::Sd2),
        Some(768) => Ok(Family::Sd1),
        Some(c) => Err(format!(
            "a UNet with {c}-wide cross-attention and no text encoder: cannot tell the family \
             (768 = SD 1.x, 1024 = SD 2.x, 2048 = SDXL)"
        )),
        None => Err("a UNet without cross-attention: not an SD 1.x/2.x/SDXL checkpoint".into()),
    }
}
