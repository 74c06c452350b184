//! The UNet family's block partition: which streaming unit (a group of tensors fetched together, kept resident or
//! streamed as one) a checkpoint tensor belongs to.
//!
//! A unit is the deepest numbered child of a block list (`resnets.j`, `attentions.j`, `transformer_blocks.k`,
//! `downsamplers.0`, `upsamplers.0`), so an attention stack splits per `BasicTransformerBlock`: SDXL's 1280-channel
//! stacks (10 layers, 669 MiB fp16 as one unit) become 66 MiB units. For the SDXL base UNet that gives 118 units,
//! the largest `up_blocks.0.resnets.0` at 49.2 M parameters = 94 MiB fp16 (computed from diffusers' model built
//! from the shipped config.json on torch's meta device). What an attention keeps outside its layers is
//! two units, in the order the forward uses them: `attentions.j` (norm, proj_in) and `attentions.j.proj_out`, so
//! every unit is fetched exactly once per forward and never two at a time. Everything else is its top-level module
//! (`time_embedding`, `add_embedding`, `conv_in`, ...; under `encoder.`/`decoder.` one level deeper, for the VAE).

/// Containers whose numbered children are separate units.
const BLOCK_LISTS: &[&str] = &[
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
];

/// The unit of tensor `name` (a diffusers checkpoint name):
///
/// - `down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q.weight` → `down_blocks.2.attentions.0.transformer_blocks.3`
/// - `down_blocks.2.attentions.0.proj_in.weight` → `down_blocks.2.attentions.0`
/// - `down_blocks.2.attentions.0.proj_out.weight` → `down_blocks.2.attentions.0.proj_out`
/// - `down_blocks.0.resnets.1.conv1.weight` → `down_blocks.0.resnets.1`
/// - `add_embedding.linear_1.weight` → `add_embedding`
pub fn block_of(name: &str) -> &str {
    let parts: Vec<&str> = name.split('.').collect();
    // Byte offset of the end of each part.
    let mut ends = Vec::with_capacity(parts.len());
    let mut len = 0usize;
    for (i, part) in parts.iter().enumerate() {
        len += part.len() + usize::from(i > 0);
        ends.push(len);
    }
    let deepest = (1..parts.len())
        .rev()
        .find(|&i| BLOCK_LISTS.contains(&parts[i - 1]) && parts[i].parse::<usize>().is_ok());
    if let Some(i) = deepest {
        if parts[i - 1] == "attentions" && parts.get(i + 1) == Some(&"proj_out") && i + 2 < parts.len() {
            return &name[..ends[i + 1]];
        }
        return &name[..ends[i]];
    }
    let depth = if matches!(parts[0], "encoder" | "decoder") && parts.len() > 2 {
        2
    } else {
        1
    };
    &name[..ends[depth - 1]]
}

#[cfg(test)]
mod tests {
    use super::block_of;

    #[test]
    fn attention_stacks_split_per_layer() {
        let cases = [
            (
                "down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q.weight",
                "down_blocks.2.attentions.0.transformer_blocks.3",
            ),
            (
                "down_blocks.2.attentions.0.transformer_blocks.3.ff.net.0.proj.bias",
                "down_blocks.2.attentions.0.transformer_blocks.3",
            ),
            ("down_blocks.2.attentions.0.norm.weight", "down_blocks.2.attentions.0"),
            (
                "down_blocks.2.attentions.0.proj_in.weight",
                "down_blocks.2.attentions.0",
            ),
            (
                "down_blocks.2.attentions.0.proj_out.weight",
                "down_blocks.2.attentions.0.proj_out",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0.weight",
                "mid_block.attentions.0.transformer_blocks.9",
            ),
            (
                "up_blocks.0.attentions.2.proj_out.bias",
                "up_blocks.0.attentions.2.proj_out",
            ),
            ("down_blocks.0.resnets.1.conv1.weight", "down_blocks.0.resnets.1"),
            ("down_blocks.0.downsamplers.0.conv.bias", "down_blocks.0.downsamplers.0"),
            ("up_blocks.1.upsamplers.0.conv.weight", "up_blocks.1.upsamplers.0"),
            ("time_embedding.linear_1.weight", "time_embedding"),
            ("add_embedding.linear_2.bias", "add_embedding"),
            ("conv_in.weight", "conv_in"),
            ("conv_norm_out.bias", "conv_norm_out"),
            (
                "decoder.up_blocks.2.resnets.0.norm1.weight",
                "decoder.up_blocks.2.resnets.0",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid_block.attentions.0",
            ),
            ("decoder.conv_in.weight", "decoder.conv_in"),
            ("post_quant_conv.weight", "post_quant_conv"),
        ];
        for (name, unit) in cases {
            assert_eq!(block_of(name), unit, "{name}");
            assert_eq!(crate::weights::block_key(name), unit, "global block_key: {name}");
        }
    }
}
