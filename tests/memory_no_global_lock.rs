//! No global lock across slow work (issue 13, item 7): while a large model is read — its first load, and a lock
//! that reads its RAM copy again after `unload_all` — `stats`, `configure` and `reserve` on another thread answer
//! promptly instead of waiting for the whole read; and two threads reading the same model at once read its file
//! once (the second waits for the first's copy).

mod memory_support;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
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

/// The big file's cache: fp32 storage, so the RAM copy is converted from the fp16 file (a read of several hundred
/// ms at least).
fn big_cache() -> Arc<ModelCache> {
    let mut cfg = config("emulated:4GiB", 0);
    cfg.set("storage_dtype", "fp32").unwrap();
    cfg.set("max_cache_ram_gb", "4").unwrap();
    Arc::new(ModelCache::new(cfg).unwrap())
}

/// Runs `f` on two threads started together; returns their results and whether the calls overlapped in time.
fn twice_at_once<T: Send + 'static>(f: impl Fn() -> T + Send + Sync + 'static) -> (T, T, bool) {
    let f = Arc::new(f);
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (f, start) = (f.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let began = Instant::now();
                let out = f();
                (out, began, Instant::now())
            })
        })
        .collect();
    let mut done: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (b, a) = (done.pop().unwrap(), done.pop().unwrap());
    let overlapped = a.1.max(b.1) < a.2.min(b.2);
    (a.0, b.0, overlapped)
}

#[test]
fn stats_configure_and_reserve_answer_while_a_large_model_is_read() {
    let dir = TempDir::new("biglock");
    let path = write_big(dir.path());
    let cache = big_cache();

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

/// Two threads load the same file at once: one reads it, the other waits for that read (without the cache's lock)
/// and gets the same model as a hit. Two locks at once that both need its RAM copy again (after `unload_all`) read
/// it once too. The file reads are counted against one load on a cache of its own.
#[test]
fn the_same_model_loaded_on_two_threads_at_once_is_read_once() {
    let dir = TempDir::new("twoloads");
    let path = write_big(dir.path());
    let one = {
        let cache = big_cache();
        drop(cache.load_model(&path, "big").unwrap());
        cache.stats()
    };
    assert!(one.ram.file_copies_total > 0 && one.bytes_read_from_files_total > 0);

    let cache = big_cache();
    let (c, p) = (cache.clone(), path.clone());
    let (a, b, overlapped) = twice_at_once(move || c.load_model(&p, "big").unwrap());
    assert!(overlapped, "the two loads did not run at the same time: nothing was tested");
    assert!(Arc::ptr_eq(&a, &b), "two models ({} and {}) for one file", a.id(), b.id());
    let s = cache.stats();
    assert_eq!((s.tiers.load_misses, s.tiers.load_hits), (1, 1));
    assert_eq!((s.tiers.ram_misses, s.tiers.ram_hits), (1, 0));
    assert_eq!(
        (s.ram.file_copies_total, s.bytes_read_from_files_total),
        (one.ram.file_copies_total, one.bytes_read_from_files_total),
        "the file was read more than once"
    );
    assert_eq!(s.models.len(), 1);

    // The RAM copy dropped: two locks at once read it again, once; the second's is a RAM hit.
    cache.unload_all();
    let (c, m) = (cache.clone(), a.clone());
    let (la, lb, overlapped) = twice_at_once(move || c.lock(&m, 0).unwrap());
    assert!(overlapped, "the two locks did not run at the same time: nothing was tested");
    drop((la, lb));
    let s = cache.stats();
    assert_eq!((s.tiers.ram_misses, s.tiers.ram_hits), (2, 1));
    assert_eq!(
        (s.ram.file_copies_total, s.bytes_read_from_files_total),
        (2 * one.ram.file_copies_total, 2 * one.bytes_read_from_files_total),
        "the RAM copy was read more than once"
    );
    assert_eq!(s.ram.cache_used_bytes, a.total_bytes());
}
