//! The model cache: a RAM tier and a device tier, LRU between models, residency plans within a locked model,
//! working-memory reservations and host reservations.
//!
//! Locking order (never reversed): the cache's `inner` mutex → a model's `state` mutex → the allocator's counters.
//! A fetch takes only its model's state, briefly; no mutex is held across a forward or a file read (loads and
//! locks read RAM copies without the cache's mutex).
//!
//! This file holds the types and the cache's configuration and statistics; the work is split by concept:
//! `registry.rs` (the models kept, the RAM tier, eviction), `budget.rs` (what the device has, plans, allocation with
//! waiting and eviction), `lock.rs` (locks and fetches), `prefetch.rs` (the next streamed block, copied by the
//! device's copy engine), `reservation.rs` (host reservations).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, CudaAllocator, VramState};
use crate::device::{
    AllocKind, Allocation, BlockBuffer, ComputeGate, ComputeThreads, DeviceAllocator, DeviceSpec, GateGuard, PoolRoute,
};
use crate::error::{Error, Result};
use crate::memory::plan::{self, BlockCost, ResidencyPlan};
use crate::memory::sizing::{self, Sizing};
use crate::memory::stats::{CacheStats, DeviceStats, ModelStats, PlanStats, RamStats, TierStats, WeightsFrom};
use crate::weights::{
    BlockInfo, BlockWeights, StagingRing, TensorLocation, WeightSource, WeightStore,
};

mod budget;
mod lock;
mod prefetch;
mod registry;
mod reservation;

use budget::{block_costs, min_need};
use prefetch::{upload_streamed, Prefetch, StreamLease};
use registry::{FileKey, Loading};

pub use reservation::Reservation;

/// Buffers in the staging ring (reads without a RAM copy): one block being copied, one being filled.
const STAGING_SLOTS: usize = 2;

/// How long a lock or a fetch waits for bytes held by a running block before treating the shortage as an OOM.
const WAIT_LIMIT: Duration = Duration::from_secs(5);

/// How long a lock waits for other calls' locks (their working memory and plans) to make room before it fails.
pub const LOCK_WAIT_LIMIT: Duration = Duration::from_secs(60);

/// What a lock needs done about its model's RAM copy.
#[derive(Clone, Copy, PartialEq)]
enum RamNeed {
    /// Held already, or not wanted (`keep_ram_copy_of_weights: false`).
    Held,
    /// Larger than the RAM tier: streamed from the file.
    TooLarge,
    /// To be read from the file (and pinned).
    Read { pin: bool },
}

/// The outcome of one attempt to lock a model (or register a reservation).
enum Attempt<T = ModelLock> {
    Locked(T),
    /// Cannot succeed by waiting (the model does not fit alone, or an I/O error).
    Failed(Error),
    /// Does not fit beside the locks held now; the error to report if waiting does not help.
    Contended(Error),
}

/// A sum of byte counts that saturates instead of wrapping.
fn sat_sum(v: impl IntoIterator<Item = u64>) -> u64 {
    v.into_iter().fold(0, u64::saturating_add)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Thread-safe cache of models over one device. All methods take `&self`; share it with `Arc` or by reference.
pub struct ModelCache {
    shared: Arc<Shared>,
}

struct Shared {
    alloc: DeviceAllocator,
    /// On CUDA, one lock computes at a time (see [`ComputeGate`]); None elsewhere.
    gate: Option<Arc<ComputeGate>>,
    staging: Arc<StagingRing>,
    inner: Mutex<Inner>,
    streamed: AtomicU64,
    prefetched: AtomicU64,
    prefetch_wasted: AtomicU64,
    loaded: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    tiers: TierCounters,
    /// File bytes read by models the cache has forgotten (the live ones count their own).
    files_read: AtomicU64,
    /// Copies from files made by models the cache has forgotten.
    file_copies: AtomicU64,
    /// Where log lines go (the context's logger): `(warn, line)`. Called on the thread of the call that logs, never
    /// under the cache's lock.
    log: Mutex<Option<LogFn>>,
}

/// A log line's destination: `(warn, line)`.
pub type LogFn = Arc<dyn Fn(bool, &str) + Send + Sync>;

/// Hits, misses and evictions of the two tiers (see [`TierStats`]).
#[derive(Default)]
struct TierCounters {
    load_hits: AtomicU64,
    load_misses: AtomicU64,
    ram_hits: AtomicU64,
    ram_misses: AtomicU64,
    ram_evictions: AtomicU64,
    ram_evicted_bytes: AtomicU64,
    device_hits: AtomicU64,
    device_misses: AtomicU64,
    device_evictions: AtomicU64,
    device_evicted_bytes: AtomicU64,
    forgotten: AtomicU64,
}

impl TierCounters {
    fn snapshot(&self) -> TierStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TierStats {
            load_hits: g(&self.load_hits),
            load_misses: g(&self.load_misses),
            ram_hits: g(&self.ram_hits),
            ram_misses: g(&self.ram_misses),
            ram_evictions: g(&self.ram_evictions),
            ram_evicted_bytes: g(&self.ram_evicted_bytes),
            device_hits: g(&self.device_hits),
            device_misses: g(&self.device_misses),
            device_evictions: g(&self.device_evictions),
            device_evicted_bytes: g(&self.device_evicted_bytes),
            models_forgotten: g(&self.forgotten),
        }
    }
}

struct LockRec {
    id: u64,
    model: Arc<ManagedModel>,
    working: u64,
}

struct Inner {
    config: Config,
    sizing: Sizing,
    /// Every model the cache keeps (strongly: a model outlives its host handles until the budgets evict it or
    /// `unload_all` forgets it).
    models: Vec<Arc<ManagedModel>>,
    /// First loads in progress (their files read without this lock); a load of the same model waits for its one.
    loading: Vec<Arc<Loading>>,
    locks: Vec<LockRec>,
    reservations: Vec<(u64, u64)>,
    next_id: u64,
    clock: u64,
    plan: Option<PlanStats>,
}

impl Inner {
    /// Bytes of host reservations (saturating: a host may ask for any u64).
    fn reserved(&self) -> u64 {
        self.reservations
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.1))
    }
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
    fn live_models(&mut self) -> Vec<Arc<ManagedModel>> {
        self.models.clone()
    }
}

/// Why a plan cannot fit: total bytes needed and available for everything planned together.
struct Infeasible {
    needed: u64,
    available: u64,
}

/// A model registered with the cache: its mapped weights and where each block is now. Shared (`Arc`) between
/// the host, the cache and running locks. The cache keeps it after the host's handles are gone, until its RAM copy
/// and device residency are evicted by the budgets (then it is forgotten and its file unmapped) or `unload_all`.
pub struct ManagedModel {
    id: u64,
    name: String,
    /// Which view of the file it is (`""` whole; a single file's component name).
    pub(super) view: String,
    /// The file's size and modification time when it was mapped: a later load of the same path is a cache hit only
    /// while they are unchanged.
    file_key: FileKey,
    /// The `storage_dtype` it was loaded with (a load under another one is a different model).
    storage: Option<DType>,
    store: WeightStore,
    costs: Vec<BlockCost>,
    state: Mutex<ModelState>,
    /// The threads running a forward of it now (its locks' threads): its device memory is freed only on them.
    compute: Arc<ComputeThreads>,
    /// Why it has no RAM copy, when it has none (shown by [`ManagedModel::weights_from`]).
    no_ram_copy: Mutex<String>,
    /// The last line logged about where its weights stream from (a new one is logged when it changes).
    logged_from: Mutex<String>,
    /// The block fetched after each block in the last forward (learned: a model fetches its blocks in the same
    /// order every call), which is what a prefetch copies next.
    next_fetch: Mutex<HashMap<usize, usize>>,
}

#[derive(Default)]
struct ModelState {
    resident: HashMap<usize, ResidentBlock>,
    /// The plan's resident set while locked (None when unlocked: residency is then whatever eviction left).
    target: Option<Vec<bool>>,
    plan: Option<ResidencyPlan>,
    locks: usize,
    last_used: u64,
    streamed: u64,
    loaded: u64,
    /// Resident blocks released by another thread while a forward runs: freed by a compute thread at its next block
    /// boundary (its next fetch), so the free is ordered after the work it queued (stream order on CUDA).
    deferred: Vec<ResidentBlock>,
}

struct ResidentBlock {
    tensors: HashMap<String, Tensor>,
    alloc: Arc<Allocation>,
}

impl ResidentBlock {
    /// Give the bytes back: now if no running block holds them, else when it drops (marked retiring).
    /// Returns the bytes freed immediately.
    fn release(self) -> u64 {
        if Arc::strong_count(&self.alloc) > 1 {
            self.alloc.mark_retiring();
            0
        } else {
            self.alloc.bytes()
        }
    }
}

/// A model locked for use: the [`WeightSource`] a forward fetches through. Holds the lock's working memory;
/// dropping it releases that memory (and unloads the model's device weights when `smart_memory: false` or
/// `vram_state: normal`).
pub struct ModelLock {
    shared: Arc<Shared>,
    model: Arc<ManagedModel>,
    id: u64,
    working: Option<Allocation>,
    working_bytes: u64,
    device: Device,
    inflight: Arc<AtomicU64>,
    streamed: AtomicU64,
    prefetched: AtomicU64,
    loaded: AtomicU64,
    /// The block fetched last (to learn the order) and the prefetch in flight.
    last_fetch: Mutex<Option<usize>>,
    pending: Mutex<Option<Prefetch>>,
    /// The thread that took the lock: the model's device memory is freed on it while the lock is held.
    thread: Option<std::thread::ThreadId>,
    /// The device's compute gate (CUDA), held while the lock is.
    gate: Option<GateGuard>,
    /// Our memory pool is the device's current one while the lock is held (CUDA: candle's allocations inside the
    /// forward come from it); dropped last, after `Drop` synchronised.
    _route: PoolRoute,
}

fn resolve_compute(config: &Config, alloc: &DeviceAllocator) -> DType {
    config.compute_dtype.dtype().unwrap_or(if alloc.is_cuda() {
        DType::F16
    } else {
        DType::F32
    })
}

impl ModelCache {
    /// A cache over the device `config` selects, sized per `config` (see [`ModelCache::sizing`] for the log lines).
    pub fn new(config: Config) -> Result<Self> {
        let alloc = DeviceAllocator::new(&config.effective_device())?;
        crate::device::set_pool_keep(&alloc, config.cuda_allocator == CudaAllocator::PoolKeep)?;
        let sizing = sizing::compute(&config, &alloc);
        alloc.set_pinned_cap(sizing.pinned_cap_bytes);
        let staging = StagingRing::new(STAGING_SLOTS);
        staging.set_pin(config.pin_memory);
        Ok(Self {
            shared: Arc::new(Shared {
                gate: alloc.is_cuda().then(Arc::default),
                alloc,
                staging,
                inner: Mutex::new(Inner {
                    config,
                    sizing,
                    models: Vec::new(),
                    loading: Vec::new(),
                    locks: Vec::new(),
                    reservations: Vec::new(),
                    next_id: 0,
                    clock: 0,
                    plan: None,
                }),
                streamed: AtomicU64::new(0),
                prefetched: AtomicU64::new(0),
                prefetch_wasted: AtomicU64::new(0),
                loaded: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                tiers: TierCounters::default(),
                files_read: AtomicU64::new(0),
                file_copies: AtomicU64::new(0),
                log: Mutex::new(None),
            }),
        })
    }

    /// The compute device (the CPU for `cpu` and `emulated:SIZE`).
    pub fn device(&self) -> &Device {
        self.shared.alloc.device()
    }

    /// The device's allocator (counters; `reserve_external` to stand in for another user of the device).
    pub fn allocator(&self) -> &DeviceAllocator {
        &self.shared.alloc
    }

    /// The dtype models loaded now compute in.
    pub fn compute_dtype(&self) -> DType {
        resolve_compute(&self.shared.inner().config, &self.shared.alloc)
    }

    /// Send the cache's log lines (where each model's weights stream from, when that is decided or changes) to
    /// `log(warn, line)`; None = nowhere. It runs on the thread of the call that logs, never under the cache's lock.
    pub fn set_log(&self, log: Option<LogFn>) {
        *lock(&self.shared.log) = log;
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.shared.inner().config.clone()
    }

    /// Cache sizes in force, with the log lines that explain them.
    pub fn sizing(&self) -> Sizing {
        self.shared.inner().sizing.clone()
    }

    /// Apply a partial YAML document to the live cache. Budgets change at once: residency above the new budget is
    /// released (by a running forward at its next block boundary), the RAM tier is trimmed. `device` cannot
    /// change on a live cache; dtype changes apply to models loaded afterwards. On error nothing changes.
    /// Returns the sizing log lines.
    pub fn configure(&self, yaml: &str) -> Result<Vec<String>> {
        let mut next = self.config();
        next.apply_yaml(yaml)?;
        self.replace_config(next)
    }

    /// Set one key on the live cache (same rules as [`configure`](Self::configure)).
    pub fn set(&self, key: &str, value: &str) -> Result<Vec<String>> {
        let mut next = self.config();
        next.set(key, value)?;
        self.replace_config(next)
    }

    pub(super) fn replace_config(&self, next: Config) -> Result<Vec<String>> {
        let sh = &self.shared;
        if next.effective_device().resolve() != *sh.alloc.spec() {
            return Err(Error::invalid(format!(
                "config key `device`: cannot change from {} to {} on a live context; create a new one",
                sh.alloc.spec(),
                next.effective_device()
            )));
        }
        crate::device::set_pool_keep(&sh.alloc, next.cuda_allocator == CudaAllocator::PoolKeep)?;
        let mut inner = sh.inner();
        let old = std::mem::replace(&mut inner.config, next);
        let new_sizing = sizing::compute(&inner.config, &sh.alloc);
        let old_sizing = std::mem::replace(&mut inner.sizing, new_sizing);
        if let Err(e) = sh.rebalance(&mut inner) {
            inner.config = old;
            inner.sizing = old_sizing;
            let _ = sh.rebalance(&mut inner);
            return Err(Error::BudgetTooSmall {
                what: "new configuration (active locks and reservations)".into(),
                needed_bytes: e.needed,
                available_bytes: e.available,
            });
        }
        if !inner.config.keep_ram_copy_of_weights {
            for m in inner.live_models() {
                if m.state().locks == 0 {
                    sh.drop_ram(&m, registry::NO_RAM_KEPT);
                }
            }
        }
        sh.enforce_ram(&mut inner, None);
        sh.alloc.set_pinned_cap(inner.sizing.pinned_cap_bytes);
        sh.staging.set_pin(inner.config.pin_memory);
        let log = inner.sizing.log.clone();
        drop(inner);
        sh.alloc.notify();
        Ok(log)
    }

    /// All counters, JSON-serialisable.
    pub fn stats(&self) -> CacheStats {
        let sh = &self.shared;
        // The driver's figures (CUDA) are read before the cache's lock is taken.
        let pool = crate::device::pool_stats(&sh.alloc).ok().flatten();
        let external_from_driver_bytes = sh.alloc.external_from_driver();
        let mut inner = sh.inner();
        let models = inner.live_models();
        let usage = sh.alloc.usage();
        let mstats: Vec<ModelStats> = models
            .iter()
            .map(|m| {
                let (weights_from, weights_from_reason) = m.weights_from();
                let st = m.state();
                ModelStats {
                    id: m.id,
                    name: m.name.clone(),
                    path: m.store.path().display().to_string(),
                    total_bytes: m.store.total_bytes(),
                    resident_bytes: st.resident.values().map(|r| r.alloc.bytes()).sum(),
                    ram_bytes: m.store.ram_bytes(),
                    ram_arena_bytes: m.store.ram_arena_bytes(),
                    pinned_bytes: m.store.pinned_bytes(),
                    weights_from,
                    weights_from_reason,
                    blocks: m.costs.len(),
                    resident_blocks: st.resident.len(),
                    locks: st.locks,
                    bytes_streamed: st.streamed,
                    bytes_loaded: st.loaded,
                }
            })
            .collect();
        let count = |w: WeightsFrom| mstats.iter().filter(|m| m.weights_from == w).count();
        CacheStats {
            device: DeviceStats {
                // From the same snapshot as `usage`, so free + used never exceeds the capacity.
                free_bytes: usage
                    .capacity_bytes
                    .map(|c| c.saturating_sub(usage.current_bytes)),
                used_by_cache_bytes: usage.weights_bytes,
                usage,
                pool,
                external_from_driver_bytes,
            },
            ram: RamStats {
                cache_used_bytes: mstats.iter().map(|m| m.ram_bytes).sum(),
                cache_limit_bytes: inner.sizing.ram_limit_bytes,
                staging_bytes: sh.staging.bytes(),
                staging_peak_bytes: sh.staging.peak(),
                staging_slots: sh.staging.slots(),
                pinned_bytes: sh.alloc.pinned_bytes(),
                pinned_peak_bytes: sh.alloc.pinned_peak(),
                pinned_cap_bytes: sh.alloc.pinned_cap(),
                models_pinned: count(WeightsFrom::PinnedRam),
                models_unpinned: count(WeightsFrom::Ram),
                models_without_ram_copy: count(WeightsFrom::File),
                file_copies_total: sh.file_copies.load(Ordering::Relaxed)
                    + models.iter().map(|m| m.store.file_copies()).sum::<u64>(),
                mapped_bytes: models.iter().map(|m| m.store.mapped_bytes()).sum(),
            },
            models: mstats,
            bytes_streamed_total: sh.streamed.load(Ordering::Relaxed),
            bytes_prefetched_total: sh.prefetched.load(Ordering::Relaxed),
            bytes_prefetch_wasted_total: sh.prefetch_wasted.load(Ordering::Relaxed),
            bytes_loaded_total: sh.loaded.load(Ordering::Relaxed),
            cache_hits: sh.hits.load(Ordering::Relaxed),
            cache_misses: sh.misses.load(Ordering::Relaxed),
            tiers: sh.tiers.snapshot(),
            bytes_read_from_files_total: sh.files_read.load(Ordering::Relaxed)
                + models
                    .iter()
                    .map(|m| m.store.file_bytes_read())
                    .sum::<u64>(),
            plan: inner.plan.clone(),
            sizing: inner.sizing.clone(),
        }
    }
}

impl Shared {
    pub(super) fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

// Emulated and CPU devices hand out CPU tensors; keep the type used in signatures visible for docs.
#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<ModelCache>();
    is::<ManagedModel>();
    is::<ModelLock>();
    is::<Reservation>();
    let _ = DeviceSpec::Cpu;
}
