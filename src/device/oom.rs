//! Device out-of-memory, whoever raised it: the allocator's own refusal, a buffer the tensor library could not get
//! inside an op (cudarc's `CUDA_ERROR_OUT_OF_MEMORY` from `cuMemAllocAsync`), a cuBLAS workspace it could not
//! allocate (`CUBLAS_STATUS_ALLOC_FAILED`), one of our kernels failing to launch for lack of memory, or an op-level
//! fault injected on purpose ([`device_oom_error`]). [`oom_request`] is the one test of "is this a device OOM";
//! [`crate::device::DeviceAllocator::classify`] turns such an error into `OutOfDeviceMemory` with the numbers.

use std::error::Error as StdError;

/// A device OOM the op-level fault injection raised inside an op, on a build without CUDA (a `cuda` build raises
/// cudarc's own `CUDA_ERROR_OUT_OF_MEMORY` instead, exactly what `cuMemAllocAsync` returns): it travels as
/// candle's `Error::Cuda`, as a real one does, and carries the op's request.
#[derive(Debug, Clone, Copy)]
pub struct InjectedDeviceOom {
    /// The bytes the op asked for (its output).
    pub bytes: u64,
}

impl std::fmt::Display for InjectedDeviceOom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CUDA_ERROR_OUT_OF_MEMORY (injected): an op's {} bytes", self.bytes)
    }
}

impl StdError for InjectedDeviceOom {}

/// The tensor-library error a device OOM inside an op of `bytes` produces: on a `cuda` build the one candle makes
/// of a failed `cuMemAllocAsync` (`CudaError::Cuda(DriverError(CUDA_ERROR_OUT_OF_MEMORY))` boxed in
/// `Error::Cuda`, candle-core-0.11.1 `cuda_backend/error.rs:60-64`, `WrapErr::w`), else [`InjectedDeviceOom`]
/// in the same variant.
pub fn device_oom_error(bytes: u64) -> candle_core::Error {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{sys::CUresult, DriverError};
        let _ = bytes;
        candle_core::Error::Cuda(Box::new(candle_core::cuda_backend::CudaError::Cuda(DriverError(
            CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        ))))
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::Error::Cuda(Box::new(InjectedDeviceOom { bytes }))
    }
}

/// Whether `e` is a device out-of-memory: `Some(request)` if so, with the bytes the failed allocation asked for
/// when the error says (an injected fault does; the driver's does not), `None` for any other error. Looks through
/// candle's wrappers (backtrace, context, path) and each wrapped error's `source()` chain; matches types, never
/// message text.
pub fn oom_request(e: &candle_core::Error) -> Option<Option<u64>> {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => oom_request(inner),
        E::Cuda(b) => chain_oom(b.as_ref()),
        E::WrappedContext { wrapped, .. } => chain_oom(wrapped.as_ref()),
        _ => None,
    }
}

fn chain_oom(e: &(dyn StdError + 'static)) -> Option<Option<u64>> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(i) = err.downcast_ref::<InjectedDeviceOom>() {
            return Some(Some(i.bytes));
        }
        if let Some(c) = err.downcast_ref::<candle_core::Error>() {
            if let Some(r) = oom_request(c) {
                return Some(r);
            }
        }
        #[cfg(feature = "cuda")]
        if cuda_oom(err) {
            return Some(None);
        }
        cur = err.source();
    }
    None
}

/// cudarc's driver and cuBLAS errors that mean the device had no memory (candle's `CudaError` wraps them
/// transparently, so `source()` may skip the wrapper: both levels are checked).
#[cfg(feature = "cuda")]
fn cuda_oom(err: &(dyn StdError + 'static)) -> bool {
    use candle_core::cuda_backend::cudarc::cublas::result::CublasError;
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasStatus_t;
    use candle_core::cuda_backend::cudarc::driver::{sys::CUresult, DriverError};
    use candle_core::cuda_backend::CudaError;
    let driver = |d: &DriverError| d.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY;
    let cublas = |c: &CublasError| c.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED;
    if let Some(c) = err.downcast_ref::<CudaError>() {
        return match c {
            CudaError::Cuda(d) | CudaError::Load { cuda: d, .. } => driver(d),
            CudaError::Cublas(b) => cublas(b),
            _ => false,
        };
    }
    err.downcast_ref::<DriverError>().is_some_and(driver) || err.downcast_ref::<CublasError>().is_some_and(cublas)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classifier finds an OOM under every wrapper candle puts around it, and nothing else.
    #[test]
    fn an_oom_is_found_under_candles_wrappers_and_nothing_else_is() {
        let wrapped = [
            device_oom_error(64),
            device_oom_error(64).bt(),
            device_oom_error(64).context("conv2d").with_path("/x"),
            candle_core::Error::Context {
                inner: Box::new(device_oom_error(64)),
                context: Box::new("CUDA kernel conv2d_f16"),
            },
        ];
        for e in &wrapped {
            let r = oom_request(e);
            assert!(r.is_some(), "{e}");
            #[cfg(not(feature = "cuda"))]
            assert_eq!(r, Some(Some(64)), "{e}");
        }
        let others = [
            candle_core::Error::Msg("out of memory".into()),
            candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into()),
            candle_core::Error::UnwrapNone,
            candle_core::Error::Cuda(Box::new(std::io::Error::other("launch failed"))),
        ];
        for e in &others {
            assert_eq!(oom_request(e), None, "{e}: not a typed device OOM");
        }
    }
}
