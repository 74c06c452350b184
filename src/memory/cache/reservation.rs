//! Host reservations: device bytes the host takes for its own use; the cache shrinks around them.

use super::budget::Wait;
use super::*;

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

impl ModelCache {
    /// Reserve `bytes` of device memory for the host. The cache shrinks at once (running forwards release their
    /// extra blocks at their next block boundary); returns once the bytes are actually free (on CUDA: for another
    /// allocator, with the compute stream drained to that point and our pool trimmed, per the driver), or `BudgetTooSmall`
    /// if they cannot be while the calls running now run (what locked models need to run, fully streamed, stays
    /// theirs). Waits without bound for the block boundaries; [`reserve_with`](Self::reserve_with) bounds it.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation> {
        let wait = Wait { limit: None, cancelled: None, start: Instant::now(), ran_out: Default::default() };
        self.reserve_waiting(bytes, &wait, false)
    }

    /// [`reserve`](Self::reserve) with a bound on the wait: `timeout` (None = no bound; zero = take the bytes only
    /// if they are free now) and `cancelled`, polled while waiting. The wait covers both the running forwards'
    /// block boundaries and, when the bytes do not fit beside the memory running calls need, the end of those
    /// calls (a lock waits for other locks the same way). `Timeout` (bytes needed and available) when the time
    /// runs out, `Cancelled` when `cancelled` says so, `BudgetTooSmall` at once when the bytes can never be free
    /// (beyond the device beside other reservations, or held by a call running on this very thread). On every
    /// failure the cache is as it was.
    pub fn reserve_with(
        &self,
        bytes: u64,
        timeout: Option<Duration>,
        cancelled: Option<&dyn Fn() -> bool>,
    ) -> Result<Reservation> {
        let wait = Wait { limit: timeout, cancelled, start: Instant::now(), ran_out: Default::default() };
        self.reserve_waiting(bytes, &wait, true)
    }

    fn reserve_waiting(&self, bytes: u64, wait: &Wait, wait_for_calls: bool) -> Result<Reservation> {
        let sh = &self.shared;
        let timed_out = |needed_bytes, available_bytes| Error::Timeout {
            what: "reservation".into(),
            needed_bytes,
            available_bytes,
            waited_ms: wait.start.elapsed().as_millis() as u64,
        };
        // Registered, the cache plans around it at once; beside the calls running now it may not fit yet.
        let id = if wait_for_calls {
            let time_out = |e| match e {
                Error::BudgetTooSmall { needed_bytes, available_bytes, .. } => timed_out(needed_bytes, available_bytes),
                e => e,
            };
            sh.retry_contended(wait, || self.register(bytes), time_out)?
        } else {
            match self.register(bytes) {
                Attempt::Locked(id) => id,
                Attempt::Failed(e) | Attempt::Contended(e) => return Err(e),
            }
        };
        // Dropping it on a failure below unregisters it and gives the cache its plans back.
        let mut res = Reservation { shared: sh.clone(), id, alloc: None };
        match sh.alloc_waiting(bytes, AllocKind::Reservation, None, wait, 0) {
            Ok(a) => {
                res.alloc = Some(a);
                // Counted as the host's, the bytes must also be free for the host's own allocator: on CUDA the
                // compute stream drained to here and our pool trimmed (`settle_free`); wait while they are not.
                loop {
                    let (free, available) = sh.alloc.settle_free(bytes)?;
                    if free {
                        return Ok(res);
                    }
                    if wait.cancelled.is_some_and(|c| c()) {
                        return Err(Error::Cancelled);
                    }
                    let Some(left) = wait.left() else {
                        return Err(timed_out(bytes, available));
                    };
                    sh.alloc.wait_for_free(left.min(Duration::from_millis(20)));
                }
            }
            Err(Error::OutOfDeviceMemory { needed_bytes, available_bytes, .. }) => Err(if wait.ran_out.get() {
                timed_out(needed_bytes, available_bytes)
            } else {
                Error::BudgetTooSmall { what: "reservation".into(), needed_bytes, available_bytes }
            }),
            Err(e) => Err(e),
        }
    }

    /// Add a reservation of `bytes` to the plans: its id, or the error, contended when it failed only because of
    /// the calls running now on other threads (it fits the device beside the other reservations alone).
    fn register(&self, bytes: u64) -> Attempt<u64> {
        let sh = &self.shared;
        let mut inner = sh.inner();
        let id = inner.id();
        inner.reservations.push((id, bytes));
        if sh.rebalance(&mut inner).is_ok() {
            return Attempt::Locked(id);
        }
        inner.reservations.retain(|r| r.0 != id);
        let _ = sh.rebalance(&mut inner);
        let device = sh.avail_phys(&inner).unwrap_or(u64::MAX);
        // What the device has beside other reservations, minus what locked models need to run at all.
        let locked = sat_sum(
            inner
                .locks
                .iter()
                .map(|l| min_need(&inner.config, &l.model.costs).saturating_add(l.working)),
        );
        // A call running on this thread (a progress callback reserving) would wait for itself.
        let own_call = inner.locks.iter().any(|l| l.model.compute.is_current());
        let contended = bytes <= device && !inner.locks.is_empty() && !own_call;
        let e = Error::BudgetTooSmall {
            what: "reservation".into(),
            needed_bytes: bytes,
            available_bytes: device.saturating_sub(locked),
        };
        if contended {
            Attempt::Contended(e)
        } else {
            Attempt::Failed(e)
        }
    }
}
