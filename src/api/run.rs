//! The two operations a host runs: the denoise loop on a UNet and the VAE decode, each under a model lock with its
//! working memory, each returning a report of time and memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::api::{Context, Model};
use crate::ops::OpTarget;
use crate::error::{Error, Result};
use crate::memory::ModelLock;
use crate::sampling::{self, DenoiseParams, SchedulerKind};
use crate::weights::{BlockWeights, WeightSource};

/// What a run measured. Serialises to the `--json` report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// Wall time of the whole operation, milliseconds.
    pub total_ms: f64,
    /// Wall time of each denoising step (empty for decode), milliseconds.
    pub step_ms: Vec<f64>,
    /// Highest device bytes in use during the run (weights + working-memory reservations), per the allocator.
    pub peak_device_bytes: u64,
    /// Bytes copied to the device for blocks that were not resident, over the run.
    pub bytes_streamed: u64,
    /// Bytes of the model resident on the device when the run ended.
    pub resident_bytes: u64,
    /// Bytes of all the model's weights.
    pub model_bytes: u64,
    /// Working memory the run reserved (max of `device_working_mem_gb` and the op's estimate).
    pub working_bytes: u64,
    /// The op's own working-memory estimate.
    pub estimated_working_bytes: u64,
    /// Allocations the device refused during the run (0 for any run that fits).
    pub refused_allocations: u64,
    /// Decode only: whether it ran in tiles, and the tile edge in latent pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tile_latent: Option<usize>,
}

/// Options of [`Context::denoise`].
#[derive(Debug, Clone)]
pub struct DenoiseOptions {
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the conditional batch only.
    pub guidance: f64,
    /// Seeds the initial noise (when none is given) and Euler ancestral's step noise (when none is given).
    pub seed: u64,
    /// Latent size (height, width) when no initial noise is given: the image size / 8 for SD.
    pub latent_size: (usize, usize),
}

impl Default for DenoiseOptions {
    fn default() -> Self {
        Self { scheduler: SchedulerKind::Euler, karras: false, steps: 20, guidance: 7.5, seed: 0, latent_size: (64, 64) }
    }
}

/// How [`Context::vae_decode`] may tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    /// Untiled when its working memory fits, tiled otherwise and after a device OOM.
    Auto,
    /// Never tile (BUDGET_TOO_SMALL if the whole decode cannot fit).
    Never,
    /// Always tile with this tile edge, in latent pixels (exact: tiles need no overlap).
    Tiles { tile_latent: usize },
}

/// The dimensions of a rank-`N` input, or INVALID_ARGUMENT naming it (not the tensor library's rank error).
fn dims<const N: usize>(t: &Tensor, name: &str, layout: &str) -> Result<[usize; N]> {
    <[usize; N]>::try_from(t.dims())
        .map_err(|_| Error::invalid(format!("{name} has shape {:?}, expected {layout}", t.dims())))
}

/// A weight source that stops a run at the next block boundary when the context is cancelled.
struct Cancellable<'a> {
    inner: &'a ModelLock,
    cancel: &'a AtomicBool,
}

impl WeightSource for Cancellable<'_> {
    fn fetch(&self, block: &str) -> Result<BlockWeights> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        self.inner.fetch(block)
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
}

impl Context {
    /// Run the sampler on `unet`: `cond` `[B, S, D]` text embeddings, `uncond` the same shape (zeros when `None`),
    /// `init_noise` `[B, 4, h, w]` standard normal (seeded when `None`), `step_noise` `[steps, B, 4, h, w]` for
    /// Euler ancestral (seeded when `None`). Returns the final latents (f32, before the VAE scaling) and a report.
    /// `progress(step, total)` after each step; returning false cancels.
    pub fn denoise(
        &self,
        unet: &Model,
        options: &DenoiseOptions,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        init_noise: Option<&Tensor>,
        step_noise: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Tensor, RunReport)> {
        self.begin_call();
        let start = Instant::now();
        let (model, scheduler_config) = unet.as_unet()?;
        let config = model.config();
        let [batch, seq, dim] = dims::<3>(cond, "cond embeddings", "[B, S, D]")?;
        if dim != config.cross_attention_dim {
            return Err(Error::invalid(format!(
                "cond embeddings are [{batch}, {seq}, {dim}], the UNet expects [B, S, {}]",
                config.cross_attention_dim
            )));
        }
        if let Some(u) = uncond {
            if u.dims() != cond.dims() {
                return Err(Error::invalid(format!(
                    "uncond embeddings have shape {:?}, cond has {:?}",
                    u.dims(),
                    cond.dims()
                )));
            }
        }
        let noise = match init_noise {
            Some(n) => {
                let [nb, nc, _, _] = dims::<4>(n, "init noise", "[B, C, h, w]")?;
                if nb != batch || nc != config.in_channels {
                    return Err(Error::invalid(format!(
                        "init noise has shape {:?}, expected [{batch}, {}, h, w]",
                        n.dims(),
                        config.in_channels
                    )));
                }
                n.to_dtype(DType::F32)?
            }
            None => {
                let (h, w) = options.latent_size;
                if h == 0 || w == 0 {
                    return Err(Error::invalid("latent size must be positive"));
                }
                sampling::noise::initial_noise(options.seed, &[batch, config.in_channels, h, w], &Device::Cpu)?
            }
        };
        let (_, _, h, w) = noise.dims4()?;
        let guided = options.guidance > 1.0;
        let unet_batch = if guided { 2 * batch } else { batch };

        let target = OpTarget::new(self.cache().device(), self.cache().compute_dtype());
        let estimate = model.working_bytes(unet_batch, h, w, seq, target);
        self.cache().allocator().reset_peak();
        let refused_before = self.cache().allocator().refused();
        let lock = self.cache().lock_cancellable(unet.weights(), estimate, Some(self.cancel_flag()))?;
        let source = Cancellable { inner: &lock, cancel: self.cancel_flag() };

        let device = lock.device().clone();
        let cond_dev = cond.to_device(&device)?.to_dtype(target.dtype)?;
        let context = if guided {
            let u = match uncond {
                Some(u) => u.to_device(&device)?.to_dtype(target.dtype)?,
                None => cond_dev.zeros_like()?,
            };
            Tensor::cat(&[&u, &cond_dev], 0)?
        } else {
            cond_dev
        };
        let params = DenoiseParams {
            kind: options.scheduler,
            karras: options.karras,
            steps: options.steps,
            guidance: options.guidance,
            seed: options.seed,
            scheduler_config: scheduler_config.clone(),
        };
        let mut step_ms = Vec::with_capacity(options.steps);
        let mut last = Instant::now();
        let mut model_fn = |x: &Tensor, t: f64| -> Result<Tensor> {
            let out = model.forward(&source, &x.to_device(&device)?, t, &context)?;
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

    /// Decode latents as `denoise` returns them (`[B, 4, h, w]`, before dividing by the VAE's scaling factor) into
    /// the raw decoder output `[B, 3, 8h, 8w]` (≈ [-1, 1], unclamped, f32). With [`Tiling::Auto`] it tiles when
    /// the untiled working memory cannot fit, and retries tiled after a device OOM.
    pub fn vae_decode(&self, vae: &Model, latents: &Tensor, tiling: Tiling) -> Result<(Tensor, RunReport)> {
        self.begin_call();
        let start = Instant::now();
        let model = vae.as_vae()?;
        let config = model.config();
        let [_, c, _, _] = dims::<4>(latents, "latents", "[B, C, h, w]")?;
        if c != config.latent_channels {
            return Err(Error::invalid(format!(
                "latents have {c} channels, the VAE expects {}",
                config.latent_channels
            )));
        }
        let mut z = (latents.to_dtype(DType::F32)? / config.scaling_factor)?;
        if let Some(shift) = config.shift_factor {
            z = (z + shift)?;
        }
        let target = OpTarget::new(self.cache().device(), self.cache().compute_dtype());
        let refused_before = self.cache().allocator().refused();
        self.cache().allocator().reset_peak();

        if matches!(tiling, Tiling::Auto | Tiling::Never) {
            let estimate = model.decode_working_bytes(z.dims(), target);
            match self.cache().lock_cancellable(vae.weights(), estimate, Some(self.cancel_flag())) {
                Ok(lock) => {
                    let source = Cancellable { inner: &lock, cancel: self.cancel_flag() };
                    match model.decode(&source, &z.to_device(lock.device())?) {
                        Ok(image) => {
                            let image = image.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                            return Ok((image, self.report(&lock, start, Vec::new(), estimate, refused_before, None)));
                        }
                        Err(Error::OutOfDeviceMemory { .. }) if tiling == Tiling::Auto => {
                            self.logger().warn("VAE decode ran out of device memory; retrying in tiles");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(Error::BudgetTooSmall { .. }) if tiling == Tiling::Auto => {
                    self.logger().info("VAE decode does not fit untiled; decoding in tiles");
                }
                Err(e) => return Err(e),
            }
        }
        // Largest tile first: fewer tiles, less per-tile overhead; smaller tiles need less working memory.
        let candidates: Vec<usize> = match tiling {
            Tiling::Tiles { tile_latent } => vec![tile_latent],
            _ => vec![64, 32, 16, 8],
        };
        let mut last_err = None;
        for tile in candidates {
            if tile == 0 {
                return Err(Error::invalid("tile edge must be positive"));
            }
            let estimate = model.decode_tiled_working_bytes(z.dims(), tile, target);
            let lock = match self.cache().lock_cancellable(vae.weights(), estimate, Some(self.cancel_flag())) {
                Ok(lock) => lock,
                Err(e @ Error::BudgetTooSmall { .. }) => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let source = Cancellable { inner: &lock, cancel: self.cancel_flag() };
            match model.decode_tiled(&source, &z, tile) {
                Ok(image) => {
                    let image = image.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    let report = self.report(&lock, start, Vec::new(), estimate, refused_before, Some(tile));
                    return Ok((image, report));
                }
                Err(e @ Error::OutOfDeviceMemory { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::invalid("no tile size fits")))
    }

    fn report(
        &self,
        lock: &ModelLock,
        start: Instant,
        step_ms: Vec<f64>,
        estimate: u64,
        refused_before: u64,
        tile_latent: Option<usize>,
    ) -> RunReport {
        let alloc = self.cache().allocator();
        let model = lock.model();
        RunReport {
            total_ms: start.elapsed().as_secs_f64() * 1e3,
            step_ms,
            peak_device_bytes: alloc.peak(),
            bytes_streamed: lock.bytes_streamed(),
            resident_bytes: model.resident_bytes(),
            model_bytes: model.total_bytes(),
            working_bytes: lock.working_bytes(),
            estimated_working_bytes: estimate,
            refused_allocations: alloc.refused() - refused_before,
            tile_latent,
        }
    }
}
