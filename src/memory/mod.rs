//! The memory manager: a model cache with a RAM tier and a device tier, residency plans for partial loading,
//! working-memory and host reservations, and statistics. Models reach it only through
//! [`crate::WeightSource`] (implemented by [`ModelLock`]).

mod cache;
pub mod plan;
pub mod sizing;
mod stats;

pub use cache::{LogFn, ManagedModel, ModelCache, ModelLock, Reservation};
pub use plan::ResidencyPlan;
pub use sizing::Sizing;
pub use stats::{CacheStats, DeviceStats, ModelStats, PlanStats, RamStats, TierStats, WeightsFrom};
