//! Prefetch: the next streamed block is copied by the device's copy engine (one persistent thread, its own stream on
//! CUDA) while the current one computes, within the plan's second slot, and handed over by an event.

use super::*;
use crate::device::Pending;

/// A streamed block's device tensors in the storage dtype, and the pooled buffer they view (emulated device).
pub(super) type Uploaded = (HashMap<String, Tensor>, Option<BlockBuffer>);

/// The next streamed block, being copied by the copy engine while the current one computes. Its lease (device
/// bytes) is taken before the copy starts, within the plan's slot.
pub(super) struct Prefetch {
    pub(super) block: usize,
    pub(super) lease: StreamLease,
    pub(super) done: Pending<Uploaded>,
}

/// Copy block `b` of `m` to the device of `alloc` for one use, converted to the compute dtype on arrival.
/// `prefetch`: a copy-engine job (`alloc` is the engine's view: on CUDA the copies go on its stream and the consumer
/// waits for the job's event; the host copy is single-threaded, leaving the cores to the compute thread).
pub(super) fn upload_streamed(
    sh: &Shared,
    alloc: &DeviceAllocator,
    m: &ManagedModel,
    b: usize,
    prefetch: bool,
) -> Result<Uploaded> {
    let dtype = m.store.compute_dtype();
    if let Some((tensors, buf)) = m.store.block_to_buffer(b, alloc, !prefetch, dtype)? {
        return Ok((tensors, Some(buf)));
    }
    let tensors = m.store.block_to_device(b, alloc, &sh.staging, dtype)?;
    Ok((tensors, None))
}

pub(super) struct StreamLease {
    pub(super) _alloc: Allocation,
    pub(super) bytes: u64,
    pub(super) inflight: Arc<AtomicU64>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.inflight.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl ModelLock {
    /// A prefetch that will not be used: wait for its copy (its bytes are in use until then: an unused hand-off
    /// waits for its event on the host), then release them.
    pub(super) fn discard(&self, p: Prefetch) {
        let Prefetch { block, lease, done } = p;
        drop(done.recv(&self.shared.alloc));
        drop(lease);
        self.shared
            .prefetch_wasted
            .fetch_add(self.model.costs[block].bytes, Ordering::Relaxed);
    }

    /// Start copying the block expected after `b`, if it will be streamed and its lease fits in the plan's slot
    /// beside what this lock holds now (never waiting and never evicting: a prefetch that does not fit is skipped).
    pub(super) fn start_prefetch(&self, b: usize) {
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
        let Ok(engine) = sh.alloc.copy_engine() else {
            return;
        };
        let Ok(alloc) = sh.alloc.allocate(bytes, AllocKind::Streaming) else {
            return;
        };
        self.inflight.fetch_add(bytes, Ordering::SeqCst);
        let lease = StreamLease {
            _alloc: alloc,
            bytes,
            inflight: self.inflight.clone(),
        };
        let (sh2, m2) = (sh.clone(), m.clone());
        let job = engine
            .submit(move |lane| upload_streamed(&sh2, &sh2.alloc.on_lane(lane), &m2, n, true));
        // Not queued (the engine stopped): the lease drops here and the block is copied at its fetch.
        if let Ok(done) = job {
            *lock(&self.pending) = Some(Prefetch {
                block: n,
                lease,
                done,
            });
        }
    }
}
