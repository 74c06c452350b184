//! Locks: a model locked for a forward plans its residency, holds its working memory and is the weight source
//! the forward fetches through (resident blocks as placed, the others streamed; frees of blocks other threads
//! release happen here, at block boundaries).

use super::budget::Wait;
use super::*;

impl ModelCache {
    /// Lock `model` for an operation needing `working_mem_bytes` of working memory (the lock gets
    /// max(`device_working_mem_gb`, that)). Plans residency for the current budget (evicting unlocked models,
    /// shrinking other plans to their minimum if needed), reserves the working memory and loads the planned blocks.
    /// When the model fits the device alone but not beside the locks held now (another call's working memory), it
    /// waits for them (up to [`LOCK_WAIT_LIMIT`]) instead of failing. `BudgetTooSmall` when the model cannot run
    /// even fully streamed and alone beside host reservations and other programs' use.
    pub fn lock(&self, model: &Arc<ManagedModel>, working_mem_bytes: u64) -> Result<ModelLock> {
        self.lock_cancellable(model, working_mem_bytes, None)
    }

    /// [`lock`](Self::lock) whose wait for other calls' memory ends with `Cancelled` as soon as `cancelled()`
    /// returns true (a call's cancel token, the context's cancel). On CUDA the lock also holds the device's compute
    /// gate: while another thread's lock computes, it waits for it (cancellable, without bound).
    pub fn lock_cancellable(
        &self,
        model: &Arc<ManagedModel>,
        working_mem_bytes: u64,
        cancelled: Option<&dyn Fn() -> bool>,
    ) -> Result<ModelLock> {
        let sh = &self.shared;
        let wait = Wait { limit: Some(LOCK_WAIT_LIMIT), cancelled, start: Instant::now(), ran_out: Default::default() };
        let mut l = sh.retry_contended(&wait, || self.try_lock(model, working_mem_bytes), |e| e)?;
        // Memory first, then the gate: a call waiting for the gate already holds what it needs, and the holder never
        // waits for a waiter's memory (its plan was made beside it).
        if let Some(g) = &sh.gate {
            l.gate = Some(g.enter(cancelled)?);
        }
        Ok(l)
    }

    /// One attempt at [`lock`](Self::lock): locked, failed for good, or failed only because of other locks.
    pub(super) fn try_lock(&self, model: &Arc<ManagedModel>, working_mem_bytes: u64) -> Attempt {
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
                undo_lock(sh, &mut inner, model, id);
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
        // From here our pool serves the lock's uploads and the forward's activations (CUDA; `device::pool`).
        let route = match sh.alloc.route_pool() {
            Ok(r) => r,
            Err(e) => {
                undo_lock(sh, &mut sh.inner(), model, id);
                return Attempt::Failed(e);
            }
        };
        let mut lk = ModelLock {
            _route: route,
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
            gate: None,
        };
        // Dropping `lk` on an error below unregisters the lock. The lock protects the RAM copy being read from
        // eviction; the read runs without the cache's lock.
        if let RamNeed::Read { pin } = ram {
            if let Err(e) = sh.read_ram(model, pin) {
                return Attempt::Failed(e);
            }
        }
        // A RAM copy evicted, read again (perhaps unpinned: the cap), or refused: the log says so.
        sh.log_weights_from(model);
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
        let r = sh.alloc.route_pool().and_then(|_route| sh.fill_target(model, &AtomicU64::new(0)));
        model.state().target = None;
        r?;
        Ok(model.resident_bytes())
    }
}

/// Take back a lock registered by `try_lock` that could not be completed: drop it from the registry, clear the
/// model's target when no lock is left, and rebalance the budgets it held.
fn undo_lock(sh: &Shared, inner: &mut Inner, model: &ManagedModel, id: u64) {
    inner.locks.retain(|l| l.id != id);
    {
        let mut st = model.state();
        st.locks -= 1;
        if st.locks == 0 {
            st.target = None;
        }
    }
    let _ = sh.rebalance(inner);
}

impl Shared {
    /// Load the blocks of `m`'s plan that are not resident yet (eviction-and-retry on refusal; a block that still
    /// does not fit is dropped from the plan and streamed instead).
    pub(super) fn fill_target(&self, m: &ManagedModel, counter: &AtomicU64) -> Result<()> {
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
                    let tensors = match m.store.block_to_device(b, &self.alloc, &self.staging, m.store.compute_dtype())
                    {
                        Ok(t) => t,
                        // The device itself had no room for the copy (on CUDA: the driver, beyond our counters):
                        // the block streams instead, as one whose bytes were refused.
                        Err(Error::OutOfDeviceMemory { .. }) => {
                            drop((transient, a));
                            if let Some(t) = m.state().target.as_mut() {
                                t[b] = false;
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
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

    /// Free device memory after a device out-of-memory inside this lock's forward, in the order that costs least:
    /// other unlocked models' device copies (LRU first), then this model's own resident blocks that no fetch holds
    /// now (they are streamed instead for the rest of this lock; the next lock plans afresh). Frees at least
    /// `needed` bytes when it can. Returns the bytes freed now; 0 means nothing more can be freed (give up).
    pub fn relieve(&self, needed: u64) -> u64 {
        let (now, _) = self.shared.make_room(needed.max(1), Some(self.model.as_ref()));
        if now > 0 {
            self.shared.alloc.notify();
        }
        now
    }

    pub(super) fn stream_alloc(&self, bytes: u64) -> Result<StreamLease> {
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
    /// With a plan of two slots (async_loading), the block this model fetched next last time is then copied by the
    /// device's copy engine while the caller computes, and handed over (by its event) at the next fetch.
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
        // Tensors in a stored format (GGUF quantised, fp8) travel as their bytes and are dequantised on `get`.
        let out = self
            .fetch_now(b, block, ready)?
            .with_stored(m.store.stored_tensors(b));
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
    pub(super) fn fetch_now(
        &self,
        b: usize,
        block: &str,
        ready: Option<Prefetch>,
    ) -> Result<BlockWeights> {
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
                let placed = m.store.block_to_device(b, &sh.alloc, &sh.staging, m.store.compute_dtype());
                drop(transient);
                // The device itself had no room for the copy: stream the block below instead.
                let tensors = match placed {
                    Ok(t) => Some(t),
                    Err(Error::OutOfDeviceMemory { .. }) => None,
                    Err(e) => return Err(e),
                };
                if let Some(tensors) = tensors {
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
        }
        // A prefetched copy if it arrived whole (a failed one is redone here, which reports the error). The
        // compute side waits for the copy's event before the tensors are used (on CUDA: the compute stream waits
        // on the device, the host does not).
        let prefetched = ready.and_then(|p| {
            let Prefetch { lease, done, .. } = p;
            let mut h = done.recv(&sh.alloc).ok()?;
            h.wait().ok()?;
            Some((lease, h.take()))
        });
        let from_prefetch = prefetched.is_some();
        let (lease, (tensors, buf)) = match prefetched {
            Some(x) => x,
            None => (
                self.stream_alloc(cost.lease_streamed())?,
                upload_streamed(sh, &sh.alloc, m, b, false)?,
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
        if self.gate.is_some() {
            // The next holder's kernels must not overlap this one's (they share a cuBLAS workspace).
            let _ = self.device.synchronize();
            drop(self.gate.take());
        }
    }
}
