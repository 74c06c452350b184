//! Dequantisation on CUDA: `kernels/dequant.cu`, one kernel per stored format and output dtype, from the stored
//! bytes (a `U8` device tensor) into a fresh dense tensor. The arithmetic is the CPU decoders' (bit-identical f32),
//! checked on the emulator by `kernels/emu/test_dequant.cpp`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};

use super::module::{kernel, Module};
use super::{config, dtype_suffix, grid_dim, launch_error, output, view};
use crate::weights::{QuantType, StoredFormat};

const THREADS: u32 = 256;
/// Grid cap: the kernels loop over the rest (a few waves of an H100's SMs are plenty for a memory-bound copy).
const MAX_GRID: usize = 4096;

/// The kernel name's format part.
fn format_name(f: StoredFormat) -> &'static str {
    match f {
        StoredFormat::Quant(q) => match q {
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q5_0 => "q5_0",
            QuantType::Q5_1 => "q5_1",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q2_K => "q2_k",
            QuantType::Q3_K => "q3_k",
            QuantType::Q4_K => "q4_k",
            QuantType::Q5_K => "q5_k",
            QuantType::Q6_K => "q6_k",
        },
        StoredFormat::F8E4M3 => "f8_e4m3",
        StoredFormat::F8E5M2 => "f8_e5m2",
    }
}

/// `bytes` (a CUDA `U8` tensor, checked by the caller to hold a `shape` tensor in `format`) dequantised into `dtype`.
pub(crate) fn dequantize(
    bytes: &Tensor,
    format: StoredFormat,
    shape: &[usize],
    dtype: DType,
) -> crate::error::Result<Tensor> {
    let bytes = bytes.contiguous()?;
    let op = DequantOp {
        format,
        shape: Shape::from(shape.to_vec()),
        dtype,
    };
    Ok(bytes.apply_op1_no_bwd(&op)?)
}

struct DequantOp {
    format: StoredFormat,
    shape: Shape,
    dtype: DType,
}

impl CustomOp1 for DequantOp {
    fn name(&self) -> &'static str {
        "lowvram-dequant"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lowvram-dequant: the CUDA kernel got CPU bytes (ops::dequantize decodes those on the CPU)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        with_element_type!(self.dtype, "lowvram-dequant", T => self.run::<T>(s, l))
    }
}

impl DequantOp {
    fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = self.shape.elem_count();
        let (be, bb) = (self.format.block_elems(), self.format.block_bytes());
        if !l.is_contiguous() || s.dtype() != DType::U8 || n % be != 0 || l.shape().elem_count() != n / be * bb {
            candle_core::bail!(
                "lowvram-dequant: {:?} {:?} bytes for a {} tensor of shape {:?}",
                s.dtype(),
                l.dims(),
                self.format.name(),
                self.shape
            );
        }
        let dev = &s.device;
        let src = view::<u8>(s, l)?;
        let mut y = output::<T>(dev, n.max(1))?;
        let name = format!(
            "lowvram_dequant_{}_{}",
            format_name(self.format),
            dtype_suffix(self.dtype).unwrap_or("?")
        );
        let grid = grid_dim(n.div_ceil(THREADS as usize).clamp(1, MAX_GRID), "dequant")?;
        let k = kernel(dev, Module::Dequant, &name, 0)?;
        let n64 = n as i64;
        let mut launch = k.stream.launch_builder(&k.func);
        launch.arg(&src).arg(&mut y).arg(&n64);
        // SAFETY: the argument list is the kernel's (kernels/dequant.cu); src holds n / block · block_bytes bytes
        // (checked above), y n elements, each written by exactly one thread of the grid-stride loop.
        unsafe { launch.launch(config((grid, 1, 1), THREADS, 0)) }.map_err(|e| launch_error(&name, e))?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), self.shape.clone()))
    }
}
