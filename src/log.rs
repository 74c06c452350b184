//! Log messages routed to host callbacks: one per context, with a process-wide fallback.
//!
//! A message from work done for a context goes to that context's callback if it has one, else to the process-wide
//! callback, else nowhere. Callbacks run on the thread that made the call that logs.

use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, RwLock};

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

/// Releases a callback's `user_data` (wasmtime's finalizer): the library calls it exactly once, when it will never
/// use that `user_data` again. It may run on any thread that calls lowvram; it must not call back into lowvram.
#[allow(non_camel_case_types)]
pub type lowvram_release_callback = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// A callback, its user data and the user data's release. Shared: a message being delivered holds its own
/// reference, so replacing the sink never pulls the user data from under a running callback; the release runs
/// when the last reference goes (the replacement, or the end of the last delivery to the old sink).
#[derive(Clone)]
pub struct LogSink(Arc<SinkInner>);

struct SinkInner {
    callback: unsafe extern "C" fn(lowvram_log_level, *const c_char, *mut c_void),
    user_data: *mut c_void,
    release: lowvram_release_callback,
}

// SAFETY: the host promises (in the header) that the callback and the release may be called from any thread.
unsafe impl Send for SinkInner {}
unsafe impl Sync for SinkInner {}

impl Drop for SinkInner {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: the host's release for this user_data, called once (this is the last reference).
            unsafe { release(self.user_data) }
        }
    }
}

impl LogSink {
    /// `None` when `callback` is NULL (which clears a sink).
    pub fn new(callback: lowvram_log_callback, user_data: *mut c_void) -> Option<Self> {
        Self::with_release(callback, user_data, None)
    }

    /// As [`LogSink::new`], with a release for `user_data`. With a NULL `callback` the release runs at once.
    pub fn with_release(
        callback: lowvram_log_callback,
        user_data: *mut c_void,
        release: lowvram_release_callback,
    ) -> Option<Self> {
        match callback {
            Some(callback) => Some(Self(Arc::new(SinkInner { callback, user_data, release }))),
            None => {
                if let Some(r) = release {
                    // SAFETY: as in Drop: the user data will never be used.
                    unsafe { r(user_data) }
                }
                None
            }
        }
    }

    fn emit(&self, level: lowvram_log_level, message: &str) {
        let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
        // A panic in a host callback cannot happen (C); a Rust closure host goes through the same path.
        unsafe { (self.0.callback)(level, c.as_ptr(), self.0.user_data) }
    }
}

static GLOBAL: RwLock<Option<LogSink>> = RwLock::new(None);

/// Set (or clear with `None`) the process-wide sink. The old one is released outside the lock.
pub fn set_global(sink: Option<LogSink>) {
    let old = std::mem::replace(&mut *GLOBAL.write().unwrap_or_else(|e| e.into_inner()), sink);
    drop(old);
}

/// A logger: a per-context sink with the process-wide one as fallback.
#[derive(Default)]
pub struct Logger {
    sink: RwLock<Option<LogSink>>,
}

impl Logger {
    /// Set (or clear) this logger's own sink.
    pub fn set_sink(&self, sink: Option<LogSink>) {
        let old = std::mem::replace(&mut *self.sink.write().unwrap_or_else(|e| e.into_inner()), sink);
        drop(old);
    }

    /// Send `message` to this logger's sink, else the process-wide one.
    pub fn log(&self, level: lowvram_log_level, message: &str) {
        // Clone the sink out of the lock: the callback runs unlocked, and the clone keeps its user data alive.
        let own = self.sink.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sink) = own.or_else(|| GLOBAL.read().unwrap_or_else(|e| e.into_inner()).clone()) {
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
