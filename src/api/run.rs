//! The two operations a host runs: the denoise loop on a UNet and the VAE decode, each under a model lock with its
//! working memory, each returning a report of time and memory.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::api::context::{CallCancel, CancelToken};
use crate::api::{Context, Model};
use crate::error::{Error, Result};
use crate::memory::ModelLock;
use crate::models::conditioning::{COND_EMBEDDINGS, GUIDANCE, UNCOND_EMBEDDINGS};
use crate::models::Conditioning;
use crate::ops::OpTarget;
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
    /// Classifier-free guidance scale; ≤ 1 runs the conditional batch only. `flow_euler` never runs
    /// classifier-free guidance (one forward per step): a guidance-distilled model (FLUX.1 dev) takes the scale
    /// from its conditioning instead.
    pub guidance: f64,
    /// Seeds the initial noise (when none is given) and Euler ancestral's step noise (when none is given).
    pub seed: u64,
    /// Latent size (height, width) when no initial noise is given: the image size / 8 for SD.
    pub latent_size: (usize, usize),
}

impl Default for DenoiseOptions {
    fn default() -> Self {
        Self {
            scheduler: SchedulerKind::Euler,
            karras: false,
            steps: 20,
            guidance: 7.5,
            seed: 0,
            latent_size: (64, 64),
        }
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
pub(crate) fn dims<const N: usize>(t: &Tensor, name: &str, layout: &str) -> Result<[usize; N]> {
    <[usize; N]>::try_from(t.dims())
        .map_err(|_| Error::invalid(format!("{name} has shape {:?}, expected {layout}", t.dims())))
}

/// A weight source that stops a run at the next block boundary when its call is cancelled, and counts the blocks
/// it hands out (the decode's progress).
pub(crate) struct Cancellable<'a, 'b> {
    pub(crate) inner: &'a ModelLock,
    pub(crate) cancel: &'a CallCancel<'b>,
    pub(crate) on_block: Option<&'a OnBlock<'b>>,
}

/// The decode's per-block callback. Forwards call `fetch` on the thread that made the call, never elsewhere, so
/// the host's callback (which need not be thread-safe) runs only there.
pub(crate) struct OnBlock<'b>(std::cell::RefCell<&'b mut dyn FnMut() -> bool>);

// SAFETY: reached only through `Cancellable::fetch`, which only the calling thread's forward calls (see above).
unsafe impl Sync for OnBlock<'_> {}

impl WeightSource for Cancellable<'_, '_> {
    fn fetch(&self, block: &str) -> Result<BlockWeights> {
        self.cancel.check()?;
        if let Some(f) = self.on_block {
            if !(f.0.borrow_mut())() {
                return Err(Error::Cancelled);
            }
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

/// Largest |guidance| accepted: beyond it every latent overflows to infinity or NaN.
pub const MAX_GUIDANCE: f64 = 1000.0;

/// `a × b × …` as bytes of f32, or INVALID_ARGUMENT when the product overflows.
fn f32_bytes(what: &str, dims: &[usize]) -> Result<u64> {
    dims.iter()
        .try_fold(4u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| Error::invalid(format!("{what} {dims:?} has more elements than memory can address")))
}

/// OUT_OF_HOST_MEMORY, with the numbers, when `bytes` of host buffers cannot fit the RAM available now: checked
/// before allocating, because an allocation that fails aborts the process.
fn check_host_bytes(what: &str, bytes: u64) -> Result<()> {
    let ram = crate::system::ram_stats();
    if ram.free_bytes > 0 && bytes > ram.free_bytes {
        return Err(Error::OutOfHostMemory(format!("{what} needs {bytes} bytes of RAM, {} available", ram.free_bytes)));
    }
    Ok(())
}

/// Measurements taken while a call runs, turned into its report on success and on failure alike.
pub(crate) struct Meter {
    start: Instant,
    refused_before: u64,
    pub(crate) estimate: u64,
    working: u64,
    streamed: u64,
    tile_latent: Option<usize>,
    step_ms: Vec<f64>,
}

impl Meter {
    pub(crate) fn new(ctx: &Context) -> Self {
        let refused_before = ctx.cache().allocator().refused();
        ctx.cache().allocator().reset_peak();
        Self {
            start: Instant::now(),
            refused_before,
            estimate: 0,
            working: 0,
            streamed: 0,
            tile_latent: None,
            step_ms: Vec::new(),
        }
    }

    pub(crate) fn took(&mut self, lock: &ModelLock) {
        self.working = lock.working_bytes();
        self.streamed = lock.bytes_streamed();
    }

    pub(crate) fn report(self, ctx: &Context, model: &Model) -> RunReport {
        let alloc = ctx.cache().allocator();
        let w = model.weights();
        RunReport {
            total_ms: self.start.elapsed().as_secs_f64() * 1e3,
            step_ms: self.step_ms,
            peak_device_bytes: alloc.peak(),
            bytes_streamed: self.streamed,
            resident_bytes: w.resident_bytes(),
            model_bytes: w.total_bytes(),
            working_bytes: self.working,
            estimated_working_bytes: self.estimate,
            refused_allocations: alloc.refused().saturating_sub(self.refused_before),
            tile_latent: self.tile_latent,
        }
    }
}

/// INVALID_ARGUMENT when the result holds NaN or infinity (guidance or inputs far outside the model's range).
fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Err(Error::invalid(format!(
            "{what}: {bad} of {} values are not finite (inputs or guidance outside the model's range)",
            v.len()
        )));
    }
    Ok(())
}

impl Context {
    /// Run `f` as the body of a call on this thread: the ops inside poll the call's cancel
    /// ([`crate::ops::cancel::scope`]) and see this context's device at their activation point
    /// ([`crate::ops::activation::scope`]: op-level fault injection).
    pub(crate) fn call_scope<R>(&self, call: &CallCancel, f: impl FnOnce() -> R) -> R {
        crate::ops::activation::scope(self.cache().allocator(), || crate::ops::cancel::scope(&|| call.is_cancelled(), f))
    }

    /// `forward()` (a forward, or a denoise step's, from inputs it does not change), with a device out-of-memory
    /// anywhere in it (the allocator's, or the tensor library's inside an op or kernel: one classifier,
    /// [`DeviceAllocator::classify`](crate::device::DeviceAllocator::classify)) made `OutOfDeviceMemory` and
    /// recovered from in order: evict other unlocked models' device copies, then shrink this lock's residency
    /// (stream more blocks), then run `forward()` again from the same inputs. When nothing more can be freed, the
    /// `OutOfDeviceMemory` is returned (needed: the failed request if known, else the lock's working memory).
    pub(crate) fn forward_recovering<T>(&self, lock: &ModelLock, mut forward: impl FnMut() -> Result<T>) -> Result<T> {
        let alloc = self.cache().allocator();
        loop {
            match forward().map_err(|e| alloc.classify(e, lock.working_bytes())) {
                Err(e @ Error::OutOfDeviceMemory { needed_bytes, .. }) => {
                    let freed = lock.relieve(needed_bytes);
                    if freed == 0 {
                        return Err(e);
                    }
                    self.logger().warn(&format!("{e}; freed {freed} bytes (other models, then own residency), retrying"));
                }
                r => return r,
            }
        }
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
        let mut report = RunReport::default();
        let latents =
            self.denoise_with(unet, options, cond, uncond, init_noise, step_noise, progress, None, &mut report)?;
        Ok((latents, report))
    }

    /// [`Context::denoise`] with a cancel token, filling `report` on success and on failure (a BUDGET_TOO_SMALL or
    /// CANCELLED run reports what it measured up to then). Every size is checked before anything is allocated.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_with(
        &self,
        unet: &Model,
        options: &DenoiseOptions,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        init_noise: Option<&Tensor>,
        step_noise: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        token: Option<&CancelToken>,
        report: &mut RunReport,
    ) -> Result<Tensor> {
        // The SD 1.x/2.x entry point names its tensors and takes the one path every family takes.
        let mut conditioning = Conditioning::new();
        conditioning.insert(COND_EMBEDDINGS, cond.clone());
        if let Some(u) = uncond {
            conditioning.insert(UNCOND_EMBEDDINGS, u.clone());
        }
        self.denoise_conditioned_with(unet, options, &conditioning, init_noise, step_noise, progress, token, report)
    }

    /// Run the sampler on any denoising model with named conditioning `cond` (checked against the model's
    /// [`Denoiser::conditioning`]: a missing or misshapen tensor is INVALID_ARGUMENT naming it); `init_noise`
    /// `[B, C, h, w]` standard normal (seeded from `options` when `None`), `step_noise` `[steps, B, C, h, w]` for
    /// Euler ancestral. Returns the final latents (f32, before the VAE scaling) and a report.
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
        let mut report = RunReport::default();
        let latents =
            self.denoise_conditioned_with(model, options, cond, init_noise, step_noise, progress, None, &mut report)?;
        Ok((latents, report))
    }

    /// [`Context::denoise_conditioned`] with a cancel token, filling `report` on success and on failure.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_conditioned_with(
        &self,
        model: &Model,
        options: &DenoiseOptions,
        cond: &Conditioning,
        init_noise: Option<&Tensor>,
        step_noise: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        token: Option<&CancelToken>,
        report: &mut RunReport,
    ) -> Result<Tensor> {
        let call = self.begin_call(token)?;
        let mut meter = Meter::new(self);
        // The ops inside a block poll the call's cancel too (on this thread).
        let result = self.call_scope(&call, || {
            self.denoise_inner(model, options, cond, init_noise, step_noise, progress, &call, &mut meter)
        });
        *report = meter.report(self, model);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn denoise_inner(
        &self,
        model: &Model,
        options: &DenoiseOptions,
        cond: &Conditioning,
        init_noise: Option<&Tensor>,
        step_noise: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        call: &CallCancel,
        meter: &mut Meter,
    ) -> Result<Tensor> {
        self.check_owns(model)?;
        let (denoiser, scheduler_config) = model.as_denoiser()?;
        // A guidance-distilled model (FLUX.1 dev) takes the guidance scale as the input `sampling.guidance`: filled
        // from the options, one value per row, unless the caller gave it.
        let with_guidance;
        let cond = if denoiser.conditioning().iter().any(|s| s.name == GUIDANCE) && cond.get(GUIDANCE).is_none() {
            let mut c = cond.clone();
            if let Some(rows) = cond.get(COND_EMBEDDINGS).and_then(|t| t.dims().first().copied()) {
                c.insert(GUIDANCE, Tensor::full(options.guidance as f32, rows, &Device::Cpu)?);
            }
            with_guidance = c;
            &with_guidance
        } else {
            cond
        };
        let batch = cond.check(&denoiser.conditioning(), denoiser.name())?;
        let channels = denoiser.latent_channels();
        // Bounds first: nothing below may allocate a buffer sized by an unchecked number.
        if !options.guidance.is_finite() || options.guidance.abs() > MAX_GUIDANCE {
            return Err(Error::invalid(format!(
                "guidance = {} is out of range (accepted: |guidance| ≤ {MAX_GUIDANCE})",
                options.guidance
            )));
        }
        let train_steps = scheduler_config.resolve(options.scheduler)?.num_train_timesteps;
        if options.steps == 0 || options.steps > train_steps {
            return Err(Error::invalid(format!(
                "steps = {} is out of range (accepted: 1..={train_steps}, the model's num_train_timesteps)",
                options.steps
            )));
        }
        let (h, w) = match init_noise {
            Some(n) => {
                let [nb, nc, h, w] = dims::<4>(n, "init noise", "[B, C, h, w]")?;
                if nb != batch || nc != channels {
                    return Err(Error::invalid(format!(
                        "init noise has shape {:?}, expected [{batch}, {channels}, h, w]",
                        n.dims()
                    )));
                }
                (h, w)
            }
            None => options.latent_size,
        };
        if h == 0 || w == 0 {
            return Err(Error::invalid("latent size must be positive"));
        }
        // Classifier-free guidance only for models that use it and schedulers that take it: FLUX's guidance is
        // distilled (one forward per step), and flow matching never batches an unconditional row (`sampling::denoise`).
        let guided =
            denoiser.classifier_free_guidance() && options.scheduler.classifier_free_guidance() && options.guidance > 1.0;
        let model_batch = if guided { 2 * batch } else { batch };
        let latent_bytes = f32_bytes("the latents", &[model_batch, channels, h, w])?;
        // The estimates multiply the widest activation by small factors: refuse what cannot be addressed first.
        f32_bytes("the model's activations", &[model_batch, denoiser.widest_channels(), h, w, 64])?;
        let target = OpTarget::new(self.cache().device(), self.cache().compute_dtype());
        meter.estimate = denoiser.working_bytes(model_batch, h, w, cond, target);
        // Host buffers: noise, latents, the model input and output, each ≤ latent_bytes; on the CPU device the
        // working memory is host RAM too.
        let on_host = if self.cache().allocator().capacity().is_none() { meter.estimate } else { 0 };
        check_host_bytes("the denoise", latent_bytes.saturating_mul(4).saturating_add(on_host))?;
        call.check()?;

        let lock = self.cache().lock_cancellable(model.weights(), meter.estimate, Some(&|| call.is_cancelled()))?;
        meter.took(&lock);
        let noise = match init_noise {
            Some(n) => n.to_dtype(DType::F32)?,
            None => sampling::noise::initial_noise(options.seed, &[batch, channels, h, w], &Device::Cpu)?,
        };
        let source = Cancellable { inner: &lock, cancel: call, on_block: None };
        let device = lock.device().clone();
        let batched = cond.batched(guided, &device, target.dtype)?;
        let params = DenoiseParams {
            kind: options.scheduler,
            karras: options.karras,
            steps: options.steps,
            guidance: if guided { options.guidance } else { 1.0 },
            seed: options.seed,
            scheduler_config: scheduler_config.clone(),
        };
        let mut step_ms = Vec::new();
        step_ms.try_reserve_exact(options.steps).map_err(|e| Error::OutOfHostMemory(format!("step timings: {e}")))?;
        let mut last = Instant::now();
        // A step that runs out of device memory is retried from the same inputs after freeing (see there).
        let mut model_fn = |x: &Tensor, t: f64| -> Result<Tensor> {
            self.forward_recovering(&lock, || {
                call.check()?;
                let out = denoiser.forward(&source, &x.to_device(&device)?, t, &batched)?;
                out.to_device(&Device::Cpu)?.to_dtype(DType::F32).map_err(Error::from)
            })
        };
        let mut on_step = |i: usize, total: usize| {
            step_ms.push(last.elapsed().as_secs_f64() * 1e3);
            last = Instant::now();
            !call.is_cancelled() && progress(i, total)
        };
        // Cancellation is polled through the model function and the step callback (per call, not per context).
        let never = AtomicBool::new(false);
        let result = sampling::denoise(&mut model_fn, &params, &noise, step_noise, &mut on_step, &never);
        meter.took(&lock);
        meter.step_ms = step_ms;
        let latents = result?;
        check_finite(&latents, "denoise result")?;
        Ok(latents)
    }

    /// Decode latents as `denoise` returns them (`[B, C, h, w]` with the VAE's latent channels: 4 for SD, 16 for
    /// FLUX; before the VAE's scaling and shift, which are applied here) into
    /// the raw decoder output `[B, 3, 8h, 8w]` (≈ [-1, 1], unclamped, f32). With [`Tiling::Auto`] it tiles when
    /// the untiled working memory cannot fit, and retries tiled after a device OOM.
    pub fn vae_decode(&self, vae: &Model, latents: &Tensor, tiling: Tiling) -> Result<(Tensor, RunReport)> {
        let mut report = RunReport::default();
        let image = self.vae_decode_with(vae, latents, tiling, &mut |_, _| true, None, &mut report)?;
        Ok((image, report))
    }

    /// [`Context::vae_decode`] with `progress(blocks done, blocks)` as each decoder block starts (returning false
    /// cancels) and a cancel token, both checked at every block; `report` is filled on success and on failure.
    pub fn vae_decode_with(
        &self,
        vae: &Model,
        latents: &Tensor,
        tiling: Tiling,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        token: Option<&CancelToken>,
        report: &mut RunReport,
    ) -> Result<Tensor> {
        let call = self.begin_call(token)?;
        let mut meter = Meter::new(self);
        let result = self.call_scope(&call, || self.decode_inner(vae, latents, tiling, progress, &call, &mut meter));
        *report = meter.report(self, vae);
        result
    }

    fn decode_inner(
        &self,
        vae: &Model,
        latents: &Tensor,
        tiling: Tiling,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        call: &CallCancel,
        meter: &mut Meter,
    ) -> Result<Tensor> {
        self.check_owns(vae)?;
        let model = vae.as_vae()?;
        let config = model.config();
        let [b, c, h, w] = dims::<4>(latents, "latents", "[B, C, h, w]")?;
        if c != config.latent_channels {
            return Err(Error::invalid(format!(
                "latents have {c} channels, the VAE expects {}",
                config.latent_channels
            )));
        }
        if let Tiling::Tiles { tile_latent: 0 } = tiling {
            return Err(Error::invalid("tile edge must be positive"));
        }
        let f = config.downscale();
        let widest = config.block_out_channels.iter().max().copied().unwrap_or(1);
        // The estimates multiply the widest activation by small factors: refuse what cannot be addressed first.
        f32_bytes("the decoder's activations", &[b, widest, h, f, w, f, 64])?;
        let target = OpTarget::new(self.cache().device(), self.cache().compute_dtype());
        let on_host = if self.cache().allocator().capacity().is_none() {
            model.decode_working_bytes(latents.dims(), target)
        } else {
            0
        };
        // The output image and the host copy of the latents; untiled on the CPU device, the working memory too.
        let host_needed = f32_bytes("the decoded image", &[b, config.out_channels, h, f, w, f])?.saturating_mul(2);
        check_host_bytes("the decode", host_needed.saturating_add(if tiling == Tiling::Never { on_host } else { 0 }))?;
        call.check()?;

        // latents / scaling_factor (+ shift_factor: FLUX).
        let z = config.z_from_latents(latents)?;
        // Progress counts the decoder's blocks as they are fetched (each once per pass, tiled or not).
        let total = vae
            .weights()
            .blocks()
            .iter()
            .filter(|b| b.key.starts_with("decoder.") || b.key == "post_quant_conv")
            .count();
        let mut done = 0usize;
        let mut on_block_fn = || {
            done += 1;
            progress(done.min(total), total)
        };
        let on_block = OnBlock(std::cell::RefCell::new(&mut on_block_fn));

        if matches!(tiling, Tiling::Auto | Tiling::Never) {
            let estimate = model.decode_working_bytes(z.dims(), target);
            meter.estimate = estimate;
            match self.cache().lock_cancellable(vae.weights(), estimate, Some(&|| call.is_cancelled())) {
                Ok(lock) => {
                    meter.took(&lock);
                    let source = Cancellable { inner: &lock, cancel: call, on_block: Some(&on_block) };
                    // A device OOM inside any op becomes OutOfDeviceMemory here, so the tiled retry below fires.
                    let result = z
                        .to_device(lock.device())
                        .map_err(Error::from)
                        .and_then(|z| model.decode(&source, &z))
                        .map_err(|e| self.cache().allocator().classify(e, lock.working_bytes()));
                    meter.took(&lock);
                    match result {
                        Ok(image) => return Ok(image.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
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
            let estimate = model.decode_tiled_working_bytes(z.dims(), tile, target);
            meter.estimate = estimate;
            meter.tile_latent = Some(tile);
            let lock = match self.cache().lock_cancellable(vae.weights(), estimate, Some(&|| call.is_cancelled())) {
                Ok(lock) => lock,
                Err(e @ Error::BudgetTooSmall { .. }) => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            meter.took(&lock);
            let source = Cancellable { inner: &lock, cancel: call, on_block: Some(&on_block) };
            let result =
                model.decode_tiled(&source, &z, tile).map_err(|e| self.cache().allocator().classify(e, lock.working_bytes()));
            meter.took(&lock);
            match result {
                Ok(image) => return Ok(image.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
                Err(e @ Error::OutOfDeviceMemory { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::invalid("no tile size fits")))
    }
}
