//! Single-file checkpoints in the LDM/SGM layout (SD 1.x, SD 2.x, SDXL `.safetensors`): which family and
//! components a file holds, and a pure name mapping from its tensors to the diffusers names each component's model
//! uses. Nothing is rewritten: every mapped tensor is a byte range of the memory-mapped file (q/k/v of OpenCLIP's
//! fused `in_proj` are row ranges, i.e. contiguous byte ranges), plus a transpose flag for OpenCLIP's
//! `text_projection` and a reshape flag for the VAE's 1×1-conv attention weights.
//!
//! The rules are those of diffusers' `loaders/single_file_utils.py` (cited per module); keys no rule maps are an
//! error naming them, except the known extras listed in [`detect`] (EMA copies, schedule buffers, position ids,
//! `logit_scale`, ...), which are skipped and reported by [`SingleFile::skipped`].
//!
//! [`SingleFileMap`] is the mapping alone (from a header: names, dtypes, shapes, byte ranges); [`SingleFile`] is a
//! memory-mapped checkpoint with its map; [`ComponentFile`] is a VAE or text encoder stored alone.

mod clip;
mod component_file;
pub mod config;
pub mod detect;
pub mod flux;
mod unet;
mod vae;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

pub use clip::ClipLayout;
pub use component_file::ComponentFile;
pub use detect::Family;

/// A model component a single file may hold (the diffusers sub-folder names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `UNet2DConditionModel`.
    Unet,
    /// `AutoencoderKL`.
    Vae,
    /// The first (or only) text encoder: `CLIPTextModel`.
    TextEncoder,
    /// SDXL's second text encoder: `CLIPTextModelWithProjection` (OpenCLIP bigG); FLUX's T5 encoder.
    TextEncoder2,
    /// FLUX's `FluxTransformer2DModel` (BFL names internally).
    Transformer,
}

impl Component {
    /// Every component, in pipeline order.
    pub const ALL: [Component; 5] =
        [Component::Unet, Component::Transformer, Component::Vae, Component::TextEncoder, Component::TextEncoder2];

    /// The diffusers folder name (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Transformer => "transformer",
        }
    }

    /// Parse a diffusers folder name.
    pub fn from_name(name: &str) -> Result<Self> {
        Component::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            Error::invalid(format!("unknown component '{name}' (unet, transformer, vae, text_encoder, text_encoder_2)"))
        })
    }

    /// What a user passes when the file lacks this component (the CLI flag).
    fn missing_hint(self) -> &'static str {
        match self {
            Component::Unet => "no UNet in this file: pass a checkpoint that has one as --model",
            Component::Vae => "no VAE in this file: pass --vae",
            Component::TextEncoder => "no text encoder in this file: pass --text-encoder",
            Component::TextEncoder2 => "no second text encoder in this file: pass --text-encoder-2",
            Component::Transformer => "no FLUX transformer in this file: pass a checkpoint that has one as --model",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor as a safetensors header describes it: what the mapping works from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// Its name in the file.
    pub name: String,
    /// Its dtype; None for dtypes no model loads (I64 position ids, ...): fine for skipped extras only.
    pub dtype: Option<DType>,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Byte range of its data in the file.
    pub bytes: Range<usize>,
}

/// What one rule produces for one stored tensor (before byte ranges are resolved).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    name: String,
    shape: Vec<usize>,
    rows: Option<Range<usize>>,
    transpose: bool,
    reshape: bool,
}

impl Target {
    fn whole(name: String, t: &StoredTensor) -> Self {
        Target { name, shape: t.shape.clone(), rows: None, transpose: false, reshape: false }
    }
    fn reshaped(name: String, shape: Vec<usize>) -> Self {
        Target { name, shape, rows: None, transpose: false, reshape: true }
    }
    fn transposed(name: String, t: &StoredTensor) -> Self {
        Target { name, shape: t.shape.iter().rev().copied().collect(), rows: None, transpose: true, reshape: false }
    }
    fn rows(name: String, t: &StoredTensor, rows: Range<usize>) -> Self {
        let mut shape = t.shape.clone();
        shape[0] = rows.len();
        Target { name, shape, rows: Some(rows), transpose: false, reshape: false }
    }
}

/// One tensor of a component, as its model names it, and where its bytes are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// The diffusers/transformers name the model loads (`down_blocks.0.resnets.1.conv1.weight`).
    pub internal_name: String,
    /// The name in the file (`model.diffusion_model.input_blocks.2.0.in_layers.2.weight`).
    pub stored_name: String,
    /// The stored dtype (also the dtype [`SingleFile::read_tensor`] returns).
    pub dtype: DType,
    /// The shape the model expects.
    pub shape: Vec<usize>,
    /// The stored tensor's shape.
    pub stored_shape: Vec<usize>,
    /// A slice of dim 0 of the stored tensor (q/k/v out of OpenCLIP's `in_proj_weight`); None = all of it.
    pub rows: Option<Range<usize>>,
    /// The stored 2-D tensor is the transpose of what the model expects (OpenCLIP's `text_projection`).
    pub transpose: bool,
    /// Same bytes, different shape (LDM's 1×1-conv VAE attention weights read as linear).
    pub reshape: bool,
    /// Absolute byte range in the file of the stored bytes this entry reads (the row slice when `rows` is set).
    /// Contiguous and row-major; with `transpose`, the bytes of the stored (untransposed) tensor.
    pub bytes: Range<usize>,
}

/// The mapping of one component.
#[derive(Debug, Clone)]
pub struct ComponentMap {
    /// Which component.
    pub component: Component,
    /// The key prefix it was found under (`model.diffusion_model.`).
    pub prefix: &'static str,
    /// Entries sorted by `internal_name`.
    pub entries: Vec<MapEntry>,
}

impl ComponentMap {
    /// The entry for a model name.
    pub fn get(&self, internal_name: &str) -> Option<&MapEntry> {
        self.entries.binary_search_by(|e| e.internal_name.as_str().cmp(internal_name)).ok().map(|i| &self.entries[i])
    }
}

/// The mapping of a whole single file, from its tensor names, dtypes and shapes alone (no file access): family,
/// components, skipped extras and configs.
#[derive(Debug, Clone)]
pub struct SingleFileMap {
    source: String,
    family: Family,
    maps: BTreeMap<Component, ComponentMap>,
    skipped: Vec<String>,
    sidecar: Option<serde_json::Value>,
    config_dir: Option<PathBuf>,
}

/// An opened single-file checkpoint: memory-mapped, its keys mapped per component ([`SingleFileMap`]).
pub struct SingleFile {
    path: PathBuf,
    mmap: Mmap,
    map: SingleFileMap,
}

impl fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFile").field("path", &self.path).field("map", &self.map).finish()
    }
}

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F8_E4M3 => Some(DType::F8E4M3),
        _ => None,
    }
}

/// Keys listed in an error: the first few and a count.
fn list_keys(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    s
}

impl SingleFileMap {
    /// Map `tensors` (a safetensors header). `source` names the file in errors; `sidecar` is its LDM original
    /// config (see [`config`]); `config_dir` a diffusers folder giving the components' configs. Errors: keys no
    /// rule maps (named), an unknown family, two keys mapping to one name.
    pub fn new(
        source: &str,
        tensors: Vec<StoredTensor>,
        sidecar: Option<serde_json::Value>,
        config_dir: Option<&Path>,
    ) -> Result<Self> {
        let stored: BTreeMap<String, StoredTensor> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let family = detect::family(&stored).map_err(|e| Error::format(format!("{source}: {e}")))?;
        let (maps, skipped) = if family == Family::Flux {
            map_flux(source, &stored)?
        } else {
            map_all(&stored, family).map_err(|e| Error::format(format!("{source}: {e}")))?
        };
        Ok(SingleFileMap {
            source: source.to_string(),
            family,
            maps,
            skipped,
            sidecar,
            config_dir: config_dir.map(Path::to_path_buf),
        })
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The components present, in pipeline order.
    pub fn components(&self) -> Vec<Component> {
        self.maps.keys().copied().collect()
    }

    /// The components the family needs that this file lacks.
    pub fn missing(&self) -> Vec<Component> {
        self.family.components().iter().copied().filter(|c| !self.maps.contains_key(c)).collect()
    }

    /// The mapping of one component; a clear error naming what to pass when the file lacks it.
    pub fn component(&self, c: Component) -> Result<&ComponentMap> {
        self.maps.get(&c).ok_or_else(|| {
            Error::invalid(format!("{}: {} (a {} checkpoint)", self.source, c.missing_hint(), self.family))
        })
    }

    /// Stored names skipped as known extras (EMA copies, schedule buffers, position ids, ...).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The diffusers config of a component: from the config folder when one was given, else the family's
    /// standard config when the shapes match it, else derived from the shapes and the `.yaml` sidecar.
    pub fn config(&self, c: Component) -> Result<serde_json::Value> {
        let map = self.component(c)?;
        config::component_config(self, map)
    }

    /// The scheduler config (see [`config::scheduler_config`]); parse it with
    /// [`SchedulerConfig::from_value`](crate::sampling::SchedulerConfig::from_value).
    pub fn scheduler_config(&self) -> Result<serde_json::Value> {
        config::scheduler_config(self)
    }

    /// The scheduler's `prediction_type` (see [`config::prediction_type`]).
    pub fn prediction_type(&self) -> &'static str {
        config::prediction_type(self)
    }

    /// The file was trained with zero terminal SNR (a `ztsnr` marker key): diffusers'
    /// `rescale_betas_zero_snr: true` for its scheduler.
    pub fn zero_terminal_snr(&self) -> bool {
        self.has_marker("ztsnr")
    }

    pub(crate) fn has_marker(&self, name: &str) -> bool {
        self.skipped.iter().any(|k| k == name)
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn sidecar(&self) -> Option<&serde_json::Value> {
        self.sidecar.as_ref()
    }

    pub(crate) fn config_dir(&self) -> Option<&Path> {
        self.config_dir.as_deref()
    }
}

impl SingleFile {
    /// Open `path`, detect its family and map every key. A `<stem>.yaml` next to the file (the LDM "original
    /// config" A1111 and ComfyUI read) is used for what shapes cannot tell (head counts, v-prediction, VAE
    /// scale); see [`config`]. Errors: unreadable or corrupt file, keys no rule maps (named), unknown family.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_config(path, None)
    }

    /// Like [`open`](Self::open), with a diffusers folder whose `<component>/config.json` give the components'
    /// configs (diffusers' `from_single_file(config=...)`).
    pub fn open_with_config(path: &Path, config_dir: Option<&Path>) -> Result<Self> {
        let (mmap, tensors) = read_header(path)?;
        let sidecar = config::read_sidecar(path)?;
        let map = SingleFileMap::new(&path.display().to_string(), tensors, sidecar, config_dir)?;
        Ok(SingleFile { path: path.to_path_buf(), mmap, map })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapping.
    pub fn map(&self) -> &SingleFileMap {
        &self.map
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.map.family()
    }

    /// The components present, in pipeline order.
    pub fn components(&self) -> Vec<Component> {
        self.map.components()
    }

    /// The components the family needs that this file lacks.
    pub fn missing(&self) -> Vec<Component> {
        self.map.missing()
    }

    /// The mapping of one component; a clear error naming what to pass when the file lacks it
    /// ("no VAE in this file: pass --vae").
    pub fn component(&self, c: Component) -> Result<&ComponentMap> {
        self.map.component(c)
    }

    /// Stored names skipped as known extras.
    pub fn skipped(&self) -> &[String] {
        self.map.skipped()
    }

    /// The diffusers config of a component (see [`SingleFileMap::config`]).
    pub fn config(&self, c: Component) -> Result<serde_json::Value> {
        self.map.config(c)
    }

    /// The scheduler's `prediction_type`.
    pub fn prediction_type(&self) -> &'static str {
        self.map.prediction_type()
    }

    /// The scheduler config (see [`SingleFileMap::scheduler_config`]).
    pub fn scheduler_config(&self) -> Result<serde_json::Value> {
        self.map.scheduler_config()
    }

    /// Trained with zero terminal SNR (see [`SingleFileMap::zero_terminal_snr`]).
    pub fn zero_terminal_snr(&self) -> bool {
        self.map.zero_terminal_snr()
    }

    /// Every tensor of a component by its model name, read as [`read_tensor`](Self::read_tensor) does (CPU,
    /// stored dtype): for resident loading (`ResidentWeights::from_tensors`) and tests.
    pub fn read_component(&self, c: Component) -> Result<std::collections::HashMap<String, Tensor>> {
        let map = self.component(c)?;
        map.entries.iter().map(|e| Ok((e.internal_name.clone(), self.read_tensor(e)?))).collect()
    }

    /// Read one entry as a CPU tensor in the stored dtype, with its row slice, transpose and reshape applied
    /// (a copy: for tests and loaders that want a `Tensor`; streaming loaders read [`MapEntry::bytes`] of the
    /// mapped file).
    pub fn read_tensor(&self, e: &MapEntry) -> Result<Tensor> {
        read_entry(&self.mmap, &self.path, e)
    }
}

/// Which rules map a group of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rules {
    /// LDM UNet (`input_blocks`, ...); `sdxl` names `label_emb` the `text_time` add_embedding.
    Unet { sdxl: bool },
    /// LDM VAE (`encoder.down.i.block.j`, ...).
    Vae,
    /// A text encoder in one of the CLIP layouts.
    Clip(ClipLayout),
    /// Already diffusers/transformers names (a standalone component file in diffusers layout).
    Identity,
}

/// Map every key of the file: per component entries, plus the skipped extras. Unmapped keys are one error
/// listing them.
fn map_all(
    stored: &BTreeMap<String, StoredTensor>,
    family: Family,
) -> std::result::Result<(BTreeMap<Component, ComponentMap>, Vec<String>), String> {
    let mut groups: BTreeMap<Component, (&'static str, Rules, Vec<&StoredTensor>)> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut unmapped = Vec::new();
    for t in stored.values() {
        match detect::classify(&t.name) {
            detect::Class::Extra => skipped.push(t.name.clone()),
            detect::Class::Unknown => unmapped.push(t.name.clone()),
            detect::Class::Part { component, prefix, clip } => {
                let rules = match (component, clip) {
                    (_, Some(c)) => Rules::Clip(c),
                    (Component::Unet, None) => Rules::Unet { sdxl: family == Family::Sdxl },
                    _ => Rules::Vae,
                };
                groups.entry(component).or_insert((prefix, rules, Vec::new())).2.push(t);
            }
        }
    }
    let mut maps = BTreeMap::new();
    for (component, (prefix, rules, tensors)) in groups {
        let map = map_group(component, prefix, rules, &tensors, &mut unmapped)?;
        maps.insert(component, map);
    }
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(format!("{} key(s) no {family} single-file rule maps: {}", unmapped.len(), list_keys(&unmapped)));
    }
    Ok((maps, skipped))
}

/// Map a FLUX single file: the transformer's BFL keys ([`flux::map_bfl`]). A Comfy all-in-one file's other
/// components are mapped too: `vae.` (BFL's autoencoder in LDM names) and `text_encoders.clip_l.transformer.`
/// (CLIP-L in transformers' names); `text_encoders.t5xxl.` is listed with the skipped keys (T5 comes from
/// `--text-encoder-2`). Any other key is an error naming it.
#[allow(clippy::type_complexity)]
fn map_flux(source: &str, stored: &BTreeMap<String, StoredTensor>) -> Result<(BTreeMap<Component, ComponentMap>, Vec<String>)> {
    let list: Vec<StoredTensor> = stored.values().cloned().collect();
    let m = flux::map_bfl(source, &list)?;
    let mut entries: Vec<MapEntry> = m
        .tensors
        .iter()
        .map(|t| MapEntry {
            internal_name: t.name.clone(),
            stored_name: format!("{}{}", m.prefix, t.name),
            dtype: t.dtype,
            shape: t.shape.clone(),
            stored_shape: t.shape.clone(),
            rows: None,
            transpose: false,
            reshape: false,
            bytes: t.parts[0].bytes.clone(), // one part: a BFL tensor is stored whole
        })
        .collect();
    entries.sort_by(|a, b| a.internal_name.cmp(&b.internal_name));
    let map = ComponentMap { component: Component::Transformer, prefix: m.prefix, entries };
    let mut maps = BTreeMap::from([(Component::Transformer, map)]);
    const COMFY: [(&str, Component, Rules); 2] = [
        ("vae.", Component::Vae, Rules::Vae),
        ("text_encoders.clip_l.transformer.", Component::TextEncoder, Rules::Clip(ClipLayout::Transformers)),
    ];
    let (mut skipped, mut unmapped) = (Vec::new(), Vec::new());
    let mut groups: Vec<Vec<&StoredTensor>> = vec![Vec::new(); COMFY.len()];
    for name in &m.others {
        match COMFY.iter().position(|(prefix, _, _)| name.starts_with(prefix)) {
            Some(i) => groups[i].push(&stored[name]),
            None => skipped.push(name.clone()),
        }
    }
    for ((prefix, component, rules), tensors) in COMFY.into_iter().zip(groups) {
        if !tensors.is_empty() {
            let map = map_group(component, prefix, rules, &tensors, &mut unmapped)
                .map_err(|e| Error::format(format!("{source}: {e}")))?;
            maps.insert(component, map);
        }
    }
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(Error::format(format!(
            "{source}: {} key(s) no FLUX.1 single-file rule maps: {}",
            unmapped.len(),
            list_keys(&unmapped)
        )));
    }
    Ok((maps, skipped))
}

/// Map one component's keys (all under `prefix`) with `rules`; keys no rule maps go to `unmapped`.
fn map_group(
    component: Component,
    prefix: &'static str,
    rules: Rules,
    tensors: &[&StoredTensor],
    unmapped: &mut Vec<String>,
) -> std::result::Result<ComponentMap, String> {
    let rels: Vec<&str> = tensors.iter().map(|t| &t.name[prefix.len()..]).collect();
    let unet_layout =
        match rules {
            Rules::Unet { .. } => Some(unet::layout(&rels).ok_or_else(|| {
                "cannot read the UNet's layout from its keys (input_blocks/output_blocks)".to_string()
            })?),
            _ => None,
        };
    let vae_levels = if rules == Rules::Vae { vae::levels(&rels) } else { 0 };
    let mut entries = Vec::new();
    for (t, rel) in tensors.iter().zip(&rels) {
        let targets = match rules {
            Rules::Unet { sdxl } => unet_layout.and_then(|l| unet::map(rel, t, l, sdxl)),
            Rules::Vae => vae::map(rel, t, vae_levels),
            Rules::Clip(ClipLayout::Transformers) => clip::map_transformers(rel, t),
            Rules::Clip(ClipLayout::OpenClipNoProjection) => clip::map_open_clip(rel, t, false),
            Rules::Clip(ClipLayout::OpenClipWithProjection) => clip::map_open_clip(rel, t, true),
            Rules::Identity => Some(vec![Target::whole(rel.to_string(), t)]),
        };
        let Some(targets) = targets else {
            unmapped.push(t.name.clone());
            continue;
        };
        let Some(dtype) = t.dtype else {
            return Err(format!("tensor {}: unsupported dtype (supported: F32, F16, BF16, F8_E4M3)", t.name));
        };
        for tg in targets {
            let row_bytes = t.shape.iter().skip(1).product::<usize>() * dtype.size_in_bytes();
            let bytes = match &tg.rows {
                Some(r) => t.bytes.start + r.start * row_bytes..t.bytes.start + r.end * row_bytes,
                None => t.bytes.clone(),
            };
            entries.push(MapEntry {
                internal_name: tg.name,
                stored_name: t.name.clone(),
                dtype,
                shape: tg.shape,
                stored_shape: t.shape.clone(),
                rows: tg.rows,
                transpose: tg.transpose,
                reshape: tg.reshape,
                bytes,
            });
        }
    }
    entries.sort_by(|a, b| a.internal_name.cmp(&b.internal_name));
    if let Some(w) = entries.windows(2).find(|w| w[0].internal_name == w[1].internal_name) {
        return Err(format!("{} and {} both map to {}", w[0].stored_name, w[1].stored_name, w[0].internal_name));
    }
    Ok(ComponentMap { component, prefix, entries })
}

/// Memory-map a safetensors file and list its tensors.
fn read_header(path: &Path) -> Result<(Mmap, Vec<StoredTensor>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping; as every mmap-based loader, we rely on the file not being truncated while
    // mapped (documented for hosts).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::format(format!("{}: invalid safetensors: {e}", path.display())))?;
    let base = mmap.as_ptr() as usize;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let start = view.data().as_ptr() as usize - base;
            StoredTensor {
                name,
                dtype: dtype_of(view.dtype()),
                shape: view.shape().to_vec(),
                bytes: start..start + view.data().len(),
            }
        })
        .collect();
    drop(st);
    Ok((mmap, tensors))
}

/// One entry as a CPU tensor (row slice, transpose and reshape applied).
fn read_entry(mmap: &Mmap, path: &Path, e: &MapEntry) -> Result<Tensor> {
    let raw = mmap.get(e.bytes.clone()).ok_or_else(|| {
        Error::invalid(format!("{}: entry {} is not a range of this file", path.display(), e.internal_name))
    })?;
    if e.transpose {
        let t = Tensor::from_raw_buffer(raw, e.dtype, &e.stored_shape, &Device::Cpu)?;
        return Ok(t.t()?.contiguous()?);
    }
    Ok(Tensor::from_raw_buffer(raw, e.dtype, &e.shape, &Device::Cpu)?)
}
