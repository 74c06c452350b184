//! The CLIP text encoders' working-memory estimate against the measured peak (DECISIONS: estimate ≥ measured and
//! ≤ 1.5× measured), with the counting allocator of tests/ops_memory.rs: on the CPU every activation is a heap
//! allocation, so the most bytes live during one forward above the level before it is the forward's real peak
//! (outputs included: the manager reserves them too). One test function runs every case in turn so that no other
//! test's allocations fall into a measurement. Weights are resident beforehand (the manager counts those).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use lowvram::models::clip::{ClipTextConfig, ClipTextEncoder, KeyLayout};
use lowvram::ops::OpTarget;
use lowvram::ResidentWeights;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

/// Random weights for every tensor the encoder reads.
fn weights(enc: &ClipTextEncoder) -> ResidentWeights {
    let tensors: HashMap<String, Tensor> = enc
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let std = if shape.len() == 2 {
                1.0 / (shape[1] as f64).sqrt()
            } else {
                0.1
            };
            let t = Tensor::randn(0f32, std as f32, shape.as_slice(), &Device::Cpu).unwrap();
            let t = if name.contains("norm") && name.ends_with("weight") {
                (t + 1.0).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    ResidentWeights::from_tensors(tensors, &Device::Cpu, DType::F32).unwrap()
}

/// CLIP-L's and bigG's widths (vocabulary and depth cut: the activations do not depend on them).
fn config(hidden: usize, heads: usize, ffn: usize, act: &str, arch: &str) -> ClipTextConfig {
    ClipTextConfig::from_json(&format!(
        r#"{{"architectures": ["{arch}"], "hidden_size": {hidden}, "num_attention_heads": {heads},
            "intermediate_size": {ffn}, "hidden_act": "{act}", "num_hidden_layers": 3, "vocab_size": 1000,
            "projection_dim": {hidden}, "eos_token_id": 2}}"#
    ))
    .unwrap()
}

#[test]
fn text_encoder_working_memory_bounds_the_measured_peak() {
    let target = OpTarget::new(&Device::Cpu, DType::F32);
    let mut failures = Vec::new();
    for (name, cfg) in [
        ("CLIP-L width", config(768, 12, 3072, "quick_gelu", "CLIPTextModel")),
        (
            "bigG width",
            config(1280, 20, 5120, "gelu", "CLIPTextModelWithProjection"),
        ),
    ] {
        let enc = ClipTextEncoder::new(cfg, KeyLayout::Prefixed);
        let w = weights(&enc);
        for batch in [1usize, 2] {
            let ids: Vec<u32> = (0..batch * 77).map(|i| ((i * 37) % 999) as u32).collect();
            let ids = Tensor::from_vec(ids, (batch, 77), &Device::Cpu).unwrap();
            for clip_skip in [0, 2] {
                let _ = enc.encode_with_clip_skip(&w, &ids, clip_skip).unwrap(); // warm the thread pool
                let before = LIVE.load(Ordering::Relaxed);
                PEAK.store(before, Ordering::Relaxed);
                let out = enc.encode_with_clip_skip(&w, &ids, clip_skip).unwrap();
                let measured = PEAK.load(Ordering::Relaxed).saturating_sub(before) as u64;
                drop(out);
                let estimate = enc.working_bytes(batch, 77, target);
                let ratio = estimate as f64 / measured.max(1) as f64;
                let line = format!(
                    "{name:<13} batch {batch} clip_skip {clip_skip}: measured {measured:>10} B  estimate {estimate:>10} B  ratio {ratio:.2}"
                );
                println!("{line}");
                // 64 KiB: a call's bookkeeping (shape vectors, rayon job lists), as in tests/ops_memory.rs.
                if estimate + (64 << 10) < measured || ratio > 1.5 {
                    failures.push(line);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "estimates outside [measured, 1.5x measured]:\n{}",
        failures.join("\n")
    );
}
