//! The crate's one error type. Every variant maps to a stable C status code (`ffi::status`).

use std::path::PathBuf;

/// Errors returned by every fallible lowvram operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required pointer or value was missing.
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
    /// A value was out of range, malformed or inconsistent with another.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A caller buffer's byte length does not match the data.
    #[error("buffer size: {0}")]
    BufferSize(String),
    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are malformed (corrupt safetensors, bad JSON/YAML, missing tensor).
    #[error("format error: {0}")]
    Format(String),
    /// The device refused an allocation.
    #[error("out of device memory on {device}: needed {needed_bytes} bytes, {available_bytes} available")]
    OutOfDeviceMemory {
        device: String,
        needed_bytes: u64,
        available_bytes: u64,
    },
    /// A host allocation failed.
    #[error("out of host memory: {0}")]
    OutOfHostMemory(String),
    /// The operation cannot fit even after evicting everything that may be evicted.
    #[error("budget too small: {what} needs {needed_bytes} bytes, {available_bytes} available")]
    BudgetTooSmall {
        what: String,
        needed_bytes: u64,
        available_bytes: u64,
    },
    /// A wait the caller bounded ran out before the bytes were free (a reservation waiting for running calls).
    #[error("timed out after {waited_ms} ms: {what} needs {needed_bytes} bytes, {available_bytes} available")]
    Timeout {
        what: String,
        needed_bytes: u64,
        available_bytes: u64,
        waited_ms: u64,
    },
    /// The host asked the running call to stop.
    #[error("cancelled")]
    Cancelled,
    /// A feature, configuration or model variant this build does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A call on this context panicked earlier; its state may be half-updated, so it refuses every call.
    #[error("context unusable: an earlier call on it panicked ({0}); free it and create a new one")]
    ContextFailed(String),
    /// An error from the tensor library.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::Format`].
    pub fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
    /// An I/O error tagged with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
