//! The high-water mark of the CUDA default memory pool (which candle's allocations come from, through
//! `cuMemAllocAsync`): the device's own accounting of the bytes live at once, used to measure an operation's peak
//! device memory (benchmarks; GPU tests check working-memory estimates against it). Off CUDA these report None.

use candle_core::Device;

use crate::error::Result;

/// Reset the pool's high-water mark of used bytes to the bytes in use now (then [`pool_peak_bytes`] − the bytes in
/// use now = the peak of what follows). Synchronises the device first so earlier work is not counted.
pub fn pool_peak_reset(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
        device.synchronize()?;
        let mut zero: u64 = 0;
        set(device, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero)?;
    }
    let _ = device;
    Ok(())
}

/// `(used now, high-water mark since the last reset)` of the pool in bytes, after synchronising; None off CUDA.
pub fn pool_peak_bytes(device: &Device) -> Result<Option<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
        device.synchronize()?;
        let used = get(device, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        let high = get(device, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        return Ok(Some((used, high)));
    }
    let _ = device;
    Ok(None)
}

/// Bytes the pool holds from the driver now (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`): the live allocations and the
/// freed blocks it keeps for reuse. Read without synchronising (frees still queued count as held). None off CUDA.
pub fn pool_reserved_bytes(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
        return get(device, CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT).map(Some);
    }
    let _ = device;
    Ok(None)
}

#[cfg(feature = "cuda")]
fn default_pool(
    device: &Device,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(dev) = device else {
        unreachable!("called for CUDA devices only")
    };
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(super::pinned::cuda_err)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: an out-pointer of the documented type and the context's device.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(super::pinned::cuda_err)?
    };
    Ok(pool)
}

#[cfg(feature = "cuda")]
fn get(
    device: &Device,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(device)?;
    let mut v: u64 = 0;
    // SAFETY: the used/reserved-memory attributes are u64 (cuuint64_t) values.
    unsafe {
        sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _)
            .result()
            .map_err(super::pinned::cuda_err)?
    };
    Ok(v)
}

#[cfg(feature = "cuda")]
fn set(
    device: &Device,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    v: &mut u64,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(device)?;
    // SAFETY: the high-water mark may only be set to 0 (reset); the value is a u64 (cuuint64_t).
    unsafe {
        sys::cuMemPoolSetAttribute(pool, attr, v as *mut u64 as *mut _)
            .result()
            .map_err(super::pinned::cuda_err)?
    };
    Ok(())
}
