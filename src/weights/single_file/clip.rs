//! Text encoders: LDM's `FrozenCLIPEmbedder` (a transformers `CLIPTextModel` under a prefix) and OpenCLIP text
//! towers → transformers CLIP names as the diffusers folders on the hub store them (`text_model.*`, plus
//! `text_projection.weight` for `CLIPTextModelWithProjection`).
//!
//! OpenCLIP rules (diffusers' `convert_open_clip_checkpoint`, `DIFFUSERS_TO_LDM_MAPPING["openclip"]`):
//! `transformer.resblocks.N` → `text_model.encoder.layers.N`, `ln_1/2` → `layer_norm1/2`, `mlp.c_fc/c_proj` →
//! `mlp.fc1/fc2`, `attn.out_proj` → `self_attn.out_proj`, `attn.in_proj_weight/bias` [3d, …] → three row slices
//! `q_proj/k_proj/v_proj`, `token_embedding` and `positional_embedding` → `embeddings.*`, `ln_final` →
//! `final_layer_norm`, `text_projection` [hidden, proj] → `text_projection.weight` [proj, hidden] (transposed).

use super::{StoredTensor, Target};

/// Which text-encoder layout a prefix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayout {
    /// transformers' CLIP names under a prefix (SD 1.x, SDXL's first encoder).
    Transformers,
    /// OpenCLIP text tower without projection in diffusers (SD 2.x: `CLIPTextModel`, 23 of 24 layers).
    OpenClipNoProjection,
    /// OpenCLIP text tower with projection (SDXL's bigG: `CLIPTextModelWithProjection`).
    OpenClipWithProjection,
}

/// A transformers CLIP key (prefix stripped). Old files store names without `text_model.`.
pub fn map_transformers(rel: &str, t: &StoredTensor) -> Option<Vec<Target>> {
    // CLIPTextModelWithProjection's own name (standalone encoder files).
    if rel == "text_projection.weight" && t.shape.len() == 2 {
        return Some(vec![Target::whole(rel.to_string(), t)]);
    }
    let rel = rel.strip_prefix("text_model.").unwrap_or(rel);
    let (module, leaf) = rel.rsplit_once('.')?;
    let ok = match module {
        "embeddings.token_embedding" | "embeddings.position_embedding" => leaf == "weight",
        "final_layer_norm" => leaf == "weight" || leaf == "bias",
        _ => {
            let (n, inner) = module.strip_prefix("encoder.layers.")?.split_once('.')?;
            n.parse::<usize>().ok()?;
            (leaf == "weight" || leaf == "bias")
                && matches!(
                    inner,
                    "self_attn.q_proj"
                        | "self_attn.k_proj"
                        | "self_attn.v_proj"
                        | "self_attn.out_proj"
                        | "layer_norm1"
                        | "layer_norm2"
                        | "mlp.fc1"
                        | "mlp.fc2"
                )
        }
    };
    ok.then(|| vec![Target::whole(format!("text_model.{rel}"), t)])
}

/// An OpenCLIP key (prefix stripped). `text_projection` is mapped only `with_projection`; the caller skips it
/// (and `logit_scale`) otherwise.
pub fn map_open_clip(rel: &str, t: &StoredTensor, with_projection: bool) -> Option<Vec<Target>> {
    let whole = |name: &str| Some(vec![Target::whole(name.to_string(), t)]);
    match rel {
        "token_embedding.weight" => return whole("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => return whole("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => return whole("text_model.final_layer_norm.weight"),
        "ln_final.bias" => return whole("text_model.final_layer_norm.bias"),
        "text_projection" if with_projection && t.shape.len() == 2 => {
            return Some(vec![Target::transposed("text_projection.weight".to_string(), t)])
        }
        _ => {}
    }
    let (n, inner) = rel.strip_prefix("transformer.resblocks.")?.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let layer = format!("text_model.encoder.layers.{n}");
    if let Some(leaf) = inner.strip_prefix("attn.in_proj_") {
        // q, k, v stacked along dim 0: three contiguous row ranges of the stored tensor.
        let rows = *t.shape.first()?;
        if (leaf != "weight" && leaf != "bias") || rows % 3 != 0 {
            return None;
        }
        let d = rows / 3;
        return Some(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(i, p)| Target::rows(format!("{layer}.self_attn.{p}.{leaf}"), t, i * d..(i + 1) * d))
                .collect(),
        );
    }
    let (module, leaf) = inner.rsplit_once('.')?;
    let to = match module {
        "attn.out_proj" => "self_attn.out_proj",
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        _ => return None,
    };
    (leaf == "weight" || leaf == "bias").then(|| vec![Target::whole(format!("{layer}.{to}.{leaf}"), t)])
}
