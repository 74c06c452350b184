//! Log messages routed to host callbacks: one per context, with a process-wide fallback.
//!
//! A message from work done for a context goes to that context's callback if it has one, else to the process-wide
//! callback, else nowhere. Callbacks run on the thread that made the call that logs.

use std::ffi::{c_char, c_void, CString};
use std::sync::RwLock;

/// Severity of a log message (stable numbers).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum lowvram_log_level {
    /// A failure the host should know about.
    Error = 1,
    /// Something unexpected that the library worked around.
    Warn = 2,
    /// What the library decided (cache sizes, plans, timings).
    Info = 3,
    /// Detail for debugging.
    Debug = 4,
}

/// A host log callback: `level`, a NUL-terminated UTF-8 `message` valid only during the call, and the `user_data`
/// given when the callback was set. It runs on the thread that made the lowvram call that logs; it must not call
/// back into lowvram on the same context.
#[allow(non_camel_case_types)]
pub type lowvram_log_callback =
    Option<unsafe extern "C" fn(level: lowvram_log_level, message: *const c_char, user_data: *mut c_void)>;

/// A callback and its user data.
#[derive(Clone, Copy)]
pub struct LogSink {
    callback: unsafe extern "C" fn(lowvram_log_level, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: the host promises (in the header) that the callback may be called from any thread that calls lowvram.
unsafe impl Send for LogSink {}
unsafe impl Sync for LogSink {}

impl LogSink {
    /// `None` when `callback` is NULL (which clears a sink).
    pub fn new(callback: lowvram_log_callback, user_data: *mut c_void) -> Option<Self> {
        callback.map(|callback| Self { callback, user_data })
    }

    fn emit(&self, level: lowvram_log_level, message: &str) {
        let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
        // A panic in a host callback cannot happen (C); a Rust closure host goes through the same path.
        unsafe { (self.callback)(level, c.as_ptr(), self.user_data) }
    }
}

static GLOBAL: RwLock<Option<LogSink>> = RwLock::new(None);

/// Set (or clear with `None`) the process-wide sink.
pub fn set_global(sink: Option<LogSink>) {
    *GLOBAL.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

/// A logger: a per-context sink with the process-wide one as fallback.
#[derive(Default)]
pub struct Logger {
    sink: RwLock<Option<LogSink>>,
}

impl Logger {
    /// Set (or clear) this logger's own sink.
    pub fn set_sink(&self, sink: Option<LogSink>) {
        *self.sink.write().unwrap_or_else(|e| e.into_inner()) = sink;
    }

    /// Send `message` to this logger's sink, else the process-wide one.
    pub fn log(&self, level: lowvram_log_level, message: &str) {
        let own = *self.sink.read().unwrap_or_else(|e| e.into_inner());
        if let Some(sink) = own.or_else(|| *GLOBAL.read().unwrap_or_else(|e| e.into_inner())) {
            sink.emit(level, message);
        }
    }

    /// Log at Info.
    pub fn info(&self, message: &str) {
        self.log(lowvram_log_level::Info, message)
    }

    /// Log at Warn.
    pub fn warn(&self, message: &str) {
        self.log(lowvram_log_level::Warn, message)
    }

    /// Log at Debug.
    pub fn debug(&self, message: &str) {
        self.log(lowvram_log_level::Debug, message)
    }
}
