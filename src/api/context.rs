//! A context: one model cache with its budgets, a logger, a cancel epoch and a failed flag.
//!
//! Cancelling: `Context::cancel` bumps an epoch; a call remembers the epoch it started in and stops when the epoch
//! moves, so a context cancel stops exactly the calls running when it was issued and no call starting later can
//! erase it. A [`CancelToken`] is per call (or per group of calls): sticky, it stops a call even when cancelled
//! before the call starts, and never touches another call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::api::Model;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::log::{LogSink, Logger};
use crate::memory::{CacheStats, ModelCache, Reservation};

/// How to create a context.
#[derive(Default, Clone)]
pub struct ContextOptions {
    /// Device spec (`auto`, `cpu`, `cuda:N`, `emulated:SIZE`); `None` = the config's.
    pub device: Option<String>,
    /// YAML configuration text; applied after `config_path`.
    pub config_yaml: Option<String>,
    /// A YAML configuration file.
    pub config_path: Option<PathBuf>,
    /// Log sink for this context (else the process-wide one).
    pub log: Option<LogSink>,
}

/// One model cache and everything that runs against it. Thread-safe: calls may come from several threads; `cancel`
/// may be called while another thread runs a generation.
pub struct Context {
    /// Unique in the process: models remember the context they were loaded in.
    id: u64,
    logger: Arc<Logger>,
    /// Bumped by every context-wide cancel.
    cancel_epoch: AtomicU64,
    /// Set when a call panicked: the cache may be half-updated, so every later call refuses to run.
    failed: OnceLock<String>,
    cache: ModelCache,
}

/// A cancel request for one call (or every call it is passed to). Once cancelled it stays cancelled: a call given
/// a cancelled token stops at its first check, however early the token was cancelled.
#[derive(Debug, Default)]
pub struct CancelToken {
    cancelled: AtomicBool,
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel every call this token is (or will be) passed to.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// What stops one running call: a context cancel issued after it started, or its own token.
pub struct CallCancel<'a> {
    epoch: &'a AtomicU64,
    started_in: u64,
    token: Option<&'a CancelToken>,
}

impl CallCancel<'_> {
    /// Whether the call should stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_some_and(CancelToken::is_cancelled) || self.epoch.load(Ordering::SeqCst) != self.started_in
    }

    /// `Err(Cancelled)` when the call should stop.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Context {
    /// Create a context: read the configuration (file, then text, then the device override), size the caches and
    /// log the sizes with the rules that chose them.
    pub fn new(options: ContextOptions) -> Result<Self> {
        let logger = Arc::new(Logger::default());
        logger.set_sink(options.log);
        let mut config = Config::default();
        if let Some(path) = &options.config_path {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            config.apply_yaml(&text).map_err(|e| with_path(e, path))?;
        }
        if let Some(text) = &options.config_yaml {
            config.apply_yaml(text)?;
        }
        if let Some(device) = &options.device {
            config.set("device", device)?;
        }
        let cache = ModelCache::new(config)?;
        // The cache's lines (where each model's weights stream from, and why) go to this context's logger.
        let to = Arc::downgrade(&logger);
        cache.set_log(Some(Arc::new(move |warn: bool, line: &str| {
            if let Some(l) = to.upgrade() {
                if warn {
                    l.warn(line)
                } else {
                    l.info(line)
                }
            }
        })));
        logger.info(&format!("lowvram {} on {}", crate::VERSION, cache.allocator().spec()));
        for line in cache.sizing().log {
            logger.info(&line);
        }
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self { id, logger, cancel_epoch: AtomicU64::new(0), failed: OnceLock::new(), cache })
    }

    /// This context's identity, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Mark the context unusable after a panic inside one of its calls (the first reason is kept).
    pub fn mark_failed(&self, reason: &str) {
        let _ = self.failed.set(reason.to_string());
    }

    /// `Err(ContextFailed)` once a call on this context panicked.
    pub fn check_usable(&self) -> Result<()> {
        match self.failed.get() {
            Some(reason) => Err(Error::ContextFailed(reason.clone())),
            None => Ok(()),
        }
    }

    /// INVALID_ARGUMENT unless `model` was loaded in this context.
    pub fn check_owns(&self, model: &Model) -> Result<()> {
        if model.context_id() == self.id {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{} was loaded in another context (id {}); this is context {}: load it here",
                model.dir().display(),
                model.context_id(),
                self.id
            )))
        }
    }

    /// The context's logger.
    pub fn logger(&self) -> &Logger {
        &self.logger
    }

    /// The model cache.
    pub fn cache(&self) -> &ModelCache {
        &self.cache
    }

    /// Apply a partial YAML configuration to the live context; budgets take effect at once (a running forward
    /// adapts at its next block). On error nothing changes.
    pub fn configure(&self, yaml: &str) -> Result<()> {
        for line in self.cache.configure(yaml)? {
            self.logger.info(&line);
        }
        Ok(())
    }

    /// Load a component folder (`unet/`, `vae/`) into the cache.
    pub fn load_model(&self, dir: &Path) -> Result<Arc<Model>> {
        self.load_model_with(dir, &mut |_, _| true, None)
    }

    /// [`Context::load_model`] with `progress(done, total)` after each phase (returning false cancels) and a cancel
    /// token; a context cancel issued during the load stops it too.
    pub fn load_model_with(
        &self,
        dir: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        token: Option<&CancelToken>,
    ) -> Result<Arc<Model>> {
        let call = self.begin_call(token)?;
        let mut step = |done: usize, total: usize| -> Result<()> {
            call.check()?;
            if progress(done, total) {
                call.check()
            } else {
                Err(Error::Cancelled)
            }
        };
        let model = Model::load(&self.cache, dir, self.id, &mut step)?;
        self.logger.info(&format!(
            "loaded {} ({:?}, {} bytes of weights)",
            dir.display(),
            model.kind(),
            model.weights().total_bytes()
        ));
        Ok(Arc::new(model))
    }

    /// Load one component of an opened single-file checkpoint into the cache (see
    /// [`Model::load_single_file_component`]).
    pub fn load_single_file_component(
        &self,
        file: &crate::weights::single_file::SingleFile,
        component: crate::weights::single_file::Component,
    ) -> Result<Arc<Model>> {
        let model = Model::load_single_file_component(&self.cache, file, component, self.id)?;
        self.logger.info(&format!(
            "loaded {} of {} ({:?}, {} bytes of weights)",
            component.name(),
            file.path().display(),
            model.kind(),
            model.weights().total_bytes()
        ));
        Ok(Arc::new(model))
    }

    /// Load a T5 encoder stored alone in a file (GGUF or safetensors) into the cache (see [`Model::load_t5_file`]).
    pub fn load_t5_file(&self, path: &Path) -> Result<Arc<Model>> {
        let model = Model::load_t5_file(&self.cache, path, self.id)?;
        let bytes = model.weights().total_bytes();
        self.logger.info(&format!("loaded T5 encoder file {} ({bytes} bytes stored)", path.display()));
        Ok(Arc::new(model))
    }

    /// Load a FLUX transformer GGUF file into the cache (see [`Model::load_gguf_transformer`]).
    pub fn load_gguf_transformer(&self, path: &Path) -> Result<Arc<Model>> {
        let model = Model::load_gguf_transformer(&self.cache, path, self.id)?;
        let bytes = model.weights().total_bytes();
        self.logger.info(&format!("loaded GGUF transformer {} ({bytes} bytes stored)", path.display()));
        Ok(Arc::new(model))
    }

    /// Load a VAE stored alone in a file (`--vae FILE`: BFL's FLUX.1 `ae.safetensors`, an LDM or diffusers-layout
    /// VAE) into the cache (see [`Model::load_vae_file`]); `family` sets an SD VAE's scaling factor (FLUX's
    /// autoencoder is recognised by its shapes).
    pub fn load_vae_file(
        &self,
        path: &Path,
        family: Option<crate::weights::single_file::Family>,
    ) -> Result<Arc<Model>> {
        let model = Model::load_vae_file(&self.cache, path, family, self.id)?;
        let bytes = model.weights().total_bytes();
        self.logger.info(&format!("loaded VAE {} ({bytes} bytes of weights)", path.display()));
        Ok(Arc::new(model))
    }

    /// Place up to `max_bytes` of `model`'s weights on the device now (explicit partial load); returns the bytes
    /// resident afterwards.
    pub fn load_to_device(&self, model: &Model, max_bytes: u64) -> Result<u64> {
        self.check_owns(model)?;
        self.cache.load_to_device(model.weights(), max_bytes)
    }

    /// Reserve `bytes` of device memory for the host (a renderer's frames): the cache shrinks at once.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation> {
        self.cache.reserve(bytes)
    }

    /// [`Context::reserve`] with a bound on the wait (`timeout`: None = none, zero = only if free now) that also
    /// waits for running calls to end when the bytes do not fit beside them; `Timeout` when the time runs out,
    /// `Cancelled` by `token` or a context cancel (see [`ModelCache::reserve_with`]).
    pub fn reserve_with(
        &self,
        bytes: u64,
        timeout: Option<std::time::Duration>,
        token: Option<&CancelToken>,
    ) -> Result<Reservation> {
        let call = self.begin_call(token)?;
        call.check()?;
        self.cache.reserve_with(bytes, timeout, Some(&|| call.is_cancelled()))
    }

    /// Free at least `bytes` of device memory held by unlocked models (like ComfyUI's /free); returns bytes freed.
    pub fn free_memory(&self, bytes: u64) -> u64 {
        self.cache.free_memory(bytes)
    }

    /// Drop every unlocked model's device and RAM-cache bytes; returns bytes freed.
    pub fn unload_all(&self) -> u64 {
        self.cache.unload_all()
    }

    /// Cache, device and per-model statistics.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Stop every call running on this context now, at its next step or block. Calls that start afterwards are not
    /// affected (use a [`CancelToken`] to cancel a call that may not have started yet).
    pub fn cancel(&self) {
        self.cancel_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Start a call: refuse on a failed context, and remember the cancel epoch the call starts in.
    pub fn begin_call<'a>(&'a self, token: Option<&'a CancelToken>) -> Result<CallCancel<'a>> {
        self.check_usable()?;
        Ok(CallCancel { epoch: &self.cancel_epoch, started_in: self.cancel_epoch.load(Ordering::SeqCst), token })
    }
}

fn with_path(e: Error, path: &Path) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
        other => other,
    }
}
