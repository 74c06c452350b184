//! The last error of each thread, readable from C.

use crate::ffi::backend::forward;
use std::cell::RefCell;
use std::ffi::{c_char, CString};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Record `message` as this thread's last error (interior NULs are replaced so nothing is lost). During thread
/// teardown, when the thread-local is gone, the message is dropped rather than panicking.
pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// This thread's last error message, as a Rust string ("" if none or during thread teardown).
pub(crate) fn last_error_string() -> String {
    LAST_ERROR.try_with(|e| e.borrow().to_string_lossy().into_owned()).unwrap_or_default()
}

/// The message of the last failing call on the calling thread, or "" if none failed yet.
///
/// The string is owned by the library; it stays valid until the next failing lowvram call on the same thread.
/// Do not free it. Successful calls leave it unchanged. Thread-safe: each thread has its own message. Never fails:
/// called while the thread is being torn down (from a thread-local destructor) it returns "".
#[no_mangle]
pub extern "C" fn lowvram_last_error_message() -> *const c_char {
    forward!(lowvram_last_error_message());
    // The pointer outlives the borrow: the CString is replaced only by a later failing call on this thread.
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}
