//! The C ABI: pointer checks, handle casts, the panic boundary and the last error. No logic lives here; every
//! function forwards to the Rust API. One file per C "class".

#[cfg(not(feature = "cuda"))]
pub mod backend;
/// The CUDA build is the backend: its exports run, they never forward.
#[cfg(feature = "cuda")]
mod backend {
    macro_rules! forward {
        ($($t:tt)*) => {};
    }
    pub(crate) use forward;
}
mod boundary;
pub mod cancel;
pub mod context;
pub mod error;
pub mod log;
pub mod model;
pub mod pipeline;
pub mod reservation;
pub mod run;
pub mod status;
pub mod system;
pub mod tensor;

pub use boundary::lowvram_release_callback;
pub use status::lowvram_status;
