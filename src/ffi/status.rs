//! Status codes returned by every fallible C entry point.

use crate::ffi::backend::forward;
use std::ffi::{c_char, CStr};

use crate::error::Error;

/// The outcome of a C API call. The numbers are stable: a code is never renumbered, and a retired code is never
/// reused. On any status other than `LOWVRAM_STATUS_OK`, `lowvram_last_error_message()` describes the failure.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum lowvram_status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument was out of range, malformed, or inconsistent (wrong size, wrong shape, bad config value).
    InvalidArgument = 2,
    /// A file could not be opened, read or written.
    Io = 3,
    /// A file was read but is malformed (corrupt safetensors, bad JSON or YAML, missing tensor).
    Format = 4,
    /// The device ran out of memory, wherever it happened: the cache's own placement of weights, streamed blocks or
    /// working memory, or a buffer the tensor library or one of the library's kernels could not get inside an op
    /// (on CUDA: `CUDA_ERROR_OUT_OF_MEMORY`, a cuBLAS allocation failure). Before returning it, a denoise step or a
    /// text encode recovers in order (other unlocked models' device copies evicted, then this model's residency
    /// shrunk so more blocks stream, then the step run again from the same inputs, with the same result) and a VAE
    /// decode retries in tiles; this status means nothing more could be freed. The message gives the bytes needed
    /// (the failed request when known, else the call's working memory) and available (what the device really has:
    /// the driver's free bytes on CUDA). The cache is left consistent and the context usable.
    OutOfDeviceMemory = 5,
    /// A host allocation failed.
    OutOfHostMemory = 6,
    /// The operation cannot fit the configured budgets even after evicting everything evictable.
    BudgetTooSmall = 7,
    /// The call was cancelled by `lowvram_context_cancel`, its cancel token, or a progress callback returning false.
    Cancelled = 8,
    /// The model, configuration or feature is not supported by this build.
    Unsupported = 9,
    /// The library panicked; the panic was caught at the C boundary. Please report it. The context the call ran on
    /// is marked failed: every later call on it returns PANIC (free it and create a new one).
    Panic = 10,
    /// A caller-provided buffer is too small or too large for the data (reads check byte lengths exactly).
    BufferSize = 11,
    /// An internal error in the tensor library.
    Internal = 12,
    /// A wait the host bounded (`lowvram_reservation_params.timeout_ms`) ran out first; the message gives the bytes
    /// needed and available. Nothing was taken: the cache is as it was. Since 0.3.
    Timeout = 13,
}

impl lowvram_status {
    /// The status a Rust error maps to.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::NullArgument(_) => Self::NullArgument,
            Error::InvalidArgument(_) => Self::InvalidArgument,
            Error::BufferSize(_) => Self::BufferSize,
            Error::Io { .. } => Self::Io,
            Error::Format(_) => Self::Format,
            Error::OutOfDeviceMemory { .. } => Self::OutOfDeviceMemory,
            Error::OutOfHostMemory(_) => Self::OutOfHostMemory,
            Error::BudgetTooSmall { .. } => Self::BudgetTooSmall,
            Error::Timeout { .. } => Self::Timeout,
            Error::Cancelled => Self::Cancelled,
            Error::Unsupported(_) => Self::Unsupported,
            Error::ContextFailed(_) => Self::Panic,
            Error::Tensor(_) => Self::Internal,
        }
    }

    /// Every status, in numeric order (the number is the index).
    pub const ALL: [Self; 14] = [Self::Ok, Self::NullArgument, Self::InvalidArgument, Self::Io, Self::Format, Self::OutOfDeviceMemory, Self::OutOfHostMemory, Self::BudgetTooSmall, Self::Cancelled, Self::Unsupported, Self::Panic, Self::BufferSize, Self::Internal, Self::Timeout];

    /// The status with number `n`, if this version knows it.
    pub fn from_u32(n: u32) -> Option<Self> {
        Self::ALL.get(n as usize).copied()
    }

    /// The constant's name without the prefix, e.g. `"BUDGET_TOO_SMALL"`.
    pub fn name(self) -> &'static CStr {
        match self {
            Self::Ok => c"OK",
            Self::NullArgument => c"NULL_ARGUMENT",
            Self::InvalidArgument => c"INVALID_ARGUMENT",
            Self::Io => c"IO",
            Self::Format => c"FORMAT",
            Self::OutOfDeviceMemory => c"OUT_OF_DEVICE_MEMORY",
            Self::OutOfHostMemory => c"OUT_OF_HOST_MEMORY",
            Self::BudgetTooSmall => c"BUDGET_TOO_SMALL",
            Self::Cancelled => c"CANCELLED",
            Self::Unsupported => c"UNSUPPORTED",
            Self::Panic => c"PANIC",
            Self::BufferSize => c"BUFFER_SIZE",
            Self::Internal => c"INTERNAL",
            Self::Timeout => c"TIMEOUT",
        }
    }
}

/// A static, NUL-terminated name for `status` (e.g. "BUDGET_TOO_SMALL"); "UNKNOWN" for numbers this version does
/// not know. The string is owned by the library and valid for the life of the process. Thread-safe.
#[no_mangle]
pub extern "C" fn lowvram_status_name(status: u32) -> *const c_char {
    forward!(lowvram_status_name(status));
    lowvram_status::from_u32(status).map_or(c"UNKNOWN", lowvram_status::name).as_ptr()
}
