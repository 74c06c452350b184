//! One device's compute, one thread at a time, where the device needs it.
//!
//! candle gives each CUDA device one cuBLAS handle with one workspace, and `Device::new_cuda` issues work on the
//! calling thread's default stream: two host threads computing on one context would run GEMMs on two streams
//! sharing that workspace at once. So on CUDA a context lets one call compute at a time (the others wait, and can
//! be cancelled while they wait); on the CPU and `emulated:` devices calls compute concurrently.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use crate::error::{Error, Result};

/// A re-entrant gate: held by one thread at a time (that thread may enter again, e.g. a lock taken inside a lock).
#[derive(Default)]
pub struct ComputeGate {
    held: Mutex<Option<(ThreadId, usize)>>,
    changed: Condvar,
}

/// The gate, held until dropped.
pub struct GateGuard {
    gate: Arc<ComputeGate>,
}

impl ComputeGate {
    fn state(&self) -> MutexGuard<'_, Option<(ThreadId, usize)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enter the gate, waiting while another thread holds it; `Cancelled` as soon as `cancelled()` says so.
    pub fn enter(self: &Arc<Self>, cancelled: Option<&dyn Fn() -> bool>) -> Result<GateGuard> {
        let me = std::thread::current().id();
        let mut held = self.state();
        loop {
            match held.as_mut() {
                None => {
                    *held = Some((me, 1));
                    break;
                }
                Some((owner, depth)) if *owner == me => {
                    *depth += 1;
                    break;
                }
                Some(_) => {
                    if cancelled.is_some_and(|c| c()) {
                        return Err(Error::Cancelled);
                    }
                    // The timeout bounds how late a cancel is seen; a release wakes the waiters at once.
                    held = self
                        .changed
                        .wait_timeout(held, Duration::from_millis(20))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        Ok(GateGuard { gate: self.clone() })
    }

    /// Whether some thread holds the gate now.
    pub fn is_held(&self) -> bool {
        self.state().is_some()
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        let mut held = self.gate.state();
        if let Some((_, depth)) = held.as_mut() {
            *depth -= 1;
            if *depth == 0 {
                *held = None;
                self.gate.changed.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn one_thread_at_a_time_and_reentrant() {
        let gate = Arc::new(ComputeGate::default());
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let _g = gate.enter(None).unwrap();
                        let _again = gate.enter(None).unwrap(); // the same thread enters again
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 1, "two threads computed at once");
        assert!(!gate.is_held());
    }

    #[test]
    fn a_waiter_can_be_cancelled_and_the_holder_keeps_the_gate() {
        let gate = Arc::new(ComputeGate::default());
        let held = gate.enter(None).unwrap();
        let cancel = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| gate.enter(Some(&|| cancel.load(Ordering::SeqCst))).map(|_| ()));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!waiter.is_finished(), "entered while another thread held the gate");
            cancel.store(true, Ordering::SeqCst);
            assert!(matches!(waiter.join().unwrap(), Err(Error::Cancelled)));
        });
        assert!(gate.is_held());
        drop(held);
        assert!(!gate.is_held());
        std::thread::spawn({
            let gate = gate.clone();
            move || drop(gate.enter(None).unwrap())
        })
        .join()
        .unwrap();
    }
}
