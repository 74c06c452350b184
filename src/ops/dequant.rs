//! Dequantisation of stored weights (GGUF quantised blocks, fp8 bytes) into a fresh dense tensor in the compute dtype,
//! on the device the stored bytes live on.
//!
//! The stored bytes are a 1-D `U8` tensor (what the weight cache keeps in RAM, pins, keeps resident and streams); the
//! output is new working memory the caller drops after its matmul. CPU: [`crate::ops::cpu`]'s block decoders over the
//! rayon pool, bit-identical to gguf-py 0.19.0's `gguf.quants.dequantize` (then rounded to f16/bf16 to nearest even
//! when the compute dtype asks for it). CUDA: `kernels/dequant.cu`, one kernel per type, the same arithmetic.
//!
//! Why not candle's `QMatMul` (MODELS.md §4.2): it owns its device copy of the quantised bytes (allocated and copied
//! outside our allocator's accounting, so budgets and streaming statistics would not see it), and on CUDA it quantises
//! the activations to Q8_1 for int8 dot products, which changes the numerics against the dequantise-then-matmul
//! references (gguf-py, diffusers' GGUF path, ComfyUI-GGUF). Dequantising per layer into working memory and running
//! our ordinary matmul keeps both the accounting and the reference arithmetic; the price is one dense copy of the
//! largest weight of a block in working memory ([`crate::weights::BlockWeights::largest_dequantised_bytes`]).

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{Error, Result};
use crate::ops::cpu::dequant::{dequantize_into, OutElem};
use crate::weights::StoredFormat;

/// Dequantise `bytes` (a contiguous 1-D `U8` tensor holding a tensor of `shape` in `format`) into a new tensor of
/// `shape` in `dtype` (f32, f16 or bf16) on the same device.
pub fn dequantize(bytes: &Tensor, format: StoredFormat, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let expect = format.stored_bytes(shape)?;
    if bytes.dtype() != DType::U8 || bytes.elem_count() != expect {
        return Err(Error::invalid(format!(
            "dequantize: {} bytes of {:?} for a {} tensor of shape {shape:?} (expected {expect} U8 bytes)",
            bytes.elem_count(),
            bytes.dtype(),
            format.name()
        )));
    }
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::unsupported(format!(
            "dequantizing {} to {dtype:?} (supported: F32, F16, BF16)",
            format.name()
        )));
    }
    match bytes.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::ops::cuda::dequant::dequantize(bytes, format, shape, dtype),
        Device::Cpu => {
            let bytes = bytes.contiguous()?;
            let (storage, layout) = bytes.storage_and_layout();
            let (Storage::Cpu(candle_core::CpuStorage::U8(v)), Some((a, b))) = (&*storage, layout.contiguous_offsets())
            else {
                return Err(Error::invalid("dequantize: bytes are not a contiguous U8 host tensor"));
            };
            dequantize_slice(&v[a..b], format, shape, dtype)
        }
        other => Err(Error::unsupported(format!("dequantizing on {other:?}"))),
    }
}

/// [`dequantize`] from host bytes into a CPU tensor.
pub fn dequantize_slice(bytes: &[u8], format: StoredFormat, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let expect = format.stored_bytes(shape)?;
    if bytes.len() != expect {
        return Err(Error::invalid(format!(
            "dequantize: {} bytes for a {} tensor of shape {shape:?} (expected {expect})",
            bytes.len(),
            format.name()
        )));
    }
    fn run<T: OutElem + candle_core::WithDType>(bytes: &[u8], format: StoredFormat, shape: &[usize]) -> Result<Tensor> {
        let mut out = vec![T::default(); shape.iter().product()];
        dequantize_into(bytes, format, &mut out);
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }
    match dtype {
        DType::F32 => run::<f32>(bytes, format, shape),
        DType::F16 => run::<half::f16>(bytes, format, shape),
        DType::BF16 => run::<half::bf16>(bytes, format, shape),
        other => Err(Error::unsupported(format!(
            "dequantizing {} to {other:?} (supported: F32, F16, BF16)",
            format.name()
        ))),
    }
}

/// Bytes of the dense copy [`dequantize`] makes of a tensor of `shape` in `dtype` (working memory).
pub fn dequantized_bytes(shape: &[usize], dtype: DType) -> u64 {
    (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64
}
