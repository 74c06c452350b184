//! Host tensors: how data crosses the API (contiguous, row-major, on the CPU).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Element types that cross the API (stable numbers in the C enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDType {
    F32,
    F16,
    BF16,
}

impl HostDType {
    /// The candle dtype.
    pub fn to_candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// The API dtype of a candle dtype, if it crosses the API.
    pub fn from_candle(dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::F32),
            DType::F16 => Ok(Self::F16),
            DType::BF16 => Ok(Self::BF16),
            other => Err(Error::unsupported(format!("dtype {other:?} cannot cross the API"))),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.to_candle().size_in_bytes()
    }
}

/// A tensor in host memory, owned by the library.
#[derive(Debug, Clone)]
pub struct HostTensor {
    tensor: Tensor,
}

impl HostTensor {
    /// Copy `data` (exactly `shape.product() * dtype.size()` bytes, native endianness) into a new tensor.
    pub fn from_bytes(dtype: HostDType, shape: &[usize], data: &[u8]) -> Result<Self> {
        let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected = elems.and_then(|e| e.checked_mul(dtype.size())).ok_or_else(|| {
            Error::invalid(format!("shape {shape:?} is too large"))
        })?;
        if data.len() != expected {
            return Err(Error::BufferSize(format!(
                "data has {} bytes, shape {shape:?} of {dtype:?} needs {expected}",
                data.len()
            )));
        }
        let tensor = Tensor::from_raw_buffer(data, dtype.to_candle(), shape, &Device::Cpu)?;
        Ok(Self { tensor })
    }

    /// Wrap a candle tensor, moving it to the host and making it contiguous.
    pub fn from_tensor(tensor: &Tensor) -> Result<Self> {
        HostDType::from_candle(tensor.dtype())?;
        Ok(Self { tensor: tensor.to_device(&Device::Cpu)?.contiguous()? })
    }

    /// The candle tensor (on the CPU).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The element type.
    pub fn dtype(&self) -> HostDType {
        HostDType::from_candle(self.tensor.dtype()).expect("checked at construction")
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> usize {
        self.tensor.elem_count() * self.dtype().size()
    }

    /// Copy the data into `buf`, whose length must be exactly [`Self::byte_len`].
    pub fn read_into(&self, buf: &mut [u8]) -> Result<()> {
        if buf.len() != self.byte_len() {
            return Err(Error::BufferSize(format!(
                "buffer has {} bytes, the tensor {:?} of {:?} has {}",
                buf.len(),
                self.shape(),
                self.dtype(),
                self.byte_len()
            )));
        }
        let flat = self.tensor.flatten_all()?;
        match self.dtype() {
            HostDType::F32 => copy_pod(&flat.to_vec1::<f32>()?, buf),
            HostDType::F16 => copy_pod(&flat.to_vec1::<half::f16>()?, buf),
            HostDType::BF16 => copy_pod(&flat.to_vec1::<half::bf16>()?, buf),
        }
        Ok(())
    }
}

fn copy_pod<T: Copy>(src: &[T], dst: &mut [u8]) {
    // SAFETY: T is a plain numeric type; dst has exactly size_of_val(src) bytes (checked by the caller).
    let bytes = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), std::mem::size_of_val(src)) };
    dst.copy_from_slice(bytes);
}
