//! A pipeline: the components of one family (denoiser, VAE, text encoders with their tokenizers) loaded through
//! the context's cache, and the three steps every family shares — prompt → [`Conditioning`], conditioning →
//! latents, latents → image. FLUX adds a family, not an entry point.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::api::run::{Cancellable, Meter};
use crate::api::model::tokenizer_dir_beside;
use crate::api::{Architecture, CancelToken, Context, DenoiseOptions, Model, RunReport, Tiling};
use crate::error::{Error, Result};
use crate::models::conditioning::{COND_EMBEDDINGS, COND_POOLED, TIME_IDS, UNCOND_EMBEDDINGS, UNCOND_POOLED};
use crate::models::text_encoder::{HiddenLayer, PromptTokenizer, TextEncoding};
use crate::text::T5Tokenizer;
use crate::models::{Conditioning, Family};
use crate::ops::OpTarget;
use crate::weights::single_file::{Component, SingleFile};
use crate::weights::WeightSource;

/// Component paths that override (or complete) what a pipeline folder holds: each a diffusers component folder; the
/// VAE may also be a file (BFL's FLUX.1 `ae.safetensors`, an LDM VAE).
#[derive(Debug, Clone, Default)]
pub struct ComponentPaths {
    pub vae: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub text_encoder_2: Option<PathBuf>,
}

/// How a prompt is encoded.
#[derive(Debug, Clone)]
pub struct PromptOptions {
    /// Images per prompt (the batch).
    pub batch: usize,
    /// Image size in pixels (height, width): SDXL's micro-conditioning.
    pub image_size: (usize, usize),
    /// Layers to skip from the end of the text encoder (diffusers' `clip_skip`); 0 = the family's default.
    pub clip_skip: usize,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self { batch: 1, image_size: (512, 512), clip_skip: 0 }
    }
}

/// The components of one family, shared with the cache (dropping the pipeline drops the host's references only).
pub struct Pipeline {
    family: Family,
    denoiser: Arc<Model>,
    vae: Arc<Model>,
    /// In the family's order (`text_encoder`, `text_encoder_2`); `None` where the pipeline has none.
    text_encoders: Vec<Option<Arc<Model>>>,
    /// SDXL: no negative prompt is zeros, not the encoding of "" (`force_zeros_for_empty_prompt`; a given "" is
    /// encoded, as diffusers does).
    zeros_for_empty_negative: bool,
    /// FLUX.1 schnell: its T5 tokenizer at schnell's default length (256, BFL's) where the tokenizer folder states
    /// none; `None` uses the encoder's own tokenizer (the folder's `model_max_length`, else dev's 512).
    t5_tokenizer: Option<T5Tokenizer>,
}

impl Pipeline {
    /// Load the pipeline in `path` (a diffusers folder) with `components` overriding its parts. The family comes
    /// from `model_index.json` (or the UNet's config); text encoders are optional (without them only host-given
    /// conditioning works, and [`Self::encode_prompt`] says which flag to pass).
    pub fn load(ctx: &Context, path: &Path, components: &ComponentPaths) -> Result<Self> {
        if path.is_file() {
            return Self::load_single_file(ctx, path, components);
        }
        if !path.is_dir() {
            return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let family = Family::of_pipeline_dir(path)?;
        let denoiser_name = if family == Family::Flux { "transformer" } else { "unet" };
        let denoiser = ctx.load_model(&path.join(denoiser_name))?;
        denoiser.as_denoiser()?;
        let vae_dir = components.vae.clone().unwrap_or_else(|| path.join("vae"));
        if !vae_dir.exists() {
            return Err(Error::invalid(format!("{}: no vae/ in this pipeline: pass --vae", path.display())));
        }
        let vae = load_vae(ctx, &vae_dir, family)?;
        let overrides = [&components.text_encoder, &components.text_encoder_2];
        let mut text_encoders = Vec::new();
        for (i, name) in family.text_encoders().iter().enumerate() {
            let dir = overrides[i].clone().or_else(|| Some(path.join(name)).filter(|d| d.join("config.json").exists()));
            let model = match dir {
                Some(dir) => {
                    let m = load_encoder(ctx, &dir)?;
                    m.as_text_encoder()?;
                    Some(m)
                }
                None => None,
            };
            text_encoders.push(model);
        }
        let index = read_json_opt(&path.join("model_index.json"))?;
        let zeros_for_empty_negative = index
            .as_ref()
            .and_then(|j| j.get("force_zeros_for_empty_prompt"))
            .and_then(Value::as_bool)
            .unwrap_or(family == Family::Sdxl);
        Self::new(family, denoiser, vae, text_encoders, zeros_for_empty_negative)
    }

    fn new(
        family: Family,
        denoiser: Arc<Model>,
        vae: Arc<Model>,
        text_encoders: Vec<Option<Arc<Model>>>,
        zeros_for_empty_negative: bool,
    ) -> Result<Self> {
        let schnell = matches!(denoiser.architecture(), Architecture::Flux { model, .. } if !model.config().guidance_embeds);
        let t5_tokenizer = match text_encoders.get(1).and_then(Option::as_ref) {
            Some(t5) if schnell && t5.as_text_encoder()?.0.name() == "T5EncoderModel" => {
                tokenizer_dir_beside(t5.dir()).map(|d| T5Tokenizer::from_dir(&d, SCHNELL_T5_MAX_LENGTH)).transpose()?
            }
            _ => None,
        };
        Ok(Self { family, denoiser, vae, text_encoders, zeros_for_empty_negative, t5_tokenizer })
    }

    /// Whether at least one of the family's text encoders is loaded.
    pub fn has_text_encoders(&self) -> bool {
        self.text_encoders.iter().any(Option::is_some)
    }

    /// Load a single-file checkpoint (SD 1.x/2.x/SDXL `.safetensors` in the LDM/SGM layout, or a FLUX.1
    /// transformer in BFL's layout, bare or under `model.diffusion_model.`): the family and the components come from
    /// its keys, each component is read in place under the model's names. Components the file lacks come from
    /// `components` (diffusers component folders; the VAE may be a file); one that is neither is an error naming
    /// the flag ("no VAE in this file: pass --vae"). A FLUX file's scheduler is the variant's FLUX.1 default (dev
    /// shifts with the image length, schnell is unshifted).
    ///
    /// Configs come from the file's shapes (the standard SD 1.5 / 2.1 / SDXL configs when they match), refined by
    /// an LDM `NAME.yaml` beside the file; a diffusers config folder `NAME/` beside `NAME.safetensors` (diffusers'
    /// `config=`) gives them exactly.
    fn load_single_file(ctx: &Context, path: &Path, components: &ComponentPaths) -> Result<Self> {
        if crate::weights::gguf::is_gguf_file(path) {
            return Self::load_gguf(ctx, path, components);
        }
        let config_dir = path.with_extension("");
        let file = SingleFile::open_with_config(path, Some(config_dir.as_path()).filter(|d| d.is_dir()))?;
        let family = file.family();
        let load = |c: Component, over: &Option<PathBuf>| -> Result<Option<Arc<Model>>> {
            match over {
                Some(dir) if matches!(c, Component::TextEncoder | Component::TextEncoder2) => {
                    load_encoder(ctx, dir).map(Some)
                }
                Some(dir) => ctx.load_model(dir).map(Some),
                None if file.components().contains(&c) => ctx.load_single_file_component(&file, c).map(Some),
                None => Ok(None),
            }
        };
        let denoiser_component = if family == Family::Flux { Component::Transformer } else { Component::Unet };
        let denoiser = load(denoiser_component, &None)?.ok_or_else(|| {
            Error::invalid(format!("{}: no UNet in this file (a VAE or text encoder alone?)", path.display()))
        })?;
        let vae = match &components.vae {
            Some(p) => load_vae(ctx, p, family)?,
            None if file.components().contains(&Component::Vae) => {
                ctx.load_single_file_component(&file, Component::Vae)?
            }
            None => {
                let what = if family == Family::Flux {
                    "no VAE this file's layout maps (a FLUX transformer file: BFL's ae.safetensors or a vae/ folder)"
                } else {
                    "no VAE in this file"
                };
                return Err(Error::invalid(format!("{}: {what}: pass --vae", path.display())));
            }
        };
        vae.as_vae()?;
        let mut text_encoders = Vec::new();
        for (i, c) in [Component::TextEncoder, Component::TextEncoder2].into_iter().enumerate() {
            if i < family.text_encoders().len() {
                let over = if i == 0 { &components.text_encoder } else { &components.text_encoder_2 };
                let m = load(c, over)?;
                if let Some(m) = &m {
                    m.as_text_encoder()?;
                }
                text_encoders.push(m);
            }
        }
        Self::new(family, denoiser, vae, text_encoders, family == Family::Sdxl)
    }

    /// A FLUX transformer GGUF file (see [`Context::load_gguf_transformer`]) with the components given by flag:
    /// `--vae` is required, the text encoders are optional (host-given conditioning works without them).
    fn load_gguf(ctx: &Context, path: &Path, components: &ComponentPaths) -> Result<Self> {
        let denoiser = ctx.load_gguf_transformer(path)?;
        let vae = match &components.vae {
            Some(p) => load_vae(ctx, p, Family::Flux)?,
            None => {
                let what = "a GGUF file holds the transformer alone: pass --vae";
                return Err(Error::invalid(format!("{}: {what}", path.display())));
            }
        };
        let mut text_encoders = Vec::new();
        for over in [&components.text_encoder, &components.text_encoder_2] {
            let m = over.as_ref().map(|dir| load_encoder(ctx, dir)).transpose()?;
            if let Some(m) = &m {
                m.as_text_encoder()?;
            }
            text_encoders.push(m);
        }
        Self::new(Family::Flux, denoiser, vae, text_encoders, false)
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The denoising model (UNet, FLUX transformer).
    pub fn denoiser(&self) -> &Arc<Model> {
        &self.denoiser
    }

    /// The VAE.
    pub fn vae(&self) -> &Arc<Model> {
        &self.vae
    }

    /// Encode `prompt` and `negative` into the conditioning the family's denoiser takes (each text encoder runs
    /// under the cache's lock like any model: loaded, streamed, evicted).
    pub fn encode_prompt(
        &self,
        ctx: &Context,
        prompt: &str,
        negative: Option<&str>,
        options: &PromptOptions,
    ) -> Result<Conditioning> {
        let b = options.batch;
        if b == 0 {
            return Err(Error::invalid("batch must be at least 1"));
        }
        let mut cond = Conditioning::new();
        let negative_is_zeros = self.zeros_for_empty_negative && negative.is_none();
        match self.family {
            Family::Sd1 | Family::Sd2 => {
                let layer = if options.clip_skip == 0 { HiddenLayer::Last } else { HiddenLayer::SkipNormed(options.clip_skip) };
                let enc = self.encoder(0)?;
                let pos = ctx.encode_text(enc, prompt, layer)?;
                cond.insert(COND_EMBEDDINGS, repeat(&pos.hidden, b)?);
                let neg = ctx.encode_text(enc, negative.unwrap_or(""), layer)?;
                cond.insert(UNCOND_EMBEDDINGS, repeat(&neg.hidden, b)?);
            }
            Family::Flux => {
                // CLIP-L's pooled output (final-LN state at EOS, no projection) and T5's last hidden state; no
                // negative prompt: FLUX runs one forward per step (dev's guidance is distilled into the model).
                if negative.is_some() {
                    return Err(Error::invalid(
                        "FLUX.1 runs no classifier-free guidance: a negative prompt is not used (leave it out)",
                    ));
                }
                let pooled = self.flux_pooled(ctx, prompt)?;
                let t5 = self.encoder(1)?;
                let states = match &self.t5_tokenizer {
                    Some(tokenizer) => {
                        let ids = tokenizer.tokenize(prompt)?;
                        ctx.encode_ids(t5, &ids, HiddenLayer::Last, None, &mut RunReport::default())?.hidden
                    }
                    None => ctx.encode_text(t5, prompt, HiddenLayer::Last)?.hidden,
                };
                cond.insert(COND_EMBEDDINGS, repeat(&states, b)?);
                cond.insert(COND_POOLED, repeat(&pooled, b)?);
            }
            Family::Sdxl => {
                // Both encoders' penultimate layers (SDXL's default; clip_skip moves further back), concatenated
                // along the width; the pooled vector is the second encoder's projected one.
                let layer = HiddenLayer::Skip(1 + options.clip_skip);
                let (e1, e2) = (self.encoder(0)?, self.encoder(1)?);
                let encode = |text: &str| -> Result<(Tensor, Tensor)> {
                    let a = ctx.encode_text(e1, text, layer)?;
                    let c = ctx.encode_text(e2, text, layer)?;
                    let pooled = c.pooled.ok_or_else(|| {
                        Error::format(format!("{}: text_encoder_2 gives no pooled output", e2.dir().display()))
                    })?;
                    Ok((Tensor::cat(&[&a.hidden, &c.hidden], 2)?, pooled))
                };
                let (hidden, pooled) = encode(prompt)?;
                let (neg_hidden, neg_pooled) = if negative_is_zeros {
                    (hidden.zeros_like()?, pooled.zeros_like()?)
                } else {
                    encode(negative.unwrap_or(""))?
                };
                cond.insert(COND_EMBEDDINGS, repeat(&hidden, b)?);
                cond.insert(UNCOND_EMBEDDINGS, repeat(&neg_hidden, b)?);
                cond.insert(COND_POOLED, repeat(&pooled, b)?);
                cond.insert(UNCOND_POOLED, repeat(&neg_pooled, b)?);
                let (h, w) = options.image_size;
                let ids = [h as f32, w as f32, 0.0, 0.0, h as f32, w as f32];
                cond.insert(TIME_IDS, repeat(&Tensor::from_slice(&ids, (1, 6), &Device::Cpu)?, b)?);
            }
        }
        Ok(cond)
    }

    /// FLUX's pooled prompt vector `[1, 768]`: CLIP-L's `pooler_output` (f32 on the CPU).
    pub fn flux_pooled(&self, ctx: &Context, prompt: &str) -> Result<Tensor> {
        let clip = self.encoder(0)?;
        ctx.encode_text(clip, prompt, HiddenLayer::Last)?.pooled.ok_or_else(|| {
            Error::format(format!("{}: text_encoder gives no pooled output", clip.dir().display()))
        })
    }

    /// The text encoder `i` (0: `text_encoder`, 1: `text_encoder_2`), if loaded.
    pub fn text_encoder(&self, i: usize) -> Option<&Arc<Model>> {
        self.text_encoders.get(i).and_then(Option::as_ref)
    }

    /// Denoise from `cond` (see [`Context::denoise_conditioned`]).
    pub fn denoise(
        &self,
        ctx: &Context,
        cond: &Conditioning,
        options: &DenoiseOptions,
        init_noise: Option<&Tensor>,
        step_noise: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Tensor, RunReport)> {
        ctx.denoise_conditioned(&self.denoiser, options, cond, init_noise, step_noise, progress)
    }

    /// Decode latents as [`Self::denoise`] returns them into the raw image `[B, 3, H, W]` (≈ [-1, 1]).
    pub fn decode(&self, ctx: &Context, latents: &Tensor, tiling: Tiling) -> Result<(Tensor, RunReport)> {
        ctx.vae_decode(&self.vae, latents, tiling)
    }

    fn encoder(&self, i: usize) -> Result<&Model> {
        let name = self.family.text_encoders()[i];
        let flag = name.replace('_', "-");
        self.text_encoders.get(i).and_then(|m| m.as_deref()).ok_or_else(|| {
            Error::invalid(format!(
                "this {} pipeline has no {name}: pass --{flag} (or give sampling.cond_embeddings)",
                self.family
            ))
        })
    }
}

impl Context {
    /// Tokenize `prompt` with the encoder's own tokenizer and encode it under the cache's lock; returns f32
    /// tensors on the CPU (`hidden` `[1, S, D]`, `pooled` `[1, P]`).
    pub fn encode_text(&self, encoder: &Model, prompt: &str, layer: HiddenLayer) -> Result<TextEncoding> {
        let (_, tokenizer) = encoder.as_text_encoder()?;
        let tokenizer = tokenizer.ok_or_else(|| {
            Error::invalid(format!("{}: no tokenizer beside this text encoder", encoder.dir().display()))
        })?;
        let ids = tokenizer.tokenize(prompt)?;
        self.encode_ids(encoder, &ids, layer, None, &mut RunReport::default())
    }

    /// Encode token ids `[1, S]` with a text encoder under the cache's lock, with a report (filled on failure too).
    pub fn encode_ids(
        &self,
        encoder: &Model,
        ids: &[u32],
        layer: HiddenLayer,
        token: Option<&CancelToken>,
        report: &mut RunReport,
    ) -> Result<TextEncoding> {
        let call = self.begin_call(token)?;
        let mut meter = Meter::new(self);
        let result = self.call_scope(&call, || {
            self.check_owns(encoder)?;
            let (model, _) = encoder.as_text_encoder()?;
            if ids.is_empty() {
                return Err(Error::invalid("no token ids to encode"));
            }
            let target = OpTarget::new(self.cache().device(), self.cache().compute_dtype());
            meter.estimate = model.working_bytes(1, ids.len(), target);
            call.check()?;
            let lock = self.cache().lock_cancellable(encoder.weights(), meter.estimate, Some(&|| call.is_cancelled()))?;
            meter.took(&lock);
            let source = Cancellable { inner: &lock, cancel: &call, on_block: None };
            let ids = Tensor::from_slice(ids, (1, ids.len()), source.device())?;
            let enc = self.forward_recovering(&lock, || model.encode(&source, &ids, layer));
            meter.took(&lock);
            let enc = enc?;
            let to_host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            Ok(TextEncoding { hidden: to_host(&enc.hidden)?, pooled: enc.pooled.as_ref().map(to_host).transpose()? })
        });
        *report = meter.report(self, encoder);
        result
    }
}

/// FLUX.1 schnell's T5 sequence length when the tokenizer folder states none (BFL's `max_length=256`; dev's is 512).
const SCHNELL_T5_MAX_LENGTH: usize = 256;

/// A VAE folder, or a VAE file (BFL's FLUX.1 `ae.safetensors`, an LDM VAE) read in place.
fn load_vae(ctx: &Context, path: &Path, family: Family) -> Result<Arc<Model>> {
    let vae = if path.is_file() { ctx.load_vae_file(path, Some(family))? } else { ctx.load_model(path)? };
    vae.as_vae()?;
    Ok(vae)
}

/// `t` `[1, ...]` repeated to `[b, ...]`.
fn repeat(t: &Tensor, b: usize) -> Result<Tensor> {
    let mut dims = vec![1usize; t.rank()];
    dims[0] = b;
    Ok(t.repeat(dims)?)
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::format(format!("{}: {e}", path.display())))
}

/// A text encoder given by flag: a folder (`text_encoder_2/`), or a T5 encoder stored alone in a file (a T5 GGUF, a
/// `t5xxl_*.safetensors`: [`Context::load_t5_file`]).
fn load_encoder(ctx: &Context, path: &Path) -> Result<Arc<Model>> {
    if path.is_file() {
        ctx.load_t5_file(path)
    } else {
        ctx.load_model(path)
    }
}
