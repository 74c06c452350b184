//! The registry of models and the RAM tier: which files the cache keeps (hits by path, size and mtime), their
//! RAM copies, device-tier eviction of unlocked models, and forgetting models that cache nothing any more.

use super::*;
use crate::device::NotPinned;
use crate::weights::WeightLayout;

/// Why a model has no RAM copy with `keep_ram_copy_of_weights: false`.
pub(super) const NO_RAM_KEPT: &str = "keep_ram_copy_of_weights: false";

/// Why a model has no RAM copy when it is larger than the RAM cache.
fn too_large(total: u64, limit: u64) -> String {
    format!(
        "its {total} bytes exceed the RAM cache limit of {limit} bytes (see the RAM cache line at context creation; \
         set max_cache_ram_gb to keep a RAM copy)"
    )
}

/// Size and modification time of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileKey {
    pub(super) size: u64,
    pub(super) mtime: Option<std::time::SystemTime>,
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

/// What makes two loads the same model: the file (canonical path, size and mtime), its view, and the dtypes it is
/// stored and computed in.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LoadKey {
    path: PathBuf,
    view: String,
    file: FileKey,
    storage: Option<DType>,
    compute: DType,
}

impl LoadKey {
    fn is(&self, m: &ManagedModel) -> bool {
        m.store.path() == self.path
            && m.view == self.view
            && m.file_key == self.file
            && m.storage == self.storage
            && m.store.compute_dtype() == self.compute
    }
}

/// A first load in progress: it maps and reads the file without the cache's lock, and a load of the same model
/// meanwhile waits here for it instead of reading the file again (issue 13, item 7), then takes its model as a hit
/// (or, if it failed, loads on its own).
pub(super) struct Loading {
    key: LoadKey,
    done: Mutex<bool>,
    finished: Condvar,
}

impl Loading {
    fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.finished.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ends a [`Loading`] however its load ends (a model registered, an error, a panic): unregisters it and wakes the
/// loads waiting for it. It takes the cache's lock, so it must be dropped after any guard of it.
struct Finish<'a> {
    shared: &'a Shared,
    loading: Arc<Loading>,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.shared.inner().loading.retain(|l| !Arc::ptr_eq(l, &self.loading));
        *lock(&self.loading.done) = true;
        self.loading.finished.notify_all();
    }
}

/// Model ids come from one counter for the whole process: a host (or a log) holding ids from several contexts can
/// never confuse two models.
static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

impl ManagedModel {
    pub(super) fn state(&self) -> MutexGuard<'_, ModelState> {
        lock(&self.state)
    }
    /// Its identity, unique in the process (models of different contexts never share one).
    pub fn id(&self) -> u64 {
        self.id
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

    pub(super) fn set_no_ram_copy(&self, why: &str) {
        *lock(&self.no_ram_copy) = why.to_string();
    }

    /// Where its weights are copied to the device from now, and why: its pinned RAM copy, its pageable RAM copy
    /// (with the reason it is not pinned), the memory map of its file (with the reason it has no RAM copy), or, on
    /// the CPU device, in place.
    pub fn weights_from(&self) -> (WeightsFrom, String) {
        match self.store.ram_pinned() {
            Some(Ok(())) => (
                WeightsFrom::PinnedRam,
                format!("its RAM copy, pinned ({} bytes page-locked)", self.store.pinned_bytes()),
            ),
            Some(Err(NotPinned::NoTransfers)) => {
                (WeightsFrom::InPlace, "its RAM copy, used in place (CPU device)".to_string())
            }
            Some(Err(why)) => (WeightsFrom::Ram, format!("its RAM copy, not pinned: {why}")),
            None => (
                WeightsFrom::File,
                format!(
                    "the memory map of its file through the staging ring (no RAM copy: {})",
                    lock(&self.no_ram_copy)
                ),
            ),
        }
    }

    /// One log line saying where its weights stream from and why, and whether the host did not choose that slower
    /// path (no RAM copy because the RAM cache is too small; a RAM copy left unpinned by the cap or the driver):
    /// worth a warning.
    pub fn weights_from_line(&self) -> (bool, String) {
        let (from, why) = self.weights_from();
        let slow = match from {
            WeightsFrom::File => *lock(&self.no_ram_copy) != NO_RAM_KEPT,
            WeightsFrom::Ram => !matches!(self.store.ram_pinned(), Some(Err(NotPinned::Disabled))),
            _ => false,
        };
        (slow, format!("model `{}` ({} bytes): weights stream from {why}", self.name, self.total_bytes()))
    }

    /// Give a resident block back; returns the bytes freed now. While a forward runs on other threads the block is
    /// handed to them (retiring): a compute thread frees it at its next block boundary.
    pub(super) fn release_block(&self, st: &mut ModelState, rb: ResidentBlock) -> u64 {
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
    pub(super) fn free_deferred(&self) -> bool {
        let mut st = self.state();
        let before = st.deferred.len();
        st.deferred.retain(|rb| Arc::strong_count(&rb.alloc) > 1);
        st.deferred.len() != before
    }

    /// Release resident blocks the target no longer holds; returns bytes freed immediately.
    pub(super) fn release_outside_target(&self, st: &mut ModelState) -> u64 {
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
    pub(super) fn evict(&self, st: &mut ModelState, want: u64, whole: bool) -> (u64, u64) {
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

impl Shared {
    /// Keep the RAM tier within its limit: drop RAM copies of unlocked models, least recently used first, never
    /// `keep`'s; then forget models that hold nothing any more.
    pub(super) fn enforce_ram(&self, inner: &mut Inner, keep: Option<u64>) {
        let limit = inner.sizing.ram_limit_bytes;
        let why = format!("evicted from the RAM cache (limit {limit} bytes); read again at its next use");
        let mut models = inner.live_models();
        models.sort_by_key(|m| m.state().last_used);
        let mut used: u64 = models.iter().map(|m| m.store.ram_bytes()).sum();
        for m in &models {
            if used <= limit {
                break;
            }
            if Some(m.id) != keep && m.state().locks == 0 {
                used -= self.drop_ram(m, &why);
            }
        }
        drop(models);
        self.forget_unused(inner);
    }

    /// Drop `m`'s RAM copy (an eviction from the RAM tier) for the reason `why`; returns the bytes released.
    pub(super) fn drop_ram(&self, m: &ManagedModel, why: &str) -> u64 {
        let bytes = m.store.drop_ram_copy();
        if bytes > 0 {
            m.set_no_ram_copy(why);
            self.tiers.ram_evictions.fetch_add(1, Ordering::Relaxed);
            self.tiers
                .ram_evicted_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        bytes
    }

    /// [`ManagedModel::evict`], counted as an eviction from the device tier when it releases anything.
    pub(super) fn evict(
        &self,
        m: &ManagedModel,
        st: &mut ModelState,
        want: u64,
        whole: bool,
    ) -> (u64, u64) {
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
    pub(super) fn forget_unused(&self, inner: &mut Inner) {
        self.forget(inner, |m| {
            Arc::strong_count(m) == 1 && !m.store.has_ram_copy() && m.state().resident.is_empty()
        });
    }

    /// Drop the registry's reference to every model `gone` selects (counted; their file reads stay in the total).
    pub(super) fn forget(&self, inner: &mut Inner, gone: impl Fn(&Arc<ManagedModel>) -> bool) {
        let before = inner.models.len();
        inner.models.retain(|m| {
            if gone(m) {
                self.keep_reads_of(&m.store);
                return false;
            }
            true
        });
        let n = (before - inner.models.len()) as u64;
        self.tiers.forgotten.fetch_add(n, Ordering::Relaxed);
    }

    /// Count `store`'s file reads in the totals, which it is leaving (the live models count their own).
    fn keep_reads_of(&self, store: &WeightStore) {
        self.files_read.fetch_add(store.file_bytes_read(), Ordering::Relaxed);
        self.file_copies.fetch_add(store.file_copies(), Ordering::Relaxed);
    }

    /// Log where `m`'s weights stream from, if that changed since the last line about it (outside the cache's lock).
    pub(super) fn log_weights_from(&self, m: &ManagedModel) {
        let (warn, line) = m.weights_from_line();
        {
            let mut last = lock(&m.logged_from);
            if *last == line {
                return;
            }
            *last = line.clone();
        }
        let log = lock(&self.log).clone();
        if let Some(log) = log {
            log(warn, &line);
        }
    }

    /// Whether `m` should get a RAM copy it lacks (read outside the cache's lock by the caller, see
    /// [`Shared::read_ram`]), counting the RAM tier's hit.
    pub(super) fn ram_need(&self, inner: &Inner, m: &ManagedModel) -> RamNeed {
        if !inner.config.keep_ram_copy_of_weights {
            if !m.store.has_ram_copy() {
                m.set_no_ram_copy(NO_RAM_KEPT);
            }
            return RamNeed::Held;
        }
        if m.store.has_ram_copy() {
            self.tiers.ram_hits.fetch_add(1, Ordering::Relaxed);
            return RamNeed::Held;
        }
        if m.store.total_bytes() > inner.sizing.ram_limit_bytes {
            m.set_no_ram_copy(&too_large(m.store.total_bytes(), inner.sizing.ram_limit_bytes));
            return RamNeed::TooLarge;
        }
        RamNeed::Read {
            pin: inner.config.pin_memory,
        }
    }

    /// Read (and pin) `m`'s RAM copy — without the cache's lock: this is a whole-file read — then trim the RAM tier
    /// (never `m`'s copy). A lock of `m` on another thread reading it meanwhile is waited for (see
    /// [`WeightStore::load_ram_copy`]): then the copy is a hit.
    pub(super) fn read_ram(&self, m: &ManagedModel, pin: bool) -> Result<()> {
        let read = m.store.load_ram_copy(&self.alloc, pin)?;
        let counter = if read { &self.tiers.ram_misses } else { &self.tiers.ram_hits };
        counter.fetch_add(1, Ordering::Relaxed);
        self.enforce_ram(&mut self.inner(), Some(m.id));
        Ok(())
    }
}

impl ModelCache {
    /// Map the safetensors file `path` and register it as `name` (no device bytes yet; a RAM copy when
    /// `keep_ram_copy_of_weights` and it fits the RAM tier). Loading the same file again — same path, size and
    /// modification time, same storage dtype — returns the model the cache keeps, with whatever RAM copy and device
    /// residency it still has, without reading the file (a hit), even after every earlier handle was freed. The
    /// file is mapped and read without holding the cache's lock, so other threads' calls proceed meanwhile.
    pub fn load_model(&self, path: &Path, name: &str) -> Result<Arc<ManagedModel>> {
        self.load_model_as(path, name, &WeightLayout::whole(crate::weights::block_key))
    }

    /// [`Self::load_model`] with a family's layout: its block rule and, for a component of a single-file
    /// checkpoint, the spans of its tensors (each component of one file is its own model in the cache).
    pub fn load_model_as(&self, path: &Path, name: &str, layout: &WeightLayout) -> Result<Arc<ManagedModel>> {
        let sh = &self.shared;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let file = FileKey::of(&canon)?;
        // A hit, a wait for the same model's first load on another thread (then look again), or this thread's load.
        let (key, keep_ram, ram_limit, pin, loading) = loop {
            let mut inner = sh.inner();
            let key = LoadKey {
                path: canon.clone(),
                view: layout.view.clone(),
                file,
                storage: inner.config.storage_dtype.dtype(),
                compute: resolve_compute(&inner.config, &sh.alloc),
            };
            if let Some(m) = self.cached(&mut inner, &key) {
                return Ok(m);
            }
            if let Some(other) = inner.loading.iter().find(|l| l.key == key).cloned() {
                drop(inner);
                other.wait();
                continue;
            }
            let loading = Arc::new(Loading { key: key.clone(), done: Mutex::new(false), finished: Condvar::new() });
            inner.loading.push(loading.clone());
            let c = &inner.config;
            break (key, c.keep_ram_copy_of_weights, inner.sizing.ram_limit_bytes, c.pin_memory, loading);
        };
        let _finish = Finish { shared: sh, loading };
        // The slow part, outside the cache's lock: map and validate the file, read the RAM copy, pin it.
        let store = WeightStore::open_with(&canon, layout, key.storage, key.compute)?;
        let costs = block_costs(&store, sh.alloc.is_cuda());
        let ram = keep_ram && store.total_bytes() <= ram_limit;
        let no_ram_copy = if ram {
            if let Err(e) = store.load_ram_copy(&sh.alloc, pin) {
                sh.keep_reads_of(&store);
                return Err(e);
            }
            String::new()
        } else if keep_ram {
            too_large(store.total_bytes(), ram_limit)
        } else {
            NO_RAM_KEPT.to_string()
        };
        // Loads of this model wait for `_finish` (dropped after `inner`): nothing else registered it meanwhile.
        let mut inner = sh.inner();
        let id = NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed);
        inner.clock += 1;
        let m = Arc::new(ManagedModel {
            id,
            name: name.to_string(),
            view: key.view,
            file_key: file,
            storage: key.storage,
            store,
            costs,
            next_fetch: Mutex::new(HashMap::new()),
            compute: Arc::default(),
            no_ram_copy: Mutex::new(no_ram_copy),
            logged_from: Mutex::new(String::new()),
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
        drop(inner);
        sh.log_weights_from(&m);
        Ok(m)
    }

    /// The model the cache keeps for this file, if its size and modification time are unchanged (a hit: it is
    /// marked used now). Entries for an older version of the file are forgotten when nothing holds them.
    pub(super) fn cached(&self, inner: &mut Inner, key: &LoadKey) -> Option<Arc<ManagedModel>> {
        let sh = &self.shared;
        sh.forget(inner, |m| {
            m.store.path() == key.path
                && m.file_key != key.file
                && Arc::strong_count(m) == 1
                && m.state().locks == 0
        });
        let m = inner.models.iter().find(|m| key.is(m))?;
        let m = m.clone();
        inner.clock += 1;
        m.state().last_used = inner.clock;
        sh.hits.fetch_add(1, Ordering::Relaxed);
        sh.tiers.load_hits.fetch_add(1, Ordering::Relaxed);
        Some(m)
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
                self.shared.drop_ram(&m, "unloaded (unload_all); read again at its next use");
            }
        }
        self.shared.forget_unused(&mut inner);
        drop(inner);
        self.shared.alloc.notify();
        released
    }
}
