//! The activation allocation point inside ops: the device a running call computes on, seen at the entry of the main
//! ops (linear, conv2d, attention, group_norm), where each is about to allocate its output. A call sets it for its
//! duration on its own thread ([`scope`]); [`enter`] tells that device's allocator
//! ([`DeviceAllocator::activation`]), whose op-level fault injection can then fail the op exactly as a device OOM
//! inside the tensor library would, on the emulated and CUDA devices alike. Outside a call (and on rayon's
//! workers, which never enter an op) it does nothing.

use std::cell::RefCell;

use candle_core::Tensor;

use crate::device::DeviceAllocator;
use crate::error::Result;

thread_local! {
    /// The allocator of the call running on this thread; None outside a call.
    static DEVICE: RefCell<Option<DeviceAllocator>> = const { RefCell::new(None) };
}

/// Run `f` with `alloc` as this thread's device for [`enter`]; the previous one comes back afterwards, also on a
/// panic.
pub fn scope<R>(alloc: &DeviceAllocator, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<DeviceAllocator>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            let _ = DEVICE.try_with(|d| *d.borrow_mut() = prev);
        }
    }
    let _restore = Restore(DEVICE.with(|d| d.borrow_mut().replace(alloc.clone())));
    f()
}

/// An op on this thread is about to allocate its output of `bytes`: the device's activation point (which may fail
/// it as a device OOM, see [`DeviceAllocator::activation`]). Ok outside a call.
pub fn enter(bytes: u64) -> Result<()> {
    DEVICE
        .try_with(|d| d.borrow().as_ref().map_or(Ok(()), |a| a.activation(bytes)))
        .unwrap_or(Ok(()))
}

/// Bytes of `elems` elements of `t`'s dtype (an op's output shaped from `t`).
pub(crate) fn bytes_like(t: &Tensor, elems: usize) -> u64 {
    (elems as u64).saturating_mul(t.dtype().size_in_bytes() as u64)
}
