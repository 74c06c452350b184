//! The Rust public API that the C ABI and the CLI share.

mod context;
mod tensor;

pub use context::{Context, ContextOptions};
pub use tensor::{HostDType, HostTensor};
