//! The model cache: a RAM tier and a device tier, LRU between models, residency plans within a locked model,
//! working-memory reservations and host reservations.
//!
//! Locking order (never reversed): the cache's `inner` mutex → a model's `state` mutex → the allocator's counters.
//! A fetch takes only its model's state, briefly; no mutex is held across a forward or a file read in a fetch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, CudaAllocator, VramState};
use crate::device::{
    AllocKind, Allocation, BlockBuffer, ComputeThreads, DeviceAllocator, DeviceSpec,
};
use crate::error::{Error, Result};
use crate::memory::plan::{self, BlockCost, ResidencyPlan};
use crate::memory::sizing::{self, Sizing};
use crate::memory::stats::{CacheStats, DeviceStats, ModelStats, PlanStats, RamStats, TierStats};
use crate::weights::{
    BlockInfo, BlockWeights, StagingRing, TensorLocation, WeightSource, WeightStore,
};

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

/// The outcome of one attempt to lock a model.
enum Attempt {
    Locked(ModelLock),
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
}

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

/// Size and modification time of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    size: u64,
    mtime: Option<std::time::SystemTime>,
}

impl FileKey {
    fn of(path: &Path) -> Result<Self> {
        let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            size: md.len(),
            mtime: md.modified().ok(),
        })
    }
}

/// A model registered with the cache: its mapped weights and where each block is now. Shared (`Arc`) between
/// the host, the cache and running locks. The cache keeps it after the host's handles are gone, until its RAM copy
/// and device residency are evicted by the budgets (then it is forgotten and its file unmapped) or `unload_all`.
pub struct ManagedModel {
    id: u64,
    name: String,
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

impl ManagedModel {
    fn state(&self) -> MutexGuard<'_, ModelState> {
        lock(&self.state)
    }
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The safetensors file.
    pub fn path(&self) -> &Path {
        self.store.path()
    }
    /// The mapped weights (tensor and block tables).
    pub fn store(&self) -> &WeightStore {
        &self.store
    }
    /// Its blocks, in file order.
    pub fn blocks(&self) -> &[BlockInfo] {
        self.store.blocks()
    }
    /// Bytes of all weights in the storage dtype.
    pub fn total_bytes(&self) -> u64 {
        self.store.total_bytes()
    }
    /// Device bytes the model takes when wholly resident: its weights in the compute dtype (they are converted
    /// once when placed, so an fp16 file computed in f32 takes twice its storage bytes).
    pub fn device_bytes(&self) -> u64 {
        self.costs.iter().map(|c| c.resident).sum()
    }
    /// Storage-dtype bytes of the blocks not resident now: what one forward streams.
    pub fn streamed_bytes_per_forward(&self) -> u64 {
        let st = self.state();
        self.store
            .blocks()
            .iter()
            .enumerate()
            .filter(|(i, _)| !st.resident.contains_key(i))
            .map(|(_, b)| b.storage_bytes)
            .sum()
    }
    /// Device bytes resident now (compute dtype).
    pub fn resident_bytes(&self) -> u64 {
        self.state()
            .resident
            .values()
            .map(|r| r.alloc.bytes())
            .sum()
    }
    /// Keys of the blocks resident now.
    pub fn resident_blocks(&self) -> Vec<String> {
        let st = self.state();
        let mut v: Vec<usize> = st.resident.keys().copied().collect();
        v.sort();
        v.into_iter()
            .map(|i| self.store.blocks()[i].key.clone())
            .collect()
    }
    /// Number of active locks.
    pub fn lock_count(&self) -> usize {
        self.state().locks
    }
    /// The current residency plan (while locked).
    pub fn plan(&self) -> Option<ResidencyPlan> {
        self.state().plan.clone()
    }
    /// Where tensor `name` (full checkpoint name) is now, or None if the model has no such tensor.
    pub fn tensor_location(&self, name: &str) -> Option<TensorLocation> {
        let t = self.store.tensors().iter().find(|t| t.name == name)?;
        if self.state().resident.contains_key(&t.block) {
            Some(TensorLocation::Device)
        } else if self.store.has_ram_copy() {
            Some(TensorLocation::Ram)
        } else {
            Some(TensorLocation::File)
        }
    }
    /// Bytes streamed for this model since it was loaded.
    pub fn bytes_streamed(&self) -> u64 {
        self.state().streamed
    }

    /// Give a resident block back; returns the bytes freed now. While a forward runs on other threads the block is
    /// handed to them (retiring): a compute thread frees it at its next block boundary.
    fn release_block(&self, st: &mut ModelState, rb: ResidentBlock) -> u64 {
        if self.compute.running() && !self.compute.is_current() {
            rb.alloc.mark_retiring();
            st.deferred.push(rb);
            0
        } else {
            rb.release()
        }
    }

    /// At a block boundary on a compute thread: free the blocks other threads released meanwhile that no fetch
    /// holds any more. Returns whether anything was freed.
    fn free_deferred(&self) -> bool {
        let mut st = self.state();
        let before = st.deferred.len();
        st.deferred.retain(|rb| Arc::strong_count(&rb.alloc) > 1);
        st.deferred.len() != before
    }

    /// Release resident blocks the target no longer holds; returns bytes freed immediately.
    fn release_outside_target(&self, st: &mut ModelState) -> u64 {
        let Some(target) = st.target.clone() else {
            return 0;
        };
        let drop: Vec<usize> = st
            .resident
            .keys()
            .copied()
            .filter(|&b| !target[b])
            .collect();
        let mut freed = 0;
        for b in drop {
            if let Some(rb) = st.resident.remove(&b) {
                freed += self.release_block(st, rb);
            }
        }
        freed
    }

    /// Release resident blocks, lowest rank first (smallest blocks first), until `want` bytes are released or
    /// `whole` (then all). Returns (freed now, released in total).
    fn evict(&self, st: &mut ModelState, want: u64, whole: bool) -> (u64, u64) {
        let (mut now, mut total) = (0, 0);
        for b in plan::rank(&self.costs).into_iter().rev() {
            if !whole && total >= want {
                break;
            }
            if let Some(rb) = st.resident.remove(&b) {
                total += rb.alloc.bytes();
                now += self.release_block(st, rb);
                if let Some(t) = st.target.as_mut() {
                    t[b] = false;
                }
            }
        }
        (now, total)
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
}

/// A streamed block's device tensors in the storage dtype, and the pooled buffer they view (emulated device).
type Uploaded = (HashMap<String, Tensor>, Option<BlockBuffer>);

/// The next streamed block, being copied on its own thread while the current one computes. Its lease (device
/// bytes) is taken before the copy starts, within the plan's slot.
struct Prefetch {
    block: usize,
    lease: StreamLease,
    done: mpsc::Receiver<Result<Uploaded>>,
}

/// Copy block `b` of `m` to the device for one use, converted to the compute dtype on arrival. `prefetch`: on the prefetch thread (single-threaded copy; on
/// CUDA the copy runs on that thread's own stream, so wait for it there: the consumer then needs no event).
fn upload_streamed(sh: &Shared, m: &ManagedModel, b: usize, prefetch: bool) -> Result<Uploaded> {
    let dtype = m.store.compute_dtype();
    if let Some((tensors, buf)) = m.store.block_to_buffer(b, &sh.alloc, !prefetch, dtype)? {
        return Ok((tensors, Some(buf)));
    }
    let tensors = m.store.block_to_device(b, &sh.alloc, &sh.staging, dtype)?;
    if prefetch && sh.alloc.is_cuda() {
        sh.alloc.device().synchronize()?;
    }
    Ok((tensors, None))
}

struct StreamLease {
    _alloc: Allocation,
    bytes: u64,
    inflight: Arc<AtomicU64>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.inflight.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Device bytes the host holds for its own use; dropping it gives them back to the cache.
pub struct Reservation {
    shared: Arc<Shared>,
    id: u64,
    alloc: Option<Allocation>,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.alloc.as_ref().map_or(0, |a| a.bytes())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        drop(self.alloc.take());
        let mut inner = lock(&self.shared.inner);
        inner.reservations.retain(|(id, _)| *id != self.id);
        let _ = self.shared.rebalance(&mut inner);
        drop(inner);
        self.shared.alloc.notify();
    }
}

/// What each block of `store` costs on `alloc`'s device. Blocks are converted to the compute dtype once: resident
/// ones when placed, streamed ones on arrival. On CUDA the storage-dtype copy crosses the bus and is converted on
/// the device (so it is held beside the converted one meanwhile); elsewhere the conversion runs on the host as the
/// bytes are copied.
fn block_costs(store: &WeightStore, cuda: bool) -> Vec<BlockCost> {
    let compute = store.compute_dtype();
    store
        .blocks()
        .iter()
        .map(|b| {
            let converts = b
                .tensors
                .iter()
                .any(|&t| store.tensors()[t].storage_dtype != compute);
            match (converts, cuda) {
                (false, _) => BlockCost::same_dtype(b.storage_bytes),
                (true, false) => BlockCost {
                    bytes: b.storage_bytes,
                    resident: b.compute_bytes,
                    lease: b.compute_bytes,
                    place: 0,
                },
                (true, true) => BlockCost {
                    bytes: b.storage_bytes,
                    resident: b.compute_bytes,
                    lease: b.storage_bytes + b.compute_bytes,
                    place: b.storage_bytes,
                },
            }
        })
        .collect()
}

/// The least a model needs on the device to run at all: fully streamed with one block in flight, or whole when
/// the configuration does not split models.
fn min_need(cfg: &Config, costs: &[BlockCost]) -> u64 {
    let partial_ok =
        cfg.enable_partial_loading || matches!(cfg.vram_state, VramState::Low | VramState::None);
    if partial_ok {
        plan::min_need(costs, 1)
    } else {
        plan::whole_need(costs)
    }
}

fn resolve_compute(config: &Config, alloc: &DeviceAllocator) -> DType {
    config.compute_dtype.dtype().unwrap_or(if alloc.is_cuda() {
        DType::F16
    } else {
        DType::F32
    })
}

impl Shared {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Device bytes the cache may plan with (capacity − external use − reserve_vram − host reservations), None
    /// when unbounded (CPU).
    fn avail_phys(&self, inner: &Inner) -> Option<u64> {
        let cap = self.alloc.capacity()?;
        let external = if self.alloc.is_cuda() {
            self.alloc
                .mem_info()
                .map(|(free, total)| {
                    total
                        .saturating_sub(free)
                        .saturating_sub(self.alloc.current())
                })
                .unwrap_or(0)
        } else {
            self.alloc.used(AllocKind::External)
        };
        let held = external
            .saturating_add(inner.config.reserve_vram_bytes())
            .saturating_add(inner.reserved());
        Some(cap.saturating_sub(held))
    }

    /// Whether `m` with `working` bytes of working memory could run if it were the only lock: None when it can,
    /// else what it needs and what the device (or the cap) really has for it.
    fn fits_alone(&self, inner: &Inner, m: &ManagedModel, working: u64) -> Option<Infeasible> {
        let min = min_need(&inner.config, &m.costs);
        let phys = self.avail_phys(inner);
        if let Some(c) = inner.config.max_cache_vram_bytes() {
            if min > c {
                return Some(Infeasible {
                    needed: min,
                    available: phys.map_or(c, |p| p.min(c)),
                });
            }
        }
        let p = phys?;
        let need = min.saturating_add(working);
        (need > p).then_some(Infeasible {
            needed: need,
            available: p,
        })
    }

    /// Recompute every locked model's plan for the current budget, release residency above it (now, or at the
    /// holder's next block boundary) and evict unlocked models' residency that no longer fits, LRU first.
    fn rebalance(&self, inner: &mut Inner) -> std::result::Result<(), Infeasible> {
        let cfg = inner.config.clone();
        let phys = self.avail_phys(inner);
        let cap = cfg.max_cache_vram_bytes();
        let state = cfg.vram_state;
        let partial_ok =
            cfg.enable_partial_loading || matches!(state, VramState::Low | VramState::None);
        // Prefetch (async_loading) needs a second block in flight; plans fall back to one slot when two don't fit.
        let slots = if cfg.async_loading && self.alloc.capacity().is_some() {
            2
        } else {
            1
        };
        let min_of = |m: &Arc<ManagedModel>| min_need(&cfg, &m.costs);
        // One entry per locked model (a model locked twice is planned once; its working memories add up).
        let mut order: Vec<(Arc<ManagedModel>, u64)> = Vec::new();
        for l in &inner.locks {
            match order.iter_mut().find(|(m, _)| m.id == l.model.id) {
                Some(e) => e.1 += l.working,
                None => order.push((l.model.clone(), l.working)),
            }
        }
        let mins: Vec<u64> = order.iter().map(|(m, _)| min_of(m)).collect();
        let works: Vec<u64> = order.iter().map(|(_, w)| *w).collect();
        match (cap, phys) {
            (None, Some(p)) => {
                let need = sat_sum(mins.iter().chain(&works).copied());
                if need > p {
                    return Err(Infeasible {
                        needed: need,
                        available: p,
                    });
                }
            }
            (Some(c), p) => {
                let need = sat_sum(mins.iter().copied());
                if need > c {
                    return Err(Infeasible {
                        needed: need,
                        available: p.map_or(c, |p| p.min(c)),
                    });
                }
            }
            (None, None) => {}
        }
        let mut plans = Vec::with_capacity(order.len());
        let (mut used_w, mut used_work) = (0u64, 0u64);
        for (k, (m, work)) in order.iter().enumerate() {
            let later_min = sat_sum(mins[k + 1..].iter().copied());
            let later_work = sat_sum(works[k + 1..].iter().copied());
            let budget = match (cap, phys) {
                (None, None) => u64::MAX,
                (None, Some(p)) => {
                    p.saturating_sub(sat_sum([used_w, used_work, later_min, later_work, *work]))
                }
                // The cap takes precedence over working memory: plan up to it, bounded only by what the device
                // holds besides the other locks; the working memory then comes out of residency on refusal.
                (Some(c), p) => {
                    let b = c.saturating_sub(used_w.saturating_add(later_min));
                    p.map_or(b, |p| {
                        b.min(p.saturating_sub(used_w.saturating_add(later_min)))
                    })
                }
            };
            let costs = &m.costs;
            let p = match state {
                VramState::None => [slots, 1]
                    .into_iter()
                    .find(|&k| plan::min_need(costs, k) <= budget)
                    .map(|k| plan::stream_all(costs, budget, k)),
                VramState::High | VramState::Normal => {
                    if plan::whole_need(costs) <= budget {
                        Some(plan::whole(costs, budget))
                    } else if partial_ok {
                        plan::partial(costs, budget, slots)
                            .or_else(|| plan::partial(costs, budget, 1))
                    } else {
                        None
                    }
                }
                _ if partial_ok => {
                    plan::partial(costs, budget, slots).or_else(|| plan::partial(costs, budget, 1))
                }
                _ => (plan::whole_need(costs) <= budget).then(|| plan::whole(costs, budget)),
            };
            let Some(p) = p else {
                let own = min_of(m).saturating_add(*work);
                return Err(Infeasible {
                    needed: own,
                    available: budget.saturating_add(*work),
                });
            };
            used_w = sat_sum([used_w, p.resident_bytes, p.slot_bytes]);
            used_work = used_work.saturating_add(*work);
            plans.push(p);
        }
        // Apply the plans to the locked models.
        for ((m, _), p) in order.iter().zip(&plans) {
            let mut st = m.state();
            st.target = Some(p.resident.clone());
            st.plan = Some(p.clone());
            m.release_outside_target(&mut st);
        }
        // Unlocked residency must fit what is left; evict least recently used first.
        let room = match (cap, phys) {
            (None, None) => u64::MAX,
            (None, Some(p)) => p.saturating_sub(used_w.saturating_add(used_work)),
            (Some(c), p) => {
                let b = c.saturating_sub(used_w);
                p.map_or(b, |p| b.min(p.saturating_sub(used_w)))
            }
        };
        let mut unlocked: Vec<(Arc<ManagedModel>, u64, u64)> = inner
            .live_models()
            .into_iter()
            .filter_map(|m| {
                let st = m.state();
                let bytes: u64 = st.resident.values().map(|r| r.alloc.bytes()).sum();
                let (key, locks) = (st.last_used, st.locks);
                drop(st);
                (locks == 0 && bytes > 0).then(|| (m, key, bytes))
            })
            .collect();
        unlocked.sort_by_key(|u| u.1);
        let mut total: u64 = unlocked.iter().map(|u| u.2).sum();
        let whole = matches!(state, VramState::High | VramState::Normal);
        for (m, _, _) in &unlocked {
            if total <= room {
                break;
            }
            let mut st = m.state();
            let (_, released) = self.evict(m, &mut st, total - room, whole);
            total -= released;
        }
        self.forget_unused(inner);
        // The predicted device peak with these plans.
        let external = self.alloc.used(AllocKind::External);
        let peak = sat_sum([used_w, used_work, total, inner.reserved(), external]);
        inner.plan = order
            .last()
            .zip(plans.last())
            .map(|((m, work), p)| PlanStats {
                model: m.name.clone(),
                budget_bytes: p.budget_bytes,
                resident_bytes: p.resident_bytes,
                slot_bytes: p.slot_bytes,
                slots: p.slots,
                working_bytes: *work,
                streamed_bytes_per_forward: p.streamed_bytes_per_forward,
                predicted_peak_bytes: peak,
            });
        Ok(())
    }

    /// Free device bytes by evicting unlocked models (LRU first, block by block or whole per `vram_state`), then,
    /// for `requester`, by shrinking its own plan. Returns (bytes freed now, bytes released in total).
    fn make_room(&self, want: u64, requester: Option<&ManagedModel>) -> (u64, u64) {
        let mut inner = self.inner();
        let whole = matches!(inner.config.vram_state, VramState::High | VramState::Normal);
        let mut unlocked: Vec<(Arc<ManagedModel>, u64)> = inner
            .live_models()
            .into_iter()
            .filter_map(|m| {
                let st = m.state();
                let r = (st.locks == 0 && !st.resident.is_empty()).then_some(st.last_used);
                drop(st);
                r.map(|k| (m, k))
            })
            .collect();
        unlocked.sort_by_key(|u| u.1);
        let (mut now, mut total) = (0, 0);
        for (m, _) in &unlocked {
            if now >= want {
                break;
            }
            let (n, t) = self.evict(m, &mut m.state(), want - now, whole);
            now += n;
            total += t;
        }
        if now < want {
            if let Some(m) = requester {
                let mut st = m.state();
                // Only blocks no running fetch holds free anything now.
                for b in plan::rank(&m.costs).into_iter().rev() {
                    if now >= want {
                        break;
                    }
                    let free_now = st
                        .resident
                        .get(&b)
                        .is_some_and(|r| Arc::strong_count(&r.alloc) == 1);
                    if free_now {
                        let rb = st.resident.remove(&b).expect("present");
                        total += rb.alloc.bytes();
                        now += m.release_block(&mut st, rb);
                        if let Some(t) = st.target.as_mut() {
                            t[b] = false;
                        }
                    }
                }
                let target = st.target.clone();
                if let (Some(t), Some(p)) = (target, st.plan.as_mut()) {
                    p.resident = t;
                    p.resident_bytes = plan::resident_bytes(&m.costs, &p.resident);
                    p.streamed_bytes_per_forward = plan::streamed_bytes(&m.costs, &p.resident);
                    p.slot_bytes = plan::slot_of(&m.costs, &p.resident, p.slots);
                }
            }
        }
        drop(inner);
        (now, total)
    }

    /// Allocate `bytes` of `kind`: wait while bytes held by running blocks (retiring or streamed by someone else)
    /// would cover the shortage, up to `wait` (None = as long as they would); then try, and on refusal evict and
    /// retry until nothing more can be evicted.
    fn alloc_for(
        &self,
        bytes: u64,
        kind: AllocKind,
        requester: Option<&ManagedModel>,
        wait: Option<Duration>,
        own_inflight: u64,
    ) -> Result<Allocation> {
        let start = Instant::now();
        if let Some(cap) = self.alloc.capacity() {
            if bytes <= cap {
                loop {
                    let free = self.alloc.free().unwrap_or(0);
                    if free >= bytes {
                        if let Ok(a) = self.alloc.allocate(bytes, kind) {
                            return Ok(a);
                        }
                        // Refused although the counters show room (another thread took it, or the device itself is
                        // out of memory): evict and retry below, which ends when nothing more can be evicted.
                        break;
                    }
                    let pending = self.alloc.retiring()
                        + self
                            .alloc
                            .used(AllocKind::Streaming)
                            .saturating_sub(own_inflight);
                    let in_time = wait.is_none_or(|w| start.elapsed() < w);
                    if free + pending >= bytes && pending > 0 && in_time {
                        self.alloc.wait_for_free(Duration::from_millis(20));
                        continue;
                    }
                    break;
                }
            }
        }
        loop {
            match self.alloc.allocate(bytes, kind) {
                Ok(a) => return Ok(a),
                Err(e @ Error::OutOfDeviceMemory { .. }) => {
                    let free = self.alloc.free().unwrap_or(0);
                    let (now, _) = self.make_room(bytes.saturating_sub(free), requester);
                    if now == 0 {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Keep the RAM tier within its limit: drop RAM copies of unlocked models, least recently used first, never
    /// `keep`'s; then forget models that hold nothing any more.
    fn enforce_ram(&self, inner: &mut Inner, keep: Option<u64>) {
        let limit = inner.sizing.ram_limit_bytes;
        let mut models = inner.live_models();
        models.sort_by_key(|m| m.state().last_used);
        let mut used: u64 = models.iter().map(|m| m.store.ram_bytes()).sum();
        for m in &models {
            if used <= limit {
                break;
            }
            if Some(m.id) != keep && m.state().locks == 0 {
                used -= self.drop_ram(m);
            }
        }
        drop(models);
        self.forget_unused(inner);
    }

    /// Drop `m`'s RAM copy (an eviction from the RAM tier); returns the bytes released.
    fn drop_ram(&self, m: &ManagedModel) -> u64 {
        let bytes = m.store.drop_ram_copy();
        if bytes > 0 {
            self.tiers.ram_evictions.fetch_add(1, Ordering::Relaxed);
            self.tiers
                .ram_evicted_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        bytes
    }

    /// [`ManagedModel::evict`], counted as an eviction from the device tier when it releases anything.
    fn evict(&self, m: &ManagedModel, st: &mut ModelState, want: u64, whole: bool) -> (u64, u64) {
        let (now, total) = m.evict(st, want, whole);
        if total > 0 {
            self.tiers.device_evictions.fetch_add(1, Ordering::Relaxed);
            self.tiers
                .device_evicted_bytes
                .fetch_add(total, Ordering::Relaxed);
        }
        (now, total)
    }

    /// Forget models that no handle, lock or prefetch holds and that cache nothing any more (no RAM copy, no device
    /// residency): their files are unmapped. Only the registry's reference is left when the strong count is 1.
    fn forget_unused(&self, inner: &mut Inner) {
        self.forget(inner, |m| {
            Arc::strong_count(m) == 1 && !m.store.has_ram_copy() && m.state().resident.is_empty()
        });
    }

    /// Drop the registry's reference to every model `gone` selects (counted; their file reads stay in the total).
    fn forget(&self, inner: &mut Inner, gone: impl Fn(&Arc<ManagedModel>) -> bool) {
        let before = inner.models.len();
        inner.models.retain(|m| {
            if gone(m) {
                self.files_read
                    .fetch_add(m.store.file_bytes_read(), Ordering::Relaxed);
                return false;
            }
            true
        });
        let n = (before - inner.models.len()) as u64;
        self.tiers.forgotten.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether `m` should get a RAM copy it lacks (read outside the cache's lock by the caller, see
    /// [`Shared::read_ram`]), counting the RAM tier's hit.
    fn ram_need(&self, inner: &Inner, m: &ManagedModel) -> RamNeed {
        if !inner.config.keep_ram_copy_of_weights {
            return RamNeed::Held;
        }
        if m.store.has_ram_copy() {
            self.tiers.ram_hits.fetch_add(1, Ordering::Relaxed);
            return RamNeed::Held;
        }
        if m.store.total_bytes() > inner.sizing.ram_limit_bytes {
            return RamNeed::TooLarge;
        }
        RamNeed::Read {
            pin: inner.config.pin_memory,
        }
    }

    /// Read (and pin) `m`'s RAM copy — without the cache's lock: this is a whole-file read — then trim the RAM tier
    /// (never `m`'s copy).
    fn read_ram(&self, m: &ManagedModel, pin: bool) -> Result<()> {
        self.tiers.ram_misses.fetch_add(1, Ordering::Relaxed);
        m.store.load_ram_copy()?;
        if pin {
            m.store.pin_ram_copy(&self.alloc)?;
        }
        self.enforce_ram(&mut self.inner(), Some(m.id));
        Ok(())
    }

    /// Load the blocks of `m`'s plan that are not resident yet (eviction-and-retry on refusal; a block that still
    /// does not fit is dropped from the plan and streamed instead).
    fn fill_target(&self, m: &ManagedModel, counter: &AtomicU64) -> Result<()> {
        let todo: Vec<usize> = {
            let st = m.state();
            match &st.target {
                Some(t) => (0..t.len())
                    .filter(|&b| t[b] && !st.resident.contains_key(&b))
                    .collect(),
                None => Vec::new(),
            }
        };
        for b in todo {
            if !m.state().target.as_ref().is_some_and(|t| t[b]) {
                continue;
            }
            let bytes = m.costs[b].resident;
            let placed = self
                .alloc_for(bytes, AllocKind::Weights, Some(m), Some(WAIT_LIMIT), 0)
                .and_then(|a| {
                    let place = m.costs[b].place;
                    let transient = match place {
                        0 => None,
                        n => Some(self.alloc_for(
                            n,
                            AllocKind::Streaming,
                            Some(m),
                            Some(WAIT_LIMIT),
                            0,
                        )?),
                    };
                    Ok((a, transient))
                });
            match placed {
                Ok((a, transient)) => {
                    let tensors = m.store.block_to_device(
                        b,
                        &self.alloc,
                        &self.staging,
                        m.store.compute_dtype(),
                    )?;
                    drop(transient);
                    let mut st = m.state();
                    st.resident.insert(
                        b,
                        ResidentBlock {
                            tensors,
                            alloc: Arc::new(a.used_by(m.compute.clone())),
                        },
                    );
                    st.loaded += bytes;
                    self.loaded.fetch_add(bytes, Ordering::Relaxed);
                    counter.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(Error::OutOfDeviceMemory { .. }) => {
                    let mut st = m.state();
                    if let Some(t) = st.target.as_mut() {
                        t[b] = false;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ModelCache {
    /// A cache over the device `config` selects, sized per `config` (see [`ModelCache::sizing`] for the log lines).
    pub fn new(config: Config) -> Result<Self> {
        let alloc = DeviceAllocator::new(&config.effective_device())?;
        crate::device::set_pool_keep(&alloc, config.cuda_allocator == CudaAllocator::PoolKeep)?;
        let sizing = sizing::compute(&config, &alloc);
        Ok(Self {
            shared: Arc::new(Shared {
                alloc,
                staging: StagingRing::new(STAGING_SLOTS),
                inner: Mutex::new(Inner {
                    config,
                    sizing,
                    models: Vec::new(),
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

    fn replace_config(&self, next: Config) -> Result<Vec<String>> {
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
                    sh.drop_ram(&m);
                }
            }
        }
        sh.enforce_ram(&mut inner, None);
        let log = inner.sizing.log.clone();
        drop(inner);
        sh.alloc.notify();
        Ok(log)
    }

    /// Map the safetensors file `path` and register it as `name` (no device bytes yet; a RAM copy when
    /// `keep_ram_copy_of_weights` and it fits the RAM tier). Loading the same file again — same path, size and
    /// modification time, same storage dtype — returns the model the cache keeps, with whatever RAM copy and device
    /// residency it still has, without reading the file (a hit), even after every earlier handle was freed. The
    /// file is mapped and read without holding the cache's lock, so other threads' calls proceed meanwhile.
    pub fn load_model(&self, path: &Path, name: &str) -> Result<Arc<ManagedModel>> {
        let sh = &self.shared;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let key = FileKey::of(&canon)?;
        let (storage, compute, keep_ram, ram_limit, pin) = {
            let mut inner = sh.inner();
            let storage = inner.config.storage_dtype.dtype();
            let compute = resolve_compute(&inner.config, &sh.alloc);
            if let Some(m) = self.cached(&mut inner, &canon, key, storage, compute) {
                return Ok(m);
            }
            let c = &inner.config;
            (
                storage,
                compute,
                c.keep_ram_copy_of_weights,
                inner.sizing.ram_limit_bytes,
                c.pin_memory,
            )
        };
        // The slow part, outside the cache's lock: map and validate the file, read the RAM copy, pin it.
        let store = WeightStore::open(&canon, storage, compute)?;
        let costs = block_costs(&store, sh.alloc.is_cuda());
        let ram = keep_ram && store.total_bytes() <= ram_limit;
        if ram {
            store.load_ram_copy()?;
            if pin {
                store.pin_ram_copy(&sh.alloc)?;
            }
        }
        let mut inner = sh.inner();
        // Another thread may have loaded the same file meanwhile: use its model (ours is dropped).
        if let Some(m) = self.cached(&mut inner, &canon, key, storage, compute) {
            return Ok(m);
        }
        let id = inner.id();
        inner.clock += 1;
        let m = Arc::new(ManagedModel {
            id,
            name: name.to_string(),
            file_key: key,
            storage,
            store,
            costs,
            next_fetch: Mutex::new(HashMap::new()),
            compute: Arc::default(),
            state: Mutex::new(ModelState {
                last_used: inner.clock,
                ..Default::default()
            }),
        });
        sh.misses.fetch_add(1, Ordering::Relaxed);
        sh.tiers.load_misses.fetch_add(1, Ordering::Relaxed);
        if ram {
            sh.tiers.ram_misses.fetch_add(1, Ordering::Relaxed);
        }
        inner.models.push(m.clone());
        sh.enforce_ram(&mut inner, Some(m.id));
        Ok(m)
    }

    /// The model the cache keeps for this file, if its size and modification time are unchanged (a hit: it is
    /// marked used now). Entries for an older version of the file are forgotten when nothing holds them.
    fn cached(
        &self,
        inner: &mut Inner,
        path: &Path,
        key: FileKey,
        storage: Option<DType>,
        compute: DType,
    ) -> Option<Arc<ManagedModel>> {
        let sh = &self.shared;
        sh.forget(inner, |m| {
            m.store.path() == path
                && m.file_key != key
                && Arc::strong_count(m) == 1
                && m.state().locks == 0
        });
        let m = inner.models.iter().find(|m| {
            m.store.path() == path
                && m.file_key == key
                && m.storage == storage
                && m.store.compute_dtype() == compute
        })?;
        let m = m.clone();
        inner.clock += 1;
        m.state().last_used = inner.clock;
        sh.hits.fetch_add(1, Ordering::Relaxed);
        sh.tiers.load_hits.fetch_add(1, Ordering::Relaxed);
        Some(m)
    }

    /// Lock `model` for an operation needing `working_mem_bytes` of working memory (the lock gets
    /// max(`device_working_mem_gb`, that)). Plans residency for the current budget (evicting unlocked models,
    /// shrinking other plans to their minimum if needed), reserves the working memory and loads the planned blocks.
    /// When the model fits the device alone but not beside the locks held now (another call's working memory), it
    /// waits for them (up to [`LOCK_WAIT_LIMIT`]) instead of failing. `BudgetTooSmall` when the model cannot run
    /// even fully streamed and alone beside host reservations and other programs' use.
    pub fn lock(&self, model: &Arc<ManagedModel>, working_mem_bytes: u64) -> Result<ModelLock> {
        self.lock_cancellable(model, working_mem_bytes, None)
    }

    /// [`lock`](Self::lock) whose wait for other calls' memory ends with `Cancelled` as soon as `cancel` is set.
    pub fn lock_cancellable(
        &self,
        model: &Arc<ManagedModel>,
        working_mem_bytes: u64,
        cancel: Option<&AtomicBool>,
    ) -> Result<ModelLock> {
        let sh = &self.shared;
        let start = Instant::now();
        loop {
            match self.try_lock(model, working_mem_bytes) {
                Attempt::Locked(l) => return Ok(l),
                Attempt::Failed(e) => return Err(e),
                Attempt::Contended(e) => {
                    if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                        return Err(Error::Cancelled);
                    }
                    if start.elapsed() >= LOCK_WAIT_LIMIT {
                        return Err(e);
                    }
                    // Woken by every release (allocations, locks, reservations); the timeout bounds a missed one.
                    sh.alloc.wait_for_free(Duration::from_millis(20));
                }
            }
        }
    }

    /// One attempt at [`lock`](Self::lock): locked, failed for good, or failed only because of other locks.
    fn try_lock(&self, model: &Arc<ManagedModel>, working_mem_bytes: u64) -> Attempt {
        let sh = &self.shared;
        let mut ram = RamNeed::Held;
        let (id, working) = {
            let mut inner = sh.inner();
            let working = inner.config.working_mem_bytes().max(working_mem_bytes);
            if let Some(e) = sh.fits_alone(&inner, model, working) {
                return Attempt::Failed(Error::BudgetTooSmall {
                    what: format!("model `{}` (working memory {working} bytes)", model.name),
                    needed_bytes: e.needed,
                    available_bytes: e.available,
                });
            }
            let id = inner.id();
            inner.clock += 1;
            let clock = inner.clock;
            let was_resident = {
                let mut st = model.state();
                st.locks += 1;
                st.last_used = clock;
                !st.resident.is_empty()
            };
            inner.locks.push(LockRec {
                id,
                model: model.clone(),
                working,
            });
            let failure: Option<Error> = match sh.rebalance(&mut inner) {
                Err(e) => Some(Error::BudgetTooSmall {
                    what: format!(
                        "model `{}` (working memory {working} bytes) beside the {} other lock(s) held now",
                        model.name,
                        inner.locks.len() - 1
                    ),
                    needed_bytes: e.needed,
                    available_bytes: e.available,
                }),
                Ok(()) => {
                    ram = sh.ram_need(&inner, model);
                    let hit = ram == RamNeed::Held || (ram == RamNeed::TooLarge && was_resident);
                    let c = if hit { &sh.hits } else { &sh.misses };
                    c.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            if let Some(err) = failure {
                inner.locks.retain(|l| l.id != id);
                {
                    let mut st = model.state();
                    st.locks -= 1;
                    if st.locks == 0 {
                        st.target = None;
                    }
                }
                let _ = sh.rebalance(&mut inner);
                // It fits alone (checked above): a plan that fails now fails because of the other locks.
                let contended =
                    matches!(err, Error::BudgetTooSmall { .. }) && !inner.locks.is_empty();
                return if contended {
                    Attempt::Contended(err)
                } else {
                    Attempt::Failed(err)
                };
            }
            (id, working)
        };
        let mut lk = ModelLock {
            shared: sh.clone(),
            model: model.clone(),
            id,
            working: None,
            working_bytes: working,
            device: sh.alloc.device().clone(),
            inflight: Arc::new(AtomicU64::new(0)),
            streamed: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            last_fetch: Mutex::new(None),
            pending: Mutex::new(None),
            thread: None,
        };
        // Dropping `lk` on an error below unregisters the lock. The lock protects the RAM copy being read from
        // eviction; the read runs without the cache's lock.
        if let RamNeed::Read { pin } = ram {
            if let Err(e) = sh.read_ram(model, pin) {
                return Attempt::Failed(e);
            }
        }
        match sh.alloc_for(
            working,
            AllocKind::Working,
            Some(model.as_ref()),
            Some(WAIT_LIMIT),
            0,
        ) {
            Ok(a) => lk.working = Some(a),
            Err(e @ Error::OutOfDeviceMemory { .. }) => {
                drop(lk);
                // Other locks' working memory or streamed blocks hold the bytes: wait for them.
                let others = !sh.inner().locks.is_empty();
                return if others {
                    Attempt::Contended(e)
                } else {
                    Attempt::Failed(e)
                };
            }
            Err(e) => return Attempt::Failed(e),
        }
        let planned = model
            .state()
            .target
            .as_ref()
            .is_some_and(|t| t.iter().any(|r| *r));
        match sh.fill_target(model, &lk.loaded) {
            Ok(()) => {
                // The device tier: a hit when the plan's resident blocks were all there already.
                let c = match lk.loaded.load(Ordering::Relaxed) {
                    0 if planned => Some(&sh.tiers.device_hits),
                    0 => None,
                    _ => Some(&sh.tiers.device_misses),
                };
                if let Some(c) = c {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                lk.thread = Some(model.compute.enter());
                Attempt::Locked(lk)
            }
            Err(e) => Attempt::Failed(e),
        }
    }

    /// Explicit partial load (like `lowvram_model_load_to_device`): make up to `max_bytes` of `model` resident now,
    /// by the plan's rank, evicting other unlocked models if needed. Returns the model's resident bytes. A locked
    /// model keeps its plan (its resident bytes are returned unchanged).
    pub fn load_to_device(&self, model: &Arc<ManagedModel>, max_bytes: u64) -> Result<u64> {
        let sh = &self.shared;
        {
            let mut inner = sh.inner();
            if model.state().locks > 0 {
                return Ok(model.resident_bytes());
            }
            inner.clock += 1;
            let clock = inner.clock;
            // Room for unlocked residency after the locks, as the plan sees it.
            let phys = sh.avail_phys(&inner);
            let cap = inner.config.max_cache_vram_bytes();
            let locked: u64 = inner
                .live_models()
                .iter()
                .filter(|m| m.state().locks > 0)
                .map(|m| {
                    m.state()
                        .plan
                        .as_ref()
                        .map_or(0, |p| p.resident_bytes + p.slot_bytes)
                })
                .sum::<u64>()
                + inner.locks.iter().map(|l| l.working).sum::<u64>();
            let room = match (cap, phys) {
                (None, None) => u64::MAX,
                (None, Some(p)) => p.saturating_sub(locked),
                (Some(c), p) => p.map_or(c, |p| p.min(c)).saturating_sub(locked),
            };
            let keep = plan::keep_within(&model.costs, max_bytes.min(room));
            let keep_bytes = plan::resident_bytes(&model.costs, &keep);
            let mut others: Vec<Arc<ManagedModel>> = inner
                .live_models()
                .into_iter()
                .filter(|m| m.id != model.id && m.state().locks == 0)
                .collect();
            others.sort_by_key(|m| m.state().last_used);
            let mut other_bytes: u64 = others.iter().map(|m| m.resident_bytes()).sum();
            for o in &others {
                if other_bytes + keep_bytes <= room {
                    break;
                }
                let want = other_bytes + keep_bytes - room;
                other_bytes -= sh.evict(o, &mut o.state(), want, false).1;
            }
            let mut st = model.state();
            st.last_used = clock;
            for b in 0..keep.len() {
                if !keep[b] {
                    if let Some(rb) = st.resident.remove(&b) {
                        model.release_block(&mut st, rb);
                    }
                }
            }
            st.target = Some(keep);
            drop(st);
            let _ = sh.rebalance(&mut inner);
        }
        let r = sh.fill_target(model, &AtomicU64::new(0));
        model.state().target = None;
        r?;
        Ok(model.resident_bytes())
    }

    /// Reserve `bytes` of device memory for the host. The cache shrinks at once (running forwards release their
    /// extra blocks at their next block boundary); returns once the bytes are actually free, or `BudgetTooSmall`
    /// if they can never be (what locked models need to run, fully streamed, stays theirs).
    pub fn reserve(&self, bytes: u64) -> Result<Reservation> {
        let sh = &self.shared;
        let id = {
            let mut inner = sh.inner();
            let id = inner.id();
            inner.reservations.push((id, bytes));
            if sh.rebalance(&mut inner).is_err() {
                inner.reservations.retain(|r| r.0 != id);
                let _ = sh.rebalance(&mut inner);
                // What the device has beside other reservations, minus what locked models need to run at all.
                let locked =
                    sat_sum(inner.locks.iter().map(|l| {
                        min_need(&inner.config, &l.model.costs).saturating_add(l.working)
                    }));
                let available = sh
                    .avail_phys(&inner)
                    .unwrap_or(u64::MAX)
                    .saturating_sub(locked);
                return Err(Error::BudgetTooSmall {
                    what: "reservation".into(),
                    needed_bytes: bytes,
                    available_bytes: available,
                });
            }
            id
        };
        let mut res = Reservation {
            shared: sh.clone(),
            id,
            alloc: None,
        };
        match sh.alloc_for(bytes, AllocKind::Reservation, None, None, 0) {
            Ok(a) => {
                res.alloc = Some(a);
                Ok(res)
            }
            Err(Error::OutOfDeviceMemory {
                needed_bytes,
                available_bytes,
                ..
            }) => Err(Error::BudgetTooSmall {
                what: "reservation".into(),
                needed_bytes,
                available_bytes,
            }),
            Err(e) => Err(e),
        }
    }

    /// Free at least `bytes` of device memory held by unlocked models (least recently used first), like
    /// ComfyUI's `/free`; `u64::MAX` frees all it can. Returns the bytes released. Locked models are untouched.
    pub fn free_memory(&self, bytes: u64) -> u64 {
        let mut inner = self.shared.inner();
        let mut models: Vec<Arc<ManagedModel>> = inner
            .live_models()
            .into_iter()
            .filter(|m| m.state().locks == 0)
            .collect();
        models.sort_by_key(|m| m.state().last_used);
        let mut released = 0;
        for m in models {
            if released >= bytes {
                break;
            }
            released += self
                .shared
                .evict(&m, &mut m.state(), bytes - released, false)
                .1;
        }
        self.shared.forget_unused(&mut inner);
        drop(inner);
        self.shared.alloc.notify();
        released
    }

    /// Unload every unlocked model: device residency and RAM copies. Models a host still holds stay registered
    /// and reload from their files on next use; the others are forgotten (files unmapped). Returns the device bytes
    /// released.
    pub fn unload_all(&self) -> u64 {
        let mut inner = self.shared.inner();
        let mut released = 0;
        for m in inner.live_models() {
            let mut st = m.state();
            if st.locks == 0 {
                released += self.shared.evict(&m, &mut st, u64::MAX, true).1;
                drop(st);
                self.shared.drop_ram(&m);
            }
        }
        self.shared.forget_unused(&mut inner);
        drop(inner);
        self.shared.alloc.notify();
        released
    }

    /// All counters, JSON-serialisable.
    pub fn stats(&self) -> CacheStats {
        let sh = &self.shared;
        let mut inner = sh.inner();
        let models = inner.live_models();
        let usage = sh.alloc.usage();
        let mstats: Vec<ModelStats> = models
            .iter()
            .map(|m| {
                let st = m.state();
                ModelStats {
                    name: m.name.clone(),
                    path: m.store.path().display().to_string(),
                    total_bytes: m.store.total_bytes(),
                    resident_bytes: st.resident.values().map(|r| r.alloc.bytes()).sum(),
                    ram_bytes: m.store.ram_bytes(),
                    blocks: m.costs.len(),
                    resident_blocks: st.resident.len(),
                    locks: st.locks,
                    bytes_streamed: st.streamed,
                    bytes_loaded: st.loaded,
                }
            })
            .collect();
        CacheStats {
            device: DeviceStats {
                // From the same snapshot as `usage`, so free + used never exceeds the capacity.
                free_bytes: usage
                    .capacity_bytes
                    .map(|c| c.saturating_sub(usage.current_bytes)),
                used_by_cache_bytes: usage.weights_bytes,
                usage,
            },
            ram: RamStats {
                cache_used_bytes: mstats.iter().map(|m| m.ram_bytes).sum(),
                cache_limit_bytes: inner.sizing.ram_limit_bytes,
                staging_bytes: sh.staging.bytes(),
                staging_peak_bytes: sh.staging.peak(),
                staging_slots: sh.staging.slots(),
                pinned_bytes: models.iter().map(|m| m.store.pinned_bytes()).sum(),
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

impl ModelLock {
    /// The locked model.
    pub fn model(&self) -> &Arc<ManagedModel> {
        &self.model
    }
    /// Working memory held by this lock.
    pub fn working_bytes(&self) -> u64 {
        self.working_bytes
    }
    /// Bytes streamed through this lock (per run).
    pub fn bytes_streamed(&self) -> u64 {
        self.streamed.load(Ordering::Relaxed)
    }
    /// Of [`Self::bytes_streamed`], the bytes that were copied ahead of use by a prefetch (async_loading).
    pub fn bytes_prefetched(&self) -> u64 {
        self.prefetched.load(Ordering::Relaxed)
    }
    /// Bytes made resident through this lock (at lock time or when the budget grew).
    pub fn bytes_loaded(&self) -> u64 {
        self.loaded.load(Ordering::Relaxed)
    }
    /// The model's current residency plan.
    pub fn plan(&self) -> Option<ResidencyPlan> {
        self.model.plan()
    }

    fn stream_alloc(&self, bytes: u64) -> Result<StreamLease> {
        let own = self.inflight.load(Ordering::SeqCst);
        let a = self.shared.alloc_for(
            bytes,
            AllocKind::Streaming,
            Some(self.model.as_ref()),
            Some(WAIT_LIMIT),
            own,
        )?;
        self.inflight.fetch_add(bytes, Ordering::SeqCst);
        Ok(StreamLease {
            _alloc: a,
            bytes,
            inflight: self.inflight.clone(),
        })
    }
}

impl WeightSource for ModelLock {
    /// Resident blocks come back at no cost (cast on the fly if the compute dtype differs); planned blocks not yet
    /// resident (the budget grew) are made resident when there is room; every other block is streamed and its bytes
    /// are released when the returned value drops. The plan is re-read at every call, so a budget change takes
    /// effect at the next block.
    /// With a plan of two slots (async_loading), the block this model fetched next last time is then copied on
    /// a separate thread while the caller computes, and handed over by the next fetch.
    fn fetch(&self, block: &str) -> Result<BlockWeights> {
        let m = &self.model;
        // A block boundary: free what other threads released meanwhile (in order with the work queued so far).
        if m.free_deferred() {
            self.shared.alloc.notify();
        }
        let Some(b) = m.store.block_index(block) else {
            return Ok(BlockWeights::new(block, HashMap::new(), None));
        };
        if let Some(a) = lock(&self.last_fetch).replace(b) {
            if a != b {
                lock(&m.next_fetch).insert(a, b);
            }
        }
        let ready = match lock(&self.pending).take() {
            Some(p) if p.block == b => Some(p),
            Some(p) => {
                self.discard(p);
                None
            }
            None => None,
        };
        let out = self.fetch_now(b, block, ready)?;
        self.start_prefetch(b);
        Ok(out)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.model.store.compute_dtype()
    }
}

impl ModelLock {
    /// A prefetch that will not be used: wait for its copy (its bytes are in use until then), then release them.
    fn discard(&self, p: Prefetch) {
        let _ = p.done.recv();
        self.shared
            .prefetch_wasted
            .fetch_add(self.model.costs[p.block].bytes, Ordering::Relaxed);
    }

    /// Start copying the block expected after `b`, if it will be streamed and its lease fits in the plan's slot
    /// beside what this lock holds now (never waiting and never evicting: a prefetch that does not fit is skipped).
    fn start_prefetch(&self, b: usize) {
        let m = &self.model;
        let Some(n) = lock(&m.next_fetch).get(&b).copied() else {
            return;
        };
        let slot = {
            let st = m.state();
            let Some(p) = st.plan.as_ref().filter(|p| p.slots >= 2) else {
                return;
            };
            if st.resident.contains_key(&n) || st.target.as_ref().is_some_and(|t| t[n]) {
                return;
            }
            p.slot_bytes
        };
        let bytes = m.costs[n].lease_streamed();
        let sh = &self.shared;
        if self.inflight.load(Ordering::SeqCst) + bytes > slot
            || sh.alloc.free().is_some_and(|f| f < bytes)
        {
            return;
        }
        let Ok(alloc) = sh.alloc.allocate(bytes, AllocKind::Streaming) else {
            return;
        };
        self.inflight.fetch_add(bytes, Ordering::SeqCst);
        let lease = StreamLease {
            _alloc: alloc,
            bytes,
            inflight: self.inflight.clone(),
        };
        let (tx, done) = mpsc::sync_channel(1);
        let (sh, m) = (sh.clone(), m.clone());
        let spawned = std::thread::Builder::new()
            .name("lowvram-prefetch".into())
            .spawn(move || {
                let _ = tx.send(upload_streamed(&sh, &m, n, true));
            });
        if spawned.is_ok() {
            *lock(&self.pending) = Some(Prefetch {
                block: n,
                lease,
                done,
            });
        }
    }

    fn fetch_now(&self, b: usize, block: &str, ready: Option<Prefetch>) -> Result<BlockWeights> {
        let m = &self.model;
        let cost = m.costs[b];
        let (res, planned) = {
            let st = m.state();
            let res = st
                .resident
                .get(&b)
                .map(|r| (r.tensors.clone(), r.alloc.clone()));
            (res, st.target.as_ref().is_some_and(|t| t[b]))
        };
        // A prefetch of a block that is resident now (the budget grew): wait for its copy before releasing its lease.
        let ready = match ready {
            Some(p) if res.is_some() || planned => {
                self.discard(p);
                None
            }
            r => r,
        };
        // Resident blocks were converted when placed: no cast here.
        if let Some((tensors, a)) = res {
            return Ok(BlockWeights::new(block, tensors, Some(Box::new(a))));
        }
        let sh = &self.shared;
        if planned
            && sh
                .alloc
                .free()
                .is_none_or(|f| f >= cost.resident + cost.place)
        {
            if let Ok(a) = sh.alloc.allocate(cost.resident, AllocKind::Weights) {
                let a = a.used_by(m.compute.clone());
                let transient = match cost.place {
                    0 => None,
                    n => Some(self.stream_alloc(n)?),
                };
                let tensors =
                    m.store
                        .block_to_device(b, &sh.alloc, &sh.staging, m.store.compute_dtype())?;
                drop(transient);
                let a = Arc::new(a);
                {
                    let mut st = m.state();
                    if st.target.as_ref().is_some_and(|t| t[b]) && !st.resident.contains_key(&b) {
                        st.resident.insert(
                            b,
                            ResidentBlock {
                                tensors: tensors.clone(),
                                alloc: a.clone(),
                            },
                        );
                        st.loaded += cost.resident;
                    }
                }
                sh.loaded.fetch_add(cost.resident, Ordering::Relaxed);
                self.loaded.fetch_add(cost.resident, Ordering::Relaxed);
                return Ok(BlockWeights::new(block, tensors, Some(Box::new(a))));
            }
        }
        // A prefetched copy if it arrived whole (a failed one is redone here, which reports the error).
        let prefetched = ready.and_then(|p| match p.done.recv() {
            Ok(Ok(up)) => Some((p.lease, up)),
            _ => None,
        });
        let from_prefetch = prefetched.is_some();
        let (lease, (tensors, buf)) = match prefetched {
            Some(x) => x,
            None => (
                self.stream_alloc(cost.lease_streamed())?,
                upload_streamed(sh, m, b, false)?,
            ),
        };
        sh.streamed.fetch_add(cost.bytes, Ordering::Relaxed);
        self.streamed.fetch_add(cost.bytes, Ordering::Relaxed);
        if from_prefetch {
            sh.prefetched.fetch_add(cost.bytes, Ordering::Relaxed);
            self.prefetched.fetch_add(cost.bytes, Ordering::Relaxed);
        }
        m.state().streamed += cost.bytes;
        // BlockWeights drops its tensors before its lease, so the views are gone before the buffer is reused.
        Ok(BlockWeights::new(
            block,
            tensors,
            Some(Box::new((lease, buf))),
        ))
    }
}

impl Drop for ModelLock {
    fn drop(&mut self) {
        if let Some(p) = lock(&self.pending).take() {
            self.discard(p);
        }
        drop(self.working.take());
        let sh = &self.shared;
        let mut inner = sh.inner();
        inner.locks.retain(|l| l.id != self.id);
        let unload = !inner.config.smart_memory || inner.config.vram_state == VramState::Normal;
        {
            let mut st = self.model.state();
            st.locks -= 1;
            if st.locks == 0 {
                st.target = None;
                // The forward is over: what other threads released while it ran is freed here, on its thread.
                st.deferred.clear();
                if unload {
                    sh.evict(&self.model, &mut st, u64::MAX, true);
                }
            }
        }
        if let Some(t) = self.thread.take() {
            self.model.compute.leave(t);
        }
        let _ = sh.rebalance(&mut inner);
        drop(inner);
        sh.alloc.notify();
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
