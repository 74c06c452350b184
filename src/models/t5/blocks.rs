//! The streaming units of a T5 encoder: the token table, each encoder block, the final norm. At T5-XXL size one block
//! is 192.9 M parameters = 368 MiB bf16 (195 MiB Q8_0), under the 512 MiB unit bound; the token table (`shared`,
//! 32128 × 4096) is 251 MiB bf16.

/// The block a T5 checkpoint tensor belongs to: `encoder.block.N.…` → `encoder.block.N` (likewise
/// `decoder.block.N` in a full seq2seq file, which the encoder does not read), `encoder.final_layer_norm.weight` →
/// `encoder.final_layer_norm`, `encoder.embed_tokens.weight` → `encoder.embed_tokens`, any other name its top-level
/// module (`shared.weight` → `shared`, `lm_head.weight` → `lm_head`).
pub fn block_of(name: &str) -> &str {
    let parts: Vec<&str> = name.split('.').collect();
    let take = match parts.as_slice() {
        ["encoder" | "decoder", "block", n, _, ..] if n.parse::<usize>().is_ok() => 3,
        ["encoder" | "decoder", _, _, ..] => 2,
        _ => 1,
    };
    let len = parts[..take].iter().map(|p| p.len()).sum::<usize>() + take - 1;
    &name[..len]
}

#[cfg(test)]
mod tests {
    use super::block_of;

    #[test]
    fn t5_keys_split_per_block() {
        for (name, block) in [
            ("shared.weight", "shared"),
            ("encoder.embed_tokens.weight", "encoder.embed_tokens"),
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.block.0"),
            ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0"),
            ("encoder.block.23.layer.1.DenseReluDense.wo.weight", "encoder.block.23"),
            ("encoder.final_layer_norm.weight", "encoder.final_layer_norm"),
            ("decoder.block.2.layer.2.layer_norm.weight", "decoder.block.2"),
            ("lm_head.weight", "lm_head"),
            ("encoder.block", "encoder"),
            ("weird", "weird"),
        ] {
            assert_eq!(block_of(name), block, "{name}");
        }
        // The generic rule would put all 24 blocks (9 GB bf16) in one unit.
        assert_eq!(crate::weights::block_key("encoder.block.3.layer.0.SelfAttention.q.weight"), "encoder.block");
    }
}
