//! Models as hosts see them: one diffusers component folder (`unet/`, `vae/`), its architecture and its managed
//! weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::memory::{ManagedModel, ModelCache};
use crate::models::clip::{ClipKind, ClipTextConfig, ClipTextEncoder, KeyLayout};
use crate::models::Family;
use crate::text::PadToken;
use crate::weights::single_file::{Component, ComponentFile, ComponentMap, SingleFile};
use crate::weights::{BlockRule, FilePart, TensorSpan, WeightLayout};
use crate::models::text_encoder::{PromptTokenizer, TextEncoder};
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::t5::T5Encoder;
use crate::text::{ClipTokenizer, T5Tokenizer};
use crate::models::{AutoencoderKL, ExpectedTensors, UNet2DConditionModel, UNetConfig, VaeConfig};
use crate::sampling::SchedulerConfig;

/// The architecture of a loaded component.
pub enum Architecture {
    /// A `UNet2DConditionModel` with the scheduler configuration found beside it (or SD 1.5's).
    Unet { model: UNet2DConditionModel, scheduler: SchedulerConfig },
    /// An `AutoencoderKL`.
    Vae(AutoencoderKL),
    /// A `FluxTransformer2DModel` (FLUX.1 dev or schnell; BFL tensor names inside) with the flow-matching scheduler
    /// configuration found beside it (or the variant's FLUX.1 default).
    Flux { model: FluxTransformer, scheduler: SchedulerConfig },
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
    /// A diffusion transformer (FLUX).
    Transformer,
}

/// A loaded component. Shared (`Arc`) by the host's handle and any run using it.
pub struct Model {
    /// The context it was loaded in: it runs only there (its weights are registered in that context's cache).
    context_id: u64,
    dir: PathBuf,
    arch: Architecture,
    weights: Arc<ManagedModel>,
}

impl Architecture {
    /// The family's block partition of this architecture's checkpoints (the streaming units).
    fn block_rule(&self) -> BlockRule {
        match self {
            Architecture::Unet { .. } => crate::models::unet::block_of,
            Architecture::Vae(_) => crate::weights::block_key,
            Architecture::Flux { .. } => crate::models::flux::block_of,
            Architecture::TextEncoder { model, .. } => model.block_rule(),
        }
    }

    /// Every tensor the architecture reads, with its shape.
    fn expected_tensors(&self) -> ExpectedTensors {
        match self {
            Architecture::Unet { model, .. } => model.expected_tensors(),
            Architecture::Vae(v) => v.expected_tensors(),
            Architecture::Flux { model, .. } => model.expected_tensors(),
            Architecture::TextEncoder { model, .. } => model.expected_tensors(),
        }
    }
}

/// Register `map`'s tensors of the file at `path` with `cache`, read in place under the model's names.
fn mapped_weights(
    cache: &ModelCache,
    path: &Path,
    map: &ComponentMap,
    component: Component,
    rule: BlockRule,
) -> Result<Arc<ManagedModel>> {
    let spans = map
        .entries
        .iter()
        .map(|e| TensorSpan {
            name: e.internal_name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            parts: vec![FilePart::of(e.bytes.clone())],
            transposed: e.transpose,
        })
        .collect();
    let layout = WeightLayout { view: component.name().to_string(), rule, spans: Some(Arc::new(spans)) };
    cache.load_model_as(path, component.name(), &layout)
}

/// Weight files a component folder may hold, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"];

impl Model {
    /// Load the component in `dir` (config.json + safetensors) into `cache`, the cache of context `context_id`. The
    /// architecture comes from config.json's `_class_name` (transformers folders: `architectures`); weights are
    /// memory-mapped and registered with the cache (no device bytes yet), and every tensor the architecture reads is
    /// checked by name and shape, so a renamed or misshapen tensor fails here rather than at the first run.
    /// `step(done, LOAD_PHASES)` runs after each phase; an error from it (a cancel) stops the load.
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
        // diffusers components name their class in `_class_name`; transformers folders (the text encoders, as the
        // hub ships them) in `architectures`; a config saved alone only says `model_type` (the weights then tell
        // whether a projection exists).
        let class = json
            .get("_class_name")
            .or_else(|| json.get("architectures").and_then(|a| a.get(0)))
            .and_then(Value::as_str)
            .or_else(|| (json.get("model_type").and_then(Value::as_str) == Some("clip_text_model")).then_some("CLIPTextModel"))
            .unwrap_or("");
        let arch = match class {
            "UNet2DConditionModel" => {
                let model = UNet2DConditionModel::new(UNetConfig::from_json(&text)?)?;
                Architecture::Unet { model, scheduler: scheduler_beside(dir)? }
            }
            "AutoencoderKL" => Architecture::Vae(AutoencoderKL::new(VaeConfig::from_json(&text)?)?),
            "FluxTransformer2DModel" => {
                let config = FluxConfig::from_json(&text)?;
                let scheduler = flux_scheduler_beside(dir, &config)?;
                Architecture::Flux { model: FluxTransformer::new(config)?, scheduler }
            }
            "CLIPTextModel" | "CLIPTextModelWithProjection" => Architecture::TextEncoder {
                model: Box::new(ClipTextEncoder::load_config(dir)?),
                tokenizer: tokenizer_beside(dir)?,
            },
            "T5EncoderModel" => Architecture::TextEncoder {
                model: Box::new(T5Encoder::load_config(dir)?),
                tokenizer: t5_tokenizer_beside(dir)?,
            },
            other => {
                return Err(Error::unsupported(format!(
                    "{}: _class_name \"{other}\" (supported: UNet2DConditionModel, AutoencoderKL, \
                     FluxTransformer2DModel, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)",
                    config_path.display()
                )))
            }
        };
        step(1, LOAD_PHASES)?;
        let file = match &arch {
            Architecture::TextEncoder { .. } => Some(ClipTextEncoder::weights_file(dir)?),
            _ => crate::weights::find_weights(dir, &WEIGHT_FILES),
        };
        let file = file.ok_or_else(|| {
            Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no weights: expected {} or {} (or its .index.json)", WEIGHT_FILES[0], WEIGHT_FILES[1]),
                ),
            )
        })?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
        let layout = match &arch {
            // diffusers' FLUX names map to BFL's by fusing q/k/v (and the single blocks' linear1) from byte ranges.
            Architecture::Flux { .. } => WeightLayout {
                view: name.clone(),
                rule: arch.block_rule(),
                spans: Some(Arc::new(crate::weights::single_file::flux::diffusers_spans(&file)?)),
            },
            _ => WeightLayout::whole(arch.block_rule()),
        };
        let weights = cache.load_model_as(&file, &name, &layout)?;
        step(2, LOAD_PHASES)?;
        check_tensors(&file, &arch.expected_tensors(), &weights)?;
        step(3, LOAD_PHASES)?;
        Ok(Self { context_id, dir: dir.to_path_buf(), arch, weights })
    }

    /// Load one component of a single-file checkpoint (LDM/SGM layout) into `cache`: its tensors are read in place
    /// under the family's names (no copy of the file is written), its config is the one the file's shapes give
    /// (see [`SingleFile::config`]), a text encoder takes the CLIP vocabulary compiled into the library.
    pub fn load_single_file_component(
        cache: &ModelCache,
        file: &SingleFile,
        component: Component,
        context_id: u64,
    ) -> Result<Self> {
        let map = file.component(component)?;
        let config = file.config(component)?.to_string();
        let arch = match component {
            Component::Unet => {
                let scheduler = SchedulerConfig::from_value(&file.scheduler_config()?)?;
                Architecture::Unet { model: UNet2DConditionModel::new(UNetConfig::from_json(&config)?)?, scheduler }
            }
            Component::Vae => Architecture::Vae(AutoencoderKL::new(VaeConfig::from_json(&config)?)?),
            Component::Transformer => {
                let config = FluxConfig::from_json(&config)?;
                // A config folder beside the file may give the scheduler; else the variant's FLUX.1 default.
                let scheduler = match file.map().config_dir().map(|d| d.join("scheduler/scheduler_config.json")) {
                    Some(p) if p.exists() => SchedulerConfig::from_file(&p)?,
                    _ => flux_scheduler_default(&config)?,
                };
                Architecture::Flux { model: FluxTransformer::new(config)?, scheduler }
            }
            Component::TextEncoder | Component::TextEncoder2 => {
                // SD 1.x, SDXL's and FLUX's CLIP-L pad with EOS; OpenCLIP (SD 2.x, SDXL's bigG) with "!".
                let pad = match (file.family(), component) {
                    (Family::Sd1, _) | (Family::Sdxl | Family::Flux, Component::TextEncoder) => PadToken::Eos,
                    _ => PadToken::Exclamation,
                };
                let mut clip = ClipTextConfig::from_json(&config)?;
                // A config alone may not name the class: the mapped weights say whether there is a projection.
                if map.get("text_projection.weight").is_some() {
                    clip.kind = ClipKind::WithProjection;
                }
                Architecture::TextEncoder {
                    model: Box::new(ClipTextEncoder::new(clip, KeyLayout::Prefixed)),
                    tokenizer: Some(Box::new(ClipTokenizer::embedded(pad)?)),
                }
            }
        };
        let weights = mapped_weights(cache, file.path(), map, component, arch.block_rule())?;
        check_tensors(file.path(), &arch.expected_tensors(), &weights)?;
        Ok(Self { context_id, dir: file.path().to_path_buf(), arch, weights })
    }

    /// Load a FLUX transformer stored as a GGUF file (City96's conversions: BFL names, optionally under
    /// `model.diffusion_model.`; quantised tensors stay in their stored form and are dequantised when used). The
    /// config comes from a diffusers config folder beside the file (`NAME/transformer/config.json` for `NAME.gguf`,
    /// diffusers' `config=`) or else from the shapes (FLUX.1's rotary axes); the scheduler from that folder's
    /// `scheduler/` or the variant's FLUX.1 default.
    pub fn load_gguf_transformer(cache: &ModelCache, path: &Path, context_id: u64) -> Result<Self> {
        let header = crate::weights::gguf::GgufHeader::read_file(path)?;
        match header.architecture() {
            Some("flux") | None => {}
            Some(other) => {
                return Err(Error::unsupported(format!(
                    "{}: GGUF general.architecture \"{other}\" as a pipeline's model (supported: flux)",
                    path.display()
                )))
            }
        }
        let config_dir = Some(path.with_extension("")).filter(|d| d.is_dir());
        let config = match config_dir.as_ref().map(|d| d.join("transformer").join("config.json")) {
            Some(p) if p.exists() => FluxConfig::from_file(&p)?,
            _ => {
                let shapes = header.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
                FluxConfig::from_bfl_shapes(&shapes, None)
                    .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?
            }
        };
        let scheduler = match config_dir.map(|d| d.join("scheduler").join("scheduler_config.json")) {
            Some(p) if p.exists() => SchedulerConfig::from_file(&p)?,
            _ => flux_scheduler_default(&config)?,
        };
        let arch = Architecture::Flux { model: FluxTransformer::new(config)?, scheduler };
        let weights = cache.load_model_as(path, "transformer", &WeightLayout::whole(arch.block_rule()))?;
        check_tensors(path, &arch.expected_tensors(), &weights)?;
        Ok(Self { context_id, dir: path.to_path_buf(), arch, weights })
    }

    /// Load a T5 encoder stored alone in a file (`--text-encoder-2 FILE`: a llama.cpp-style T5 GGUF with its
    /// vocabulary, or a `t5xxl_*.safetensors` in transformers' names with a tokenizer folder beside it; see
    /// `api::t5_file`) into `cache`. Quantised and fp8 tensors stay in their stored form.
    pub fn load_t5_file(cache: &ModelCache, path: &Path, context_id: u64) -> Result<Self> {
        let file = super::t5_file::open(path)?;
        let arch = Architecture::TextEncoder { model: Box::new(file.encoder), tokenizer: Some(file.tokenizer) };
        let weights = cache.load_model_as(path, "text_encoder_2", &file.layout)?;
        check_tensors(path, &arch.expected_tensors(), &weights)?;
        Ok(Self { context_id, dir: path.to_path_buf(), arch, weights })
    }

    /// Load a VAE stored alone in a file (BFL's FLUX.1 `ae.safetensors`, an LDM VAE such as `vae-ft-mse-840000`, or
    /// one in diffusers layout) into `cache`: its tensors are read in place under diffusers' names, its config comes
    /// from its shapes (see [`ComponentFile::vae_config`]; `family` sets an SD VAE's scaling factor).
    pub fn load_vae_file(cache: &ModelCache, path: &Path, family: Option<Family>, context_id: u64) -> Result<Self> {
        let file = ComponentFile::open(path, Component::Vae)?;
        let config = file.vae_config(family)?.to_string();
        let arch = Architecture::Vae(AutoencoderKL::new(VaeConfig::from_json(&config)?)?);
        let weights = mapped_weights(cache, path, file.map(), Component::Vae, arch.block_rule())?;
        check_tensors(path, &arch.expected_tensors(), &weights)?;
        Ok(Self { context_id, dir: path.to_path_buf(), arch, weights })
    }

    /// The model's identity in the cache, unique in the process: loads of one folder in one context share it (a
    /// cache hit), models of different contexts never do.
    pub fn id(&self) -> u64 {
        self.weights.id()
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
            Architecture::Flux { .. } => ModelKind::Transformer,
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
    match tokenizer_dir_beside(encoder_dir) {
        Some(dir) => Ok(Some(Box::new(ClipTokenizer::from_dir(&dir)?))),
        None => Ok(None),
    }
}

/// The first existing tokenizer folder of [`tokenizer_beside`]'s rule.
pub(crate) fn tokenizer_dir_beside(encoder_dir: &Path) -> Option<PathBuf> {
    let name = encoder_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let suffix = name.strip_prefix("text_encoder").filter(|s| s.is_empty() || s.starts_with('_')).unwrap_or("");
    let candidates = [
        encoder_dir.parent().map(|p| p.join(format!("tokenizer{suffix}"))),
        Some(encoder_dir.join("tokenizer")),
    ];
    candidates.into_iter().flatten().find(|d| d.is_dir())
}

/// The T5 tokenizer folder beside a T5 encoder (`text_encoder_2` → `../tokenizer_2`, as FLUX lays it out; the rule
/// of [`tokenizer_beside`]), if there is one. Its maximum length is the folder's `model_max_length`, else FLUX-dev's
/// 512 (a FLUX pipeline sets its own per variant). A folder without `tokenizer.json` is an error naming the file.
fn t5_tokenizer_beside(encoder_dir: &Path) -> Result<Option<Box<dyn PromptTokenizer>>> {
    match tokenizer_dir_beside(encoder_dir) {
        Some(dir) => Ok(Some(Box::new(T5Tokenizer::from_dir(&dir, T5_DEFAULT_MAX_LENGTH)?))),
        None => Ok(None),
    }
}

/// The T5 sequence length when a tokenizer folder states none: FLUX-dev's (BFL runs dev at 512, schnell at 256).
pub(crate) const T5_DEFAULT_MAX_LENGTH: usize = 512;

/// `../scheduler/scheduler_config.json` of a pipeline's `unet/` folder, else SD 1.5's configuration.
fn scheduler_beside(unet_dir: &Path) -> Result<SchedulerConfig> {
    let path = unet_dir.parent().map(|p| p.join("scheduler").join("scheduler_config.json"));
    match path {
        Some(p) if p.exists() => SchedulerConfig::from_file(&p),
        _ => Ok(SchedulerConfig::sd15()),
    }
}

/// `../scheduler/scheduler_config.json` of a pipeline's `transformer/` folder, else the FLUX.1 variant's default.
fn flux_scheduler_beside(transformer_dir: &Path, config: &FluxConfig) -> Result<SchedulerConfig> {
    let path = transformer_dir.parent().map(|p| p.join("scheduler").join("scheduler_config.json"));
    match path {
        Some(p) if p.exists() => SchedulerConfig::from_file(&p),
        _ => flux_scheduler_default(config),
    }
}

/// FluxPipeline's scheduler as the hub ships it: dev (guidance-distilled) shifts with the image length
/// (`use_dynamic_shifting`), schnell is unshifted (`shift` 1.0, no dynamic shifting).
pub(crate) fn flux_scheduler_default(config: &FluxConfig) -> Result<SchedulerConfig> {
    let (shift, dynamic) = if config.guidance_embeds { (3.0, true) } else { (1.0, false) };
    SchedulerConfig::from_value(&serde_json::json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": shift,
        "use_dynamic_shifting": dynamic,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }))
}

impl Model {
    /// The model as a denoiser with its scheduler configuration, or INVALID_ARGUMENT naming what was passed.
    pub fn as_denoiser(&self) -> Result<(&dyn crate::models::Denoiser, &SchedulerConfig)> {
        match &self.arch {
            Architecture::Unet { model, scheduler } => Ok((model, scheduler)),
            Architecture::Flux { model, scheduler } => Ok((model, scheduler)),
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
