//! The streaming units of a CLIP text encoder: the embeddings, each encoder layer, the final LayerNorm and the
//! projection. One layer is 13.5 MiB fp16 for CLIP-L, 37.5 MiB for bigG; the embeddings (token table) are the largest
//! unit (76 / 126 MiB fp16).

/// The block a CLIP text-encoder tensor belongs to, for both key layouts (`text_model.`-prefixed as in the hub's
/// folders, bare as transformers 5 saves `CLIPTextModel`):
/// `text_model.embeddings.token_embedding.weight` → `text_model.embeddings`,
/// `text_model.encoder.layers.3.mlp.fc1.weight` → `text_model.encoder.layers.3`,
/// `text_model.final_layer_norm.weight` → `text_model.final_layer_norm`, `text_projection.weight` →
/// `text_projection`. Other names map to their top-level module (`logit_scale` → `logit_scale`).
pub fn block_of(name: &str) -> &str {
    let body = name.strip_prefix("text_model.").unwrap_or(name);
    let offset = name.len() - body.len();
    let parts: Vec<&str> = body.split('.').collect();
    let take = if parts.len() > 3 && parts[0] == "encoder" && parts[1] == "layers" && parts[2].parse::<usize>().is_ok()
    {
        3
    } else {
        1
    };
    let len = parts[..take.min(parts.len())].iter().map(|p| p.len()).sum::<usize>() + take.min(parts.len()) - 1;
    &name[..offset + len]
}

#[cfg(test)]
mod tests {
    use super::block_of;

    #[test]
    fn clip_keys_split_per_layer_in_both_layouts() {
        for p in ["text_model.", ""] {
            assert_eq!(
                block_of(&format!("{p}embeddings.token_embedding.weight")),
                format!("{p}embeddings")
            );
            assert_eq!(
                block_of(&format!("{p}embeddings.position_ids")),
                format!("{p}embeddings")
            );
            assert_eq!(
                block_of(&format!("{p}encoder.layers.0.self_attn.q_proj.weight")),
                format!("{p}encoder.layers.0")
            );
            assert_eq!(
                block_of(&format!("{p}encoder.layers.31.mlp.fc2.bias")),
                format!("{p}encoder.layers.31")
            );
            assert_eq!(
                block_of(&format!("{p}final_layer_norm.weight")),
                format!("{p}final_layer_norm")
            );
        }
        assert_eq!(block_of("text_projection.weight"), "text_projection");
        assert_eq!(block_of("logit_scale"), "logit_scale");
        // The global rule of the weight store agrees on every CLIP key (until the store takes a family's rule).
        for name in [
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.7.layer_norm1.bias",
            "text_model.final_layer_norm.bias",
            "embeddings.position_embedding.weight",
            "encoder.layers.2.self_attn.out_proj.weight",
            "final_layer_norm.weight",
            "text_projection.weight",
        ] {
            assert_eq!(crate::weights::block_key(name), block_of(name), "{name}");
        }
    }
}
