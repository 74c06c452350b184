//! LDM VAE names (`first_stage_model.*` or `vae.*`, prefix stripped) → diffusers `AutoencoderKL` names.
//!
//! diffusers' `convert_ldm_vae_checkpoint`: `encoder.down.i.block.j` → `encoder.down_blocks.i.resnets.j`,
//! `decoder.up.k` → `decoder.up_blocks.(n−1−k)` (LDM numbers decoder levels from the lowest resolution),
//! `down/upsample.conv` → `down/upsamplers.0.conv`, `mid.block_1/2` → `mid_block.resnets.0/1`, `mid.attn_1` →
//! `mid_block.attentions.0` (`norm` → `group_norm`, `q/k/v` → `to_q/to_k/to_v`, `proj_out` → `to_out.0`, 1×1 conv
//! weights read as linear: a reshape of the same bytes), `nin_shortcut` → `conv_shortcut`, `norm_out` →
//! `conv_norm_out`.

use super::{StoredTensor, Target};

/// Decoder levels in the file (`decoder.up.k`), needed to reverse their order.
pub fn levels(keys: &[&str]) -> usize {
    keys.iter()
        .filter_map(|k| k.strip_prefix("decoder.up.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

fn resnet(rest: &str) -> Option<String> {
    let (module, leaf) = rest.rsplit_once('.')?;
    let module = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    leaf_only(leaf).then(|| format!("{module}.{leaf}"))
}

fn leaf_only(leaf: &str) -> bool {
    leaf == "weight" || leaf == "bias"
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// The diffusers name (and reshape) of one VAE key; None when no rule maps it. `levels` = decoder levels.
pub fn map(rel: &str, t: &StoredTensor, levels: usize) -> Option<Vec<Target>> {
    let (side, rest) = rel.split_once('.')?;
    match side {
        "encoder" | "decoder" => {}
        "quant_conv" | "post_quant_conv" => return leaf_only(rest).then(|| vec![Target::whole(rel.to_string(), t)]),
        _ => return None,
    }
    let name = if let Some(r) = rest.strip_prefix("down.").filter(|_| side == "encoder") {
        let (i, r) = split_index(r)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_index(r)?;
            format!("encoder.down_blocks.{i}.resnets.{j}.{}", resnet(r)?)
        } else {
            let leaf = r.strip_prefix("downsample.conv.").filter(|l| leaf_only(l))?;
            format!("encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}")
        }
    } else if let Some(r) = rest.strip_prefix("up.").filter(|_| side == "decoder") {
        let (k, r) = split_index(r)?;
        let i = levels.checked_sub(k + 1)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_index(r)?;
            format!("decoder.up_blocks.{i}.resnets.{j}.{}", resnet(r)?)
        } else {
            let leaf = r.strip_prefix("upsample.conv.").filter(|l| leaf_only(l))?;
            format!("decoder.up_blocks.{i}.upsamplers.0.conv.{leaf}")
        }
    } else if let Some(r) = rest.strip_prefix("mid.block_") {
        let (n, r) = split_index(r)?;
        if !(1..=2).contains(&n) {
            return None;
        }
        format!("{side}.mid_block.resnets.{}.{}", n - 1, resnet(r)?)
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (module, leaf) = r.rsplit_once('.')?;
        let to = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        if !leaf_only(leaf) {
            return None;
        }
        let name = format!("{side}.mid_block.attentions.0.{to}.{leaf}");
        // LDM's attention projections are 1x1 convs ([C, C, 1, 1], or [C, C, 1]); diffusers' are linear [C, C].
        if to != "group_norm" && leaf == "weight" && t.shape.len() > 2 {
            if t.shape[2..].iter().any(|&d| d != 1) {
                return None;
            }
            return Some(vec![Target::reshaped(name, t.shape[..2].to_vec())]);
        }
        name
    } else {
        let (module, leaf) = rest.rsplit_once('.')?;
        let module = match module {
            "conv_in" | "conv_out" => module,
            "norm_out" => "conv_norm_out",
            _ => return None,
        };
        if !leaf_only(leaf) {
            return None;
        }
        format!("{side}.{module}.{leaf}")
    };
    Some(vec![Target::whole(name, t)])
}
