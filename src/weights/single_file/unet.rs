//! LDM/SGM UNet names (`model.diffusion_model.*`, prefix stripped) → diffusers `UNet2DConditionModel` names.
//!
//! The rules are diffusers' `convert_ldm_unet_checkpoint` (loaders/single_file_utils.py), written per key instead
//! of per block: `input_blocks.i` (i ≥ 1) is level b = (i−1)/(L+1), layer j = (i−1)%(L+1), where L =
//! `layers_per_block`; `output_blocks.i` is level i/(L+1), layer i%(L+1); `middle_block.0/1/2` are resnet,
//! attention, resnet. Attention internals keep their names.

use std::collections::BTreeSet;

use super::{StoredTensor, Target};

/// What the mapping needs to know about the UNet's layout, read from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down level (`layers_per_block`).
    pub layers_per_block: usize,
    /// Resolution levels.
    pub levels: usize,
}

/// Read L and the level count from the keys: the first downsampler sits at `input_blocks.(L+1).0.op`, and every
/// level has L+1 output blocks.
pub fn layout(keys: &[&str]) -> Option<UnetLayout> {
    let mut inputs = BTreeSet::new();
    let mut outputs = BTreeSet::new();
    let mut first_op = None::<usize>;
    for k in keys {
        let p: Vec<&str> = k.split('.').collect();
        if p.len() < 3 {
            continue;
        }
        let Ok(i) = p[1].parse::<usize>() else {
            continue;
        };
        match p[0] {
            "input_blocks" => {
                inputs.insert(i);
                if p[2] == "0" && p.get(3) == Some(&"op") {
                    first_op = Some(first_op.map_or(i, |f| f.min(i)));
                }
            }
            "output_blocks" => {
                outputs.insert(i);
            }
            _ => {}
        }
    }
    let max_in = *inputs.iter().next_back()?;
    let layers_per_block = match first_op {
        Some(op) if op >= 2 => op - 1,
        Some(_) => return None,
        None => max_in,
    };
    let levels = outputs.len() / (layers_per_block + 1);
    if levels == 0 || outputs.len() % (layers_per_block + 1) != 0 {
        return None;
    }
    Some(UnetLayout { layers_per_block, levels })
}

fn resnet(rest: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    RENAMES.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|leaf| format!("{to}{leaf}")))
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// The diffusers name of one UNet key, or None when no rule maps it. `add_embedding` names `label_emb` as SDXL's
/// `text_time` embedding; otherwise it is a `class_embedding` (diffusers' "projection" models).
pub fn map(rel: &str, t: &StoredTensor, layout: UnetLayout, add_embedding: bool) -> Option<Vec<Target>> {
    let l = layout.layers_per_block;
    let name = map_name(rel, l, add_embedding)?;
    Some(vec![Target::whole(name, t)])
}

fn map_name(rel: &str, l: usize, add_embedding: bool) -> Option<String> {
    const FIXED: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in FIXED {
        if let Some(leaf) = rel.strip_prefix(from) {
            return leaf_only(leaf).then(|| format!("{to}{leaf}"));
        }
    }
    let emb = if add_embedding { "add_embedding" } else { "class_embedding" };
    if let Some(leaf) = rel.strip_prefix("label_emb.0.0.") {
        return leaf_only(leaf).then(|| format!("{emb}.linear_1.{leaf}"));
    }
    if let Some(leaf) = rel.strip_prefix("label_emb.0.2.") {
        return leaf_only(leaf).then(|| format!("{emb}.linear_2.{leaf}"));
    }
    if let Some(rest) = rel.strip_prefix("input_blocks.") {
        let (i, rest) = split_index(rest)?;
        if i == 0 {
            return None;
        }
        let (b, j) = ((i - 1) / (l + 1), (i - 1) % (l + 1));
        let (sub, rest) = split_index(rest)?;
        return match sub {
            0 => match rest.strip_prefix("op.") {
                Some(leaf) => {
                    (j == l && leaf_only(leaf)).then(|| format!("down_blocks.{b}.downsamplers.0.conv.{leaf}"))
                }
                None => (j < l).then(|| resnet(rest).map(|r| format!("down_blocks.{b}.resnets.{j}.{r}")))?,
            },
            1 if j < l && attention(rest) => Some(format!("down_blocks.{b}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = rel.strip_prefix("middle_block.") {
        let (i, rest) = split_index(rest)?;
        return match i {
            0 | 2 => resnet(rest).map(|r| format!("mid_block.resnets.{}.{r}", i / 2)),
            1 if attention(rest) => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = rel.strip_prefix("output_blocks.") {
        let (i, rest) = split_index(rest)?;
        let (b, j) = (i / (l + 1), i % (l + 1));
        let (sub, rest) = split_index(rest)?;
        // `.1.conv` is the upsampler of a level without attention; `.2.conv` the one after an attention.
        if let Some(leaf) = rest.strip_prefix("conv.") {
            if (sub == 1 || sub == 2) && j == l && leaf_only(leaf) {
                return Some(format!("up_blocks.{b}.upsamplers.0.conv.{leaf}"));
            }
        }
        return match sub {
            0 => resnet(rest).map(|r| format!("up_blocks.{b}.resnets.{j}.{r}")),
            1 if attention(rest) => Some(format!("up_blocks.{b}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    None
}

/// `weight` or `bias` alone (no deeper module path).
fn leaf_only(leaf: &str) -> bool {
    leaf == "weight" || leaf == "bias"
}

/// A `SpatialTransformer` parameter (same names in LDM and diffusers): `norm`, `proj_in`, `proj_out`, or
/// `transformer_blocks.k.{norm1..3, attn1/attn2.{to_q,to_k,to_v,to_out.0}, ff.net.0.proj, ff.net.2}`.
fn attention(rest: &str) -> bool {
    let Some((module, leaf)) = rest.rsplit_once('.') else {
        return false;
    };
    if !leaf_only(leaf) {
        return false;
    }
    if matches!(module, "norm" | "proj_in" | "proj_out") {
        return true;
    }
    let Some((k, inner)) = module.strip_prefix("transformer_blocks.").and_then(|r| r.split_once('.')) else {
        return false;
    };
    k.parse::<usize>().is_ok()
        && matches!(
            inner,
            "norm1"
                | "norm2"
                | "norm3"
                | "ff.net.0.proj"
                | "ff.net.2"
                | "attn1.to_q"
                | "attn1.to_k"
                | "attn1.to_v"
                | "attn1.to_out.0"
                | "attn2.to_q"
                | "attn2.to_k"
                | "attn2.to_v"
                | "attn2.to_out.0"
        )
}
