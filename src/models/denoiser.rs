//! The one interface the sampling loop and the API call on any denoising model (candle's `WithForward` idea): the
//! conditioning it needs, its forward on one batch, and its working memory. `api/` never matches on architectures.

use candle_core::Tensor;

use crate::error::Result;
use crate::models::conditioning::{
    BatchedConditioning, CondSpec, Conditioning, Dim, COND_EMBEDDINGS, COND_POOLED, TIME_IDS, UNCOND_EMBEDDINGS,
    UNCOND_POOLED,
};
use crate::models::{AddedCond, UNet2DConditionModel};
use crate::ops::OpTarget;
use crate::weights::WeightSource;

/// A model the sampler calls once per step (twice the batch with classifier-free guidance).
pub trait Denoiser: Send + Sync {
    /// A short name for messages (`UNet2DConditionModel`).
    fn name(&self) -> &'static str;
    /// Channels of the latents it denoises.
    fn latent_channels(&self) -> usize;
    /// Its widest activation's channels (bounds the working-memory arithmetic before it runs).
    fn widest_channels(&self) -> usize;
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

    fn widest_channels(&self) -> usize {
        let c = self.config();
        c.block_out_channels.iter().copied().chain([c.in_channels, c.out_channels]).max().unwrap_or(1)
    }

    fn conditioning(&self) -> Vec<CondSpec> {
        let d = self.config().cross_attention_dim;
        let mut specs = vec![
            CondSpec::required(COND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(d)]),
            CondSpec::optional(UNCOND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(d)]),
        ];
        // SDXL's text_time conditioning: pooled text embeds and the six size/crop numbers.
        if let Some((pooled, time_ids)) = self.needs_added_cond() {
            specs.push(CondSpec::required(COND_POOLED, vec![Dim::Batch, Dim::Is(pooled)]));
            specs.push(CondSpec::optional(UNCOND_POOLED, vec![Dim::Batch, Dim::Is(pooled)]));
            specs.push(CondSpec::required(TIME_IDS, vec![Dim::Batch, Dim::Is(time_ids)]));
        }
        specs
    }

    fn forward(&self, w: &dyn WeightSource, x: &Tensor, t: f64, cond: &BatchedConditioning) -> Result<Tensor> {
        let added = match self.needs_added_cond() {
            Some(_) => {
                Some(AddedCond { text_embeds: cond.get("pooled")?.clone(), time_ids: cond.get("time_ids")?.clone() })
            }
            None => None,
        };
        self.forward_with(w, x, t, cond.get("embeddings")?, added.as_ref())
    }

    fn working_bytes(&self, batch: usize, h: usize, w: usize, cond: &Conditioning, target: OpTarget) -> u64 {
        let seq = cond.get(COND_EMBEDDINGS).and_then(|t| t.dims().get(1).copied()).unwrap_or(77);
        UNet2DConditionModel::working_bytes(self, batch, h, w, seq, target)
    }
}
