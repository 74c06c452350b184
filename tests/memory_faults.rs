//! Fault injection (issue 13, item 3): refuse the Nth device allocation of a run, for every N from 1 to the run's
//! total, and at random rates. Every run of the tiny SD model (denoise + VAE decode through the public API) ends in
//! a result bit-identical to the unfaulted run or a clean OUT_OF_DEVICE_MEMORY / BUDGET_TOO_SMALL; afterwards the
//! accounting is at rest (nothing streaming, working, reserved or retiring; device bytes = resident weights) and
//! the next run succeeds. The injection sits in the allocator every placement goes through, so the same test
//! covers the CUDA allocator path when it runs on a GPU.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions, Model, Tiling};
use lowvram::device::FaultInjection;
use lowvram::Error;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Setup {
    ctx: Context,
    unet: Arc<Model>,
    vae: Arc<Model>,
    cond: Tensor,
}

fn setup() -> Setup {
    let unet_dir = repo().join("tests/fixtures/tiny-sd-random/unet");
    let probe = Context::new(ContextOptions {
        device: Some("cpu".into()),
        ..Default::default()
    })
    .unwrap();
    let unet_bytes = probe.load_model(&unet_dir).unwrap().weights().total_bytes();
    // A cache cap of 60 % of the UNet: part resident, part streamed (with prefetch), so every kind of allocation
    // happens in a run; the VAE takes what is left.
    let yaml = format!(
        "device_working_mem_gb: 0\nmax_cache_vram_gb: {}\nasync_loading: true\nenable_partial_loading: true\n",
        (unet_bytes * 6 / 10) as f64 / (1u64 << 30) as f64
    );
    let ctx = Context::new(ContextOptions {
        device: Some("emulated:64MiB".into()),
        config_yaml: Some(yaml),
        ..Default::default()
    })
    .unwrap();
    let unet = ctx.load_model(&unet_dir).unwrap();
    let vae = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/vae")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unet_dir.join("config.json")).unwrap())
            .unwrap();
    let dim = cfg["cross_attention_dim"].as_u64().unwrap() as usize;
    let cond = Tensor::randn(0f32, 1.0, (1, 77, dim), &Device::Cpu).unwrap();
    Setup {
        ctx,
        unet,
        vae,
        cond,
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// One run: a 2-step CFG denoise of 8×8 latents, then the VAE decode.
fn run(s: &Setup) -> lowvram::Result<(Vec<u32>, Vec<u32>)> {
    let opts = DenoiseOptions {
        steps: 2,
        guidance: 7.5,
        seed: 7,
        latent_size: (8, 8),
        ..Default::default()
    };
    let (latents, _) = s
        .ctx
        .denoise(&s.unet, &opts, &s.cond, None, None, None, &mut |_, _| true)?;
    let (image, _) = s.ctx.vae_decode(&s.vae, &latents, Tiling::Auto)?;
    Ok((bits(&latents), bits(&image)))
}

/// The accounting at rest: only resident weights hold device bytes, and they are the models' resident bytes.
fn assert_at_rest(s: &Setup, what: &str) {
    let st = s.ctx.stats();
    let u = &st.device.usage;
    assert_eq!(
        (
            u.streaming_bytes,
            u.working_bytes,
            u.reservation_bytes,
            u.retiring_bytes,
            u.external_bytes
        ),
        (0, 0, 0, 0, 0),
        "{what}: bytes left behind"
    );
    let resident: u64 = st.models.iter().map(|m| m.resident_bytes).sum();
    assert_eq!(
        u.current_bytes, resident,
        "{what}: device bytes = resident weights"
    );
    assert_eq!(u.weights_bytes, resident, "{what}");
    assert_eq!(u.off_thread_frees, 0, "{what}");
    // Prefetched blocks (faulted or not) are used only after their copy's event; one copy thread at most.
    assert_eq!(u.unwaited_copy_uses, 0, "{what}");
    assert!(u.copy_threads_started <= 1, "{what}");
}

/// What a faulted run may end in: the unfaulted result, or a clean memory error.
fn check_outcome(
    r: lowvram::Result<(Vec<u32>, Vec<u32>)>,
    reference: &(Vec<u32>, Vec<u32>),
    what: &str,
) -> bool {
    match r {
        Ok(out) => {
            assert!(
                out == *reference,
                "{what}: a run that recovered differs from the unfaulted one"
            );
            true
        }
        Err(Error::OutOfDeviceMemory { needed_bytes, .. })
        | Err(Error::BudgetTooSmall { needed_bytes, .. }) => {
            assert!(needed_bytes > 0, "{what}");
            false
        }
        Err(e) => panic!("{what}: not a clean memory error: {e}"),
    }
}

#[test]
fn every_allocation_point_recovers_or_fails_cleanly() {
    let s = setup();
    let alloc = s.ctx.cache().allocator().clone();
    // Warm up (plans and residency settle), then count the attempts of one run.
    let reference = run(&s).unwrap();
    assert_eq!(run(&s).unwrap(), reference);
    alloc.set_faults(FaultInjection::Off);
    assert_eq!(run(&s).unwrap(), reference);
    let (total, _) = alloc.fault_counts();
    assert!(
        total >= 10,
        "a run makes {total} allocations: too few to exercise anything"
    );
    assert_at_rest(&s, "unfaulted");

    let (mut recovered, mut failed) = (0, 0);
    for n in 1..=total {
        alloc.set_faults(FaultInjection::Nth(n));
        let r = run(&s);
        let (_, injected) = alloc.fault_counts();
        alloc.set_faults(FaultInjection::Off);
        assert_eq!(injected, 1, "allocation {n} of {total} was refused");
        let what = format!("refusing allocation {n} of {total}");
        if check_outcome(r, &reference, &what) {
            recovered += 1;
        } else {
            failed += 1;
        }
        assert_at_rest(&s, &what);
        assert_eq!(run(&s).unwrap(), reference, "{what}: the next run");
    }
    eprintln!("{total} allocation points: {recovered} recovered, {failed} failed cleanly");

    let (mut recovered, mut failed) = (0, 0);
    for seed in 0..24u64 {
        let probability = [0.02, 0.1, 0.3, 0.6, 0.9, 1.0][seed as usize % 6];
        alloc.set_faults(FaultInjection::Rate { probability, seed });
        let r = run(&s);
        alloc.set_faults(FaultInjection::Off);
        let what = format!("failure rate {probability}, seed {seed}");
        if check_outcome(r, &reference, &what) {
            recovered += 1;
        } else {
            failed += 1;
        }
        assert_at_rest(&s, &what);
        assert_eq!(run(&s).unwrap(), reference, "{what}: the next run");
    }
    eprintln!("random failure rates: {recovered} recovered, {failed} failed cleanly");
    assert!(
        failed > 0,
        "a failure rate of 1 must fail the run (cleanly)"
    );
}
