//! One page-aligned host allocation that copies to the device read from: a model's RAM copy (its tensors back to
//! back, each aligned) or a staging slot. It is pinned as a whole, once, under the registry's cap, and on drop it
//! waits for the device's reads of it, unregisters, and only then frees the memory.
//!
//! Page alignment is what makes one registration per arena work: heap allocations share pages, and the driver
//! refuses a registration that overlaps another (the per-tensor registration this replaces skipped those silently).

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::device::pinned::NotPinned;
use crate::device::DeviceAllocator;
use crate::error::{Error, Result};

/// Alignment of each tensor inside an arena: enough for every element type and for full-speed DMA.
pub const TENSOR_ALIGN: usize = 256;

/// The host's page size (4 KiB where it cannot be read).
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 && (p as usize).is_power_of_two() {
            p as usize
        } else {
            4096
        }
    })
}

/// `n` rounded up to a multiple of `align` (a power of two).
pub fn align_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

/// A page-aligned host buffer, optionally pinned with its device's driver.
pub struct HostArena {
    ptr: NonNull<u8>,
    layout: Layout,
    len: usize,
    alloc: DeviceAllocator,
    /// Ok when registered with the driver; else why not.
    pinned: std::result::Result<(), NotPinned>,
    /// The last device read of it per thread's stream (CUDA events), waited for before it is unregistered or reused.
    reads: Mutex<Vec<ReadMark>>,
}

// SAFETY: the arena owns its memory; shared access is read-only (`as_slice`) or through `&mut self`.
unsafe impl Send for HostArena {}
unsafe impl Sync for HostArena {}

struct ReadMark {
    #[cfg(feature = "cuda")]
    thread: std::thread::ThreadId,
    #[cfg(feature = "cuda")]
    event: candle_core::cuda_backend::cudarc::driver::CudaEvent,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HostArena {
    /// `len` zeroed bytes (at least one page, rounded up to whole pages), not pinned yet. `OutOfHostMemory` when the
    /// host cannot provide them.
    pub fn new(alloc: &DeviceAllocator, len: usize) -> Result<Self> {
        let page = page_size();
        let too_big = || Error::OutOfHostMemory(format!("a host arena of {len} bytes"));
        let size = len.max(1).checked_add(page - 1).ok_or_else(too_big)? & !(page - 1);
        let layout = Layout::from_size_align(size, page).map_err(|_| too_big())?;
        // SAFETY: the layout has a non-zero size. Zeroed: padding between tensors is never uninitialised memory
        // (calloc'd pages cost nothing until touched).
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            Error::OutOfHostMemory(format!("{size} bytes of page-aligned host memory for weights"))
        })?;
        Ok(Self {
            ptr,
            layout,
            len,
            alloc: alloc.clone(),
            pinned: Err(NotPinned::Disabled),
            reads: Mutex::new(Vec::new()),
        })
    }

    /// Register the whole arena with the driver if `enabled` and the cap allows (once; a later call keeps the first
    /// outcome unless that was a refusal). Returns the outcome.
    pub fn pin(&mut self, enabled: bool) -> &std::result::Result<(), NotPinned> {
        if self.pinned.is_ok() {
            return &self.pinned;
        }
        let pins = self.alloc.pins();
        self.pinned = if !pins.transfers() {
            Err(NotPinned::NoTransfers)
        } else if !enabled {
            Err(NotPinned::Disabled)
        } else {
            pins.register(self.base(), self.layout.size() as u64)
        };
        &self.pinned
    }

    /// Whether it is registered with the driver, or why not.
    pub fn pinned(&self) -> &std::result::Result<(), NotPinned> {
        &self.pinned
    }

    /// Bytes pinned for it (whole pages), 0 when not pinned.
    pub fn pinned_bytes(&self) -> u64 {
        if self.pinned.is_ok() {
            self.layout.size() as u64
        } else {
            0
        }
    }

    /// Whether dropping it is slow (a pinned arena on CUDA: the device's reads are waited for, then the range is
    /// unpinned), so an owner holding a lock may drop it elsewhere.
    pub fn slow_to_free(&self) -> bool {
        self.pinned.is_ok() && self.alloc.is_cuda()
    }

    /// Usable bytes (as asked).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no usable bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (whole pages).
    pub fn allocated(&self) -> usize {
        self.layout.size()
    }

    /// The start address (page-aligned).
    pub fn base(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` ≤ the allocation, zero-initialised at creation, alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The usable bytes, to fill. The caller has waited for device reads of earlier contents
    /// ([`Self::wait_reads`]) when it reuses the arena.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Record that `alloc` (the allocator, or its copy-engine view, that made the uploads) has queued device copies
    /// from this arena on its stream: they are waited for before the arena is unregistered, freed or refilled. The
    /// event is recorded on the stream that did the copies (`DeviceAllocator::upload_event`: the copy thread's own
    /// stream for a prefetch, else the compute stream). Only pinned arenas on CUDA are read asynchronously (a copy
    /// from pageable memory completes before it returns); elsewhere nothing is recorded.
    pub fn note_read(&self, alloc: &DeviceAllocator) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.pinned.is_ok() {
            if let Some(event) = alloc.upload_event()? {
                let thread = std::thread::current().id();
                let mut reads = lock(&self.reads);
                reads.retain(|r| r.thread != thread);
                reads.push(ReadMark { thread, event });
            }
        }
        let _ = alloc;
        Ok(())
    }

    /// Wait until the device has finished every read recorded by [`Self::note_read`].
    pub fn wait_reads(&self) {
        let marks = std::mem::take(&mut *lock(&self.reads));
        #[cfg(feature = "cuda")]
        for m in &marks {
            let _ = m.event.synchronize();
        }
        drop(marks);
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        // Strictly in this order: the device's reads are done, the range is unregistered, then the memory is freed.
        self.wait_reads();
        let pins = self.alloc.pins();
        if self.pinned.is_ok() {
            pins.unregister(self.base());
        }
        pins.note_free(self.base());
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceSpec, PinEvent};

    #[test]
    fn arena_is_page_aligned_pinned_once_and_freed_after_unregister() {
        let alloc = DeviceAllocator::new(&DeviceSpec::Emulated(1 << 20)).unwrap();
        alloc.set_pinned_cap(Some(1 << 20));
        let mut a = HostArena::new(&alloc, 10_000).unwrap();
        assert_eq!(a.base() % page_size(), 0);
        assert_eq!(a.allocated(), align_up(10_000, page_size()));
        assert!(a.as_slice().iter().all(|&b| b == 0));
        a.as_mut_slice()[9_999] = 7;
        assert!(a.pin(true).is_ok());
        assert!(a.pin(true).is_ok());
        assert_eq!(alloc.pinned_bytes(), a.allocated() as u64);
        let base = a.base();
        drop(a);
        assert_eq!(alloc.pinned_bytes(), 0);
        assert_eq!(alloc.pin_violations(), 0);
        assert_eq!(
            alloc.pin_events(),
            vec![
                PinEvent::Register { base, bytes: align_up(10_000, page_size()) as u64 },
                PinEvent::Unregister { base },
                PinEvent::Free { base },
            ]
        );
        // Past the cap: not pinned, and the memory is still usable.
        let mut big = HostArena::new(&alloc, 2 << 20).unwrap();
        assert!(matches!(big.pin(true), Err(NotPinned::Cap { .. })));
        assert_eq!(big.pinned_bytes(), 0);
        big.as_mut_slice()[0] = 1;
        // More than the host can give: OUT_OF_HOST_MEMORY, not an abort.
        for len in [1usize << 62, usize::MAX - 10] {
            assert!(matches!(HostArena::new(&alloc, len), Err(Error::OutOfHostMemory(_))));
        }
        // The CPU device pins nothing.
        let cpu = DeviceAllocator::new(&DeviceSpec::Cpu).unwrap();
        let mut c = HostArena::new(&cpu, 10).unwrap();
        assert_eq!(c.pin(true), &Err(NotPinned::NoTransfers));
    }
}
