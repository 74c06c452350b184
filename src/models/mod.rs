//! Model architectures, built from diffusers `config.json` files. Models own no tensors: every block fetches its
//! weights from a [`crate::WeightSource`] when it runs and drops them when it is done.
//!
//! - [`unet`]: the SD 1.x / 2.x `UNet2DConditionModel`.
//! - [`vae`]: `AutoencoderKL` (decoder, encoder, tiled decode).
//! - [`clip`]: the CLIP text encoders (`CLIPTextModel`, `CLIPTextModelWithProjection`).

pub(crate) mod blocks;
pub mod clip;
mod config_util;
pub mod unet;
pub mod vae;

pub use unet::{UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, VaeConfig};
