//! `lowvram_reservation`: device memory the host takes back from the cache (a game's frames).

use std::mem::size_of;
use std::time::Duration;

use crate::ffi::backend::forward;
use crate::error::Error;
use crate::ffi::boundary::{
    borrow, box_handle, field, free_box, guard, guard_ctx, out_arg, params_bytes, CStruct, Field, Handle, OwnershipBox,
};
use crate::ffi::cancel::{lowvram_cancel_token, token_arg};
use crate::ffi::context::{init_params, lowvram_context};
use crate::ffi::status::lowvram_status;
use crate::memory::Reservation;

/// `lowvram_reservation_params.timeout_ms`: wait as long as it takes.
pub const LOWVRAM_WAIT_FOREVER: u64 = u64::MAX;

/// Parameters of `lowvram_reservation_new_ex`. Initialise with `lowvram_reservation_params_init(&p, sizeof p)`.
/// Since 0.3.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_reservation_params {
    /// `sizeof(lowvram_reservation_params)` as the host sees it; set by the init function.
    pub struct_size: u32,
    /// Longest wait, in milliseconds, for the bytes to be free: released by running generations at their next
    /// block boundary, or, when they do not fit beside what running calls need, at the end of those calls.
    /// 0 = do not wait (TIMEOUT unless the bytes are free now); `LOWVRAM_WAIT_FOREVER` (UINT64_MAX) = no bound.
    /// Default `LOWVRAM_WAIT_FOREVER`.
    pub timeout_ms: u64,
    /// Cancels the wait (also before it starts): the call returns CANCELLED. NULL = none (a context cancel still
    /// stops it). The call holds its own reference. Default NULL.
    pub cancel_token: *const lowvram_cancel_token,
}

impl CStruct for lowvram_reservation_params {
    const NAME: &'static str = "lowvram_reservation_params";
    fn fields() -> Vec<Field> {
        vec![field!(Self, struct_size), field!(Self, timeout_ms), field!(Self, cancel_token)]
    }
}

fn reservation_defaults(struct_size: u32) -> lowvram_reservation_params {
    lowvram_reservation_params { struct_size, timeout_ms: LOWVRAM_WAIT_FOREVER, cancel_token: std::ptr::null() }
}

/// Fill `*params` with defaults (wait without bound, no token) and store `struct_size` (the host's
/// `sizeof(lowvram_reservation_params)`). Since 0.3. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_reservation_params_init(
    params: *mut lowvram_reservation_params,
    struct_size: usize,
) -> lowvram_status {
    forward!(lowvram_reservation_params_init(params, struct_size));
    guard(|| init_params(params, struct_size, &reservation_defaults(struct_size as u32)))
}

/// Device memory reserved for the host. Opaque. Ownership: one owner, the host, until `lowvram_reservation_free`
/// gives the bytes back; it may outlive its context (then it keeps that cache's device alive until freed).
#[allow(non_camel_case_types)]
pub struct lowvram_reservation {
    _private: [u8; 0],
}

impl Handle for lowvram_reservation {
    type Target = Reservation;
    type Ownership = OwnershipBox;
}

/// Reserve `bytes` of device memory for the host's own use: the cache shrinks at once (a generation running on
/// another thread releases resident blocks at its next block boundary), and this call returns when the bytes are
/// actually free, however long that takes. On CUDA "free" means free for the host's own allocator (`cudaMalloc`
/// of the bytes succeeds): the library's compute stream is drained to this point (an event, not a device
/// synchronise), its own memory pool gives the driver back the blocks it kept beyond what is live, and the
/// driver's free bytes are checked. BUDGET_TOO_SMALL (with bytes needed and available in the message) if
/// they cannot be freed while the calls running now run. `lowvram_reservation_new_ex` bounds the wait, can be
/// cancelled, and waits for running calls to end. On success `*out` is a new handle owned by the caller.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_reservation_new(
    ctx: *const lowvram_context,
    bytes: u64,
    out: *mut *mut lowvram_reservation,
) -> lowvram_status {
    forward!(lowvram_reservation_new(ctx, bytes, out));
    guard_ctx(ctx, |ctx| {
        let out = out_arg(out, "out")?;
        if bytes == 0 {
            return Err(Error::invalid("bytes must be positive"));
        }
        *out = box_handle(ctx.reserve(bytes)?);
        Ok(())
    })
}

/// Reserve `bytes` of device memory for the host, waiting at most `params->timeout_ms` (`params` may be NULL: the
/// defaults of `lowvram_reservation_params_init`). The cache shrinks at once; the call returns when the bytes are
/// free (on CUDA, for the host's own allocator, as for `lowvram_reservation_new`; bytes other programs hold are
/// waited for until the timeout): generations running on other threads release resident blocks at their next block boundary, and when the
/// bytes do not fit beside the memory running calls need (their working memory and the blocks they stream), the
/// call waits for those calls to end. Statuses: TIMEOUT when the time runs out first, CANCELLED by
/// `params->cancel_token` or `lowvram_context_cancel`, BUDGET_TOO_SMALL at once when the bytes can never be free
/// (more than the device has beside other reservations and other programs, or held by a call running on this
/// thread, as from a progress callback); each message gives the bytes needed and available. On any failure nothing
/// is held and the cache's plans are as before. On success `*out` is a new handle owned by the caller, freed with
/// `lowvram_reservation_free`. Since 0.3. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_reservation_new_ex(
    ctx: *const lowvram_context,
    bytes: u64,
    params: *const lowvram_reservation_params,
    out: *mut *mut lowvram_reservation,
) -> lowvram_status {
    forward!(lowvram_reservation_new_ex(ctx, bytes, params, out));
    guard_ctx(ctx, |ctx| {
        type P = lowvram_reservation_params;
        let p = params_bytes(params, &reservation_defaults(size_of::<P>() as u32))?;
        let out = out_arg(out, "out")?;
        if bytes == 0 {
            return Err(Error::invalid("bytes must be positive"));
        }
        let timeout_ms: u64 = p.get(field!(P, timeout_ms));
        let timeout = (timeout_ms != LOWVRAM_WAIT_FOREVER).then(|| Duration::from_millis(timeout_ms));
        let token = token_arg(p.get(field!(P, cancel_token)))?;
        *out = box_handle(ctx.reserve_with(bytes, timeout, token.as_deref())?);
        Ok(())
    })
}

/// Bytes a reservation holds. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_reservation_bytes(
    reservation: *const lowvram_reservation,
    out_bytes: *mut u64,
) -> lowvram_status {
    forward!(lowvram_reservation_bytes(reservation, out_bytes));
    guard(|| {
        let r = borrow(reservation, "reservation")?;
        *out_arg(out_bytes, "out_bytes")? = r.bytes();
        Ok(())
    })
}

/// Give the reserved bytes back to the cache. NULL is a no-op; freeing twice is undefined. It may be freed before
/// or after its context.
#[no_mangle]
pub unsafe extern "C" fn lowvram_reservation_free(reservation: *mut lowvram_reservation) {
    forward!(lowvram_reservation_free(reservation));
    guard(|| {
        free_box(reservation);
        Ok(())
    });
}
