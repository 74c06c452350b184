//! Devices: which one to compute on ([`DeviceSpec`]) and the one allocator every device byte goes through
//! ([`DeviceAllocator`]), with current/peak/refused accounting and, on `emulated:SIZE`, a hard capacity that refuses
//! allocations exactly like a real out-of-memory (so CPU tests drive the same OOM paths); and the device's copy
//! thread ([`CopyEngine`]) that uploads blocks ahead of use and hands them over by events.

mod allocator;
mod block_buffers;
mod compute_gate;
pub(crate) mod copy_engine;
mod host_arena;
mod pinned;
pub mod oom;
mod pool;

pub use allocator::{AllocKind, Allocation, ComputeThreads, DeviceAllocator, DeviceUsage, FaultInjection, FaultSite, PoolRoute};
pub use block_buffers::{BlockBuffer, BlockBuffers};
pub use compute_gate::{ComputeGate, GateGuard};
pub use copy_engine::{CopyEngine, CopyLane, Handoff, Pending};
pub use host_arena::{align_up, page_size, HostArena, TENSOR_ALIGN};
pub use pinned::{set_pool_keep, NotPinned, PinEvent, PinRegistry};
pub use pool::{pool_peak_bytes, pool_peak_reset, pool_reserved_bytes, pool_stats, PoolStats};

/// `dst.copy_from_slice(src)`, split into 1 MiB chunks over the rayon pool when `parallel` and at least 4 MiB: the
/// memory bandwidth of every core instead of one thread's (uploads to the emulated device, streamed blocks).
pub(crate) fn copy_chunked<T: Copy + Send + Sync>(dst: &mut [T], src: &[T], parallel: bool) {
    use rayon::prelude::*;
    let chunk = (1usize << 20) / std::mem::size_of::<T>().max(1);
    if parallel && src.len() >= 4 * chunk {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    } else {
        dst.copy_from_slice(src);
    }
}

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::config::parse_size;
use crate::error::{Error, Result};

/// Which device to compute on (`device` config key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when this is a `cuda` build and one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU (no device budget).
    Cpu,
    /// CUDA device N (`cuda` or `cuda:N`).
    Cuda(usize),
    /// A CPU-backed device with a hard capacity in bytes (`emulated:SIZE`): tensors are CPU tensors, every
    /// allocation is counted and refused past the capacity with `OutOfDeviceMemory`.
    Emulated(u64),
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || {
            Error::invalid(format!(
                "invalid device `{s}`; accepted: auto|cpu|cuda|cuda:N|emulated:SIZE"
            ))
        };
        match t {
            "auto" => return Ok(DeviceSpec::Auto),
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" => return Ok(DeviceSpec::Cuda(0)),
            _ => {}
        }
        if let Some(n) = t.strip_prefix("cuda:") {
            return n.parse().map(DeviceSpec::Cuda).map_err(|_| bad());
        }
        if let Some(size) = t.strip_prefix("emulated:") {
            let bytes = parse_size(size).map_err(|_| bad())?;
            if bytes == 0 {
                return Err(bad());
            }
            return Ok(DeviceSpec::Emulated(bytes));
        }
        Err(bad())
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Emulated(b) => write!(f, "emulated:{b}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl DeviceSpec {
    /// Resolve `auto` to a concrete device: `cuda:0` in a `cuda` build where it opens, else `cpu`.
    pub fn resolve(&self) -> DeviceSpec {
        match self {
            DeviceSpec::Auto => {
                #[cfg(feature = "cuda")]
                {
                    if candle_core::Device::new_cuda(0).is_ok() {
                        return DeviceSpec::Cuda(0);
                    }
                }
                DeviceSpec::Cpu
            }
            other => other.clone(),
        }
    }
}
