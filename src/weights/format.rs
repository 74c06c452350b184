//! Stored formats that stay as they are in RAM and on the device: GGUF quantised blocks and fp8 bytes.
//!
//! Dense dtypes (f32, f16, bf16) are converted once into the storage/compute dtype like any safetensors tensor; a
//! tensor in a [`StoredFormat`] keeps its file bytes everywhere (RAM copy, pinned copy, resident device copy, streamed
//! bytes) and is dequantised into the compute dtype only when a model asks for it
//! ([`crate::weights::BlockWeights::get`], which calls [`crate::ops::dequant`]).

use crate::error::{Error, Result};

/// A GGML block-quantised type (the ones ComfyUI-GGUF, stable-diffusion.cpp and llama.cpp write for image models and
/// T5). Layouts: ggml `ggml-common.h`; element order and arithmetic: gguf-py 0.19.0 `gguf/quants.py`.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl QuantType {
    /// Every supported quantised type.
    pub const ALL: [QuantType; 10] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q2_K => 84,
            QuantType::Q3_K => 110,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// The GGML type name (`Q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q2_K => "Q2_K",
            QuantType::Q3_K => "Q3_K",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// The GGML type id (`ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q2_K => 10,
            QuantType::Q3_K => 11,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
        }
    }

    /// Index 0..10 (kernel tables).
    pub fn index(self) -> usize {
        QuantType::ALL.iter().position(|&q| q == self).expect("listed")
    }
}

/// How a tensor's bytes are kept when they are not a dense f32/f16/bf16 array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredFormat {
    /// GGML quantised blocks, each row a whole number of blocks.
    Quant(QuantType),
    /// fp8 e4m3fn (no infinities; 0x7f/0xff are NaN), one byte per element.
    F8E4M3,
    /// fp8 e5m2 (IEEE-style, with infinities), one byte per element.
    F8E5M2,
}

impl StoredFormat {
    /// Elements per block (1 for fp8).
    pub fn block_elems(self) -> usize {
        match self {
            StoredFormat::Quant(q) => q.block_elems(),
            _ => 1,
        }
    }

    /// Bytes per block (1 for fp8).
    pub fn block_bytes(self) -> usize {
        match self {
            StoredFormat::Quant(q) => q.block_bytes(),
            _ => 1,
        }
    }

    /// A readable name (`Q4_K`, `F8_E4M3`).
    pub fn name(self) -> &'static str {
        match self {
            StoredFormat::Quant(q) => q.name(),
            StoredFormat::F8E4M3 => "F8_E4M3",
            StoredFormat::F8E5M2 => "F8_E5M2",
        }
    }

    /// Stored bytes of a tensor of `shape`: a whole number of blocks in row-major order (a file checks its rows;
    /// City96's reshaped SD tensors are read in another shape of the same element count), or a format error.
    pub fn stored_bytes(self, shape: &[usize]) -> Result<usize> {
        let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match elems {
            Some(n) if n % self.block_elems() == 0 => Ok(n / self.block_elems() * self.block_bytes()),
            _ => Err(Error::format(format!(
                "a {} tensor of shape {shape:?} is not a whole number of {}-element blocks",
                self.name(),
                self.block_elems()
            ))),
        }
    }
}
