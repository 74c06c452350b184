//! The Rust public API that the C ABI and the CLI share.

mod context;

pub use context::{Context, ContextOptions};
