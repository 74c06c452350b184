//! Weights: where every tensor of a checkpoint lives, and the interface models fetch them through.

mod convert;
mod format;
pub mod gguf;
mod resident;
mod shards;
pub mod single_file;
mod source;
mod store;

pub use format::{QuantType, StoredFormat};
pub use resident::ResidentWeights;
pub use source::{block_key, BlockRule, BlockWeights, FilePart, StoredTensors, TensorSpan, WeightLayout, WeightSource};
pub use shards::{find_weights, is_index, shard_files, tensor_shapes};
pub use store::{BlockInfo, StagingRing, TensorInfo, TensorLocation, WeightStore};
