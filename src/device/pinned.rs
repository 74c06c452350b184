//! Page-locked ("pinned") host memory for the RAM copy of weights on CUDA (`pin_memory`).
//!
//! A copy from pageable memory runs at ~8 GB/s (the driver stages it through its own pinned buffer) and blocks the
//! calling thread; from pinned memory it is a DMA at full PCIe speed (~54 GB/s on the H100 host) and can overlap
//! compute. We register the buffers we already hold (`cuMemHostRegister`: fast, no second copy, no power-of-two
//! rounding as in pinned allocators), so pinned bytes = the RAM copy, already bounded by `max_cache_ram_gb`.

use candle_core::Tensor;

use crate::device::DeviceAllocator;
use crate::error::Result;

/// Tensors smaller than this stay pageable.
#[cfg(feature = "cuda")]
const MIN_PINNED: usize = 64 << 10;

/// Registered host buffers; unregistered (after the device has finished any copy from them) when dropped, which
/// must happen before the buffers are freed.
pub struct PinnedHost {
    #[cfg(feature = "cuda")]
    ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    #[cfg(feature = "cuda")]
    regions: Vec<usize>,
    bytes: u64,
}

impl PinnedHost {
    /// Host bytes registered.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Register the storage of each CPU tensor in `tensors` with the CUDA driver of `alloc`'s device. None when the
    /// device is not CUDA. Tensors must stay alive (and not move: candle's CPU storage never does) until this drops.
    pub fn register<'a>(
        alloc: &DeviceAllocator,
        tensors: impl Iterator<Item = &'a Tensor>,
    ) -> Result<Option<Self>> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys;
            let candle_core::Device::Cuda(dev) = alloc.device() else {
                return Ok(None);
            };
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread().map_err(cuda_err)?;
            let mut pinned = PinnedHost {
                ctx,
                regions: Vec::new(),
                bytes: 0,
            };
            for t in tensors {
                let (storage, _) = t.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    continue;
                };
                let (ptr, len) = cpu_span(cpu);
                // Small tensors are latency-bound either way, and may share a page with a registered neighbour
                // (the driver refuses overlapping registrations): those stay pageable.
                if len < MIN_PINNED {
                    continue;
                }
                // SAFETY: ptr/len are the live allocation of a CPU storage the caller keeps alive while registered.
                let r = unsafe {
                    sys::cuMemHostRegister_v2(ptr as *mut _, len, sys::CU_MEMHOSTREGISTER_PORTABLE)
                };
                if r.result().is_ok() {
                    pinned.regions.push(ptr);
                    pinned.bytes += len as u64;
                }
            }
            Ok(Some(pinned))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (alloc, tensors.count());
            Ok(None)
        }
    }
}

#[cfg(feature = "cuda")]
fn cpu_span(cpu: &candle_core::CpuStorage) -> (usize, usize) {
    use candle_core::CpuStorage as S;
    fn span<T>(v: &[T]) -> (usize, usize) {
        (v.as_ptr() as usize, std::mem::size_of_val(v))
    }
    match cpu {
        S::F32(v) => span(v),
        S::F16(v) => span(v),
        S::BF16(v) => span(v),
        S::F64(v) => span(v),
        S::U8(v) => span(v),
        S::U32(v) => span(v),
        S::I64(v) => span(v),
        _ => (0, 0),
    }
}

#[cfg(feature = "cuda")]
pub(super) fn cuda_err(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> crate::error::Error {
    crate::error::Error::unsupported(format!("CUDA driver: {e:?}"))
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys;
            if self.ctx.bind_to_thread().is_err() {
                return;
            }
            // A copy issued from this memory may still be in flight on some stream.
            let _ = self.ctx.synchronize();
            for &p in &self.regions {
                // SAFETY: registered above and not yet unregistered.
                let _ = unsafe { sys::cuMemHostUnregister(p as *mut _) };
            }
        }
    }
}

/// Set the CUDA memory pool's release threshold on `alloc`'s device: `keep` holds freed blocks in the pool for
/// reuse (`cuda_allocator: pool_keep`), else they go back to the driver at each synchronise (`pool`). The cache
/// counts kept bytes either way: they show as used in the driver's free memory, which its budget is read from.
/// A no-op off CUDA.
pub fn set_pool_keep(alloc: &DeviceAllocator, keep: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let candle_core::Device::Cuda(dev) = alloc.device() else {
            return Ok(());
        };
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(cuda_err)?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = if keep { u64::MAX } else { 0 };
        // SAFETY: out-pointer and attribute value of the documented types.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                .result()
                .map_err(cuda_err)?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut _,
            )
            .result()
            .map_err(cuda_err)?;
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (alloc, keep);
        Ok(())
    }
}
