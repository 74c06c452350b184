//! lowvram: run diffusion models on GPUs too small to hold them, behind a stable C ABI.
//!
//! Layers, top to bottom (one folder each):
//! `ffi` (C ABI only) → `api` (the Rust public API the ffi and the CLI share) → `memory` (model cache, residency
//! plans, working memory) → `device` (allocators with byte accounting) and `weights` (safetensors, the
//! [`WeightSource`] interface) → `models` / `sampling` → `ops` → candle.

pub mod api;
pub mod backend;
pub mod config;
pub mod device;
mod error;
pub mod ffi;
pub mod log;
pub mod memory;
pub mod models;
pub mod ops;
pub mod sampling;
pub mod system;
pub mod text;
pub mod weights;

pub use error::{Error, Result};
pub use weights::{block_key, BlockWeights, ResidentWeights, WeightSource};

/// The library version, as in Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
