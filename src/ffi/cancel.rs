//! `lowvram_cancel_token`: cancel one call (or a chosen group of calls), even before it starts.

use crate::ffi::backend::forward;
use std::sync::Arc;

use crate::api::CancelToken;
use crate::ffi::boundary::{arc_handle, borrow, clone_arc, free_arc, guard, out_arg, Handle, OwnershipArc};
use crate::ffi::status::lowvram_status;

/// A cancel request for the calls it is passed to (in their params' `cancel_token`). Opaque. Ownership: shared;
/// the host's handle is one reference and every call using the token holds its own, so the handle may be freed
/// while a call runs. Once cancelled it stays cancelled. Thread-safe.
#[allow(non_camel_case_types)]
pub struct lowvram_cancel_token {
    _private: [u8; 0],
}

impl Handle for lowvram_cancel_token {
    type Target = CancelToken;
    type Ownership = OwnershipArc;
}

/// The call's own reference to the token in a params struct, if any.
///
/// # Safety
/// `token` must be NULL or a live token handle.
pub(crate) unsafe fn token_arg(token: *const lowvram_cancel_token) -> crate::Result<Option<Arc<CancelToken>>> {
    if token.is_null() {
        Ok(None)
    } else {
        clone_arc(token, "cancel_token").map(Some)
    }
}

/// Create a token, not cancelled. On success `*out` is a new handle owned by the caller; free it with
/// `lowvram_cancel_token_free`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_cancel_token_new(out: *mut *mut lowvram_cancel_token) -> lowvram_status {
    forward!(lowvram_cancel_token_new(out));
    guard(|| {
        *out_arg(out, "out")? = arc_handle(Arc::new(CancelToken::new()));
        Ok(())
    })
}

/// Cancel every call the token is passed to: a running call stops at its next step or block (on the CPU and
/// `emulated:` devices within a block: between chunks of an attention or convolution) with CANCELLED, and a call
/// that starts later with this token returns CANCELLED at once. Other calls are never affected. Thread-safe; safe to
/// call from any callback.
#[no_mangle]
pub unsafe extern "C" fn lowvram_cancel_token_cancel(token: *const lowvram_cancel_token) -> lowvram_status {
    forward!(lowvram_cancel_token_cancel(token));
    guard(|| {
        borrow(token, "token")?.cancel();
        Ok(())
    })
}

/// `*out_cancelled` = whether the token was cancelled. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_cancel_token_is_cancelled(
    token: *const lowvram_cancel_token,
    out_cancelled: *mut bool,
) -> lowvram_status {
    forward!(lowvram_cancel_token_is_cancelled(token, out_cancelled));
    guard(|| {
        let t = borrow(token, "token")?;
        *out_arg(out_cancelled, "out_cancelled")? = t.is_cancelled();
        Ok(())
    })
}

/// Drop the host's reference to a token. NULL is a no-op. Calls using the token keep their own reference.
#[no_mangle]
pub unsafe extern "C" fn lowvram_cancel_token_free(token: *mut lowvram_cancel_token) {
    forward!(lowvram_cancel_token_free(token));
    guard(|| {
        free_arc(token);
        Ok(())
    });
}
