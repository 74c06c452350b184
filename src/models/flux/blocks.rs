//! The FLUX family's block partition: which streaming unit a checkpoint tensor (BFL name) belongs to.
//!
//! A FLUX.1 double block is 648 MiB in bf16 — more than 1/8 of a 4 GiB card (DECISIONS: largest unit ≤ 512 MiB) —
//! so it is split by sub-module, in the order the forward uses them: `img_mod` and `txt_mod` (modulation linears,
//! 108 MiB bf16 each), `img_attn` and `txt_attn` (fused qkv + q/k norms, 54 MiB), then after the joint attention
//! `img_attn.proj` (18 MiB), `img_mlp` (144 MiB), `txt_attn.proj`, `txt_mlp`. A single block (270 MiB bf16; its
//! fused `linear1` alone is 126 MiB) is one unit `single_blocks.N`. Embedders and the final layer are one unit each
//! (`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`, 0.4–72 MiB). Largest unit at the real
//! size: `single_blocks.N`, 270 MiB bf16 (checked in this module's tests from the config alone). Every unit is fetched
//! exactly once per forward and never two at a time.

/// The unit of tensor `name` (a BFL name without any `model.diffusion_model.` prefix):
///
/// - `double_blocks.3.img_attn.qkv.weight` → `double_blocks.3.img_attn`
/// - `double_blocks.3.img_attn.proj.bias` → `double_blocks.3.img_attn.proj`
/// - `double_blocks.3.txt_mlp.0.weight` → `double_blocks.3.txt_mlp`
/// - `single_blocks.7.linear1.weight` → `single_blocks.7`
/// - `guidance_in.in_layer.weight` → `guidance_in`
pub fn block_of(name: &str) -> &str {
    let parts: Vec<&str> = name.split('.').collect();
    let end = |n: usize| -> usize { parts[..n].iter().map(|p| p.len()).sum::<usize>() + n - 1 };
    let numbered = parts.len() > 2 && parts[1].parse::<usize>().is_ok();
    match parts[0] {
        "double_blocks" if numbered && parts.len() > 3 => {
            let attn = matches!(parts[2], "img_attn" | "txt_attn");
            if attn && parts[3] == "proj" && parts.len() > 4 {
                &name[..end(4)]
            } else {
                &name[..end(3)]
            }
        }
        "single_blocks" if numbered => &name[..end(2)],
        _ => &name[..end(1)],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::block_of;
    use crate::models::flux::{FluxConfig, FluxTransformer};

    #[test]
    fn units_follow_the_sub_modules() {
        for (name, unit) in [
            ("double_blocks.3.img_attn.qkv.weight", "double_blocks.3.img_attn"),
            ("double_blocks.3.img_attn.norm.key_norm.scale", "double_blocks.3.img_attn"),
            ("double_blocks.3.img_attn.proj.bias", "double_blocks.3.img_attn.proj"),
            ("double_blocks.12.txt_attn.proj.weight", "double_blocks.12.txt_attn.proj"),
            ("double_blocks.3.txt_mlp.0.weight", "double_blocks.3.txt_mlp"),
            ("double_blocks.0.img_mod.lin.weight", "double_blocks.0.img_mod"),
            ("single_blocks.37.linear1.weight", "single_blocks.37"),
            ("single_blocks.7.norm.query_norm.scale", "single_blocks.7"),
            ("guidance_in.in_layer.weight", "guidance_in"),
            ("final_layer.adaLN_modulation.1.bias", "final_layer"),
            ("img_in.weight", "img_in"),
        ] {
            assert_eq!(block_of(name), unit, "{name}");
        }
    }

    /// At FLUX.1's real size every unit is ≤ 512 MiB in bf16 (DECISIONS), the largest a single block (270 MiB),
    /// and the units add up to the published 11,901,408,320 parameters (dev).
    #[test]
    fn real_size_units_fit_a_4gib_card() {
        let m = FluxTransformer::new(FluxConfig::dev()).unwrap();
        let mut units: BTreeMap<&str, usize> = BTreeMap::new();
        let shapes = m.tensor_shapes();
        for (name, shape) in &shapes {
            *units.entry(block_of(name)).or_default() += shape.iter().product::<usize>();
        }
        let total: usize = units.values().sum();
        assert_eq!(total, 11_901_408_320);
        let (largest, n) = units.iter().max_by_key(|(_, n)| **n).unwrap();
        let mib = |n: usize| (2 * n) as f64 / (1 << 20) as f64;
        println!("{} units, largest {largest} {:.1} MiB bf16", units.len(), mib(*n));
        assert!(largest.starts_with("single_blocks."), "{largest}");
        assert!((mib(*n) - 270.1).abs() < 0.1, "{}", mib(*n));
        let double: usize = units.iter().filter(|(k, _)| k.starts_with("double_blocks.0.")).map(|(_, n)| n).sum();
        assert!((mib(double) - 648.2).abs() < 0.1, "{}", mib(double));
        assert!(units.values().all(|&n| mib(n) <= 512.0));
    }
}
