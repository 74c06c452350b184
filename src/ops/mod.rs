//! The hot ops every model calls, one file each. Each starts as a composition of candle-core primitives; own kernels
//! (CPU and CUDA) can replace them one by one without any change in `models/`.
//!
//! Conventions: activations are NCHW (`[batch, channels, height, width]`) or `[batch, tokens, features]`; weights have
//! the shapes of the PyTorch modules they come from (`Linear`: `[out, in]`, `Conv2d`: `[out, in, kh, kw]`).
//! Statistics (group/layer norm mean and variance, softmax) are computed in f32 whatever the compute dtype, and the
//! result is returned in the input's dtype.

use candle_core::{DType, Device};

pub mod activation;
pub mod attention;
pub mod cancel;
mod cpu;
mod cuda;
pub mod conv2d;
pub mod dequant;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod rms_norm;
pub mod rope;
pub mod timestep;

pub use attention::{attention, attention_chunk_rows, attention_scratch_bytes, attention_with_budget, ATTENTION_SCRATCH_BYTES};
pub use conv2d::{conv2d, conv2d_scratch_bytes};
pub use dequant::{dequantize, dequantized_bytes};
pub use rms_norm::rms_norm;
pub use cpu::elementwise::{silu_tensor as silu, upsample_nearest2d};
pub use geglu::geglu;
pub use group_norm::{group_norm, group_norm_scratch_bytes};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use rope::{rope_scratch_bytes, RopeTable};
pub use timestep::timestep_embedding;

/// What a working-memory estimate needs to know about where an op runs: its compute dtype, and which kernels run it —
/// the own CPU kernels (f32 in host memory: the `cpu` and `emulated:` devices), the own CUDA kernels (CUDA tensors of
/// a dtype the GPU's kernels support), or candle's compositions (everything else). The own kernels need far less
/// scratch than the compositions. A bare `DType` converts to the compositions' figure, an upper bound of all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpTarget {
    pub dtype: DType,
    pub cpu_kernels: bool,
    pub cuda_kernels: bool,
}

impl OpTarget {
    /// The path ops take for tensors of `dtype` on `device` (the dispatch rule of the ops in this module).
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self { dtype, cpu_kernels: device.is_cpu() && dtype == DType::F32, cuda_kernels: cuda_kernels_run(device, dtype) }
    }

    /// Bytes per element of the compute dtype.
    pub fn size_in_bytes(&self) -> usize {
        self.dtype.size_in_bytes()
    }
}

impl From<DType> for OpTarget {
    fn from(dtype: DType) -> Self {
        Self { dtype, cpu_kernels: false, cuda_kernels: false }
    }
}

/// Whether the own CUDA kernels run ops on tensors of `dtype` on `device` (a `cuda` build, a CUDA device, f32/f16, or
/// bf16 on compute capability ≥ 8.0).
#[cfg(feature = "cuda")]
fn cuda_kernels_run(device: &Device, dtype: DType) -> bool {
    match device {
        Device::Cuda(dev) => cuda::dtype_runs(dev, dtype),
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_kernels_run(_: &Device, _: DType) -> bool {
    false
}

/// The compute capabilities whose machine code the `cuda` build embeds for the own kernels (e.g. `75,80,86,89,90`),
/// or None in a CPU build. Other GPUs newer than the list JIT-compile the embedded PTX of the newest.
pub fn cuda_kernel_archs() -> Option<&'static str> {
    #[cfg(feature = "cuda")]
    {
        Some(cuda::module::BUILT_ARCHS)
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}
