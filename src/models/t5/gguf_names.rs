//! T5 encoder tensor names in GGUF files (llama.cpp's `t5encoder` architecture, as written by llama.cpp's converter
//! and read by ComfyUI-GGUF through its `T5_SD_MAP`) ↔ transformers' `T5EncoderModel` names, the internal layout.
//!
//! | GGUF | transformers |
//! |---|---|
//! | `token_embd.weight` | `shared.weight` |
//! | `enc.blk.N.attn_norm.weight` | `encoder.block.N.layer.0.layer_norm.weight` |
//! | `enc.blk.N.attn_{q,k,v,o}.weight` | `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight` |
//! | `enc.blk.N.attn_rel_b.weight` | `encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight` |
//! | `enc.blk.N.ffn_norm.weight` | `encoder.block.N.layer.1.layer_norm.weight` |
//! | `enc.blk.N.ffn_gate.weight` | `encoder.block.N.layer.1.DenseReluDense.wi_0.weight` |
//! | `enc.blk.N.ffn_up.weight` | `encoder.block.N.layer.1.DenseReluDense.wi_1.weight` (gated), `…wi.weight` (v1.0) |
//! | `enc.blk.N.ffn_down.weight` | `encoder.block.N.layer.1.DenseReluDense.wo.weight` |
//! | `enc.output_norm.weight` | `encoder.final_layer_norm.weight` |
//!
//! A v1.0 (ungated) file has `ffn_up` without `ffn_gate`: llama.cpp's converter writes `wi` as `ffn_up`
//! (`gguf-py` `tensor_mapping.py`: `encoder.block.{bid}.layer.1.DenseReluDense.wi` → `ENC_FFN_UP`), so the mapping
//! needs to know whether the file is gated ([`gguf_to_transformers`]'s `gated`). Names it does not know (the
//! `output.weight` LM head some files carry, decoder tensors) map to `None`: the encoder does not read them.

/// The sub-module names of one encoder block: (GGUF suffix, transformers suffix for a gated FF, for an ungated FF).
const BLOCK_TENSORS: [(&str, &str, &str); 10] = [
    ("attn_norm", "layer.0.layer_norm", "layer.0.layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o", "layer.0.SelfAttention.o"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_norm", "layer.1.layer_norm", "layer.1.layer_norm"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0", ""),
    ("ffn_up", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wi"),
    ("ffn_down", "layer.1.DenseReluDense.wo", "layer.1.DenseReluDense.wo"),
];

/// The transformers name of a GGUF T5 encoder tensor (`enc.blk.3.ffn_gate.weight` →
/// `encoder.block.3.layer.1.DenseReluDense.wi_0.weight`), or `None` for a name the encoder does not read. `gated`:
/// the file has `ffn_gate` tensors (T5 v1.1); otherwise `ffn_up` is v1.0's single `wi`.
pub fn gguf_to_transformers(name: &str, gated: bool) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" {
        return None;
    }
    match stem {
        "token_embd" => return Some("shared.weight".into()),
        "enc.output_norm" => return Some("encoder.final_layer_norm.weight".into()),
        _ => {}
    }
    let rest = stem.strip_prefix("enc.blk.")?;
    let (index, tensor) = rest.split_once('.')?;
    // A canonical block number only ("03" or "+3" would alias another block).
    let n: usize = index.parse().ok().filter(|n: &usize| n.to_string() == index)?;
    let (_, g, u) = BLOCK_TENSORS.iter().find(|(gguf, _, _)| *gguf == tensor)?;
    let to = if gated { g } else { u };
    (!to.is_empty()).then(|| format!("encoder.block.{n}.{to}.weight"))
}

/// The GGUF name of a transformers T5 encoder tensor: the inverse of [`gguf_to_transformers`] (`encoder.embed_tokens`,
/// the tied copy of `shared`, maps to `token_embd` too).
pub fn transformers_to_gguf(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".weight")?;
    match stem {
        "shared" | "encoder.embed_tokens" => return Some("token_embd.weight".into()),
        "encoder.final_layer_norm" => return Some("enc.output_norm.weight".into()),
        _ => {}
    }
    let rest = stem.strip_prefix("encoder.block.")?;
    let (index, tensor) = rest.split_once('.')?;
    let n: usize = index.parse().ok().filter(|n: &usize| n.to_string() == index)?;
    let (gguf, _, _) = BLOCK_TENSORS.iter().find(|(_, g, u)| *g == tensor || (!u.is_empty() && *u == tensor))?;
    Some(format!("enc.blk.{n}.{gguf}.weight"))
}

/// Whether a GGUF T5 file's FF is gated (v1.1): it has any `ffn_gate` tensor.
pub fn gguf_is_gated<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    names.into_iter().any(|n| n.starts_with("enc.blk.") && n.ends_with(".ffn_gate.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_tensor_maps_like_comfyui_gguf() {
        let cases = [
            ("token_embd.weight", "shared.weight"),
            ("enc.output_norm.weight", "encoder.final_layer_norm.weight"),
            ("enc.blk.0.attn_norm.weight", "encoder.block.0.layer.0.layer_norm.weight"),
            ("enc.blk.0.attn_q.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
            ("enc.blk.7.attn_k.weight", "encoder.block.7.layer.0.SelfAttention.k.weight"),
            ("enc.blk.12.attn_v.weight", "encoder.block.12.layer.0.SelfAttention.v.weight"),
            ("enc.blk.23.attn_o.weight", "encoder.block.23.layer.0.SelfAttention.o.weight"),
            ("enc.blk.0.attn_rel_b.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            ("enc.blk.5.ffn_norm.weight", "encoder.block.5.layer.1.layer_norm.weight"),
            ("enc.blk.5.ffn_gate.weight", "encoder.block.5.layer.1.DenseReluDense.wi_0.weight"),
            ("enc.blk.5.ffn_up.weight", "encoder.block.5.layer.1.DenseReluDense.wi_1.weight"),
            ("enc.blk.5.ffn_down.weight", "encoder.block.5.layer.1.DenseReluDense.wo.weight"),
        ];
        for (gguf, hf) in cases {
            assert_eq!(gguf_to_transformers(gguf, true).as_deref(), Some(hf), "{gguf}");
            assert_eq!(transformers_to_gguf(hf).as_deref(), Some(gguf), "{hf}");
            assert_eq!(comfy_t5_sd_map(gguf), hf, "ComfyUI-GGUF's substring rules agree on {gguf}");
        }
        // v1.0: `ffn_up` is the single `wi`, and there is no gate.
        assert_eq!(
            gguf_to_transformers("enc.blk.1.ffn_up.weight", false).as_deref(),
            Some("encoder.block.1.layer.1.DenseReluDense.wi.weight")
        );
        assert_eq!(gguf_to_transformers("enc.blk.1.ffn_gate.weight", false), None);
        assert_eq!(
            transformers_to_gguf("encoder.block.1.layer.1.DenseReluDense.wi.weight").as_deref(),
            Some("enc.blk.1.ffn_up.weight")
        );
        assert_eq!(transformers_to_gguf("encoder.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
    }

    #[test]
    fn unknown_and_malformed_names_map_to_nothing() {
        for name in [
            "output.weight",
            "dec.blk.0.attn_q.weight",
            "enc.blk.0.attn_q.bias",
            "enc.blk.03.attn_q.weight",
            "enc.blk.+3.attn_q.weight",
            "enc.blk.x.attn_q.weight",
            "enc.blk.0.attn_qkv.weight",
            "enc.blk.0",
            "enc.blk..attn_q.weight",
            "",
        ] {
            assert_eq!(gguf_to_transformers(name, true), None, "{name}");
        }
        assert_eq!(transformers_to_gguf("decoder.block.0.layer.0.SelfAttention.q.weight"), None);
        assert_eq!(transformers_to_gguf("encoder.block.0.layer.2.layer_norm.weight"), None);
    }

    #[test]
    fn gating_is_read_from_the_names() {
        assert!(gguf_is_gated(["token_embd.weight", "enc.blk.0.ffn_gate.weight"]));
        assert!(!gguf_is_gated(["token_embd.weight", "enc.blk.0.ffn_up.weight"]));
    }

    /// ComfyUI-GGUF's `T5_SD_MAP` applied as its loader applies it: each (old, new) pair in order, `str.replace`.
    fn comfy_t5_sd_map(name: &str) -> String {
        const MAP: [(&str, &str); 14] = [
            ("enc.", "encoder."),
            (".blk.", ".block."),
            ("token_embd", "shared"),
            ("output_norm", "final_layer_norm"),
            ("attn_q", "layer.0.SelfAttention.q"),
            ("attn_k", "layer.0.SelfAttention.k"),
            ("attn_v", "layer.0.SelfAttention.v"),
            ("attn_o", "layer.0.SelfAttention.o"),
            ("attn_norm", "layer.0.layer_norm"),
            ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
            ("ffn_up", "layer.1.DenseReluDense.wi_1"),
            ("ffn_down", "layer.1.DenseReluDense.wo"),
            ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
            ("ffn_norm", "layer.1.layer_norm"),
        ];
        MAP.iter().fold(name.to_string(), |n, (a, b)| n.replace(a, b))
    }
}
