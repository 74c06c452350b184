//! The panic boundary and the pointer checks every exported function goes through.

use std::any::Any;
use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::api::Context;
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

/// Like [`guard`] for an entry point on a context: a context on which a call panicked refuses every later call
/// (PANIC, naming the first panic), and a panic in `body` marks the context so.
///
/// # Safety
/// `ctx` must be NULL or a live context handle.
pub(crate) unsafe fn guard_ctx(
    ctx: *const crate::ffi::context::lowvram_context,
    body: impl FnOnce(&Context) -> Result<()>,
) -> lowvram_status {
    let mut entered: Option<&Context> = None;
    let status = guard(|| {
        let c = borrow(ctx, "ctx")?;
        c.check_usable()?;
        entered = Some(c);
        body(c)
    });
    if let (lowvram_status::Panic, Some(c)) = (status, entered) {
        c.mark_failed(&crate::ffi::error::last_error_string());
    }
    status
}

/// Ownership kind of a handle whose host pointer owns one `Box` (freeing it destroys the object).
pub(crate) struct OwnershipBox;
/// Ownership kind of a handle whose host pointer holds one strong count of an `Arc` (the library may hold more).
pub(crate) struct OwnershipArc;

/// A C handle type, the Rust type it stands for, and how the host's pointer owns it (rustls-ffi's `Castable`):
/// the kind is chosen once per type, so `Box::from_raw` on a shared handle cannot be written.
pub(crate) trait Handle {
    type Target;
    type Ownership;
}

/// Borrow the Rust object behind a handle, or `NullArgument` naming the parameter.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H` made by this library.
pub(crate) unsafe fn borrow<'a, H: Handle>(ptr: *const H, name: &'static str) -> Result<&'a H::Target> {
    (ptr as *const H::Target).as_ref().ok_or(Error::NullArgument(name))
}

/// A new one-owner handle.
pub(crate) fn box_handle<H: Handle<Ownership = OwnershipBox>>(value: H::Target) -> *mut H {
    Box::into_raw(Box::new(value)).cast()
}

/// Destroy a one-owner handle; NULL is a no-op.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H`, not used again.
pub(crate) unsafe fn free_box<H: Handle<Ownership = OwnershipBox>>(ptr: *mut H) {
    if !ptr.is_null() {
        drop(Box::from_raw(ptr.cast::<H::Target>()));
    }
}

/// A new shared handle holding one strong count.
pub(crate) fn arc_handle<H: Handle<Ownership = OwnershipArc>>(value: Arc<H::Target>) -> *mut H {
    Arc::into_raw(value) as *mut H
}

/// A strong reference of the call's own to a shared handle's object: the host may free its handle while the call
/// runs.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H`.
pub(crate) unsafe fn clone_arc<H: Handle<Ownership = OwnershipArc>>(
    ptr: *const H,
    name: &'static str,
) -> Result<Arc<H::Target>> {
    if ptr.is_null() {
        return Err(Error::NullArgument(name));
    }
    let p = ptr as *const H::Target;
    Arc::increment_strong_count(p);
    Ok(Arc::from_raw(p))
}

/// Drop the host's strong count of a shared handle; NULL is a no-op.
///
/// # Safety
/// `ptr` must be NULL or a live handle of type `H`, not used again by the host.
pub(crate) unsafe fn free_arc<H: Handle<Ownership = OwnershipArc>>(ptr: *mut H) {
    if !ptr.is_null() {
        drop(Arc::from_raw(ptr as *const H::Target));
    }
}

pub use crate::log::lowvram_release_callback;

/// Calls a release callback exactly once, when dropped (end of the call, also on error or panic).
pub(crate) struct ReleaseOnDrop {
    release: lowvram_release_callback,
    user_data: *mut std::ffi::c_void,
}

impl ReleaseOnDrop {
    pub(crate) fn new(release: lowvram_release_callback, user_data: *mut std::ffi::c_void) -> Self {
        Self { release, user_data }
    }
}

/// The release of a params struct's `user_data`, read before anything else can fail (a NULL context included), so
/// it runs exactly once whatever the call's status. A no-op when `p` is NULL, its `struct_size` is rejected (no
/// field can be trusted) or does not cover the release field.
///
/// # Safety
/// `p` must be NULL or point to a struct whose first `struct_size` bytes are readable.
pub(crate) unsafe fn release_of<T: CStruct>(p: *const T, user_data: Field, release: Field) -> ReleaseOnDrop {
    let none = ReleaseOnDrop::new(None, std::ptr::null_mut());
    if p.is_null() {
        return none;
    }
    let size = struct_size_at(p);
    if check_params_size::<T>(size).is_err() || size < release.offset + release.size {
        return none;
    }
    let base = p.cast::<u8>();
    ReleaseOnDrop::new(
        std::ptr::read_unaligned(base.add(release.offset).cast::<lowvram_release_callback>()),
        std::ptr::read_unaligned(base.add(user_data.offset).cast::<*mut std::ffi::c_void>()),
    )
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.release.take() {
            // SAFETY: the host gave this callback for this user_data; it is called once.
            unsafe { f(self.user_data) }
        }
    }
}

/// Offset and size of one field of a C struct.
#[derive(Clone, Copy)]
pub(crate) struct Field {
    pub offset: usize,
    pub size: usize,
}

/// The size of the value a field projection returns (a field's size without forming a reference to a struct).
pub(crate) const fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// The [`Field`] of `$ty.$f`.
macro_rules! field {
    ($ty:ty, $f:ident) => {
        $crate::ffi::boundary::Field {
            offset: std::mem::offset_of!($ty, $f),
            size: $crate::ffi::boundary::size_of_field(|s: &$ty| &s.$f),
        }
    };
}
pub(crate) use field;

/// A C struct versioned by its leading `u32 struct_size`: its fields, in order, for the size checks.
pub(crate) trait CStruct {
    const NAME: &'static str;
    fn fields() -> Vec<Field>;
}

/// The `struct_size` at the start of a host struct, read through a raw pointer: no reference is formed over a
/// struct that may be shorter than ours.
///
/// # Safety
/// `p` must point to at least 4 readable bytes.
pub(crate) unsafe fn struct_size_at<T>(p: *const T) -> usize {
    std::ptr::read_unaligned(p.cast::<u32>()) as usize
}

/// Accept a host's `struct_size` for a params struct `T`: at least the `struct_size` field, at most 64 KiB, and not
/// ending inside a field we know (a half-copied pointer would be called).
pub(crate) fn check_params_size<T: CStruct>(size: usize) -> Result<()> {
    let full = std::mem::size_of::<T>();
    if !(4..=65536).contains(&size) {
        return Err(Error::invalid(format!(
            "struct_size {size} is not a sizeof({}) this library accepts (4..=65536; this version's is {full})",
            T::NAME
        )));
    }
    if let Some(f) = T::fields().into_iter().find(|f| size > f.offset && size < f.offset + f.size) {
        return Err(Error::invalid(format!(
            "struct_size {size} ends inside a field of {} (bytes {}..{}): initialise it with its init function",
            T::NAME,
            f.offset,
            f.offset + f.size
        )));
    }
    Ok(())
}

/// The bytes of a params struct as this library reads it: `defaults`, overwritten by the bytes the host's
/// `struct_size` covers. Fields are then read from the bytes (bools as bytes, `!= 0`), never through a `&T` over
/// host memory.
///
/// # Safety
/// `p` must be NULL or point to a struct whose first `struct_size` bytes are readable.
pub(crate) unsafe fn params_bytes<T: CStruct>(p: *const T, defaults: &T) -> Result<ParamBytes<T>> {
    let full = std::mem::size_of::<T>();
    let mut bytes = vec![0u8; full];
    std::ptr::copy_nonoverlapping((defaults as *const T).cast::<u8>(), bytes.as_mut_ptr(), full);
    if !p.is_null() {
        let size = struct_size_at(p);
        check_params_size::<T>(size)?;
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), bytes.as_mut_ptr(), size.min(full));
    }
    Ok(ParamBytes { bytes, _t: PhantomData })
}

/// A params struct copied into library memory, read field by field.
pub(crate) struct ParamBytes<T> {
    bytes: Vec<u8>,
    _t: PhantomData<T>,
}

impl<T> ParamBytes<T> {
    /// The plain-data field at `f` (integers, floats, pointers, nullable function pointers: every bit pattern of
    /// these is valid).
    pub(crate) fn get<F: Copy>(&self, f: Field) -> F {
        assert!(f.size == std::mem::size_of::<F>() && f.offset + f.size <= self.bytes.len());
        // SAFETY: in bounds (checked above); read unaligned from our own buffer.
        unsafe { std::ptr::read_unaligned(self.bytes.as_ptr().add(f.offset).cast::<F>()) }
    }

    /// A `bool` field read as a byte: any non-zero value is true.
    pub(crate) fn flag(&self, f: Field) -> bool {
        self.bytes[f.offset] != 0
    }
}

/// Check a host output struct's `struct_size` before any work: at least the `struct_size` field.
///
/// # Safety
/// `out` must be NULL or point to at least 4 readable bytes.
pub(crate) unsafe fn check_out_size<T: CStruct>(out: *const T, name: &str) -> Result<()> {
    if !out.is_null() && struct_size_at(out) < 4 {
        return Err(Error::invalid(format!(
            "{name}->struct_size is {}: set it to sizeof({})",
            struct_size_at(out),
            T::NAME
        )));
    }
    Ok(())
}

/// Write `value` into a host output struct: every whole field its `struct_size` covers (an older, smaller struct
/// gets the fields it knows; a newer, larger one keeps its extra bytes). `struct_size` is set to the bytes written.
///
/// # Safety
/// `out` must point to a writable struct of the host's `struct_size` bytes, checked by [`check_out_size`].
pub(crate) unsafe fn write_out<T: CStruct>(out: *mut T, value: &T) {
    let size = struct_size_at(out);
    let full = std::mem::size_of::<T>();
    let n = if size >= full {
        full
    } else {
        T::fields().iter().map(|f| f.offset + f.size).filter(|&end| end <= size).max().unwrap_or(4)
    };
    std::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), out.cast::<u8>(), n);
    std::ptr::write_unaligned(out.cast::<u32>(), n as u32);
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
    if ptr.is_null() {
        Ok(None)
    } else {
        str_arg(ptr, name).map(Some)
    }
}

/// NULL check of a pointer to a host struct that may be shorter than ours (no reference is formed).
pub(crate) fn non_null<T>(ptr: *const T, name: &'static str) -> Result<()> {
    if ptr.is_null() {
        Err(Error::NullArgument(name))
    } else {
        Ok(())
    }
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

    #[test]
    fn a_panic_marks_its_context_failed_and_later_calls_say_so() {
        use crate::ffi::context::{
            lowvram_cache_stats, lowvram_context, lowvram_context_configure, lowvram_context_free, lowvram_context_new,
            lowvram_context_params, lowvram_context_params_init, lowvram_context_stats,
        };
        unsafe {
            let mut params = std::mem::MaybeUninit::<lowvram_context_params>::zeroed();
            assert_eq!(
                lowvram_context_params_init(params.as_mut_ptr(), std::mem::size_of::<lowvram_context_params>()),
                lowvram_status::Ok
            );
            let mut params = params.assume_init();
            params.device = c"cpu".as_ptr();
            let mut ctx: *mut lowvram_context = std::ptr::null_mut();
            assert_eq!(lowvram_context_new(&params, &mut ctx), lowvram_status::Ok);
            let mut stats: lowvram_cache_stats = std::mem::zeroed();
            stats.struct_size = std::mem::size_of::<lowvram_cache_stats>() as u32;
            assert_eq!(lowvram_context_stats(ctx, &mut stats), lowvram_status::Ok);
            assert_eq!(guard_ctx(ctx, |_| panic!("half-way through")), lowvram_status::Panic);
            assert_eq!(lowvram_context_stats(ctx, &mut stats), lowvram_status::Panic);
            let msg = last_error();
            assert!(msg.contains("context unusable") && msg.contains("half-way through"), "{msg}");
            assert_eq!(lowvram_context_configure(ctx, c"max_cache_vram_gb: 1".as_ptr()), lowvram_status::Panic);
            lowvram_context_free(ctx);
        }
    }

    #[test]
    fn the_last_error_survives_thread_teardown() {
        struct CallsOnTeardown;
        impl Drop for CallsOnTeardown {
            fn drop(&mut self) {
                // Thread-locals are being destroyed: neither call may panic (a panic here aborts the process).
                let _ = guard(|| Err(Error::invalid("during teardown")));
                let _ = unsafe { CStr::from_ptr(lowvram_last_error_message()) };
            }
        }
        thread_local! {
            static TEARDOWN: CallsOnTeardown = const { CallsOnTeardown };
        }
        std::thread::spawn(|| {
            // Registered first, destroyed last: the last error's thread-local is gone when it runs.
            TEARDOWN.with(|_| {});
            guard(|| Err(Error::invalid("before teardown")));
        })
        .join()
        .unwrap();
    }
}
