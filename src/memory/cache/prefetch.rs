//! Prefetch: the next streamed block is copied on its own thread while the current one computes, within the
//! plan's second slot.

use super::*;

/// A streamed block's device tensors in the storage dtype, and the pooled buffer they view (emulated device).
pub(super) type Uploaded = (HashMap<String, Tensor>, Option<BlockBuffer>);

/// The next streamed block, being copied on its own thread while the current one computes. Its lease (device
/// bytes) is taken before the copy starts, within the plan's slot.
pub(super) struct Prefetch {
    pub(super) block: usize,
    pub(super) lease: StreamLease,
    pub(super) done: mpsc::Receiver<Result<Uploaded>>,
}

/// Copy block `b` of `m` to the device for one use, converted to the compute dtype on arrival. `prefetch`: on the prefetch thread (single-threaded copy; on
/// CUDA the copy runs on that thread's own stream, so wait for it there: the consumer then needs no event).
pub(super) fn upload_streamed(
    sh: &Shared,
    m: &ManagedModel,
    b: usize,
    prefetch: bool,
) -> Result<Uploaded> {
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
    /// A prefetch that will not be used: wait for its copy (its bytes are in use until then), then release them.
    pub(super) fn discard(&self, p: Prefetch) {
        let _ = p.done.recv();
        self.shared
            .prefetch_wasted
            .fetch_add(self.model.costs[p.block].bytes, Ordering::Relaxed);
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
}
