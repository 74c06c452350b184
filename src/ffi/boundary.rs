//! The panic boundary and the pointer checks every exported function goes through.

use std::any::Any;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};
use crate::ffi::error::set_last_error;
use crate::ffi::status::lowvram_status;

/// Run an entry point's body: errors become their status (message stored for the thread), a panic becomes
/// `PANIC` and never unwinds into C.
pub(crate) fn guard(body: impl FnOnce() -> Result<()>) -> lowvram_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => lowvram_status::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            lowvram_status::of(&e)
        }
        Err(panic) => {
            set_last_error(&format!("panic inside lowvram: {}", panic_message(&panic)));
            lowvram_status::Panic
        }
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// A C handle type and the Rust type it stands for; `Box` handles have one owner, `Arc` handles are shared.
pub(crate) trait Handle {
    type Target;
}

/// Borrow the Rust object behind a handle, or `NullArgument` naming the parameter.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H` made by this library.
pub(crate) unsafe fn borrow<'a, H: Handle>(ptr: *const H, name: &'static str) -> Result<&'a H::Target> {
    (ptr as *const H::Target).as_ref().ok_or(Error::NullArgument(name))
}

/// Read a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &'static str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::NullArgument(name));
    }
    CStr::from_ptr(ptr).to_str().map_err(|_| Error::invalid(format!("{name} is not valid UTF-8")))
}

/// Read an optional string argument: NULL → None.
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(ptr: *const c_char, name: &'static str) -> Result<Option<&'a str>> {
    if ptr.is_null() { Ok(None) } else { str_arg(ptr, name).map(Some) }
}

/// Check an out-parameter before doing any work, so a NULL is reported before side effects happen.
pub(crate) fn out_arg<T>(ptr: *mut T, name: &'static str) -> Result<&'static mut T> {
    // SAFETY: the caller promises `ptr` is NULL or valid for writes; we only write on success.
    unsafe { ptr.as_mut() }.ok_or(Error::NullArgument(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::error::lowvram_last_error_message;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(lowvram_last_error_message()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom {}", 42));
        assert_eq!(status, lowvram_status::Panic);
        assert_eq!(last_error(), "panic inside lowvram: boom 42");
    }

    #[test]
    fn errors_set_the_message_and_success_keeps_it() {
        assert_eq!(guard(|| Err(Error::invalid("bad thing"))), lowvram_status::InvalidArgument);
        assert_eq!(guard(|| Ok(())), lowvram_status::Ok);
        assert_eq!(last_error(), "invalid argument: bad thing");
    }

    #[test]
    fn last_error_is_per_thread() {
        guard(|| Err(Error::invalid("main thread")));
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            guard(|| Err(Error::unsupported("other thread")));
            assert_eq!(last_error(), "unsupported: other thread");
        })
        .join()
        .unwrap();
        assert_eq!(last_error(), "invalid argument: main thread");
    }
}
