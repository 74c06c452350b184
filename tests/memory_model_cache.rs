//! The model cache as users know it (issue 13, item 5): models stay in the RAM and device tiers after their handles
//! are freed, until budgets evict them (LRU, locked models never); loading a cached file again is a hit with no file
//! read; `unload_all` / `free_memory` empty it on demand; stats count hits, misses and evictions per tier.

mod memory_support;

use std::time::{Duration, SystemTime};

use candle_core::{DType, Device};
use lowvram::memory::ModelCache;
use lowvram::ResidentWeights;
use memory_support::*;

const KIB: u64 = 1024;
const WORK: u64 = 64 * KIB;

fn reference(m: &TestModel) -> Vec<u32> {
    let r = ResidentWeights::load(&m.path, &Device::Cpu, DType::F32).unwrap();
    bits(&forward(&r, m).unwrap())
}

fn gib(bytes: u64) -> String {
    format!("{}", bytes as f64 / (1u64 << 30) as f64)
}

/// Freeing every handle keeps the model cached (RAM copy and residency); loading the same file again is a hit that
/// reads nothing from the file, and a run on it gives the same result.
#[test]
fn models_outlive_their_handles_and_reload_without_reading_the_file() {
    let dir = TempDir::new("keep");
    let a = write_model(dir.path(), "a", &[64, 128, 96, 64], 1);
    let cache =
        ModelCache::new(config(&format!("emulated:{}", WORK + 4 * a.total()), WORK)).unwrap();
    let m = cache.load_model(&a.path, "a").unwrap();
    {
        let l = cache.lock(&m, 0).unwrap();
        assert_eq!(bits(&forward(&l, &a).unwrap()), reference(&a));
    }
    let resident = m.resident_bytes();
    assert_eq!(resident, a.total());
    drop(m);
    let s = cache.stats();
    assert_eq!(
        s.models.len(),
        1,
        "the cache keeps the model after its handle is freed"
    );
    assert_eq!(
        (s.models[0].resident_bytes, s.models[0].ram_bytes),
        (a.total(), a.total())
    );
    assert_eq!(cache.allocator().usage().weights_bytes, a.total());
    let read = s.bytes_read_from_files_total;
    assert_eq!(read, a.total(), "one read of the file, into the RAM copy");
    assert_eq!((s.tiers.load_hits, s.tiers.load_misses), (0, 1));

    let m = cache.load_model(&a.path, "a").unwrap();
    let l = cache.lock(&m, 0).unwrap();
    assert_eq!(l.bytes_loaded(), 0, "still resident: nothing loaded");
    assert_eq!(bits(&forward(&l, &a).unwrap()), reference(&a));
    let s = cache.stats();
    assert_eq!(
        s.bytes_read_from_files_total, read,
        "a cache hit reads nothing from the file"
    );
    assert_eq!((s.tiers.load_hits, s.tiers.load_misses), (1, 1));
    assert_eq!(s.tiers.device_hits, 1);
    assert_eq!(s.tiers.device_misses, 1);
}

/// A file changed on disk (new modification time) is a miss: it is read again, and the stale entry is forgotten.
#[test]
fn a_changed_file_is_a_miss() {
    let dir = TempDir::new("mtime");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 2);
    let cache =
        ModelCache::new(config(&format!("emulated:{}", WORK + 4 * a.total()), WORK)).unwrap();
    drop(cache.load_model(&a.path, "a").unwrap());
    let f = std::fs::File::options().write(true).open(&a.path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    let m = cache.load_model(&a.path, "a").unwrap();
    let s = cache.stats();
    assert_eq!((s.tiers.load_hits, s.tiers.load_misses), (0, 2));
    assert_eq!(s.models.len(), 1, "the stale entry is gone");
    assert_eq!(s.bytes_read_from_files_total, 2 * a.total());
    assert_eq!(m.total_bytes(), a.total());
}

/// The RAM tier evicts the least recently used unlocked model's copy when another does not fit; a model that then
/// caches nothing and has no handle is forgotten. A locked model's copy is never evicted.
#[test]
fn ram_tier_evicts_lru_but_never_a_locked_model() {
    let dir = TempDir::new("ramlru");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 3);
    let b = write_model(dir.path(), "b", &[64, 128, 64], 4);
    let c = write_model(dir.path(), "c", &[64, 128, 64], 5);
    // Room for two RAM copies, not three.
    let mut cfg = config(&format!("emulated:{}", WORK + 8 * a.total()), WORK);
    cfg.set("max_cache_ram_gb", &gib(2 * a.total() + a.total() / 2))
        .unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    drop(cache.load_model(&a.path, "a").unwrap());
    let mb = cache.load_model(&b.path, "b").unwrap();
    let lb = cache.lock(&mb, 0).unwrap();
    drop(lb);
    // a is least recently used: loading c evicts a's RAM copy (a has no residency: it was never locked).
    let mc = cache.load_model(&c.path, "c").unwrap();
    let s = cache.stats();
    let names: Vec<&str> = s.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(s.tiers.ram_evictions, 1);
    assert!(
        !names.contains(&"a"),
        "a caches nothing and has no handle: forgotten ({names:?})"
    );
    assert_eq!(s.tiers.models_forgotten, 1);
    assert!(s.ram.cache_used_bytes <= s.ram.cache_limit_bytes);
    // With c locked, loading a again evicts b (unlocked, older), never c.
    let lc = cache.lock(&mc, 0).unwrap();
    let _ma = cache.load_model(&a.path, "a").unwrap();
    let s = cache.stats();
    let ram = |n: &str| {
        s.models
            .iter()
            .find(|m| m.name == n)
            .map_or(0, |m| m.ram_bytes)
    };
    assert_eq!((ram("a"), ram("b"), ram("c")), (a.total(), 0, c.total()));
    assert_eq!(bits(&forward(&lc, &c).unwrap()), reference(&c));
}

/// The device tier keeps an unlocked model's residency until another model needs the room (LRU); `free_memory`
/// and `unload_all` empty the cache on demand, and everything without a handle is forgotten.
#[test]
fn device_tier_evicts_for_room_and_empties_on_demand() {
    let dir = TempDir::new("devlru");
    let a = write_model(dir.path(), "a", &[64, 128, 64], 6);
    let b = write_model(dir.path(), "b", &[64, 128, 64], 7);
    // One model resident at a time beside the working memory.
    let cache = ModelCache::new(config(
        &format!("emulated:{}", WORK + a.total() + a.total() / 2),
        WORK,
    ))
    .unwrap();
    let ma = cache.load_model(&a.path, "a").unwrap();
    drop(cache.lock(&ma, 0).unwrap());
    drop(ma);
    assert_eq!(
        cache.allocator().usage().weights_bytes,
        a.total(),
        "a stays resident without a handle"
    );
    let mb = cache.load_model(&b.path, "b").unwrap();
    let lb = cache.lock(&mb, 0).unwrap();
    assert_eq!(bits(&forward(&lb, &b).unwrap()), reference(&b));
    let s = cache.stats();
    assert!(s.tiers.device_evictions >= 1);
    assert_eq!(
        s.models
            .iter()
            .find(|m| m.name == "a")
            .unwrap()
            .resident_bytes,
        0
    );
    drop(lb);
    // free_memory frees device bytes of unlocked models; unload_all drops RAM copies and forgets unheld models.
    assert_eq!(cache.free_memory(u64::MAX), b.total());
    assert_eq!(cache.allocator().current(), 0);
    cache.unload_all();
    let s = cache.stats();
    assert_eq!(
        s.models.len(),
        1,
        "only b, whose handle is alive, stays registered"
    );
    assert_eq!(s.ram.cache_used_bytes, 0);
    drop(mb);
    cache.unload_all();
    assert!(cache.stats().models.is_empty());
    // And the next load reads the file again.
    let ma = cache.load_model(&a.path, "a").unwrap();
    let l = cache.lock(&ma, 0).unwrap();
    assert_eq!(bits(&forward(&l, &a).unwrap()), reference(&a));
}
