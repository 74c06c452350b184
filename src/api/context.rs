//! A context: one model cache with its budgets, a logger, and a cancel flag.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    logger: Logger,
    cancel: AtomicBool,
    cache: ModelCache,
}

impl Context {
    /// Create a context: read the configuration (file, then text, then the device override), size the caches and
    /// log the sizes with the rules that chose them.
    pub fn new(options: ContextOptions) -> Result<Self> {
        let logger = Logger::default();
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
        logger.info(&format!("lowvram {} on {}", crate::VERSION, cache.allocator().spec()));
        for line in cache.sizing().log {
            logger.info(&line);
        }
        Ok(Self { logger, cancel: AtomicBool::new(false), cache })
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
        let model = Model::load(&self.cache, dir)?;
        self.logger.info(&format!(
            "loaded {} ({:?}, {} bytes of weights)",
            dir.display(),
            model.kind(),
            model.weights().total_bytes()
        ));
        Ok(Arc::new(model))
    }

    /// Place up to `max_bytes` of `model`'s weights on the device now (explicit partial load); returns the bytes
    /// resident afterwards.
    pub fn load_to_device(&self, model: &Model, max_bytes: u64) -> Result<u64> {
        self.cache.load_to_device(model.weights(), max_bytes)
    }

    /// Reserve `bytes` of device memory for the host (a renderer's frames): the cache shrinks at once.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation> {
        self.cache.reserve(bytes)
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

    /// Ask the running call on this context to stop at its next step (or block). The flag is cleared when the
    /// next call starts.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// The cancel flag, for the loops that poll it.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }

    /// Start a call: clear a stale cancel request.
    pub(crate) fn begin_call(&self) {
        self.cancel.store(false, Ordering::SeqCst);
    }
}

fn with_path(e: Error, path: &Path) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
        other => other,
    }
}
