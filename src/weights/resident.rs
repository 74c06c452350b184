//! Every weight resident on one device: the plain [`WeightSource`] for runs without a budget (and the reference the
//! managed path is compared against).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::source::{block_key, BlockRule, BlockWeights, WeightSource};

/// All tensors of a checkpoint, loaded once onto `device` in `dtype`, grouped by [`block_key`].
pub struct ResidentWeights {
    device: Device,
    dtype: DType,
    blocks: HashMap<String, HashMap<String, Tensor>>,
}

impl ResidentWeights {
    /// Group `tensors` (full checkpoint names) into blocks, converted to `dtype` on `device`.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_tensors_with(tensors, block_key, device, dtype)
    }

    /// [`Self::from_tensors`] grouped by a family's block rule (e.g. `crate::models::flux::block_of`).
    pub fn from_tensors_with(
        tensors: HashMap<String, Tensor>,
        rule: BlockRule,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut blocks: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
        for (name, t) in tensors {
            let key = rule(&name).to_string();
            let rel = name.strip_prefix(&key).map(|r| r.trim_start_matches('.')).unwrap_or(&name).to_string();
            let t = t.to_device(device)?.to_dtype(dtype)?;
            blocks.entry(key).or_default().insert(rel, t);
        }
        Ok(Self { device: device.clone(), dtype, blocks })
    }

    /// Load a safetensors file completely.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(path, block_key, device, dtype)
    }

    /// [`Self::load`] grouped by a family's block rule (e.g. `crate::models::t5::block_of`).
    pub fn load_with(path: &Path, rule: BlockRule, device: &Device, dtype: DType) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        Self::from_tensors_with(tensors, rule, device, dtype)
    }

    /// Names of all blocks.
    pub fn block_names(&self) -> impl Iterator<Item = &str> {
        self.blocks.keys().map(|s| s.as_str())
    }
}

impl WeightSource for ResidentWeights {
    fn fetch(&self, block: &str) -> Result<BlockWeights> {
        let tensors = self.blocks.get(block).cloned().unwrap_or_default();
        Ok(BlockWeights::new(block, tensors, None))
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}
