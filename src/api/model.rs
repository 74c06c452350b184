//! Models as hosts see them: one diffusers component folder (`unet/`, `vae/`), its architecture and its managed
//! weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::memory::{ManagedModel, ModelCache};
use crate::models::clip::ClipTextEncoder;
use crate::models::text_encoder::{PromptTokenizer, TextEncoder};
use crate::text::ClipTokenizer;
use crate::models::{AutoencoderKL, ExpectedTensors, UNet2DConditionModel, UNetConfig, VaeConfig};
use crate::sampling::SchedulerConfig;

/// The architecture of a loaded component.
pub enum Architecture {
    /// A `UNet2DConditionModel` with the scheduler configuration found beside it (or SD 1.5's).
    Unet { model: UNet2DConditionModel, scheduler: SchedulerConfig },
    /// An `AutoencoderKL`.
    Vae(AutoencoderKL),
    /// A text encoder (`CLIPTextModel`, `CLIPTextModelWithProjection`) with the tokenizer found beside it, if any.
    TextEncoder { model: Box<dyn TextEncoder>, tokenizer: Option<Box<dyn PromptTokenizer>> },
}

/// The kind of a component (stable numbers in the C enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Unet,
    Vae,
    TextEncoder,
}

/// A loaded component. Shared (`Arc`) by the host's handle and any run using it.
pub struct Model {
    /// The context it was loaded in: it runs only there (its weights are registered in that context's cache).
    context_id: u64,
    dir: PathBuf,
    arch: Architecture,
    weights: Arc<ManagedModel>,
}

/// Weight files a component folder may hold, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"];

impl Model {
    /// Load the component in `dir` (config.json + safetensors) into `cache`, the cache of context `context_id`. The
    /// architecture comes from config.json's `_class_name`; weights are memory-mapped and registered with the cache
    /// (no device bytes yet), and every tensor the architecture reads is checked by name and shape, so a renamed or
    /// misshapen tensor fails here rather than at the first run. `step(done, LOAD_PHASES)` runs after each phase; an
    /// error from it (a cancel) stops the load.
    pub fn load(
        cache: &ModelCache,
        dir: &Path,
        context_id: u64,
        step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(format!("{}: {e}", config_path.display())))?;
        // diffusers names the class in `_class_name`; transformers (text encoders) in `architectures`.
        let architecture = json.get("architectures").and_then(Value::as_array).and_then(|a| a.first());
        let class = json.get("_class_name").or(architecture).and_then(Value::as_str).unwrap_or("");
        let arch = match class {
            "UNet2DConditionModel" => {
                let model = UNet2DConditionModel::new(UNetConfig::from_json(&text)?)?;
                Architecture::Unet { model, scheduler: scheduler_beside(dir)? }
            }
            "AutoencoderKL" => Architecture::Vae(AutoencoderKL::new(VaeConfig::from_json(&text)?)?),
            "CLIPTextModel" | "CLIPTextModelWithProjection" => Architecture::TextEncoder {
                model: Box::new(ClipTextEncoder::load_config(dir)?),
                tokenizer: tokenizer_beside(dir)?,
            },
            other => {
                return Err(Error::unsupported(format!(
                    "{}: _class_name \"{other}\" (supported: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, \
                     CLIPTextModelWithProjection)",
                    config_path.display()
                )))
            }
        };
        step(1, LOAD_PHASES)?;
        let file = match &arch {
            Architecture::TextEncoder { .. } => Some(ClipTextEncoder::weights_file(dir)?),
            _ => WEIGHT_FILES.iter().map(|f| dir.join(f)).find(|p| p.exists()),
        };
        let file = file.ok_or_else(|| {
            Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no weights: expected {} or {}", WEIGHT_FILES[0], WEIGHT_FILES[1]),
                ),
            )
        })?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
        let weights = cache.load_model(&file, &name)?;
        step(2, LOAD_PHASES)?;
        let expected = match &arch {
            Architecture::Unet { model, .. } => model.expected_tensors(),
            Architecture::Vae(v) => v.expected_tensors(),
            Architecture::TextEncoder { model, .. } => model.expected_tensors(),
        };
        check_tensors(&file, &expected, &weights)?;
        step(3, LOAD_PHASES)?;
        Ok(Self { context_id, dir: dir.to_path_buf(), arch, weights })
    }

    /// The identity of the context the model was loaded in.
    pub fn context_id(&self) -> u64 {
        self.context_id
    }

    /// The component folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kind of component.
    pub fn kind(&self) -> ModelKind {
        match self.arch {
            Architecture::Unet { .. } => ModelKind::Unet,
            Architecture::Vae(_) => ModelKind::Vae,
            Architecture::TextEncoder { .. } => ModelKind::TextEncoder,
        }
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The managed weights.
    pub fn weights(&self) -> &Arc<ManagedModel> {
        &self.weights
    }

    /// The UNet and its scheduler config, or INVALID_ARGUMENT naming what was passed instead.
    pub fn as_unet(&self) -> Result<(&UNet2DConditionModel, &SchedulerConfig)> {
        match &self.arch {
            Architecture::Unet { model, scheduler } => Ok((model, scheduler)),
            _ => Err(Error::invalid(format!("{} is a {:?}, a UNet is needed", self.dir.display(), self.kind()))),
        }
    }

    /// The VAE, or INVALID_ARGUMENT.
    pub fn as_vae(&self) -> Result<&AutoencoderKL> {
        match &self.arch {
            Architecture::Vae(v) => Ok(v),
            _ => Err(Error::invalid(format!("{} is a {:?}, a VAE is needed", self.dir.display(), self.kind()))),
        }
    }
}

/// Phases `Model::load` reports: config read, weights mapped, tensors checked.
pub const LOAD_PHASES: usize = 3;

/// Old diffusers checkpoints name the VAE attention projections `query`/`key`/`value`/`proj_attn`.
const LEGACY_ATTENTION: [(&str, &str); 4] =
    [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")];

/// FORMAT naming the first missing or misshapen tensor (and how many there are) unless the file holds every tensor
/// the architecture reads with its shape.
fn check_tensors(file: &Path, expected: &ExpectedTensors, weights: &ManagedModel) -> Result<()> {
    let have: std::collections::HashMap<&str, &[usize]> =
        weights.store().tensors().iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
    let lookup = |name: &str| -> Option<&[usize]> {
        have.get(name).copied().or_else(|| {
            LEGACY_ATTENTION
                .iter()
                .find(|(new, _)| name.contains(new))
                .and_then(|(new, old)| have.get(name.replacen(new, old, 1).as_str()).copied())
        })
    };
    let mut problems = Vec::new();
    for (name, shape) in &expected.0 {
        match lookup(name) {
            None => problems.push(format!("tensor {name} {shape:?} is missing")),
            Some(s) if s == shape.as_slice() => {}
            Some(s) => problems.push(format!("tensor {name} has shape {s:?}, the config needs {shape:?}")),
        }
    }
    match problems.first() {
        None => Ok(()),
        Some(first) => Err(Error::format(format!(
            "{}: {first}{}",
            file.display(),
            if problems.len() > 1 { format!(" (and {} more problems)", problems.len() - 1) } else { String::new() }
        ))),
    }
}

/// The tokenizer folder beside a text encoder (`text_encoder` → `../tokenizer`, `text_encoder_2` →
/// `../tokenizer_2`; any other name `N` → `../tokenizer` then `N/tokenizer`), if there is one. A folder without one
/// still loads (host-given ids work); encoding a prompt then names what is missing.
fn tokenizer_beside(encoder_dir: &Path) -> Result<Option<Box<dyn PromptTokenizer>>> {
    let name = encoder_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let suffix = name.strip_prefix("text_encoder").filter(|s| s.is_empty() || s.starts_with('_')).unwrap_or("");
    let candidates = [
        encoder_dir.parent().map(|p| p.join(format!("tokenizer{suffix}"))),
        Some(encoder_dir.join("tokenizer")),
    ];
    for dir in candidates.into_iter().flatten() {
        if dir.is_dir() {
            return Ok(Some(Box::new(ClipTokenizer::from_dir(&dir)?)));
        }
    }
    Ok(None)
}

/// `../scheduler/scheduler_config.json` of a pipeline's `unet/` folder, else SD 1.5's configuration.
fn scheduler_beside(unet_dir: &Path) -> Result<SchedulerConfig> {
    let path = unet_dir.parent().map(|p| p.join("scheduler").join("scheduler_config.json"));
    match path {
        Some(p) if p.exists() => SchedulerConfig::from_file(&p),
        _ => Ok(SchedulerConfig::sd15()),
    }
}

impl Model {
    /// The model as a denoiser with its scheduler configuration, or INVALID_ARGUMENT naming what was passed.
    pub fn as_denoiser(&self) -> Result<(&dyn crate::models::Denoiser, &SchedulerConfig)> {
        match &self.arch {
            Architecture::Unet { model, scheduler } => Ok((model, scheduler)),
            _ => Err(Error::invalid(format!(
                "{} is a {:?}, a denoising model is needed",
                self.dir.display(),
                self.kind()
            ))),
        }
    }

    /// The model as a text encoder with its tokenizer (if its folder has one), or INVALID_ARGUMENT.
    pub fn as_text_encoder(&self) -> Result<(&dyn TextEncoder, Option<&dyn PromptTokenizer>)> {
        match &self.arch {
            Architecture::TextEncoder { model, tokenizer } => Ok((model.as_ref(), tokenizer.as_deref())),
            _ => Err(Error::invalid(format!("{} is a {:?}, a text encoder is needed", self.dir.display(), self.kind()))),
        }
    }
}
