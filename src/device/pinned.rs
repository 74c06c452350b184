//! Page-locked ("pinned") host memory: which host ranges are registered with the device's driver, under a cap.
//!
//! A copy from pageable memory runs at ~8 GB/s (the driver stages it through its own pinned buffer) and blocks the
//! calling thread; from pinned memory it is a DMA at full PCIe speed and can overlap compute. Only whole
//! [`crate::device::HostArena`]s are registered (page-aligned, one registration each), so no two registrations
//! share a page and none fails for that. Pinned bytes are capped (`max_pinned_memory_gb`, default a fraction of RAM as
//! ComfyUI does): locked pages cannot be swapped, and too many starve the host.
//!
//! The registry keeps the same books on every device kind: on CUDA it calls `cuMemHostRegister`; on the emulated
//! device it only counts (so the cap and the register → unregister → free order are tested on the CPU); the CPU
//! device copies nothing to a device and pins nothing. Events are kept (the last [`EVENTS_KEPT`]) and a free of a
//! range still registered is counted as a violation.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::device::DeviceAllocator;
use crate::error::Result;

/// Registry events kept for inspection.
pub const EVENTS_KEPT: usize = 4096;

/// One step in the life of a pinned host range (base address), in the order the registry saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinEvent {
    /// The range was registered with the driver (page-locked).
    Register { base: usize, bytes: u64 },
    /// The range was unregistered (after the device finished reading it).
    Unregister { base: usize },
    /// The memory of an arena was freed (pinned or not).
    Free { base: usize },
}

/// Why a host range is not pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotPinned {
    /// `pin_memory: false` (or `max_pinned_memory_gb: 0`).
    Disabled,
    /// Pinning it would pass the cap: bytes asked, bytes pinned already, the cap.
    Cap { needed: u64, pinned: u64, cap: u64 },
    /// The CPU device: weights are used in place, nothing crosses to a device.
    NoTransfers,
    /// The driver refused the registration.
    Driver(String),
}

impl fmt::Display for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotPinned::Disabled => f.write_str("pinning disabled (pin_memory: false)"),
            NotPinned::Cap { needed, pinned, cap } => write!(
                f,
                "pinned-memory cap: {needed} bytes more would pass {cap} bytes ({pinned} pinned already; \
                 max_pinned_memory_gb)"
            ),
            NotPinned::NoTransfers => f.write_str("CPU device: weights are used in place"),
            NotPinned::Driver(e) => write!(f, "the driver refused to pin it: {e}"),
        }
    }
}

/// How the registry pins.
enum Kind {
    /// Nothing to pin for (the CPU device).
    None,
    /// Count only (the emulated device), as CUDA would.
    Emulated,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>),
}

#[derive(Default)]
struct State {
    /// The cap in bytes; None = pinning disabled.
    cap: Option<u64>,
    bytes: u64,
    peak: u64,
    /// Registered ranges: base → bytes.
    live: HashMap<usize, u64>,
    events: VecDeque<PinEvent>,
    /// Frees of ranges still registered (must stay 0).
    violations: u64,
}

impl State {
    fn event(&mut self, e: PinEvent) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
}

/// The pinned host memory of one device (owned by its [`DeviceAllocator`]).
pub struct PinRegistry {
    kind: Kind,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PinRegistry {
    pub(crate) fn new(device: &candle_core::Device, emulated: bool) -> Self {
        let kind = match device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => Kind::Cuda(d.cuda_stream().context().clone()),
            _ if emulated => Kind::Emulated,
            _ => Kind::None,
        };
        Self {
            kind,
            state: Mutex::new(State::default()),
        }
    }

    /// Register `bytes` at `base` (page-aligned, not overlapping another registration) if the cap allows.
    pub(crate) fn register(&self, base: usize, bytes: u64) -> std::result::Result<(), NotPinned> {
        if matches!(self.kind, Kind::None) {
            return Err(NotPinned::NoTransfers);
        }
        {
            // Reserve the bytes under the lock, so concurrent loads cannot both pass the cap.
            let mut s = lock(&self.state);
            let Some(cap) = s.cap else {
                return Err(NotPinned::Disabled);
            };
            if s.bytes.saturating_add(bytes) > cap {
                return Err(NotPinned::Cap {
                    needed: bytes,
                    pinned: s.bytes,
                    cap,
                });
            }
            s.bytes += bytes;
        }
        // The driver call runs without the lock (it page-locks the whole range: slow for GBs).
        let r = self.driver_register(base, bytes);
        let mut s = lock(&self.state);
        match r {
            Ok(()) => {
                s.peak = s.peak.max(s.bytes);
                s.live.insert(base, bytes);
                s.event(PinEvent::Register { base, bytes });
                Ok(())
            }
            Err(e) => {
                s.bytes -= bytes;
                Err(NotPinned::Driver(e))
            }
        }
    }

    /// Unregister the range at `base` (the caller has waited for every device read of it).
    pub(crate) fn unregister(&self, base: usize) {
        let Some(bytes) = lock(&self.state).live.get(&base).copied() else {
            return;
        };
        self.driver_unregister(base);
        let mut s = lock(&self.state);
        s.live.remove(&base);
        s.bytes -= bytes;
        s.event(PinEvent::Unregister { base });
    }

    /// The memory at `base` is being freed: a range still registered there is a violation (counted).
    pub(crate) fn note_free(&self, base: usize) {
        let mut s = lock(&self.state);
        if s.live.contains_key(&base) {
            s.violations += 1;
        }
        s.event(PinEvent::Free { base });
    }

    /// Set the cap (None = pinning disabled). Ranges pinned already stay pinned; later ones see the new cap.
    pub(crate) fn set_cap(&self, cap: Option<u64>) {
        lock(&self.state).cap = if matches!(self.kind, Kind::None) { None } else { cap };
    }

    pub(crate) fn cap(&self) -> Option<u64> {
        lock(&self.state).cap
    }
    pub(crate) fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }
    pub(crate) fn peak(&self) -> u64 {
        lock(&self.state).peak
    }
    pub(crate) fn events(&self) -> Vec<PinEvent> {
        lock(&self.state).events.iter().copied().collect()
    }
    pub(crate) fn violations(&self) -> u64 {
        lock(&self.state).violations
    }
    /// Whether copies from host memory to this device exist at all (not the CPU device).
    pub(crate) fn transfers(&self) -> bool {
        !matches!(self.kind, Kind::None)
    }

    fn driver_register(&self, base: usize, bytes: u64) -> std::result::Result<(), String> {
        match &self.kind {
            #[cfg(feature = "cuda")]
            Kind::Cuda(ctx) => {
                use candle_core::cuda_backend::cudarc::driver::sys;
                ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
                // SAFETY: base/bytes are a live allocation the arena keeps until after `unregister`.
                let r = unsafe {
                    sys::cuMemHostRegister_v2(base as *mut _, bytes as usize, sys::CU_MEMHOSTREGISTER_PORTABLE)
                };
                r.result().map_err(|e| format!("cuMemHostRegister: {e:?}"))
            }
            _ => {
                let _ = (base, bytes);
                Ok(())
            }
        }
    }

    fn driver_unregister(&self, base: usize) {
        #[cfg(feature = "cuda")]
        if let Kind::Cuda(ctx) = &self.kind {
            use candle_core::cuda_backend::cudarc::driver::sys;
            if ctx.bind_to_thread().is_ok() {
                // SAFETY: registered by `driver_register` and not yet unregistered.
                let _ = unsafe { sys::cuMemHostUnregister(base as *mut _) };
            }
        }
        let _ = base;
    }
}

#[cfg(feature = "cuda")]
pub(super) fn cuda_err(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> crate::error::Error {
    crate::error::Error::unsupported(format!("CUDA driver: {e:?}"))
}

/// Set the release threshold of the library's own CUDA memory pool on `alloc`'s device (`device::pool`; the
/// process default pool is never touched): `keep` holds freed blocks in the pool for reuse
/// (`cuda_allocator: pool_keep`), else they go back to the driver at each synchronise (`pool`). The cache counts
/// kept bytes as ours either way. A no-op off CUDA.
pub fn set_pool_keep(alloc: &DeviceAllocator, keep: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(p) = alloc.own_pool() {
        return p.set_keep(keep);
    }
    let _ = (alloc, keep);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order check can fail: a free of a still-registered range is counted, and the cap refuses what would pass
    /// it while keeping the books exact.
    #[test]
    fn registry_counts_a_free_before_unregister_and_honours_the_cap() {
        let r = PinRegistry::new(&candle_core::Device::Cpu, true);
        assert_eq!(r.register(4096, 100), Err(NotPinned::Disabled));
        r.set_cap(Some(1000));
        r.register(4096, 600).unwrap();
        assert_eq!(
            r.register(8192, 600),
            Err(NotPinned::Cap { needed: 600, pinned: 600, cap: 1000 })
        );
        assert_eq!(r.bytes(), 600);
        r.note_free(4096);
        assert_eq!(r.violations(), 1, "a free before unregister must be counted");
        r.unregister(4096);
        r.note_free(4096);
        assert_eq!(r.violations(), 1);
        assert_eq!(r.bytes(), 0);
        assert_eq!(r.peak(), 600);
        assert_eq!(
            r.events(),
            vec![
                PinEvent::Register { base: 4096, bytes: 600 },
                PinEvent::Free { base: 4096 },
                PinEvent::Unregister { base: 4096 },
                PinEvent::Free { base: 4096 },
            ]
        );
        let cpu = PinRegistry::new(&candle_core::Device::Cpu, false);
        cpu.set_cap(Some(1 << 30));
        assert_eq!(cpu.register(4096, 1), Err(NotPinned::NoTransfers));
    }
}
