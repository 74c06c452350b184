//! The one interface the sampling loop and the API call on any denoising model (candle's `WithForward` idea): the
//! conditioning it needs, its forward on one batch, and its working memory. `api/` never matches on architectures.

use candle_core::Tensor;

use crate::error::Result;
use crate::models::conditioning::{BatchedConditioning, CondSpec, Conditioning, Dim, COND_EMBEDDINGS, UNCOND_EMBEDDINGS};
use crate::models::UNet2DConditionModel;
use crate::ops::OpTarget;
use crate::weights::WeightSource;

/// A model the sampler calls once per step (twice the batch with classifier-free guidance).
pub trait Denoiser: Send + Sync {
    /// A short name for messages (`UNet2DConditionModel`).
    fn name(&self) -> &'static str;
    /// Channels of the latents it denoises.
    fn latent_channels(&self) -> usize;
    /// The conditioning tensors it takes, with their shapes.
    fn conditioning(&self) -> Vec<CondSpec>;
    /// The prediction for `x` `[N, C, h, w]` at timestep `t`, given the conditioning of the same batch `N`.
    fn forward(&self, w: &dyn WeightSource, x: &Tensor, t: f64, cond: &BatchedConditioning) -> Result<Tensor>;
    /// Peak activation bytes of one forward on `batch` latents of `h`×`w` with `cond`'s shapes on `target`.
    fn working_bytes(&self, batch: usize, h: usize, w: usize, cond: &Conditioning, target: OpTarget) -> u64;
}

impl Denoiser for UNet2DConditionModel {
    fn name(&self) -> &'static str {
        "UNet2DConditionModel"
    }

    fn latent_channels(&self) -> usize {
        self.config().in_channels
    }

    fn conditioning(&self) -> Vec<CondSpec> {
        let d = self.config().cross_attention_dim;
        vec![
            CondSpec::required(COND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(d)]),
            CondSpec::optional(UNCOND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(d)]),
        ]
    }

    fn forward(&self, w: &dyn WeightSource, x: &Tensor, t: f64, cond: &BatchedConditioning) -> Result<Tensor> {
        UNet2DConditionModel::forward(self, w, x, t, cond.get("embeddings")?)
    }

    fn working_bytes(&self, batch: usize, h: usize, w: usize, cond: &Conditioning, target: OpTarget) -> u64 {
        let seq = cond.get(COND_EMBEDDINGS).and_then(|t| t.dims().get(1).copied()).unwrap_or(77);
        UNet2DConditionModel::working_bytes(self, batch, h, w, seq, target)
    }
}
