//! The CUDA side of the hot ops (built with the `cuda` feature): the project's own kernels from `kernels/*.cu`,
//! launched on candle's stream through candle's custom-op interface, so their inputs and outputs are ordinary
//! tensors and candle's stream ordering covers them. The public ops in `ops::*` dispatch here for CUDA tensors of
//! the dtypes and shapes a kernel supports, and fall back to the candle compositions otherwise.

/// `$body` with `$T` the element type of `$dtype` (f32, f16 or bf16: the dtypes every kernel has), or an error naming
/// `$op`: the one place the kernels' dtypes map to Rust types.
#[cfg(feature = "cuda")]
macro_rules! with_element_type {
    ($dtype:expr, $op:literal, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            d => candle_core::bail!("{}: no kernel for {d:?}", $op),
        }
    };
}

#[cfg(feature = "cuda")]
pub(crate) mod attention;
#[cfg(feature = "cuda")]
pub(crate) mod conv2d;
#[cfg(feature = "cuda")]
pub(crate) mod dequant;
pub(crate) mod geometry;
#[cfg(feature = "cuda")]
pub(crate) mod group_norm;
#[cfg(feature = "cuda")]
pub(crate) mod module;

#[cfg(feature = "cuda")]
pub(crate) use launch::*;

#[cfg(feature = "cuda")]
mod launch {
    use super::module;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CudaDevice, Layout, Result};
    use cudarc::driver::{CudaView, LaunchConfig};

    /// The elements of `s` from `l`'s start offset on (the kernels take pointers that already include it).
    pub(crate) fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<CudaView<'a, T>> {
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    /// A fresh, uninitialised device buffer of `n` elements of `T` on `dev` (every kernel writes all of its output).
    pub(crate) fn output<T: CudaDType + cudarc::driver::DeviceRepr>(
        dev: &CudaDevice,
        n: usize,
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        // SAFETY: the launching kernel writes every element before anything reads the buffer.
        unsafe { dev.alloc::<T>(n) }
    }

    pub(crate) fn config(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        }
    }

    /// candle's error for a failed launch: the driver's error kept as candle wraps it (`CudaError::Cuda`) under
    /// the kernel's name, so a launch that fails for lack of memory is a device OOM to
    /// [`crate::device::oom::oom_request`], like any other.
    pub(crate) fn launch_error(name: &str, e: cudarc::driver::DriverError) -> candle_core::Error {
        candle_core::Error::Cuda(Box::new(candle_core::cuda_backend::CudaError::Cuda(e)))
            .context(format!("CUDA kernel {name}"))
    }

    /// `u32` grid dimension, or an error when the shape is beyond what one launch covers.
    pub(crate) fn grid_dim(n: usize, what: &str) -> Result<u32> {
        u32::try_from(n)
            .map_err(|_| candle_core::Error::Msg(format!("{what}: {n} blocks exceed one launch")))
    }

    /// Kernel name suffix of a dtype the kernels support.
    pub(crate) fn dtype_suffix(dtype: candle_core::DType) -> Option<&'static str> {
        match dtype {
            candle_core::DType::F32 => Some("f32"),
            candle_core::DType::F16 => Some("f16"),
            candle_core::DType::BF16 => Some("bf16"),
            _ => None,
        }
    }

    /// Whether the kernels of `dtype` run on `dev`: bf16 tensor-core kernels need compute capability 8.0.
    pub(crate) fn dtype_runs(dev: &CudaDevice, dtype: candle_core::DType) -> bool {
        match dtype {
            candle_core::DType::F32 | candle_core::DType::F16 => true,
            candle_core::DType::BF16 => module::compute_capability(dev)
                .map(|cc| cc >= 80)
                .unwrap_or(false),
            _ => false,
        }
    }
}
