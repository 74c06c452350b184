//! FLUX transformer checkpoints → the internal BFL names (`double_blocks.N.img_attn.qkv.weight`, ...), read in place.
//!
//! - **BFL single files** (`flux1-dev.safetensors`, Comfy all-in-one files): BFL names, optionally under
//!   `model.diffusion_model.`; a Comfy file also carries `vae.*`, `text_encoders.clip_l.*` and
//!   `text_encoders.t5xxl.*`, which belong to other components ([`BflMap::others`]). Every other key must be a
//!   BFL transformer name, else an error names it.
//! - **diffusers `transformer/` folders**: diffusers names mapped to BFL ones by the inverse of diffusers'
//!   `convert_flux_transformer_checkpoint_to_diffusers` (../shared/MODELS.md §1.5). Fused tensors are several byte
//!   ranges read in order (concatenation along dim 0 of row-major tensors is concatenation of their bytes, also for
//!   quantised rows): `to_q | to_k | to_v` → `img_attn.qkv`, `add_{q,k,v}_proj` → `txt_attn.qkv`,
//!   `to_q | to_k | to_v | proj_mlp` → `single_blocks.N.linear1`, and `norm_out.linear`'s two halves swapped
//!   (diffusers' `AdaLayerNormContinuous` chunks (scale, shift), BFL (shift, scale)) → `final_layer.adaLN_modulation.1`.
//!   Keys no rule maps, and fused tensors with a part missing, are errors naming them.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;

use super::{read_header, StoredTensor};
use crate::error::{Error, Result};
use crate::weights::{shard_files, FilePart, TensorSpan};

/// The prefix of the transformer in BFL/Comfy single files.
pub const BFL_PREFIX: &str = "model.diffusion_model.";

/// Key prefixes of the other components of a Comfy all-in-one FLUX file.
pub const OTHER_COMPONENTS: [&str; 3] = ["vae.", "text_encoders.clip_l.", "text_encoders.t5xxl."];

/// The key that tells a FLUX transformer (diffusers' `CHECKPOINT_KEY_NAMES["flux"]`), without its prefix.
pub const DETECT_KEY: &str = "double_blocks.0.img_attn.norm.key_norm.scale";

/// One transformer tensor under its BFL name and where its bytes are, concatenated in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FluxTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub parts: Vec<FilePart>,
}

/// The mapping of a BFL-layout file.
#[derive(Debug, Clone)]
pub struct BflMap {
    /// The prefix the transformer's keys carry (`""` or [`BFL_PREFIX`]).
    pub prefix: &'static str,
    /// The transformer's tensors, sorted by name.
    pub tensors: Vec<FluxTensor>,
    /// Keys of other components (Comfy: VAE, CLIP-L, T5-XXL), left to their own mappings.
    pub others: Vec<String>,
}

impl BflMap {
    /// Name → shape of the transformer's tensors (for [`crate::models::flux::FluxConfig::from_bfl_shapes`]).
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
    }
}

/// Whether a file's keys are a FLUX transformer's (BFL layout, with or without the prefix).
pub fn is_flux(names: &[&str]) -> bool {
    names.iter().any(|n| *n == DETECT_KEY || n.strip_prefix(BFL_PREFIX) == Some(DETECT_KEY))
}

/// Whether `name` is a BFL transformer tensor name (any block number).
pub fn is_bfl_name(name: &str) -> bool {
    let p: Vec<&str> = name.split('.').collect();
    let wb = |s: &str| matches!(s, "weight" | "bias");
    let num = |s: &str| s.parse::<usize>().is_ok();
    match p.as_slice() {
        ["img_in" | "txt_in", x] => wb(x),
        ["time_in" | "vector_in" | "guidance_in", "in_layer" | "out_layer", x] => wb(x),
        ["final_layer", "linear", x] | ["final_layer", "adaLN_modulation", "1", x] => wb(x),
        ["double_blocks", n, s, rest @ ..] if num(n) => match (*s, rest) {
            ("img_mod" | "txt_mod", ["lin", x]) => wb(x),
            ("img_attn" | "txt_attn", ["qkv" | "proj", x]) => wb(x),
            ("img_attn" | "txt_attn", ["norm", "query_norm" | "key_norm", "scale"]) => true,
            ("img_mlp" | "txt_mlp", ["0" | "2", x]) => wb(x),
            _ => false,
        },
        ["single_blocks", n, rest @ ..] if num(n) => match rest {
            ["modulation", "lin", x] => wb(x),
            ["linear1" | "linear2", x] => wb(x),
            ["norm", "query_norm" | "key_norm", "scale"] => true,
            _ => false,
        },
        _ => false,
    }
}

fn dtype_of(t: &StoredTensor) -> Result<DType> {
    t.dtype.ok_or_else(|| {
        Error::unsupported(format!("tensor {}: unsupported dtype (supported: F32, F16, BF16, F8_E4M3)", t.name))
    })
}

/// Keys listed in an error: the first few and a count.
fn list(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    s
}

/// Map a BFL single file (see the module doc). `source` names the file in errors.
pub fn map_bfl(source: &str, stored: &[StoredTensor]) -> Result<BflMap> {
    let prefixed = stored.iter().any(|t| t.name.starts_with(BFL_PREFIX));
    let prefix = if prefixed { BFL_PREFIX } else { "" };
    let (mut tensors, mut others, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
    for t in stored {
        if OTHER_COMPONENTS.iter().any(|p| t.name.starts_with(p)) {
            others.push(t.name.clone());
            continue;
        }
        match t.name.strip_prefix(prefix).filter(|rel| is_bfl_name(rel)) {
            Some(rel) => tensors.push(FluxTensor {
                name: rel.to_string(),
                dtype: dtype_of(t)?,
                shape: t.shape.clone(),
                parts: vec![FilePart { file: 0, bytes: t.bytes.clone() }],
            }),
            None => unknown.push(t.name.clone()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::format(format!(
            "{source}: {} key(s) that are not FLUX transformer tensors (BFL names{}): {}",
            unknown.len(),
            if prefixed { " under model.diffusion_model." } else { "" },
            list(&unknown)
        )));
    }
    if tensors.is_empty() {
        return Err(Error::format(format!("{source}: no FLUX transformer tensors")));
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    others.sort();
    Ok(BflMap { prefix, tensors, others })
}

/// Where one diffusers tensor goes: the BFL target, its position among the target's parts, and (for the swapped
/// halves of `norm_out.linear`) which half of its rows: `Some(0)` first half, `Some(1)` second.
struct Slot {
    target: String,
    order: usize,
    half: Option<usize>,
}

/// The BFL target(s) of a diffusers FLUX transformer name (MODELS.md §1.5, inverted); None when no rule maps it.
fn diffusers_slots(name: &str) -> Option<Vec<Slot>> {
    let one = |t: String| Some(vec![Slot { target: t, order: 0, half: None }]);
    let at = |t: String, order: usize| Some(vec![Slot { target: t, order, half: None }]);
    let (stem, p) = name.rsplit_once('.')?;
    if !matches!(p, "weight" | "bias") {
        return None;
    }
    let embedders = [
        ("time_text_embed.timestep_embedder", "time_in"),
        ("time_text_embed.text_embedder", "vector_in"),
        ("time_text_embed.guidance_embedder", "guidance_in"),
    ];
    for (dif, bfl) in embedders {
        match stem.strip_prefix(dif) {
            Some(".linear_1") => return one(format!("{bfl}.in_layer.{p}")),
            Some(".linear_2") => return one(format!("{bfl}.out_layer.{p}")),
            _ => {}
        }
    }
    match stem {
        "context_embedder" => return one(format!("txt_in.{p}")),
        "x_embedder" => return one(format!("img_in.{p}")),
        "proj_out" => return one(format!("final_layer.linear.{p}")),
        // (scale, shift) in diffusers → (shift, scale): the second half first.
        "norm_out.linear" => {
            let t = format!("final_layer.adaLN_modulation.1.{p}");
            return Some(vec![
                Slot { target: t.clone(), order: 0, half: Some(1) },
                Slot { target: t, order: 1, half: Some(0) },
            ]);
        }
        _ => {}
    }
    let parts: Vec<&str> = stem.split('.').collect();
    match parts.as_slice() {
        ["transformer_blocks", n, rest @ ..] if n.parse::<usize>().is_ok() => {
            let b = format!("double_blocks.{n}");
            let scale = |s: &str| Some(vec![Slot { target: format!("{b}.{s}"), order: 0, half: None }]);
            match (rest, p) {
                (["norm1", "linear"], _) => one(format!("{b}.img_mod.lin.{p}")),
                (["norm1_context", "linear"], _) => one(format!("{b}.txt_mod.lin.{p}")),
                (["attn", "to_q"], _) => at(format!("{b}.img_attn.qkv.{p}"), 0),
                (["attn", "to_k"], _) => at(format!("{b}.img_attn.qkv.{p}"), 1),
                (["attn", "to_v"], _) => at(format!("{b}.img_attn.qkv.{p}"), 2),
                (["attn", "add_q_proj"], _) => at(format!("{b}.txt_attn.qkv.{p}"), 0),
                (["attn", "add_k_proj"], _) => at(format!("{b}.txt_attn.qkv.{p}"), 1),
                (["attn", "add_v_proj"], _) => at(format!("{b}.txt_attn.qkv.{p}"), 2),
                (["attn", "norm_q"], "weight") => scale("img_attn.norm.query_norm.scale"),
                (["attn", "norm_k"], "weight") => scale("img_attn.norm.key_norm.scale"),
                (["attn", "norm_added_q"], "weight") => scale("txt_attn.norm.query_norm.scale"),
                (["attn", "norm_added_k"], "weight") => scale("txt_attn.norm.key_norm.scale"),
                (["attn", "to_out", "0"], _) => one(format!("{b}.img_attn.proj.{p}")),
                (["attn", "to_add_out"], _) => one(format!("{b}.txt_attn.proj.{p}")),
                (["ff", "net", "0", "proj"], _) => one(format!("{b}.img_mlp.0.{p}")),
                (["ff", "net", "2"], _) => one(format!("{b}.img_mlp.2.{p}")),
                (["ff_context", "net", "0", "proj"], _) => one(format!("{b}.txt_mlp.0.{p}")),
                (["ff_context", "net", "2"], _) => one(format!("{b}.txt_mlp.2.{p}")),
                _ => None,
            }
        }
        ["single_transformer_blocks", n, rest @ ..] if n.parse::<usize>().is_ok() => {
            let b = format!("single_blocks.{n}");
            match (rest, p) {
                (["norm", "linear"], _) => one(format!("{b}.modulation.lin.{p}")),
                (["attn", "to_q"], _) => at(format!("{b}.linear1.{p}"), 0),
                (["attn", "to_k"], _) => at(format!("{b}.linear1.{p}"), 1),
                (["attn", "to_v"], _) => at(format!("{b}.linear1.{p}"), 2),
                (["proj_mlp"], _) => at(format!("{b}.linear1.{p}"), 3),
                (["attn", "norm_q"], "weight") => one(format!("{b}.norm.query_norm.scale")),
                (["attn", "norm_k"], "weight") => one(format!("{b}.norm.key_norm.scale")),
                (["proj_out"], _) => one(format!("{b}.linear2.{p}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// How many parts a fused BFL target has.
fn parts_of(target: &str) -> usize {
    if target.contains("_attn.qkv.") {
        3
    } else if target.contains(".linear1.") {
        4
    } else if target.starts_with("final_layer.adaLN_modulation.") {
        2
    } else {
        1
    }
}

impl FluxTensor {
    /// The span the weight store reads.
    pub fn span(&self) -> TensorSpan {
        TensorSpan {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            parts: self.parts.clone(),
            transposed: false,
        }
    }
}

/// The spans of a diffusers `transformer/` checkpoint under BFL names: `path` is its
/// `diffusion_pytorch_model.safetensors` or the shard index beside it (`….safetensors.index.json`, as FLUX.1's
/// 23.8 GB transformer ships). Open the store with the same path, these spans and [`crate::models::flux::block_of`]
/// (`ModelCache::load_model_as`, `WeightStore::open_with`).
pub fn diffusers_spans(path: &Path) -> Result<Vec<TensorSpan>> {
    let mut stored = Vec::new();
    for (i, file) in shard_files(path)?.iter().enumerate() {
        let (_, tensors) = read_header(file)?;
        stored.extend(tensors.into_iter().map(|t| (i, t)));
    }
    Ok(map_diffusers(&path.display().to_string(), &stored)?.iter().map(FluxTensor::span).collect())
}

/// The spans of a BFL single file's transformer (see [`map_bfl`]).
pub fn bfl_spans(path: &Path) -> Result<Vec<TensorSpan>> {
    let (_, tensors) = read_header(path)?;
    Ok(map_bfl(&path.display().to_string(), &tensors)?.tensors.iter().map(FluxTensor::span).collect())
}

/// The parts of one fused target by position: dtype, shape, bytes, and the diffusers name they come from.
type Parts = BTreeMap<usize, (DType, Vec<usize>, FilePart, String)>;

/// Map a diffusers `FluxTransformer2DModel` checkpoint (`stored[i].0` = index of the shard the tensor is in) to BFL
/// names (see the module doc). `source` names the checkpoint in errors.
pub fn map_diffusers(source: &str, stored: &[(usize, StoredTensor)]) -> Result<Vec<FluxTensor>> {
    let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (file, t) in stored {
        let Some(slots) = diffusers_slots(&t.name) else {
            unknown.push(t.name.clone());
            continue;
        };
        let dtype = dtype_of(t)?;
        for s in slots {
            let (shape, bytes) = match s.half {
                None => (t.shape.clone(), t.bytes.clone()),
                Some(h) => {
                    let rows = t.shape.first().copied().unwrap_or(0);
                    if rows % 2 == 1 || rows == 0 {
                        return Err(Error::format(format!(
                            "{source}: {} has {rows} rows, expected an even count",
                            t.name
                        )));
                    }
                    let half = t.bytes.len() / 2;
                    let mut shape = t.shape.clone();
                    shape[0] = rows / 2;
                    (shape, t.bytes.start + h * half..t.bytes.start + (h + 1) * half)
                }
            };
            let entry = groups.entry(s.target).or_default();
            if let Some(prev) = entry.insert(s.order, (dtype, shape, FilePart { file: *file, bytes }, t.name.clone())) {
                return Err(Error::format(format!("{source}: {} and {} map to the same tensor", prev.3, t.name)));
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::format(format!(
            "{source}: {} key(s) no FLUX transformer rule maps: {}",
            unknown.len(),
            list(&unknown)
        )));
    }
    let mut out = Vec::with_capacity(groups.len());
    for (target, parts) in groups {
        let want = parts_of(&target);
        if parts.len() != want || parts.keys().copied().ne(0..want) {
            let have: Vec<&str> = parts.values().map(|p| p.3.as_str()).collect();
            return Err(Error::format(format!(
                "{source}: {target} is made of {want} tensors, found only {}",
                have.join(", ")
            )));
        }
        let first = parts.values().next().map(|p| (p.0, p.1.clone())).unwrap_or((DType::F32, vec![]));
        let (dtype, mut shape) = first;
        let mut rows = 0;
        for (pd, ps, _, name) in parts.values() {
            if *pd != dtype || ps.get(1..) != shape.get(1..) {
                return Err(Error::format(format!(
                    "{source}: {name} ({pd:?} {ps:?}) does not stack with the other parts of {target} ({dtype:?} {shape:?})"
                )));
            }
            rows += ps.first().copied().unwrap_or(0);
        }
        if let Some(r) = shape.first_mut() {
            *r = rows;
        }
        out.push(FluxTensor { name: target, dtype, shape, parts: parts.into_values().map(|p| p.2).collect() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, shape: &[usize], at: usize) -> StoredTensor {
        let n: usize = shape.iter().product::<usize>() * 2;
        StoredTensor { name: name.into(), dtype: Some(DType::BF16), shape: shape.to_vec(), bytes: at..at + n }
    }

    #[test]
    fn bfl_names_are_recognised() {
        for n in [
            "img_in.weight",
            "guidance_in.out_layer.bias",
            "final_layer.adaLN_modulation.1.weight",
            "double_blocks.18.txt_attn.norm.query_norm.scale",
            "double_blocks.0.img_mlp.2.bias",
            "single_blocks.37.linear1.weight",
            "single_blocks.0.norm.key_norm.scale",
        ] {
            assert!(is_bfl_name(n), "{n}");
        }
        for n in ["double_blocks.x.img_mod.lin.weight", "single_blocks.0.linear3.weight", "img_in.scale", "foo"] {
            assert!(!is_bfl_name(n), "{n}");
        }
    }

    #[test]
    fn fused_parts_are_ordered_and_halves_swapped() {
        let stored = vec![
            (0, st("transformer_blocks.0.attn.to_v.weight", &[4, 4], 64)),
            (0, st("transformer_blocks.0.attn.to_q.weight", &[4, 4], 0)),
            (1, st("transformer_blocks.0.attn.to_k.weight", &[4, 4], 32)),
            (0, st("norm_out.linear.bias", &[8], 200)),
        ];
        let m = map_diffusers("t", &stored).unwrap();
        let qkv = m.iter().find(|t| t.name == "double_blocks.0.img_attn.qkv.weight").unwrap();
        assert_eq!(qkv.shape, vec![12, 4]);
        assert_eq!(
            qkv.parts,
            vec![
                FilePart { file: 0, bytes: 0..32 },
                FilePart { file: 1, bytes: 32..64 },
                FilePart { file: 0, bytes: 64..96 }
            ]
        );
        let ada = m.iter().find(|t| t.name == "final_layer.adaLN_modulation.1.bias").unwrap();
        assert_eq!(ada.parts, vec![FilePart { file: 0, bytes: 208..216 }, FilePart { file: 0, bytes: 200..208 }]);
        // A missing part and an unknown key are named.
        let e = map_diffusers("t", &stored[..2]).unwrap_err().to_string();
        assert!(e.contains("double_blocks.0.img_attn.qkv.weight") && e.contains("to_v"), "{e}");
        let mut bad = stored.clone();
        bad.push((0, st("transformer_blocks.0.attn.to_x.weight", &[4, 4], 300)));
        let e = map_diffusers("t", &bad).unwrap_err().to_string();
        assert!(e.contains("transformer_blocks.0.attn.to_x.weight"), "{e}");
    }
}
