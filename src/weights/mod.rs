//! Weights: where every tensor of a checkpoint lives, and the interface models fetch them through.

mod resident;
mod source;

pub use resident::ResidentWeights;
pub use source::{block_key, BlockWeights, WeightSource};
