//! `lowvram_reservation`: device memory the host takes back from the cache (a game's frames).

use crate::ffi::backend::forward;
use crate::error::Error;
use crate::ffi::boundary::{borrow, box_handle, free_box, guard, guard_ctx, out_arg, Handle, OwnershipBox};
use crate::ffi::context::lowvram_context;
use crate::ffi::status::lowvram_status;
use crate::memory::Reservation;

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
/// actually free. BUDGET_TOO_SMALL (with bytes needed and available in the message) if they can never be freed.
/// On success `*out` is a new handle owned by the caller. Thread-safe.
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
