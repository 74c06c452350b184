//! Host reservations: device bytes the host takes for its own use; the cache shrinks around them.

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
}
