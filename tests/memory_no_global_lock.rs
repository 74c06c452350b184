//! No global lock across slow work (issue 13, item 7): while a large model is read — its first load, and a lock
//! that reads its RAM copy again after `unload_all` — `stats`, `configure` and `reserve` on another thread answer
//! promptly instead of waiting for the whole read.

mod memory_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lowvram::memory::ModelCache;
use memory_support::*;

/// A ~380 MB fp16 checkpoint of 6 blocks (zeros: the values do not matter, the bytes do).
fn write_big(dir: &std::path::Path) -> std::path::PathBuf {
    let mut tensors = HashMap::new();
    for i in 0..6 {
        let t = Tensor::zeros((32 << 20,), DType::F16, &Device::Cpu).unwrap();
        tensors.insert(format!("down_blocks.0.resnets.{i}.weight"), t);
    }
    let path = dir.join("big.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// Runs `slow` on a thread while this one calls `stats`, `configure` and `reserve` in a loop; returns the slow
/// call's duration, the slowest answer and the number of answers.
fn while_running(
    cache: &Arc<ModelCache>,
    slow: impl FnOnce() + Send + 'static,
) -> (Duration, Duration, usize) {
    let t0 = Instant::now();
    let worker = std::thread::spawn(move || {
        let t = Instant::now();
        slow();
        t.elapsed()
    });
    let (mut worst, mut calls) = (Duration::ZERO, 0);
    while !worker.is_finished() {
        for k in 0..3 {
            let t = Instant::now();
            match k {
                0 => drop(cache.stats()),
                1 => drop(cache.configure("async_loading: true\n").unwrap()),
                _ => drop(cache.reserve(1 << 20).unwrap()),
            }
            worst = worst.max(t.elapsed());
            calls += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = worker.join().unwrap();
    assert!(t0.elapsed() >= took);
    (took, worst, calls)
}

#[test]
fn stats_configure_and_reserve_answer_while_a_large_model_is_read() {
    let dir = TempDir::new("biglock");
    let path = write_big(dir.path());
    // fp32 storage: the RAM copy is converted from the fp16 file, a read of several hundred ms at least.
    let mut cfg = config("emulated:4GiB", 0);
    cfg.set("storage_dtype", "fp32").unwrap();
    cfg.set("max_cache_ram_gb", "4").unwrap();
    let cache = Arc::new(ModelCache::new(cfg).unwrap());

    let (c, p) = (cache.clone(), path.clone());
    let (took, worst, calls) =
        while_running(&cache, move || drop(c.load_model(&p, "big").unwrap()));
    eprintln!("load_model: {took:?}; {calls} answers meanwhile, the slowest {worst:?}");
    assert!(calls >= 6, "only {calls} answers during a {took:?} load");
    assert!(
        worst * 4 < took,
        "an answer took {worst:?} during a {took:?} load: it waited for the read"
    );

    // The RAM copy is dropped; the next lock reads it again, also without the cache's lock.
    let m = cache.load_model(&path, "big").unwrap();
    cache.unload_all();
    assert_eq!(cache.stats().ram.cache_used_bytes, 0);
    let (c, m2) = (cache.clone(), m.clone());
    let (took, worst, calls) = while_running(&cache, move || drop(c.lock(&m2, 0).unwrap()));
    eprintln!("lock (RAM copy re-read, blocks placed): {took:?}; {calls} answers meanwhile, the slowest {worst:?}");
    assert!(calls >= 6, "only {calls} answers during a {took:?} lock");
    assert!(
        worst * 4 < took,
        "an answer took {worst:?} during a {took:?} lock: it waited for the read"
    );
    assert_eq!(cache.stats().ram.cache_used_bytes, m.total_bytes());
}
