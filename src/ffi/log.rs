//! Process-wide logging from C.

use crate::ffi::backend::forward;
use std::ffi::c_void;

use crate::ffi::boundary::guard;
use crate::ffi::status::lowvram_status;
use crate::log::{lowvram_log_callback, lowvram_release_callback, set_global, LogSink};

/// Set the process-wide log callback, used for messages of contexts that have no callback of their own and of
/// work done outside any context. NULL `callback` removes it. `user_data` is passed back unchanged; the library
/// does not own it, and it must stay valid as long as any message may still be delivered to it (prefer
/// `lowvram_set_log_callback_ex`, which says when that is).
///
/// Thread-safe: may be called from any thread at any time; a message being delivered concurrently goes to the old
/// or the new callback. The callback runs on the thread whose lowvram call logs.
#[no_mangle]
pub extern "C" fn lowvram_set_log_callback(callback: lowvram_log_callback, user_data: *mut c_void) -> lowvram_status {
    forward!(lowvram_set_log_callback(callback, user_data));
    lowvram_set_log_callback_ex(callback, user_data, None)
}

/// As `lowvram_set_log_callback`, with a release for `user_data`: the library calls `release(user_data)` exactly
/// once, when it will never use `user_data` again: after the callback is replaced and every message being
/// delivered to it has returned (on the thread that finished last), or at once when `callback` is NULL. Replacing
/// the callback and then freeing the old user data in `release` is race-free. Thread-safe.
#[no_mangle]
pub extern "C" fn lowvram_set_log_callback_ex(
    callback: lowvram_log_callback,
    user_data: *mut c_void,
    release: lowvram_release_callback,
) -> lowvram_status {
    forward!(lowvram_set_log_callback_ex(callback, user_data, release));
    let sink = LogSink::with_release(callback, user_data, release);
    guard(|| {
        set_global(sink);
        Ok(())
    })
}
