//! Process-wide logging from C.

use std::ffi::c_void;

use crate::ffi::boundary::guard;
use crate::ffi::status::lowvram_status;
use crate::log::{lowvram_log_callback, set_global, LogSink};

/// Set the process-wide log callback, used for messages of contexts that have no callback of their own and of
/// work done outside any context. NULL `callback` removes it. `user_data` is passed back unchanged; the library
/// does not own it, and it must stay valid until the callback is replaced or removed.
///
/// Thread-safe: may be called from any thread at any time; a message being delivered concurrently goes to the old
/// or the new callback. The callback runs on the thread whose lowvram call logs.
#[no_mangle]
pub extern "C" fn lowvram_set_log_callback(callback: lowvram_log_callback, user_data: *mut c_void) -> lowvram_status {
    guard(|| {
        set_global(LogSink::new(callback, user_data));
        Ok(())
    })
}
