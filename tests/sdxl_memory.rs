//! The SDXL UNet's working-memory estimate against the measured peak (DECISIONS: estimate ≥ measured and ≤ 1.5×
//! measured), as tests/ops_memory.rs does for SD 1.x: on the CPU every transient buffer is a heap allocation, so a
//! counting global allocator measures one forward's real peak. One test function, so no other test's allocations
//! fall into a measurement.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use lowvram::models::{AddedCond, UNet2DConditionModel};
use lowvram::ops::OpTarget;
use lowvram::ResidentWeights;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

/// One UNet forward of the tiny SDXL-style model (attention-free first block, two-layer transformer stacks,
/// text_time conditioning) with the CFG batch of 2 and a 77-token context, at latent sizes where the activations
/// outweigh the kernels' per-thread tiles (as in tests/ops_memory.rs: below that the measurement varies run to run).
#[test]
fn sdxl_unet_estimate_bounds_measured_peak() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl/model/unet");
    let m = UNet2DConditionModel::from_config_file(&dir.join("config.json")).unwrap();
    let w = ResidentWeights::load(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let (pooled, n_ids) = m.needs_added_cond().unwrap();
    let b = 2;
    let ehs = randn(&[b, 77, m.config().cross_attention_dim]);
    let added = AddedCond {
        text_embeds: randn(&[b, pooled]),
        time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]; 2], &Device::Cpu).unwrap(),
    };
    assert_eq!(added.time_ids.dims(), [b, n_ids]);
    let mut failures = Vec::new();
    for (h, wd) in [(96usize, 96usize), (112, 80)] {
        let x = randn(&[b, 4, h, wd]);
        let _ = m.forward_with(&w, &x, 500.0, &ehs, Some(&added)).unwrap(); // warm the pool and lazy statics
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let y = m.forward_with(&w, &x, 500.0, &ehs, Some(&added)).unwrap();
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before) as u64;
        let measured = peak.saturating_sub((y.elem_count() * 4) as u64);
        let estimate = m.working_bytes(b, h, wd, 77, OpTarget::new(&Device::Cpu, DType::F32));
        let ratio = estimate as f64 / measured.max(1) as f64;
        let line =
            format!("sdxl unet b{b} {h}x{wd} latents: measured {measured} B, estimate {estimate} B, ratio {ratio:.2}");
        println!("{line}");
        // 64 KiB: a call's bookkeeping (shape vectors, rayon job lists), as in tests/ops_memory.rs.
        if estimate + (64 << 10) < measured || ratio > 1.5 {
            failures.push(line);
        }
    }
    assert!(
        failures.is_empty(),
        "estimates outside [measured, 1.5x measured]:\n{}",
        failures.join("\n")
    );
}
