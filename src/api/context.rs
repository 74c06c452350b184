//! A context: one model cache with its budgets, a logger, and a cancel flag.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Result;
use crate::log::{LogSink, Logger};

/// How to create a context.
#[derive(Default, Clone)]
pub struct ContextOptions {
    /// Device spec (`auto`, `cpu`, `cuda:N`, `emulated:SIZE`); `None` = the config's.
    pub device: Option<String>,
    /// YAML configuration text; applied after `config_path`.
    pub config_yaml: Option<String>,
    /// A YAML configuration file.
    pub config_path: Option<std::path::PathBuf>,
    /// Log sink for this context (else the process-wide one).
    pub log: Option<LogSink>,
}

/// One model cache and everything that runs against it. Thread-safe: calls may come from several threads; `cancel`
/// may be called while another thread runs a generation.
pub struct Context {
    logger: Logger,
    cancel: AtomicBool,
}

impl Context {
    /// Create a context.
    pub fn new(options: ContextOptions) -> Result<Self> {
        let logger = Logger::default();
        logger.set_sink(options.log);
        let ctx = Self { logger, cancel: AtomicBool::new(false) };
        ctx.logger.info(&format!("lowvram {} context created", crate::VERSION));
        Ok(ctx)
    }

    /// The context's logger.
    pub fn logger(&self) -> &Logger {
        &self.logger
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
}
