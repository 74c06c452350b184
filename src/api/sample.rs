//! The denoise loop over any [`Denoiser`] with named [`Conditioning`]: the one sampling entry point every family
//! goes through (the SD 1.x `Context::denoise` builds its conditioning and calls it).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::api::run::{dims, Cancellable};
use crate::weights::WeightSource;
use crate::api::{Context, DenoiseOptions, Model, RunReport};
use crate::error::{Error, Result};
use crate::models::Conditioning;
use crate::ops::OpTarget;
use crate::sampling::{self, DenoiseParams};

impl Context {
    /// Run the sampler on a denoising model with `cond` (checked against the model's [`Denoiser::conditioning`]);
    /// `init_noise` `[B, C, h, w]` standard normal (seeded from `options` when `None`), `step_noise`
    /// `[steps, B, C, h, w]` for Euler ancestral. Returns the final latents (f32, before the VAE scaling) and a
    /// report. `progress(step, total)` after each step; returning false cancels.
    ///
    /// [`Denoiser::conditioning`]: crate::models::Denoiser::conditioning
    pub fn denoise_conditioned(
        &self,
        model: &Model,
        options: &DenoiseOptions,
        cond: &Conditioning,
        init_noise: Option<&Tensor>,
        step_noise: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Tensor, RunReport)> {
        self.begin_call();
        let start = Instant::now();
        let (denoiser, scheduler_config) = model.as_denoiser()?;
        let batch = cond.check(&denoiser.conditioning(), denoiser.name())?;
        let channels = denoiser.latent_channels();
        let noise = match init_noise {
            Some(n) => {
                let [nb, nc, _, _] = dims::<4>(n, "init noise", "[B, C, h, w]")?;
                if nb != batch || nc != channels {
                    return Err(Error::invalid(format!(
                        "init noise has shape {:?}, expected [{batch}, {channels}, h, w]",
                        n.dims()
                    )));
                }
                n.to_dtype(DType::F32)?
            }
            None => {
                let (h, w) = options.latent_size;
                if h == 0 || w == 0 {
                    return Err(Error::invalid("latent size must be positive"));
                }
                sampling::noise::initial_noise(options.seed, &[batch, channels, h, w], &Device::Cpu)?
            }
        };
        let (_, _, h, w) = noise.dims4()?;
        let guided = options.guidance > 1.0;
        let model_batch = if guided { 2 * batch } else { batch };

        let target = OpTarget::new(self.cache().device(), self.cache().compute_dtype());
        let estimate = denoiser.working_bytes(model_batch, h, w, cond, target);
        self.cache().allocator().reset_peak();
        let refused_before = self.cache().allocator().refused();
        let lock = self.cache().lock(model.weights(), estimate)?;
        let source = Cancellable { inner: &lock, cancel: self.cancel_flag() };
        let device = lock.device().clone();
        let batched = cond.batched(guided, &device, target.dtype)?;
        let params = DenoiseParams {
            kind: options.scheduler,
            karras: options.karras,
            steps: options.steps,
            guidance: options.guidance,
            seed: options.seed,
            scheduler_config: scheduler_config.clone(),
        };
        let mut step_ms = Vec::new();
        let mut last = Instant::now();
        let mut model_fn = |x: &Tensor, t: f64| -> Result<Tensor> {
            let out = denoiser.forward(&source, &x.to_device(&device)?, t, &batched)?;
            out.to_device(&Device::Cpu)?.to_dtype(DType::F32).map_err(Error::from)
        };
        let mut on_step = |i: usize, total: usize| {
            step_ms.push(last.elapsed().as_secs_f64() * 1e3);
            last = Instant::now();
            progress(i, total)
        };
        let latents = sampling::denoise(&mut model_fn, &params, &noise, step_noise, &mut on_step, self.cancel_flag())?;
        let report = self.report(&lock, start, step_ms, estimate, refused_before, None);
        Ok((latents, report))
    }
}
