//! A VAE or text encoder stored alone in a file (`--vae FILE`, `--text-encoder FILE`): an LDM VAE (bare keys as
//! `vae-ft-mse-840000` ships, or under `first_stage_model.`/`vae.`), a VAE already in diffusers layout, a
//! transformers CLIP text model (`text_model.*`, as ComfyUI's `clip_l`/`clip_g` files), or an OpenCLIP text tower
//! (`transformer.resblocks.N`), bare or under the single-file prefixes. Same rules and entries as [`SingleFile`](super::SingleFile).

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use memmap2::Mmap;

use super::StoredTensor;
use super::{list_keys, map_group, read_entry, read_header, ClipLayout, Component, ComponentMap, MapEntry, Rules};
use crate::error::{Error, Result};

/// Map the header of a file holding one component alone (`--vae` / `--text-encoder` given a file): an LDM VAE
/// (`encoder.down.0.block.0...`, bare or under `first_stage_model.`/`vae.`), a VAE already in diffusers layout,
/// a transformers CLIP text model (`text_model.*`, + `text_projection.weight`), or an OpenCLIP text tower
/// (`transformer.resblocks.N...`), bare or under the single-file prefixes.
fn map_component_file(
    component: Component,
    tensors: &[StoredTensor],
) -> std::result::Result<(ComponentMap, Vec<String>), String> {
    let prefixes: &[&'static str] = match component {
        Component::Unet => {
            return Err("a UNet alone is read as a checkpoint (model.diffusion_model.*): open it as the model".into())
        }
        Component::Vae => &["first_stage_model.", "vae.", ""],
        Component::TextEncoder | Component::TextEncoder2 => &[
            "cond_stage_model.transformer.",
            "cond_stage_model.model.",
            "conditioner.embedders.0.transformer.",
            "conditioner.embedders.1.model.",
            "",
        ],
    };
    let open_clip = tensors.iter().any(|t| t.name.contains("transformer.resblocks."));
    let mut skipped = Vec::new();
    let mut kept = Vec::new();
    for t in tensors {
        let leaf = t.name.rsplit('.').next().unwrap_or("");
        let extra = t.name.starts_with("model_ema.")
            || t.name.ends_with("position_ids")
            || leaf == "logit_scale"
            // An OpenCLIP tower as the only text encoder is SD 2's: no projection, and the 24th resblock dropped
            // as diffusers drops it (see `detect::is_extra`).
            || (open_clip
                && component == Component::TextEncoder
                && (leaf == "text_projection" || t.name.contains("transformer.resblocks.23.")));
        if extra {
            skipped.push(t.name.clone());
        } else {
            kept.push(t);
        }
    }
    // The prefix most keys are under (bare when none is used); keys outside it are reported as unmapped.
    let under = |p: &str| kept.iter().filter(|t| t.name.starts_with(p)).count();
    let prefix =
        prefixes.iter().copied().filter(|p| !p.is_empty() && under(p) > 0).max_by_key(|p| under(p)).unwrap_or("");
    let mut unmapped: Vec<String> =
        kept.iter().filter(|t| !t.name.starts_with(prefix)).map(|t| t.name.clone()).collect();
    kept.retain(|t| t.name.starts_with(prefix));
    let rels = || kept.iter().map(|t| &t.name[prefix.len()..]);
    let rules = match component {
        Component::Vae
            if rels().any(|r| r.starts_with("encoder.down_blocks.") || r.starts_with("decoder.up_blocks.")) =>
        {
            Rules::Identity
        }
        Component::Vae => Rules::Vae,
        _ if open_clip => Rules::Clip(if component == Component::TextEncoder2 {
            ClipLayout::OpenClipWithProjection
        } else {
            ClipLayout::OpenClipNoProjection
        }),
        _ => Rules::Clip(ClipLayout::Transformers),
    };
    let map = map_group(component, prefix, rules, &kept, &mut unmapped)?;
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(format!("{} key(s) no {component} rule maps: {}", unmapped.len(), list_keys(&unmapped)));
    }
    Ok((map, skipped))
}

/// One component stored alone in a file: a VAE or text encoder passed as `--vae FILE` / `--text-encoder FILE`
/// (LDM, OpenCLIP or diffusers/transformers layout), memory-mapped and mapped to the model's names.
pub struct ComponentFile {
    path: PathBuf,
    mmap: Mmap,
    map: ComponentMap,
    skipped: Vec<String>,
}

impl fmt::Debug for ComponentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComponentFile")
            .field("path", &self.path)
            .field("component", &self.map.component)
            .field("entries", &self.map.entries.len())
            .finish()
    }
}

impl ComponentFile {
    /// Open `path` as `component`. Errors: unreadable or corrupt file, keys no rule maps (named), a UNet (open
    /// those with [`SingleFile::open`](super::SingleFile::open)).
    pub fn open(path: &Path, component: Component) -> Result<Self> {
        let (mmap, tensors) = read_header(path)?;
        let (map, skipped) =
            map_component_file(component, &tensors).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        Ok(ComponentFile { path: path.to_path_buf(), mmap, map, skipped })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapping.
    pub fn map(&self) -> &ComponentMap {
        &self.map
    }

    /// Stored names skipped as known extras (position ids, `logit_scale`, EMA copies).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Read one entry (see [`SingleFile::read_tensor`](super::SingleFile::read_tensor)).
    pub fn read_tensor(&self, e: &MapEntry) -> Result<Tensor> {
        read_entry(&self.mmap, &self.path, e)
    }

    /// Every tensor by its model name (see [`SingleFile::read_component`](super::SingleFile::read_component)).
    pub fn read_all(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.map.entries.iter().map(|e| Ok((e.internal_name.clone(), self.read_tensor(e)?))).collect()
    }
}
