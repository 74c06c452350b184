//! The Rust public API that the C ABI and the CLI share.

mod context;
mod image;
mod model;
mod pipeline;
mod run;
mod t5_file;
mod tensor;

pub use context::{CancelToken, Context, ContextOptions};
pub use image::write_pngs;
pub use model::{Architecture, Model, ModelKind};
pub use pipeline::{ComponentPaths, Pipeline, PromptOptions};
pub use run::{DenoiseOptions, RunReport, Tiling};
pub use tensor::{HostDType, HostTensor};
