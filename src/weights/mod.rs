//! Weights: where every tensor of a checkpoint lives, and the interface models fetch them through.

mod resident;
pub mod single_file;
mod source;
mod store;

pub use resident::ResidentWeights;
pub use source::{block_key, BlockRule, BlockWeights, TensorSpan, WeightLayout, WeightSource};
pub use store::{BlockInfo, StagingRing, TensorInfo, TensorLocation, WeightStore};
