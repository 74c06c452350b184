//! The budget tests (DECISIONS.md "What the budget tests must show"), through the public Rust API on the
//! emulated device.

mod memory_support;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use candle_core::{DType, Device};
use lowvram::memory::ModelCache;
use lowvram::weights::TensorLocation;
use lowvram::{Error, ResidentWeights, WeightSource};
use memory_support::*;

const KIB: u64 = 1024;
const WORK: u64 = 64 * KIB;

fn reference(m: &TestModel) -> Vec<u32> {
    let r = ResidentWeights::load(&m.path, &Device::Cpu, DType::F32).unwrap();
    bits(&forward(&r, m).unwrap())
}

/// Two models of uneven blocks in one cache, over a sweep of capacities: peak ≤ capacity, zero refusals,
/// streamed = model − resident, predicted peak = measured peak, bit-identical outputs; capacities below the
/// minimum give BudgetTooSmall with needed and available.
#[test]
fn budget_sweep_two_models() {
    sweep_two_models(false);
}

/// The same sweep with prefetch (async_loading, the default): plans that fit two blocks in flight copy the next
/// streamed block while the current one runs. Same outputs and bytes streamed; the peak stays within the
/// prediction (which reserves the two largest blocks; adjacent blocks may be smaller) and the capacity.
#[test]
fn budget_sweep_two_models_prefetch() {
    sweep_two_models(true);
}

fn sweep_two_models(prefetch: bool) {
    let dir = TempDir::new(if prefetch { "sweep-prefetch" } else { "sweep" });
    let a = write_model(dir.path(), "a", &[64, 128, 256, 128, 192, 64, 96, 32], 1);
    let b = write_model(dir.path(), "b", &[32, 160, 160, 96, 48], 2);
    let (ref_a, ref_b) = (reference(&a), reference(&b));
    let min_cap = WORK + a.max_block().max(b.max_block());
    let full = WORK + a.total() + b.total();
    eprintln!(
        "model a {} B (max block {}), model b {} B (max block {}), working {} B",
        a.total(),
        a.max_block(),
        b.total(),
        b.max_block(),
        WORK
    );
    eprintln!(
        "{:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "capacity",
        "model",
        "resident",
        "streamed",
        "predicted",
        "fwd-peak",
        "lock-peak",
        "refused"
    );
    let mut caps: Vec<u64> = (0..=12)
        .map(|i| min_cap - 1 + (full + 64 * KIB - min_cap) * i / 12)
        .collect();
    caps.push(min_cap);
    for cap in caps {
        let mut cfg = config(&format!("emulated:{cap}"), WORK);
        cfg.set("async_loading", if prefetch { "true" } else { "false" })
            .unwrap();
        let cache = ModelCache::new(cfg).unwrap();
        let ma = cache.load_model(&a.path, "a").unwrap();
        let mb = cache.load_model(&b.path, "b").unwrap();
        for round in 0..2 {
            for (m, tm, reference) in [(&ma, &a, &ref_a), (&mb, &b, &ref_b)] {
                let before = cache.allocator().current();
                cache.allocator().reset_peak();
                let lock = match cache.lock(m, 0) {
                    Ok(l) => l,
                    Err(Error::BudgetTooSmall {
                        needed_bytes,
                        available_bytes,
                        ..
                    }) => {
                        assert!(cap < WORK + tm.max_block(), "cap {cap} should fit");
                        assert_eq!(needed_bytes, WORK + tm.max_block());
                        assert_eq!(available_bytes, cap);
                        eprintln!("{cap:>9} {:>6} BudgetTooSmall needed {needed_bytes} available {available_bytes}", m.name());
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                let plan = cache.stats().plan.unwrap();
                let lock_peak = cache.allocator().peak();
                cache.allocator().reset_peak();
                let resident = m.resident_bytes();
                assert_eq!(resident, plan.resident_bytes);
                let out = forward(&lock, tm).unwrap();
                assert_eq!(
                    bits(&out),
                    *reference,
                    "cap {cap}: output differs from all-resident"
                );
                assert_eq!(
                    lock.bytes_streamed(),
                    tm.total() - resident,
                    "streamed = model − resident"
                );
                let fwd_peak = cache.allocator().peak();
                if prefetch {
                    assert!(
                        fwd_peak <= plan.predicted_peak_bytes,
                        "cap {cap}: measured peak above the prediction"
                    );
                    // The order is learned in round 0; from round 1 every streamed block but the first arrives
                    // prefetched when two fit in flight.
                    let streamed = lock.bytes_streamed();
                    if round == 1 && plan.slots == 2 && streamed > 0 {
                        assert!(lock.bytes_prefetched() > 0, "cap {cap}: nothing prefetched");
                    }
                    if plan.slots == 1 {
                        assert_eq!(lock.bytes_prefetched(), 0, "one slot: no prefetch");
                    }
                } else {
                    assert_eq!(
                        fwd_peak, plan.predicted_peak_bytes,
                        "cap {cap}: predicted vs measured peak"
                    );
                    assert_eq!(plan.slots, 1);
                }
                assert!(lock_peak <= plan.predicted_peak_bytes.max(before));
                assert!(fwd_peak <= cap && lock_peak <= cap);
                assert_eq!(
                    cache.allocator().refused(),
                    0,
                    "runs that fit refuse nothing"
                );
                eprintln!(
                    "{cap:>9} {:>6} {resident:>9} {:>9} {:>9} {fwd_peak:>9} {lock_peak:>9} {:>7} slots {} prefetched {}",
                    m.name(),
                    lock.bytes_streamed(),
                    plan.predicted_peak_bytes,
                    cache.allocator().refused(),
                    plan.slots,
                    lock.bytes_prefetched()
                );
            }
        }
        // The copy engine: prefetches ran on one persistent thread per device (none without prefetch), and every
        // block it copied was used only after its copy's event was waited for.
        let u = cache.allocator().usage();
        assert_eq!(u.unwaited_copy_uses, 0, "cap {cap}: a prefetched block used before its copy's event");
        if !prefetch {
            assert_eq!((u.copy_threads_started, u.copy_jobs), (0, 0), "cap {cap}");
        } else if cache.stats().bytes_prefetched_total > 0 {
            assert_eq!(u.copy_threads_started, 1, "cap {cap}: one copy thread");
            assert!(u.copy_jobs > 0);
        }
    }
}

/// A model about twice the device budget: a forward streams exactly model − resident, twice in a row, and the
/// stats agree.
#[test]
fn model_twice_the_budget_streams_the_rest() {
    let dir = TempDir::new("twice");
    let a = write_model(dir.path(), "a", &[64, 128, 256, 128, 192, 64, 96, 32], 3);
    let cap = WORK + a.total() / 2;
    let cache = ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    let lock = cache.lock(&m, 0).unwrap();
    let resident = m.resident_bytes();
    assert!(resident > 0 && resident < a.total());
    let r = reference(&a);
    for i in 1..=2u64 {
        assert_eq!(bits(&forward(&lock, &a).unwrap()), r);
        assert_eq!(lock.bytes_streamed(), i * (a.total() - resident));
    }
    let s = cache.stats();
    assert_eq!(s.bytes_streamed_total, 2 * (a.total() - resident));
    assert_eq!(s.models[0].resident_bytes, resident);
    assert_eq!(s.device.usage.refused_allocations, 0);
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"predicted_peak_bytes\""));
    eprintln!(
        "model {} B, capacity {cap} B, resident {resident} B, streamed/forward {} B",
        a.total(),
        a.total() - resident
    );
    // Locations: resident blocks are on the device, the rest in the RAM copy.
    let on_device = m.resident_blocks();
    assert!(!on_device.is_empty());
    for key in &a.blocks {
        let want = if on_device.contains(key) {
            TensorLocation::Device
        } else {
            TensorLocation::Ram
        };
        assert_eq!(m.tensor_location(&format!("{key}.weight")), Some(want));
    }
    eprintln!("resident blocks {on_device:?}");
}

/// With `max_cache_vram_gb` set above what the device holds (the seed's warning), loading hits a real refusal:
/// the manager evicts the least recently used model and retries; the forward is still exact.
#[test]
fn oom_evicts_and_retries() {
    let dir = TempDir::new("oom");
    let a = write_model(dir.path(), "a", &[64, 96, 96, 64], 4);
    let b = write_model(dir.path(), "b", &[64, 128, 128, 96, 64], 5);
    let cap = WORK + a.total() + b.total() - 4 * KIB;
    let mut cfg = config(&format!("emulated:{cap}"), WORK);
    cfg.set("max_cache_vram_gb", "1").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let ma = cache.load_model(&a.path, "a").unwrap();
    let mb = cache.load_model(&b.path, "b").unwrap();
    drop(cache.lock(&ma, 0).unwrap());
    assert_eq!(ma.resident_bytes(), a.total());
    let lock = cache.lock(&mb, 0).unwrap();
    let refused = cache.allocator().refused();
    assert!(refused >= 1, "a refusal happened");
    assert!(ma.resident_bytes() < a.total(), "a was evicted");
    assert_eq!(mb.resident_bytes(), b.total());
    assert_eq!(bits(&forward(&lock, &b).unwrap()), reference(&b));
    assert!(cache.allocator().peak() <= cap);
    eprintln!(
        "refused {refused}, a resident {} of {}, b resident {}",
        ma.resident_bytes(),
        a.total(),
        mb.resident_bytes()
    );
}

/// An OOM that eviction cannot cure (another program takes device memory after the lock was planned) returns
/// OutOfDeviceMemory; the cache stays consistent and usable. A model that cannot fit the device alone fails at
/// lock time with BudgetTooSmall quoting the device's bytes, even under a larger cache cap.
#[test]
fn unrecoverable_oom_leaves_cache_consistent() {
    let dir = TempDir::new("oom2");
    let big = write_model(dir.path(), "big", &[32, 512, 32], 6);
    let small = write_model(dir.path(), "small", &[32, 32, 32], 7);
    let cap = WORK + big.max_block() - 1024;
    let mut cfg = config(&format!("emulated:{cap}"), WORK);
    cfg.set("max_cache_vram_gb", "1").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let mbig = cache.load_model(&big.path, "big").unwrap();
    match cache.lock(&mbig, 0).map(|_| ()).unwrap_err() {
        Error::BudgetTooSmall {
            needed_bytes,
            available_bytes,
            ..
        } => {
            assert_eq!(
                (needed_bytes, available_bytes),
                (WORK + big.max_block(), cap)
            );
        }
        e => panic!("expected BudgetTooSmall, got {e}"),
    }
    let cap = WORK + big.max_block() + 4096;
    let mut cfg = config(&format!("emulated:{cap}"), WORK);
    cfg.set("max_cache_vram_gb", "1").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let mbig = cache.load_model(&big.path, "big").unwrap();
    let lock = cache.lock(&mbig, 0).unwrap();
    let taken = cache.allocator().free().unwrap();
    let external = cache.allocator().reserve_external(taken).unwrap();
    let err = forward(&lock, &big).unwrap_err();
    match err {
        Error::OutOfDeviceMemory {
            needed_bytes,
            available_bytes,
            ..
        } => {
            assert!(needed_bytes > available_bytes);
            eprintln!("OOM needed {needed_bytes} available {available_bytes}");
        }
        e => panic!("expected OOM, got {e}"),
    }
    assert_eq!(
        cache.allocator().current(),
        WORK + mbig.resident_bytes() + taken
    );
    drop(lock);
    drop(external);
    assert_eq!(cache.allocator().current(), mbig.resident_bytes());
    let ms = cache.load_model(&small.path, "small").unwrap();
    let l2 = cache.lock(&ms, 0).unwrap();
    assert_eq!(bits(&forward(&l2, &small).unwrap()), reference(&small));
}

/// BudgetTooSmall for a lock and for a reservation, with needed and available.
#[test]
fn budget_too_small() {
    let dir = TempDir::new("small");
    let a = write_model(dir.path(), "a", &[64, 256, 64], 8);
    let cap = WORK + a.max_block() + 8 * KIB;
    let cache = ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    match cache.lock(&m, 2 * WORK) {
        Err(Error::BudgetTooSmall {
            needed_bytes,
            available_bytes,
            ..
        }) => {
            assert_eq!(needed_bytes, 2 * WORK + a.max_block());
            assert_eq!(available_bytes, cap);
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("should not fit"),
    }
    let lock = cache.lock(&m, 0).unwrap();
    match cache.reserve(16 * KIB) {
        Err(Error::BudgetTooSmall {
            needed_bytes,
            available_bytes,
            ..
        }) => {
            assert_eq!(needed_bytes, 16 * KIB);
            assert_eq!(available_bytes, 8 * KIB);
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("reservation should not fit"),
    }
    let r = cache.reserve(8 * KIB).unwrap();
    assert_eq!(bits(&forward(&lock, &a).unwrap()), reference(&a));
    assert!(cache.allocator().peak() <= cap);
    drop(r);
    assert_eq!(cache.allocator().refused(), 0);
}

/// A reservation taken on another thread while a forward runs: residency shrinks at once; the block being
/// computed on is released at its block boundary (it shows as retiring until then); the following blocks are
/// streamed; the forward completes exactly and nothing is refused. The plan always keeps room for the block in
/// flight, so the reservation does not have to wait for the forward to end.
#[test]
fn reservation_mid_forward_shrinks_at_next_block() {
    let dir = TempDir::new("midrun");
    let a = write_model(dir.path(), "a", &[64, 256, 64, 64, 64, 64], 9);
    let cap = WORK + a.total() + 16 * KIB;
    let cache = Arc::new(ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap());
    let m = cache.load_model(&a.path, "a").unwrap();
    let r = reference(&a);
    let lock = cache.lock(&m, 0).unwrap();
    assert_eq!(m.resident_bytes(), a.total());
    // Reserve all but what the model needs to run fully streamed.
    let want = cap - WORK - a.max_block();
    let (tx, rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<u64>();
    let c2 = cache.clone();
    let reserver = std::thread::spawn(move || {
        rx.recv().unwrap();
        let res = c2.reserve(want).unwrap();
        done_tx.send(res.bytes()).unwrap();
        res
    });
    let mut seen = Vec::new();
    let out = forward_with(&lock, &a, |i| {
        if i == 0 {
            // Holding block 0 (resident, the largest) while the reservation is taken on the other thread: the plan
            // shrinks at once, but every block stays allocated (retiring) until this thread's next block boundary,
            // so the reservation has not returned yet.
            tx.send(()).unwrap();
            let t = std::time::Instant::now();
            while m.resident_bytes() > 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "the reservation never shrank the plan"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                cache.allocator().retiring(),
                a.total(),
                "released blocks wait for the compute thread"
            );
            assert!(
                done_rx.try_recv().is_err(),
                "returned before its bytes were free"
            );
        }
        if i == 1 {
            // The fetch of block 1 freed them here; the reservation returns.
            let got = done_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("reservation returned");
            assert_eq!(got, want);
        }
        seen.push((m.resident_bytes(), cache.allocator().retiring()));
    })
    .unwrap();
    let res = reserver.join().unwrap();
    assert_eq!(cache.allocator().retiring(), 0);
    assert_eq!(bits(&out), r);
    let expect_streamed: u64 = a.block_bytes[1..].iter().sum();
    assert_eq!(lock.bytes_streamed(), expect_streamed);
    assert_eq!(cache.allocator().refused(), 0);
    assert!(cache.allocator().peak() <= cap);
    eprintln!("(resident, retiring) after each block: {seen:?}; streamed after the reservation {expect_streamed}");
    // Drop the reservation: the plan grows again, lazily at the next fetches.
    drop(res);
    assert_eq!(bits(&forward(&lock, &a).unwrap()), r);
    assert_eq!(m.resident_bytes(), a.total());
    assert_eq!(lock.bytes_streamed(), expect_streamed);
    assert_eq!(
        cache.allocator().usage().off_thread_frees,
        0,
        "a running model's memory freed off its thread"
    );
}

/// Stream order, on the CPU: while a forward runs, its device memory is freed only on its compute thread (at its
/// next block boundary), whoever shrinks the plan — a configure or a reservation from another thread, here at
/// every block boundary. The emulated device counts frees off the compute thread.
#[test]
fn running_models_memory_is_freed_only_on_its_compute_thread() {
    let dir = TempDir::new("streamorder");
    let a = write_model(dir.path(), "a", &[64, 256, 64, 128, 64, 64], 10);
    let cap = WORK + a.total() + 16 * KIB;
    let cache = Arc::new(ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap());
    let m = cache.load_model(&a.path, "a").unwrap();
    let r = reference(&a);
    let lock = cache.lock(&m, 0).unwrap();
    let (tx, rx) = mpsc::channel::<usize>();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let c2 = cache.clone();
    let total = a.total();
    let other = std::thread::spawn(move || {
        let mut held = None;
        while let Ok(i) = rx.recv() {
            // Alternate: shrink the cache cap, restore it; take a reservation, give it back.
            match i % 4 {
                0 => drop(c2.configure(&format!(
                    "max_cache_vram_gb: {}\n",
                    (total / 3) as f64 / (1u64 << 30) as f64
                ))),
                1 => drop(c2.configure("max_cache_vram_gb: null\n")),
                2 => held = c2.reserve(total / 2).ok(),
                _ => drop(held.take()),
            }
            ack_tx.send(()).unwrap();
        }
    });
    for round in 0..3 {
        let out = forward_with(&lock, &a, |i| {
            tx.send(round * 8 + i).unwrap();
            // The reservation may wait for this thread's next boundary: do not wait for it beyond a moment.
            let _ = ack_rx.recv_timeout(Duration::from_millis(100));
        })
        .unwrap();
        assert_eq!(bits(&out), r, "round {round}");
    }
    drop(tx);
    other.join().unwrap();
    drop(lock);
    let u = cache.allocator().usage();
    assert_eq!(
        u.off_thread_frees, 0,
        "a running model's memory was freed off its compute thread"
    );
    assert_eq!(
        (u.retiring_bytes, u.streaming_bytes, u.working_bytes),
        (0, 0, 0)
    );
}

/// LRU between models; a locked model is never evicted; free_memory and unload_all.
#[test]
fn lru_locks_free_and_unload() {
    let dir = TempDir::new("lru");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 10);
    let b = write_model(dir.path(), "b", &[64, 128, 64], 11);
    let c = write_model(dir.path(), "c", &[64, 128, 64], 12);
    // Two models fit whole, not three; one whole plus another's minimum (largest block) fits.
    let cap = 2 * WORK + a.total() + a.max_block() + 4 * KIB;
    let cache = ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap();
    let (ma, mb, mc) = (
        cache.load_model(&a.path, "a").unwrap(),
        cache.load_model(&b.path, "b").unwrap(),
        cache.load_model(&c.path, "c").unwrap(),
    );
    drop(cache.lock(&ma, 0).unwrap());
    drop(cache.lock(&mb, 0).unwrap());
    assert_eq!(
        (ma.resident_bytes(), mb.resident_bytes()),
        (a.total(), b.total())
    );
    drop(cache.lock(&mc, 0).unwrap());
    assert!(
        ma.resident_bytes() < a.total(),
        "least recently used evicted"
    );
    assert_eq!(mb.resident_bytes(), b.total());
    assert_eq!(mc.resident_bytes(), c.total());
    // Lock b and keep it; lock a: a gets what is left, b stays whole.
    let lb = cache.lock(&mb, 0).unwrap();
    let la = cache.lock(&ma, 0).unwrap();
    assert_eq!(mb.resident_bytes(), b.total(), "locked model not evicted");
    assert_eq!(bits(&forward(&la, &a).unwrap()), reference(&a));
    assert_eq!(cache.allocator().refused(), 0);
    // free_memory only touches unlocked models.
    drop(la);
    assert_eq!(cache.load_to_device(&mc, u64::MAX).unwrap(), c.total());
    let freed = cache.free_memory(u64::MAX);
    assert!(freed > 0);
    assert_eq!(mb.resident_bytes(), b.total());
    assert_eq!(ma.resident_bytes() + mc.resident_bytes(), 0);
    drop(lb);
    assert!(cache.stats().ram.cache_used_bytes > 0);
    let released = cache.unload_all();
    assert_eq!(released, b.total());
    let s = cache.stats();
    assert_eq!(s.device.usage.current_bytes, 0);
    assert_eq!(s.ram.cache_used_bytes, 0);
    // Still usable afterwards (reloads from the file: a miss).
    let misses = s.cache_misses;
    let l = cache.lock(&ma, 0).unwrap();
    assert_eq!(bits(&forward(&l, &a).unwrap()), reference(&a));
    assert_eq!(cache.stats().cache_misses, misses + 1);
}

/// explicit partial load
#[test]
fn load_to_device_partial() {
    let dir = TempDir::new("ltd");
    let a = write_model(dir.path(), "a", &[64, 128, 256, 64], 13);
    let cache = ModelCache::new(config("emulated:4MiB", WORK)).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    let got = cache.load_to_device(&m, a.max_block()).unwrap();
    assert_eq!(got, a.max_block());
    assert_eq!(cache.stats().device.used_by_cache_bytes, a.max_block());
}

/// keep_ram_copy_of_weights: false — no RAM copy; streamed blocks pass through the staging ring, whose host bytes
/// stay below slots × largest block.
#[test]
fn no_ram_copy_keeps_host_bytes_bounded() {
    let dir = TempDir::new("noram");
    let a = write_model(dir.path(), "a", &[64, 128, 256, 128, 192, 64, 96, 32], 14);
    let cap = WORK + a.total() / 3;
    let mut cfg = config(&format!("emulated:{cap}"), WORK);
    cfg.set("keep_ram_copy_of_weights", "false").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    let lock = cache.lock(&m, 0).unwrap();
    for _ in 0..3 {
        assert_eq!(bits(&forward(&lock, &a).unwrap()), reference(&a));
    }
    let s = cache.stats();
    assert_eq!(s.ram.cache_used_bytes, 0);
    assert!(s.ram.staging_peak_bytes > 0);
    assert!(s.ram.staging_peak_bytes <= s.ram.staging_slots as u64 * a.max_block());
    assert_eq!(
        m.tensor_location("down_blocks.0.resnets.0.bias").unwrap(),
        TensorLocation::File
    );
    eprintln!(
        "staging peak {} B ({} slots, largest block {} B, model {} B)",
        s.ram.staging_peak_bytes,
        s.ram.staging_slots,
        a.max_block(),
        a.total()
    );
    // With the copy: RAM holds the model.
    let c2 = ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap();
    let _kept = c2.load_model(&a.path, "a").unwrap();
    assert_eq!(c2.stats().ram.cache_used_bytes, a.total());
}

/// Corrupt and truncated files give Format errors; the cache stays usable.
#[test]
fn corrupt_files_give_format_errors() {
    let dir = TempDir::new("corrupt");
    let a = write_model(dir.path(), "a", &[32, 64, 32], 15);
    let bytes = std::fs::read(&a.path).unwrap();
    let cache = ModelCache::new(config("emulated:1MiB", WORK)).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("header-cut", bytes[..20].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("huge-header", {
            let mut v = u64::MAX.to_le_bytes().to_vec();
            v.extend_from_slice(&[0; 64]);
            v
        }),
        ("empty", Vec::new()),
        ("bad-json", {
            let mut v = 10u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{\"a\":[1,2");
            v
        }),
    ];
    for (name, data) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, data).unwrap();
        match cache.load_model(&p, name) {
            Err(Error::Format(msg)) => eprintln!("{name}: {msg}"),
            Err(e) => panic!("{name}: expected Format, got {e}"),
            Ok(_) => panic!("{name}: loaded"),
        }
    }
    let m = cache.load_model(&a.path, "a").unwrap();
    let l = cache.lock(&m, 0).unwrap();
    assert_eq!(bits(&forward(&l, &a).unwrap()), reference(&a));
}

/// Runtime reconfiguration takes effect without a restart, even with a lock held.
#[test]
fn runtime_reconfigure() {
    let dir = TempDir::new("reconf");
    let a = write_model(dir.path(), "a", &[64, 128, 256, 128, 64], 16);
    let cap = WORK + a.total() + 64 * KIB;
    let cache = ModelCache::new(config(&format!("emulated:{cap}"), WORK)).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    let lock = cache.lock(&m, 0).unwrap();
    assert_eq!(m.resident_bytes(), a.total());
    let r = reference(&a);
    // Cap the device cache at the largest block: residency shrinks at once, the forward streams the rest.
    let gib = a.max_block() as f64 / (1u64 << 30) as f64 * 1.5;
    let log = cache
        .configure(&format!("max_cache_vram_gb: {gib}"))
        .unwrap();
    assert!(log.iter().any(|l| l.contains("max_cache_vram_gb")));
    let resident = m.resident_bytes();
    assert!(resident < a.total());
    assert_eq!(bits(&forward(&lock, &a).unwrap()), r);
    assert_eq!(lock.bytes_streamed(), a.total() - resident);
    // Back to dynamic: the plan grows lazily during the next forward.
    cache.set("max_cache_vram_gb", "auto").unwrap();
    assert_eq!(bits(&forward(&lock, &a).unwrap()), r);
    assert_eq!(m.resident_bytes(), a.total());
    // vram_state none: nothing resident.
    cache.set("vram_state", "none").unwrap();
    assert_eq!(m.resident_bytes(), 0);
    drop(lock);
    // working memory change applies to the next lock; an impossible one is refused and nothing changes.
    assert!(
        matches!(cache.set("device", "cpu"), Err(Error::InvalidArgument(msg)) if msg.contains("device"))
    );
    cache.set("vram_state", "auto").unwrap();
    cache.set("device_working_mem_gb", "1").unwrap();
    assert!(matches!(
        cache.lock(&m, 0),
        Err(Error::BudgetTooSmall { .. })
    ));
    cache
        .set(
            "device_working_mem_gb",
            &format!("{}", WORK as f64 / (1u64 << 30) as f64),
        )
        .unwrap();
    let lock = cache.lock(&m, 0).unwrap();
    assert_eq!(lock.working_bytes(), WORK);
    assert_eq!(cache.allocator().refused(), 0);
}

/// vram_state normal / smart_memory false unload after use; high keeps whole models.
#[test]
fn vram_states_and_smart_memory() {
    let dir = TempDir::new("states");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 17);
    for (yaml, resident_after) in [
        ("vram_state: normal", 0),
        ("smart_memory: false", 0),
        ("vram_state: high", a.total()),
        ("vram_state: auto", a.total()),
    ] {
        let mut cfg = config("emulated:1MiB", WORK);
        cfg.apply_yaml(yaml).unwrap();
        let cache = ModelCache::new(cfg).unwrap();
        let m = cache.load_model(&a.path, "a").unwrap();
        let l = cache.lock(&m, 0).unwrap();
        assert_eq!(m.resident_bytes(), a.total(), "{yaml}");
        assert_eq!(bits(&forward(&l, &a).unwrap()), reference(&a));
        drop(l);
        assert_eq!(m.resident_bytes(), resident_after, "{yaml}");
    }
    // Partial loading disabled and the model does not fit whole: BudgetTooSmall.
    let mut cfg = config(&format!("emulated:{}", WORK + a.total() - 1), WORK);
    cfg.set("enable_partial_loading", "false").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    assert!(matches!(
        cache.lock(&m, 0),
        Err(Error::BudgetTooSmall { .. })
    ));
}

/// storage_dtype fp16 with fp32 compute: resident blocks are converted once when placed (they cost their f32
/// bytes), streamed ones on arrival (the plan's lease); the result equals the all-resident path through fp16
/// weights and the predicted peak is the measured one.
#[test]
fn storage_dtype_fp16() {
    let dir = TempDir::new("fp16");
    let a = write_model(dir.path(), "a", &[64, 128, 96, 64], 18);
    let r = ResidentWeights::load(&a.path, &Device::Cpu, DType::F16).unwrap();
    let reference = bits(&forward(&r, &a).unwrap());
    let cap = WORK + 90_000;
    let mut cfg = config(&format!("emulated:{cap}"), WORK);
    cfg.set("storage_dtype", "fp16").unwrap();
    // One block in flight, so that the first forward's peak is the plan's (no prefetch to learn first).
    cfg.set("async_loading", "false").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    assert_eq!(cache.compute_dtype(), DType::F32);
    let m = cache.load_model(&a.path, "a").unwrap();
    assert_eq!(m.total_bytes(), a.total() / 2);
    let l = cache.lock(&m, 0).unwrap();
    cache.allocator().reset_peak();
    assert_eq!(bits(&forward(&l, &a).unwrap()), reference);
    let plan = cache.stats().plan.unwrap();
    assert_eq!(cache.allocator().peak(), plan.predicted_peak_bytes);
    // Resident blocks hold their f32 bytes (twice the fp16 file's); a forward streams the others' fp16 bytes.
    let resident = m.resident_blocks();
    let resident_storage: u64 = a
        .blocks
        .iter()
        .zip(&a.block_bytes)
        .filter(|(k, _)| resident.contains(k))
        .map(|(_, b)| b / 2)
        .sum();
    assert_eq!(m.resident_bytes(), 2 * resident_storage);
    assert_eq!(l.bytes_streamed(), m.total_bytes() - resident_storage);
    assert!(m.resident_bytes() > 0 && resident_storage < m.total_bytes());
    eprintln!(
        "fp16 storage: resident {} of {}, slot {}, predicted peak {} = measured",
        m.resident_bytes(),
        m.total_bytes(),
        plan.slot_bytes,
        plan.predicted_peak_bytes
    );
}

/// The fp16 file users download, default configuration: on the CPU device (and on the emulated one, fully
/// resident) every block is converted to f32 once when placed. A fetch returns the same f32 tensors every time
/// (no cast, no streaming lease) and the result is bit-identical to converting the file's weights up front.
#[test]
fn fp16_file_default_config_converts_resident_blocks_once() {
    let dir = TempDir::new("fp16-once");
    let a = write_model_as(dir.path(), "a", &[64, 128, 96, 64], 21, DType::F16);
    let r = ResidentWeights::load(&a.path, &Device::Cpu, DType::F32).unwrap();
    let reference = bits(&forward(&r, &a).unwrap());
    for device in [
        "cpu".to_string(),
        format!("emulated:{}", WORK + 4 * a.total()),
    ] {
        let cache = ModelCache::new(config(&device, WORK)).unwrap();
        assert_eq!(cache.compute_dtype(), DType::F32);
        let m = cache.load_model(&a.path, "a").unwrap();
        assert_eq!(
            m.total_bytes(),
            a.total(),
            "{device}: storage stays the file's fp16"
        );
        let l = cache.lock(&m, 0).unwrap();
        assert_eq!(
            m.resident_bytes(),
            2 * a.total(),
            "{device}: resident = the converted f32 bytes"
        );
        assert_eq!(cache.allocator().usage().weights_bytes, 2 * a.total());
        for _ in 0..2 {
            assert_eq!(bits(&forward(&l, &a).unwrap()), reference, "{device}");
        }
        assert_eq!(l.bytes_streamed(), 0);
        let key = &a.blocks[1];
        let (w1, w2) = (l.fetch(key).unwrap(), l.fetch(key).unwrap());
        let (t1, t2) = (w1.get("weight").unwrap(), w2.get("weight").unwrap());
        assert_eq!(t1.dtype(), DType::F32);
        assert_eq!(
            t1.id(),
            t2.id(),
            "{device}: a resident block is converted once, not per fetch"
        );
        assert_eq!(
            cache.allocator().usage().streaming_bytes,
            0,
            "{device}: no per-fetch cast lease"
        );
    }
}
