//! Statistics of a [`crate::memory::ModelCache`], serialisable to JSON (`lowvram stats`, `/system_stats`-like).

use serde::Serialize;

use crate::device::DeviceUsage;
use crate::memory::sizing::Sizing;

/// Everything the cache knows about its memory, at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    /// The device: capacity, current/peak/refused and bytes by kind.
    pub device: DeviceStats,
    /// The RAM tier.
    pub ram: RamStats,
    /// Every live model.
    pub models: Vec<ModelStats>,
    /// Bytes copied to the device for one fetch and released after it, since creation.
    pub bytes_streamed_total: u64,
    /// Of those, bytes copied ahead of use by a prefetch (async_loading), since creation.
    pub bytes_prefetched_total: u64,
    /// Bytes a prefetch copied that were not used (the model fetched another block next), since creation.
    pub bytes_prefetch_wasted_total: u64,
    /// Bytes copied to the device to stay resident, since creation.
    pub bytes_loaded_total: u64,
    /// Loads and locks served from memory (RAM copy or device residency already there).
    pub cache_hits: u64,
    /// Loads and locks that had to read the file.
    pub cache_misses: u64,
    /// Hits, misses and evictions per tier.
    pub tiers: TierStats,
    /// Bytes read from weight files (RAM copies, and streams without one), since creation: a cache hit adds none.
    pub bytes_read_from_files_total: u64,
    /// The newest lock's plan, with the device-wide predicted peak.
    pub plan: Option<PlanStats>,
    /// Cache sizes in force and the rules that chose them.
    pub sizing: Sizing,
}

/// The model cache as users know it: loads served from the registry, and each tier's hits, misses and evictions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierStats {
    /// `load_model` of a file the cache still keeps (same path, size, mtime): no file read.
    pub load_hits: u64,
    /// `load_model` that mapped the file.
    pub load_misses: u64,
    /// Loads and locks that found the model's RAM copy held.
    pub ram_hits: u64,
    /// Loads and locks that read the RAM copy from the file.
    pub ram_misses: u64,
    /// RAM copies dropped (RAM budget, `unload_all`, `keep_ram_copy_of_weights: false`), and their bytes.
    pub ram_evictions: u64,
    pub ram_evicted_bytes: u64,
    /// Locks whose planned resident blocks were all on the device already.
    pub device_hits: u64,
    /// Locks that had to load resident blocks.
    pub device_misses: u64,
    /// Models whose device residency was evicted (budgets, other models, `free_memory`, `unload_all`), and the
    /// bytes.
    pub device_evictions: u64,
    pub device_evicted_bytes: u64,
    /// Models forgotten (no handle, nothing cached any more): their files are unmapped.
    pub models_forgotten: u64,
}

/// The device part of [`CacheStats`].
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    /// The allocator's counters.
    #[serde(flatten)]
    pub usage: DeviceUsage,
    /// Capacity minus current (None on the CPU).
    pub free_bytes: Option<u64>,
    /// Bytes of resident weights (= `usage.weights_bytes`), the device cache.
    pub used_by_cache_bytes: u64,
    /// CUDA: the context's own memory pool (live, held from the driver, high-water mark); None elsewhere.
    pub pool: Option<crate::device::PoolStats>,
    /// CUDA: other programs' use per the driver (driver used − our pool's bytes − host reservations); None
    /// elsewhere.
    pub external_from_driver_bytes: Option<u64>,
}

/// The RAM part of [`CacheStats`].
#[derive(Debug, Clone, Serialize)]
pub struct RamStats {
    /// Bytes of RAM weight copies held.
    pub cache_used_bytes: u64,
    /// The RAM cache limit.
    pub cache_limit_bytes: u64,
    /// Host bytes held by the staging ring now (reads without a RAM copy pass through it).
    pub staging_bytes: u64,
    /// The most host bytes the staging ring has held.
    pub staging_peak_bytes: u64,
    /// Buffers in the ring.
    pub staging_slots: usize,
    /// Host bytes registered as pinned (page-locked) memory now, whole pages: RAM-copy arenas and staging slots
    /// (CUDA and the emulated device, which accounts pinning as CUDA would; 0 on the CPU device).
    pub pinned_bytes: u64,
    /// The most host bytes pinned at once.
    pub pinned_peak_bytes: u64,
    /// The cap on pinned bytes (`max_pinned_memory_gb`, default a fraction of RAM); None = no pinning
    /// (`pin_memory: false`, or the CPU device).
    pub pinned_cap_bytes: Option<u64>,
    /// Models whose RAM copy is pinned.
    pub models_pinned: usize,
    /// Models with a RAM copy that is not pinned (the cap, `pin_memory: false`, the driver refused): their blocks
    /// cross from pageable memory.
    pub models_unpinned: usize,
    /// Models without a RAM copy (`keep_ram_copy_of_weights: false`, larger than the RAM cache, evicted from it):
    /// their streamed blocks are read from the memory map through the staging ring.
    pub models_without_ram_copy: usize,
    /// Copies made from memory-mapped files (RAM copies and streams without one): one per run of tensors lying back
    /// to back in a file, else one per tensor.
    pub file_copies_total: u64,
    /// Bytes memory-mapped (files; not counted as cache).
    pub mapped_bytes: u64,
}

/// Where a model's weights are copied to the device from (see [`crate::memory::ManagedModel::weights_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsFrom {
    /// Its RAM copy, pinned: DMA at full speed, overlapping compute.
    PinnedRam,
    /// Its RAM copy in pageable memory.
    Ram,
    /// The memory map of its file, through the staging ring (no RAM copy).
    File,
    /// The CPU device: the RAM copy is the weights computed with.
    InPlace,
}

/// One model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStats {
    /// Unique in the process (across contexts): `lowvram_model_info.id`.
    pub id: u64,
    pub name: String,
    pub path: String,
    /// Bytes of all weights (storage dtype).
    pub total_bytes: u64,
    /// Bytes resident on the device.
    pub resident_bytes: u64,
    /// Bytes of its RAM copy.
    pub ram_bytes: u64,
    /// Host bytes of its RAM copy's arena (tensors aligned, whole pages; 0 without one and on the CPU device).
    pub ram_arena_bytes: u64,
    /// Host bytes of its RAM copy pinned.
    pub pinned_bytes: u64,
    /// Where its weights are copied to the device from now.
    pub weights_from: WeightsFrom,
    /// Why (the log line's reason): e.g. "no RAM copy: its N bytes exceed the RAM cache limit of M bytes".
    pub weights_from_reason: String,
    /// Blocks / resident blocks.
    pub blocks: usize,
    pub resident_blocks: usize,
    /// Active locks.
    pub locks: usize,
    /// Bytes streamed / loaded for this model since it was loaded.
    pub bytes_streamed: u64,
    pub bytes_loaded: u64,
}

/// A lock's residency plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStats {
    /// The model.
    pub model: String,
    /// Budget the plan was made for (resident + slot ≤ budget).
    pub budget_bytes: u64,
    /// Bytes planned resident.
    pub resident_bytes: u64,
    /// Bytes fetches may hold beyond residency (the `slots` largest streamed blocks or casts).
    pub slot_bytes: u64,
    /// Blocks in flight at once: 2 when the next streamed block is prefetched (async_loading), else 1.
    pub slots: usize,
    /// The lock's working memory.
    pub working_bytes: u64,
    /// Bytes one forward streams (`model − resident`).
    pub streamed_bytes_per_forward: u64,
    /// Predicted device peak while it runs: all residency + every lock's slot and working memory + host
    /// reservations + external use.
    pub predicted_peak_bytes: u64,
}
