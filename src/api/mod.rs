//! The Rust public API that the C ABI and the CLI share.

mod context;
mod image;
mod tensor;

pub use context::{Context, ContextOptions};
pub use image::write_pngs;
pub use tensor::{HostDType, HostTensor};
