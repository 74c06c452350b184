//! Weights: where every tensor of a checkpoint lives, and the interface models fetch them through.

mod resident;
mod shards;
pub mod single_file;
mod source;
mod store;

pub use resident::ResidentWeights;
pub use source::{block_key, BlockRule, BlockWeights, FilePart, TensorSpan, WeightLayout, WeightSource};
pub use shards::{find_weights, is_index, shard_files};
pub use store::{BlockInfo, StagingRing, TensorInfo, TensorLocation, WeightStore};
