//! Contention and arithmetic (issue 13, item 9): calls sharing a context wait for each other's working memory,
//! budget figures never wrap, "available" is what the device or cap really has, stats are one snapshot, and the
//! VAE's tiled fallback applies under every budget setting.

mod memory_support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions, Tiling};
use lowvram::memory::ModelCache;
use lowvram::WeightSource;
use lowvram::Error;
use memory_support::*;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn context(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions {
        device: Some(device.into()),
        config_yaml: Some(yaml.into()),
        ..Default::default()
    })
    .expect("context")
}

fn gb(bytes: u64) -> String {
    format!("{}", bytes as f64 / (1u64 << 30) as f64)
}

/// `(needed, available)` of a BudgetTooSmall or OutOfDeviceMemory, else a panic naming the error.
fn shortage(e: Error) -> (u64, u64) {
    match e {
        Error::BudgetTooSmall {
            needed_bytes,
            available_bytes,
            ..
        }
        | Error::OutOfDeviceMemory {
            needed_bytes,
            available_bytes,
            ..
        } => (needed_bytes, available_bytes),
        other => panic!("expected a memory shortage, got {other}"),
    }
}

/// Four threads share one `emulated:20MiB` context whose working memory admits one denoise at a time: every call
/// waits its turn and succeeds, and each result is bit-identical to the same call run alone.
#[test]
fn four_threads_share_a_small_device_and_all_succeed() {
    // 12 MiB of working memory per call: one call fits 20 MiB beside the 2.2 MB UNet, two never do.
    let yaml = format!("device_working_mem_gb: {}\n", gb(12 * MIB));
    let unet_dir = repo().join("tests/fixtures/tiny-sd-random/unet");
    let opts = |seed| DenoiseOptions {
        steps: 3,
        guidance: 7.5,
        seed,
        latent_size: (8, 8),
        ..Default::default()
    };
    let ctx = context("emulated:20MiB", &yaml);
    let unet = ctx.load_model(&unet_dir).unwrap();
    let ehs_dim = {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(unet_dir.join("config.json")).unwrap())
                .unwrap();
        cfg["cross_attention_dim"].as_u64().unwrap() as usize
    };
    let cond = Tensor::randn(0f32, 1.0, (1, 77, ehs_dim), &Device::Cpu).unwrap();
    let alone: Vec<Vec<u32>> = (0..4u64)
        .map(|seed| {
            let (lat, _) = ctx
                .denoise(&unet, &opts(seed), &cond, None, None, None, &mut |_, _| {
                    true
                })
                .unwrap();
            bits(&lat.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    let refused_before = ctx.stats().device.usage.refused_allocations;
    let (ctx, unet, cond) = (Arc::new(ctx), unet.clone(), Arc::new(cond));
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4u64)
        .map(|seed| {
            let (ctx, unet, cond, barrier) =
                (ctx.clone(), unet.clone(), cond.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..2)
                    .map(|_| {
                        let (lat, _) = ctx
                            .denoise(&unet, &opts(seed), &cond, None, None, None, &mut |_, _| {
                                true
                            })
                            .unwrap_or_else(|e| panic!("thread {seed}: {e}"));
                        bits(&lat.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (seed, h) in handles.into_iter().enumerate() {
        for got in h.join().unwrap() {
            assert_eq!(
                got, alone[seed],
                "thread {seed}: result differs from the single-threaded run"
            );
        }
    }
    let s = ctx.stats();
    assert_eq!(
        s.device.usage.working_bytes, 0,
        "every lock's working memory is back"
    );
    assert_eq!(s.device.usage.streaming_bytes, 0);
    eprintln!(
        "refused while waiting: {}",
        s.device.usage.refused_allocations - refused_before
    );
}

/// A lock waiting for another call's memory gives up with `Cancelled` as soon as its cancel flag is set, and
/// a lock that can never fit fails at once instead of waiting.
#[test]
fn waiting_lock_is_cancellable_and_impossible_locks_fail_at_once() {
    let dir = TempDir::new("contend");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 1);
    let work = 256 * KIB;
    let cache = Arc::new(
        ModelCache::new(config(
            &format!("emulated:{}", a.total() + work + work / 2),
            work,
        ))
        .unwrap(),
    );
    let m = cache.load_model(&a.path, "a").unwrap();
    let held = cache.lock(&m, 0).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (cache, m, cancel) = (cache.clone(), m.clone(), cancel.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = cache.lock_cancellable(&m, 0, Some(&|| cancel.load(Ordering::SeqCst))).map(|_| ());
            (r, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    cancel.store(true, Ordering::SeqCst);
    let (r, waited) = waiter.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Released: the next lock proceeds.
    drop(held);
    let t = Instant::now();
    let too_big = cache.lock(&m, 10 * a.total() + 10 * work).map(|_| ());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "an impossible lock must not wait"
    );
    let (needed, available) = shortage(too_big.unwrap_err());
    assert!(needed > available);
    drop(cache.lock(&m, 0).unwrap());
}

/// A 1 KiB device reports at most 1 KiB available, with and without a cache cap far above it.
#[test]
fn available_is_what_the_device_really_has() {
    let dir = TempDir::new("avail");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 2);
    for cap in ["", "max_cache_vram_gb: 1\n"] {
        let mut cfg = config("emulated:1KiB", 0);
        if !cap.is_empty() {
            cfg.apply_yaml(cap).unwrap();
        }
        let cache = ModelCache::new(cfg).unwrap();
        let m = cache.load_model(&a.path, "a").unwrap();
        let (needed, available) = shortage(cache.lock(&m, 0).map(|_| ()).unwrap_err());
        assert!(
            available <= KIB,
            "{cap:?}: {available} available on a 1 KiB device"
        );
        assert!(needed > available);
        let (needed, available) = shortage(cache.reserve(4 * KIB).map(|_| ()).unwrap_err());
        assert!(
            available <= KIB && needed == 4 * KIB,
            "{cap:?}: reservation {needed} / {available}"
        );
        // The context stays usable and its accounting at rest.
        assert_eq!(cache.allocator().current(), 0);
    }
}

/// `*_gb` keys are finite, ≥ 0 and ≤ 2^20 GiB; huge reservations saturate instead of wrapping the budget sums.
#[test]
fn config_values_are_bounded_and_sums_saturate() {
    let mut cfg = config("emulated:64MiB", 0);
    for (key, v) in [
        ("device_working_mem_gb", "1e300"),
        ("device_working_mem_gb", "inf"),
        ("device_working_mem_gb", "NaN"),
        ("max_cache_vram_gb", "1048577"),
        ("max_cache_ram_gb", "-1"),
        ("reserve_vram_gb", "1e20"),
        ("forge_inference_memory", "1e300"),
    ] {
        let err = cfg.set(key, v).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{key}: {v}: {err}"
        );
        assert!(err.to_string().contains(key), "{err}");
    }
    cfg.set("max_cache_vram_gb", "1048576").unwrap();
    cfg.set("max_cache_vram_gb", "auto").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let err = cache
        .configure("device_working_mem_gb: 1e300\n")
        .unwrap_err();
    assert!(err.to_string().contains("device_working_mem_gb"), "{err}");
    assert_eq!(
        cache.config().device_working_mem_gb,
        0.0,
        "a rejected configure changes nothing"
    );

    let dir = TempDir::new("sat");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 3);
    let m = cache.load_model(&a.path, "a").unwrap();
    let (needed, available) = shortage(cache.reserve(u64::MAX).map(|_| ()).unwrap_err());
    assert_eq!(needed, u64::MAX);
    assert!(
        available <= 64 * MIB,
        "{available} available on a 64 MiB device"
    );
    let l = cache.lock(&m, 0).unwrap();
    let (_, available) = shortage(cache.reserve(u64::MAX - 1).map(|_| ()).unwrap_err());
    assert!(available <= 64 * MIB, "{available}");
    let plan = cache.stats().plan.unwrap();
    assert!(
        plan.predicted_peak_bytes <= 64 * MIB,
        "{}",
        plan.predicted_peak_bytes
    );
    assert_eq!(bits(&forward(&l, &a).unwrap()).len(), 2 * 64);
}

/// `stats` is one snapshot: with forwards streaming on other threads, free + used never exceeds the capacity and
/// used is the sum of its kinds.
#[test]
fn stats_are_one_consistent_snapshot_under_load() {
    let dir = TempDir::new("snap");
    let a = write_model(dir.path(), "a", &[96, 256, 128, 256, 96], 4);
    let work = 64 * KIB;
    let capacity = work * 3 + a.total() / 2;
    let cache = Arc::new(ModelCache::new(config(&format!("emulated:{capacity}"), work)).unwrap());
    let m = cache.load_model(&a.path, "a").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (cache, m, stop, a) = (cache.clone(), m.clone(), stop.clone(), a.clone());
            std::thread::spawn(move || {
                let mut runs = 0;
                while !stop.load(Ordering::SeqCst) {
                    let l = cache.lock(&m, 0).unwrap();
                    forward(&l, &a).unwrap();
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    let t = Instant::now();
    let mut snapshots = 0u64;
    while t.elapsed() < Duration::from_millis(1500) {
        let s = cache.stats();
        let u = &s.device.usage;
        let free = s.device.free_bytes.unwrap();
        assert!(
            free + u.current_bytes <= capacity,
            "free {free} + used {} > {capacity}",
            u.current_bytes
        );
        let kinds = u.weights_bytes
            + u.streaming_bytes
            + u.working_bytes
            + u.reservation_bytes
            + u.external_bytes;
        assert_eq!(kinds, u.current_bytes, "used is the sum of its kinds");
        snapshots += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let runs: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(
        runs > 0 && snapshots > 100,
        "runs {runs}, snapshots {snapshots}"
    );
}

/// With `max_cache_vram_gb` set, a decode whose untiled working memory the device cannot hold still falls back to
/// tiles (the lock's working allocation is not refused before the tiled path is considered).
#[test]
fn decode_tiles_under_a_cache_cap_too() {
    let vae_dir = repo().join("tests/fixtures/tiny-sd-random/vae");
    let model =
        lowvram::models::AutoencoderKL::from_config_file(&vae_dir.join("config.json")).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &Device::Cpu).unwrap();
    let target = lowvram::ops::OpTarget::new(&Device::Cpu, DType::F32);
    let untiled_need = model.decode_working_bytes(latents.dims(), target);
    let tiled_need = model.decode_tiled_working_bytes(latents.dims(), 8, target);
    assert!(tiled_need < untiled_need);
    let weights = std::fs::metadata(vae_dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap()
        .len();
    let capacity = weights + (tiled_need + untiled_need) / 2;
    for cap in [
        "",
        &format!("max_cache_vram_gb: {}\n", gb(weights + 4096)),
        "max_cache_vram_gb: 64\n",
    ] {
        let ctx = context(
            &format!("emulated:{capacity}"),
            &format!("device_working_mem_gb: 0\n{cap}"),
        );
        let vae = ctx.load_model(&vae_dir).unwrap();
        let (image, r) = ctx
            .vae_decode(&vae, &latents, Tiling::Auto)
            .unwrap_or_else(|e| panic!("cap {cap:?}: {e}"));
        assert!(
            r.tile_latent.is_some(),
            "cap {cap:?}: expected a tiled decode"
        );
        assert_eq!(image.dims(), &[1, 3, 256, 256]);
        assert_eq!(
            r.refused_allocations, 0,
            "cap {cap:?}: the tiled path was chosen before any refusal"
        );
    }
}

/// Two locks of one model held at once each stream their own copy of a block: the plan keeps room for both (the
/// resident set shrinks instead), so each lock can hold the largest streamed block at the same moment.
#[test]
fn two_locks_of_one_model_can_stream_the_same_block_at_once() {
    let dir = TempDir::new("twin");
    // Equal blocks, and room for the working memories plus three of them: one lock alone would keep two resident
    // and stream through the third's room, leaving nothing for a second lock's stream.
    let a = write_model(dir.path(), "a", &[128, 128, 128, 128, 128, 128], 4);
    let work = 64 * KIB;
    let capacity = work * 2 + 3 * a.max_block();
    let cache = ModelCache::new(config(&format!("emulated:{capacity}"), work)).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    let l1 = cache.lock(&m, 0).unwrap();
    let l2 = cache.lock(&m, 0).unwrap();
    for key in &a.blocks {
        let w1 = l1.fetch(key).unwrap();
        let w2 = l2.fetch(key).unwrap_or_else(|e| panic!("second lock fetching {key} while the first holds it: {e}"));
        assert_eq!(w1.get("weight").unwrap().dims(), w2.get("weight").unwrap().dims());
    }
    drop((l1, l2));
    assert_eq!(cache.allocator().refused(), 0);
}
