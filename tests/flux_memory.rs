//! The FLUX transformer's working-memory estimate against the measured peak (DECISIONS: estimate ≥ measured and
//! ≤ 1.5× measured), as tests/sdxl_memory.rs does for the SDXL UNet: on the CPU every transient buffer is a heap
//! allocation, so a counting global allocator measures one forward's real peak. One test function, so no other
//! test's allocations fall into a measurement.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use lowvram::models::flux::{block_of, FluxTransformer};
use lowvram::ops::OpTarget;
use lowvram::weights::single_file::{Component, SingleFile};
use lowvram::ResidentWeights;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

/// One forward of the tiny dev model (guidance embedding, 2 double + 2 single blocks) at latent sizes where the
/// activations outweigh the attention kernel's per-thread bound (3.3 MiB with 2 workers: gemm packing padded for
/// AVX-512, far above what it uses with 16-wide heads), square and not, with T5-like sequences of 77 to 512 tokens.
/// The estimate includes one dense copy of the largest weight (for quantised stores): 28 KiB here. bf16 on the CPU
/// takes candle's compositions (the path of f16/bf16 on CUDA), whose estimate is checked the same way.
#[test]
fn flux_estimate_bounds_measured_peak() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-flux/dev");
    let m = FluxTransformer::from_config_file(&dir.join("transformer/config.json")).unwrap();
    let sf = SingleFile::open(&dir.join("flux1-dev-tiny.safetensors")).unwrap();
    let c = m.config().clone();
    let mut failures = Vec::new();
    let cases = [
        (DType::F32, 1usize, 192usize, 192usize, 77usize),
        (DType::F32, 2, 128, 128, 256),
        (DType::F32, 1, 224, 160, 512),
        (DType::BF16, 1, 128, 96, 77),
        (DType::BF16, 2, 96, 96, 256),
    ];
    for (dt, b, h, wd, seq) in cases {
        let w = ResidentWeights::from_tensors_with(
            sf.read_component(Component::Transformer).unwrap(),
            block_of,
            &Device::Cpu,
            dt,
        )
        .unwrap();
        let x = randn(&[b, c.latent_channels(), h, wd]);
        let txt = randn(&[b, seq, c.joint_attention_dim]);
        let pooled = randn(&[b, c.pooled_projection_dim]);
        let g = Tensor::full(3.5f32, b, &Device::Cpu).unwrap();
        let _ = m.forward(&w, &x, 500.0, &txt, &pooled, Some(&g)).unwrap(); // warm the pool and lazy statics
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let y = m.forward(&w, &x, 500.0, &txt, &pooled, Some(&g)).unwrap();
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before) as u64;
        let measured = peak.saturating_sub((y.elem_count() * dt.size_in_bytes()) as u64);
        let estimate = m.working_bytes(b, h, wd, seq, OpTarget::new(&Device::Cpu, dt));
        let ratio = estimate as f64 / measured.max(1) as f64;
        let line = format!(
            "flux dev {dt:?} b{b} {h}x{wd} latents, {seq} tokens: measured {measured} B, estimate {estimate} B, ratio {ratio:.2}"
        );
        println!("{line}");
        // 64 KiB: a call's bookkeeping (shape vectors, rayon job lists), as in tests/ops_memory.rs.
        if estimate + (64 << 10) < measured || ratio > 1.5 {
            failures.push(line);
        }
    }
    assert!(failures.is_empty(), "estimates outside [measured, 1.5x measured]:\n{}", failures.join("\n"));
}
