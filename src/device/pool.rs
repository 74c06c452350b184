//! The library's own CUDA memory pool: one `CUmemoryPool` per device context (`cuMemPoolCreate`, located on the
//! device), so the bytes the library's calls hold, keep for reuse and give back are its own to count and trim, and the
//! process default pool (which the host's own CUDA code may use and tune) is never read or set.
//!
//! **Routing.** candle allocates every buffer through cudarc's `CudaStream::alloc`, which calls `cuMemAllocAsync`
//! on the stream (cudarc-0.19.10 `driver/safe/core.rs:1623-1631`, `driver/result.rs:826-832`); that takes memory from
//! the device's *current* pool, and a free (`cuMemFreeAsync`) returns a buffer to the pool it came from, whatever is
//! current then. candle has no way to name a pool per allocation. So a call of ours makes our pool the device's
//! current one while it runs ([`PoolRoute`]: taken with a model lock, and by `load_to_device`; re-entrant and counted
//! across our threads; restored to the previous pool when the last one ends, also on a panic). Allocating only our
//! uploads with `cuMemAllocFromPoolAsync` would leave every activation candle allocates in the default pool, out of
//! our count and out of reach of a trim. The routing is kept per device, process-wide (several contexts may share a
//! device): the pool current before any of ours comes back when the last of our calls on the device ends.
//!
//! **Caveat (stated in the header too).** The current pool is per device, process-wide: while a call of ours runs,
//! `cudaMallocAsync`/`cuMemAllocAsync` without an explicit pool made by the host on that device, from any thread,
//! also draws from our pool (and is counted as ours), and a host that sets the device's current pool while our
//! call runs has it set back when the call ends. Plain `cudaMalloc` and explicit pools are unaffected. Two
//! contexts on one device computing at once: the allocations of both come from the pool of the one whose call
//! started last (frees always return to the pool a buffer came from).
//!
//! Off CUDA nothing here exists; the stats read None.

use crate::device::DeviceAllocator;
use crate::error::Result;

/// Our pool's counters (bytes), from the driver (`cuMemPoolGetAttribute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PoolStats {
    /// Bytes of live allocations from the pool (`USED_MEM_CURRENT`).
    pub used: u64,
    /// Bytes the pool holds from the driver: live allocations and freed blocks kept for reuse (`RESERVED_MEM_CURRENT`).
    pub reserved: u64,
    /// The most bytes live at once since creation or [`pool_peak_reset`] (`USED_MEM_HIGH`).
    pub high: u64,
}

/// Our pool's counters on `alloc`'s device, without synchronising (frees still queued count as used); None off
/// CUDA.
pub fn pool_stats(alloc: &DeviceAllocator) -> Result<Option<PoolStats>> {
    #[cfg(feature = "cuda")]
    if let Some(p) = alloc.own_pool() {
        return p.stats().map(Some);
    }
    let _ = alloc;
    Ok(None)
}

/// Reset our pool's high-water mark of used bytes to the bytes in use now (then [`pool_peak_bytes`]'s high − the
/// bytes in use now = the peak of what follows). Synchronises the device first so earlier work is not counted.
pub fn pool_peak_reset(alloc: &DeviceAllocator) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(p) = alloc.own_pool() {
        alloc.device().synchronize()?;
        return p.reset_high();
    }
    let _ = alloc;
    Ok(())
}

/// `(used now, high-water mark since the last reset)` of our pool in bytes, after synchronising; None off CUDA.
pub fn pool_peak_bytes(alloc: &DeviceAllocator) -> Result<Option<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    if let Some(p) = alloc.own_pool() {
        alloc.device().synchronize()?;
        let s = p.stats()?;
        return Ok(Some((s.used, s.high)));
    }
    let _ = alloc;
    Ok(None)
}

/// Bytes our pool holds from the driver now (live and kept for reuse), without synchronising. None off CUDA.
pub fn pool_reserved_bytes(alloc: &DeviceAllocator) -> Result<Option<u64>> {
    Ok(pool_stats(alloc)?.map(|s| s.reserved))
}

#[cfg(feature = "cuda")]
pub(crate) use cuda::OwnPool;

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex};

    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};

    use super::PoolStats;
    use crate::device::pinned::cuda_err;
    use crate::error::Result;

    /// The routing of one device, process-wide (several contexts may share a device): the pool that was current
    /// before any of ours was made current, and our pools routed now with their counts, latest last. Pools are
    /// kept as addresses (`CUmemoryPool` is a raw pointer, not `Send`).
    struct DeviceRoute {
        dev: sys::CUdevice,
        original: usize,
        active: Vec<(usize, usize)>,
    }

    static ROUTES: Mutex<Vec<DeviceRoute>> = Mutex::new(Vec::new());

    /// One `CUmemoryPool` of our own on one device; destroyed when the allocator drops (the driver keeps it until
    /// its last outstanding allocation is freed: `cuMemPoolDestroy`).
    pub(crate) struct OwnPool {
        pool: sys::CUmemoryPool,
        ctx: Arc<CudaContext>,
    }

    // SAFETY: a pool handle is an opaque driver object; the driver API may be called on it from any thread. The
    // routing state is behind a mutex.
    unsafe impl Send for OwnPool {}
    unsafe impl Sync for OwnPool {}

    impl OwnPool {
        /// A new pool on `ctx`'s device (pinned device memory, no IPC handles), keeping freed blocks for reuse
        /// (release threshold u64::MAX) until `cuda_allocator` says otherwise ([`OwnPool::set_keep`]).
        pub(crate) fn create(ctx: &Arc<CudaContext>) -> Result<Self> {
            ctx.bind_to_thread().map_err(cuda_err)?;
            // SAFETY: a zeroed props struct is the documented "no options" value; the fields set are those of
            // CUDA 13.0's layout (`cuda-13000`, the toolkit setup.sh installs).
            let pool = unsafe {
                let mut props: sys::CUmemPoolProps = std::mem::zeroed();
                props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
                props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
                props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
                props.location.id = ctx.ordinal() as i32;
                let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
                sys::cuMemPoolCreate(&mut pool, &props).result().map_err(cuda_err)?;
                pool
            };
            let p = Self { pool, ctx: ctx.clone() };
            p.set_keep(true)?;
            Ok(p)
        }

        fn set(&self, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<()> {
            // SAFETY: the attributes set here (release threshold, used-memory high-water mark) are u64 values.
            unsafe {
                sys::cuMemPoolSetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _).result().map_err(cuda_err)
            }
        }

        fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: the used/reserved-memory attributes are u64 (cuuint64_t) values.
            unsafe {
                sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _).result().map_err(cuda_err)?
            };
            Ok(v)
        }

        /// `cuda_allocator`: `keep` (pool_keep) holds freed blocks for reuse, else (pool) they go back to the driver
        /// at each synchronise (DECISIONS.md, "CUDA allocator"). Either way they count as ours.
        pub(crate) fn set_keep(&self, keep: bool) -> Result<()> {
            self.set(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, if keep { u64::MAX } else { 0 })
        }

        pub(crate) fn stats(&self) -> Result<PoolStats> {
            use sys::CUmemPool_attribute as A;
            Ok(PoolStats {
                used: self.get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                reserved: self.get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
                high: self.get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            })
        }

        pub(crate) fn reset_high(&self) -> Result<()> {
            // The high-water mark may only be set to 0 (a reset to what is in use now).
            self.set(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
        }

        /// Give the driver back every block the pool keeps beyond `keep` bytes (live allocations always stay):
        /// `cuMemPoolTrimTo`. Frees still queued on a stream are not yet in the pool: drain to them first.
        pub(crate) fn trim_to(&self, keep: u64) -> Result<()> {
            // SAFETY: a live pool handle.
            unsafe { sys::cuMemPoolTrimTo(self.pool, keep as usize).result().map_err(cuda_err) }
        }

        /// One of our calls starts: our pool becomes the device's current one. The first of any context on this
        /// device remembers the pool that was current (the default pool, or the host's); with several contexts'
        /// calls running at once, the pool of the one that started last is current.
        pub(crate) fn enter(&self) -> Result<()> {
            let dev = self.ctx.cu_device();
            let mut routes = ROUTES.lock().unwrap_or_else(|e| e.into_inner());
            let i = match routes.iter().position(|r| r.dev == dev) {
                Some(i) => i,
                None => {
                    let mut original: sys::CUmemoryPool = std::ptr::null_mut();
                    // SAFETY: an out-pointer of the documented type; `dev` is this context's device.
                    unsafe { sys::cuDeviceGetMemPool(&mut original, dev).result().map_err(cuda_err)? };
                    routes.push(DeviceRoute { dev, original: original as usize, active: Vec::new() });
                    routes.len() - 1
                }
            };
            let r = &mut routes[i];
            let me = self.pool as usize;
            let count = match r.active.iter().position(|(p, _)| *p == me) {
                Some(k) => r.active.remove(k).1,
                None => 0,
            };
            r.active.push((me, count + 1));
            // SAFETY: our live pool, on its own device.
            let set = unsafe { sys::cuDeviceSetMemPool(dev, self.pool).result().map_err(cuda_err) };
            if let Err(e) = set {
                Self::release(&mut routes, i, me);
                return Err(e);
            }
            Ok(())
        }

        /// One of our calls ends: when our pool has no call left, the device gets the latest other routed pool, or
        /// the one that was current before any of ours.
        pub(crate) fn leave(&self) {
            let dev = self.ctx.cu_device();
            let mut routes = ROUTES.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = routes.iter().position(|r| r.dev == dev) {
                Self::release(&mut routes, i, self.pool as usize);
            }
        }

        fn release(routes: &mut Vec<DeviceRoute>, i: usize, me: usize) {
            let r = &mut routes[i];
            if let Some(k) = r.active.iter().position(|(p, _)| *p == me) {
                r.active[k].1 -= 1;
                if r.active[k].1 > 0 {
                    return;
                }
                r.active.remove(k);
            }
            let (dev, next) = (r.dev, r.active.last().map_or(r.original, |(p, _)| *p));
            if r.active.is_empty() {
                routes.swap_remove(i);
            }
            // SAFETY: `next` is a live pool: one of ours still routed (its allocator holds it), or the one that was
            // current before ours (the default pool, or the host's, which it must keep alive while current).
            let _ = unsafe { sys::cuDeviceSetMemPool(dev, next as sys::CUmemoryPool) };
        }

        /// Whether our pool is the device's current one now (tests).
        pub(crate) fn is_current(&self) -> Result<bool> {
            let mut cur: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: an out-pointer of the documented type.
            unsafe { sys::cuDeviceGetMemPool(&mut cur, self.ctx.cu_device()).result().map_err(cuda_err)? };
            Ok(cur == self.pool)
        }
    }

    impl Drop for OwnPool {
        fn drop(&mut self) {
            // SAFETY: the handle is not used after this; outstanding allocations keep the pool alive in the driver.
            let _ = unsafe { sys::cuMemPoolDestroy(self.pool) };
        }
    }
}
