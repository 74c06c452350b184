//! Model architectures, built from diffusers `config.json` files. Models own no tensors: every block fetches its
//! weights from a [`crate::WeightSource`] when it runs and drops them when it is done.
//!
//! - [`unet`]: the SD 1.x / 2.x / SDXL `UNet2DConditionModel`.
//! - [`vae`]: `AutoencoderKL` (decoder, encoder, tiled decode).
//! - [`family`]: which architectures a pipeline combines and how its family is detected.
//! - [`denoiser`]: the interface the sampler calls on any denoising model; [`conditioning`]: the named tensors it
//!   takes.
//! - [`flux`]: the FLUX.1 transformer (dev, schnell) in BFL names.
//! - [`clip`]: the CLIP text encoders (`CLIPTextModel`, `CLIPTextModelWithProjection`).
//! - [`t5`]: the T5 encoder (`T5EncoderModel`: FLUX's T5-XXL).

pub(crate) mod blocks;
pub mod clip;
pub mod conditioning;
mod config_util;
pub mod flux;
pub mod denoiser;
pub mod family;
pub mod t5;
pub mod text_encoder;
pub mod unet;
pub mod vae;

pub use blocks::ExpectedTensors;
pub use conditioning::{BatchedConditioning, CondSpec, Conditioning};
pub use denoiser::Denoiser;
pub use family::Family;
pub use flux::{FluxConfig, FluxTransformer};
pub use unet::{AddedCond, UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, VaeConfig};
