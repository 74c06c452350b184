//! Budgets: what the device (or the cap) has for the cache, the residency plans of locked models within it,
//! eviction to make room, and allocation with waiting, eviction and retry.

use std::cell::Cell;

use super::*;

/// What each block of `store` costs on `alloc`'s device. Blocks are converted to the compute dtype once: resident
/// ones when placed, streamed ones on arrival. On CUDA the storage-dtype copy crosses the bus and is converted on
/// the device (so it is held beside the converted one meanwhile); elsewhere the conversion runs on the host as the
/// bytes are copied.
pub(super) fn block_costs(store: &WeightStore, cuda: bool) -> Vec<BlockCost> {
    let compute = store.compute_dtype();
    store
        .blocks()
        .iter()
        .map(|b| {
            // Tensors in a stored format (GGUF quantised, fp8) are not converted: they stay stored on the device, so
            // they are no part of the transient storage-dtype copy a CUDA conversion holds.
            let converts = b.tensors.iter().any(|&t| {
                let t = &store.tensors()[t];
                t.stored_format().is_none() && t.storage_dtype != compute
            });
            let stored: u64 = b
                .tensors
                .iter()
                .map(|&t| &store.tensors()[t])
                .filter(|t| t.stored_format().is_some())
                .map(|t| t.storage_bytes())
                .sum();
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
                    lease: b.storage_bytes - stored + b.compute_bytes,
                    place: b.storage_bytes - stored,
                },
            }
        })
        .collect()
}

/// The least a model needs on the device to run at all: fully streamed with one block in flight, or whole when
/// the configuration does not split models.
pub(super) fn min_need(cfg: &Config, costs: &[BlockCost]) -> u64 {
    let partial_ok =
        cfg.enable_partial_loading || matches!(cfg.vram_state, VramState::Low | VramState::None);
    if partial_ok {
        plan::min_need(costs, 1)
    } else {
        plan::whole_need(costs)
    }
}

/// How long an allocation (or a reservation) may wait for bytes held by running calls.
pub(super) struct Wait<'a> {
    /// None = as long as the bytes are coming.
    pub(super) limit: Option<Duration>,
    /// Polled while waiting: true ends the wait with `Cancelled`.
    pub(super) cancelled: Option<&'a dyn Fn() -> bool>,
    pub(super) start: Instant,
    /// Set when the wait stopped because `limit` ran out.
    pub(super) ran_out: Cell<bool>,
}

impl Wait<'_> {
    /// Time left to wait (`None` once the limit ran out).
    pub(super) fn left(&self) -> Option<Duration> {
        match self.limit {
            None => Some(Duration::MAX),
            Some(l) => l.checked_sub(self.start.elapsed()).filter(|d| !d.is_zero()),
        }
    }
}

impl Shared {
    /// Repeat `attempt` while it fails only because of other calls' locks, woken by every release, until it
    /// succeeds or fails for good, `wait` is cancelled (`Cancelled`) or runs out (`on_time_out` of the last
    /// contended error).
    pub(super) fn retry_contended<T>(
        &self,
        wait: &Wait,
        mut attempt: impl FnMut() -> Attempt<T>,
        on_time_out: impl FnOnce(Error) -> Error,
    ) -> Result<T> {
        loop {
            // Before every attempt: a call cancelled while it waited returns CANCELLED even if the bytes just came.
            if wait.cancelled.is_some_and(|c| c()) {
                return Err(Error::Cancelled);
            }
            match attempt() {
                Attempt::Locked(x) => return Ok(x),
                Attempt::Failed(e) => return Err(e),
                Attempt::Contended(e) => {
                    let Some(left) = wait.left() else {
                        return Err(on_time_out(e));
                    };
                    // The timeout bounds a missed wake-up.
                    self.alloc.wait_for_free(left.min(Duration::from_millis(20)));
                }
            }
        }
    }

    /// Device bytes the cache may plan with (capacity − external use − reserve_vram − host reservations), None
    /// when unbounded (CPU).
    pub(super) fn avail_phys(&self, inner: &Inner) -> Option<u64> {
        let cap = self.alloc.capacity()?;
        let external = if self.alloc.is_cuda() {
            self.alloc.external_from_driver().unwrap_or(0)
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
    pub(super) fn fits_alone(
        &self,
        inner: &Inner,
        m: &ManagedModel,
        working: u64,
    ) -> Option<Infeasible> {
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
    pub(super) fn rebalance(&self, inner: &mut Inner) -> std::result::Result<(), Infeasible> {
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
        // One entry per locked model (a model locked twice is planned once; its working memories add up, and so do
        // its stream slots: each lock streams its own blocks, so a model locked n times keeps n times the room for
        // blocks in flight, and a lock that would leave less waits for the others instead of failing mid-forward).
        let mut order: Vec<(Arc<ManagedModel>, u64, usize)> = Vec::new();
        for l in &inner.locks {
            match order.iter_mut().find(|(m, _, _)| m.id == l.model.id) {
                Some(e) => {
                    e.1 += l.working;
                    e.2 += 1;
                }
                None => order.push((l.model.clone(), l.working, 1)),
            }
        }
        let min_of = |m: &Arc<ManagedModel>, locks: usize| {
            if partial_ok {
                plan::min_need_shared(&m.costs, 1, locks)
            } else {
                min_need(&cfg, &m.costs)
            }
        };
        // Against the device's physical bytes every holder's blocks in flight must fit (else a fetch is refused
        // mid-forward). A `max_cache_vram_gb` cap is a budget for the cache, not a wall: as with working memory
        // (which the cap also takes precedence over), concurrent holders may pass it by their extra slots, and a
        // configuration is judged by one holder's needs.
        if cap.is_some() {
            order.iter_mut().for_each(|e| e.2 = 1);
        }
        let mins: Vec<u64> = order.iter().map(|(m, _, n)| min_of(m, *n)).collect();
        let works: Vec<u64> = order.iter().map(|(_, w, _)| *w).collect();
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
        for (k, (m, work, locks)) in order.iter().enumerate() {
            let locks = *locks;
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
                    .find(|&k| plan::min_need_shared(costs, k, locks) <= budget)
                    .map(|k| plan::stream_all_shared(costs, budget, k, locks)),
                VramState::High | VramState::Normal => {
                    if plan::whole_need(costs) <= budget {
                        Some(plan::whole(costs, budget))
                    } else if partial_ok {
                        plan::partial_shared(costs, budget, slots, locks)
                            .or_else(|| plan::partial_shared(costs, budget, 1, locks))
                    } else {
                        None
                    }
                }
                _ if partial_ok => {
                    plan::partial_shared(costs, budget, slots, locks)
                        .or_else(|| plan::partial_shared(costs, budget, 1, locks))
                }
                _ => (plan::whole_need(costs) <= budget).then(|| plan::whole(costs, budget)),
            };
            let Some(p) = p else {
                let own = min_of(m, locks).saturating_add(*work);
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
        for ((m, _, _), p) in order.iter().zip(&plans) {
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
            .map(|((m, work, _), p)| PlanStats {
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
    pub(super) fn make_room(&self, want: u64, requester: Option<&ManagedModel>) -> (u64, u64) {
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
    pub(super) fn alloc_for(
        &self,
        bytes: u64,
        kind: AllocKind,
        requester: Option<&ManagedModel>,
        wait: Option<Duration>,
        own_inflight: u64,
    ) -> Result<Allocation> {
        let wait = Wait { limit: wait, cancelled: None, start: Instant::now(), ran_out: Cell::new(false) };
        self.alloc_waiting(bytes, kind, requester, &wait, own_inflight)
    }

    /// [`alloc_for`](Self::alloc_for) whose wait for running blocks ends with `Cancelled` when `wait.cancelled`
    /// says so, and records in `wait.ran_out` that it stopped waiting for time (the bytes were coming).
    pub(super) fn alloc_waiting(
        &self,
        bytes: u64,
        kind: AllocKind,
        requester: Option<&ManagedModel>,
        wait: &Wait,
        own_inflight: u64,
    ) -> Result<Allocation> {
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
                    if free + pending >= bytes && pending > 0 {
                        if wait.cancelled.is_some_and(|c| c()) {
                            return Err(Error::Cancelled);
                        }
                        if let Some(left) = wait.left() {
                            self.alloc.wait_for_free(left.min(Duration::from_millis(20)));
                            continue;
                        }
                        wait.ran_out.set(true);
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
}

#[cfg(test)]
mod stored_form_tests {
    use super::*;

    /// A GGUF block (quantised weight + F32 bias) computed in bf16: resident and leased at its stored bytes plus the
    /// bias in bf16; on CUDA only the bias crosses in its storage dtype to be converted (the quantised bytes are
    /// never part of that transient copy).
    #[test]
    fn stored_tensors_cost_their_stored_bytes_and_no_conversion_copy() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/types.gguf");
        let store = WeightStore::open(&path, None, DType::BF16).unwrap();
        let b = store.block_index("transformer_blocks.10").unwrap(); // q4_k (33 × 2048) and its f32 bias
        let block = &store.blocks()[b];
        let (weight, bias) = (33 * 2048 / 256 * 144, 33 * 4);
        assert_eq!(block.storage_bytes, weight + bias);
        assert_eq!(block.compute_bytes, weight + 33 * 2);
        for cuda in [false, true] {
            let c = block_costs(&store, cuda)[b];
            assert_eq!((c.bytes, c.resident), (weight + bias, weight + 33 * 2), "cuda {cuda}");
            assert_eq!(c.place, if cuda { bias } else { 0 }, "cuda {cuda}: only the bias is converted");
        }
    }
}
