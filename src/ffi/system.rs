//! Version and machine facts.

use crate::ffi::backend::forward;
use std::ffi::c_char;

use crate::ffi::boundary::{check_out_size, field, guard, non_null, write_out, CStruct, Field};
use crate::ffi::status::lowvram_status;
use crate::system::system_stats;

/// Major version of this header; `lowvram_version()` gives the library's at run time.
pub const LOWVRAM_VERSION_MAJOR: u32 = 0;
/// Minor version of this header.
pub const LOWVRAM_VERSION_MINOR: u32 = 3;
/// Patch version of this header.
pub const LOWVRAM_VERSION_PATCH: u32 = 0;

/// Most devices `lowvram_system_info` can list.
pub const LOWVRAM_MAX_DEVICES: usize = 16;

/// The library's version string, e.g. "0.1.0" (as in Cargo.toml). Owned by the library, valid for the life of the
/// process; do not free. Thread-safe.
#[no_mangle]
pub extern "C" fn lowvram_version() -> *const c_char {
    forward!(lowvram_version());
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// What runs a process's calls (`lowvram_system_info.backend`). The numbers are stable.
///
/// Backends: one package serves machines with and without a GPU. liblowvram.so (what hosts link) runs on the CPU
/// and needs no CUDA library; liblowvram_cuda.so, the CUDA build of the same version, may be installed beside it.
/// At the first lowvram call of a process (any function), liblowvram.so chooses once, for the whole process: when
/// the NVIDIA driver (libcuda.so.1) loads and reports at least one device and liblowvram_cuda.so is beside it (or
/// named by LOWVRAM_BACKEND_LIBRARY), every call is forwarded to that library, whose version must equal this one's;
/// otherwise the CPU runs them. lowvram_system_stats reports the choice and why (backend, backend_reason). The
/// environment variable LOWVRAM_BACKEND overrides the rule: "auto" (default), "cpu" (never forward), "cuda" (auto,
/// and a CPU outcome is printed on stderr), "library" (forward to LOWVRAM_BACKEND_LIBRARY without probing the
/// driver: for tests and custom backends). Device strings keep their meaning: on the CPU backend, device "cuda" is
/// UNSUPPORTED with the reason.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum lowvram_backend {
    /// The CPU implementation inside liblowvram.so.
    Cpu = 0,
    /// The CUDA build (liblowvram_cuda.so).
    Cuda = 1,
    /// A library named by LOWVRAM_BACKEND_LIBRARY (LOWVRAM_BACKEND=library).
    Library = 2,
}

/// One CUDA device.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct lowvram_device_info {
    /// CUDA device ordinal (as in `cuda:N`).
    pub index: u32,
    /// Device name, NUL-terminated, truncated to fit.
    pub name: [c_char; 128],
    /// Total device memory, bytes.
    pub total_bytes: u64,
    /// Free device memory as the driver reports it now, bytes.
    pub free_bytes: u64,
}

/// Host RAM and CUDA devices, filled by `lowvram_system_stats`.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct lowvram_system_info {
    /// Set by the caller to `sizeof(lowvram_system_info)` before the call; on return, the bytes the library wrote.
    pub struct_size: u32,
    /// Total host RAM, bytes.
    pub ram_total_bytes: u64,
    /// Host RAM available to new allocations, bytes.
    pub ram_free_bytes: u64,
    /// Whether a CUDA driver loaded and reported at least one device.
    pub cuda_available: bool,
    /// Why CUDA is unavailable (NUL-terminated; empty when available).
    pub cuda_reason: [c_char; 256],
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// The devices, in ordinal order.
    pub devices: [lowvram_device_info; LOWVRAM_MAX_DEVICES],
    /// What runs this process's calls (a `lowvram_backend` value). Since 0.3.
    pub backend: u32,
    /// Why that backend (NUL-terminated, truncated to fit): the backend file, driver version and device count, or
    /// why the CPU runs the calls (e.g. "no NVIDIA driver: ..."). Since 0.3.
    pub backend_reason: [c_char; 256],
}

impl CStruct for lowvram_system_info {
    const NAME: &'static str = "lowvram_system_info";
    fn fields() -> Vec<Field> {
        vec![
            field!(Self, struct_size),
            field!(Self, ram_total_bytes),
            field!(Self, ram_free_bytes),
            field!(Self, cuda_available),
            field!(Self, cuda_reason),
            field!(Self, device_count),
            field!(Self, devices),
            field!(Self, backend),
            field!(Self, backend_reason),
        ]
    }
}

fn copy_str(dst: &mut [c_char], src: &str) {
    let n = src.len().min(dst.len() - 1);
    for (d, s) in dst.iter_mut().zip(src.as_bytes()[..n].iter()) {
        *d = *s as c_char;
    }
    dst[n] = 0;
}

/// Probe host RAM and CUDA devices into `*out`. The CUDA driver is loaded at run time: on a machine without one
/// this succeeds with `cuda_available = false`, no devices, and the reason.
///
/// `out` is caller-owned; set `out->struct_size = sizeof *out` first: the fields it covers are written (an older,
/// smaller struct gets the fields it knows). Written only on success. Thread-safe. The probe creates and releases each device's primary context, which takes milliseconds.
#[no_mangle]
pub unsafe extern "C" fn lowvram_system_stats(out: *mut lowvram_system_info) -> lowvram_status {
    forward!(lowvram_system_stats(out), |status: lowvram_status| {
        // The backend does not know why it was chosen: the loader's choice is written over its own.
        if status == lowvram_status::Ok {
            write_backend(out, backend_choice());
        }
        status
    });
    guard(|| {
        non_null(out, "out")?;
        check_out_size(out, "out")?;
        let expected = std::mem::size_of::<lowvram_system_info>() as u32;
        let stats = system_stats();
        let mut info = lowvram_system_info {
            struct_size: expected,
            ram_total_bytes: stats.ram.total_bytes,
            ram_free_bytes: stats.ram.free_bytes,
            cuda_available: stats.cuda.available,
            cuda_reason: [0; 256],
            device_count: stats.devices.len().min(LOWVRAM_MAX_DEVICES) as u32,
            devices: [lowvram_device_info { index: 0, name: [0; 128], total_bytes: 0, free_bytes: 0 };
                LOWVRAM_MAX_DEVICES],
            backend: 0,
            backend_reason: [0; 256],
        };
        copy_str(&mut info.cuda_reason, &stats.cuda.reason);
        let (backend, reason) = backend_choice();
        info.backend = backend as u32;
        copy_str(&mut info.backend_reason, &reason);
        for (slot, d) in info.devices.iter_mut().zip(&stats.devices) {
            slot.index = d.index;
            copy_str(&mut slot.name, &d.name);
            slot.total_bytes = d.total_bytes;
            slot.free_bytes = d.free_bytes;
        }
        write_out(out, &info);
        Ok(())
    })
}

/// This process's backend and why, as `lowvram_system_info` reports it.
#[cfg(not(feature = "cuda"))]
fn backend_choice() -> (lowvram_backend, String) {
    let c = crate::ffi::backend::choice();
    let kind = match c.kind {
        crate::backend::BackendKind::Cpu => lowvram_backend::Cpu,
        crate::backend::BackendKind::Cuda => lowvram_backend::Cuda,
        crate::backend::BackendKind::Library => lowvram_backend::Library,
    };
    (kind, c.reason.clone())
}

/// The CUDA build runs its own calls; the CPU build that forwarded here writes its reason over this one.
#[cfg(feature = "cuda")]
fn backend_choice() -> (lowvram_backend, String) {
    (lowvram_backend::Cuda, "this library is the CUDA build".into())
}

/// Write the backend fields of a forwarded call's result, when the host's struct (as the backend wrote it) has them.
///
/// # Safety
/// `out` points to a `lowvram_system_info` the backend filled; its `struct_size` says how many bytes it wrote.
#[cfg(not(feature = "cuda"))]
unsafe fn write_backend(out: *mut lowvram_system_info, (kind, reason): (lowvram_backend, String)) {
    let written = crate::ffi::boundary::struct_size_at(out);
    let base = out.cast::<u8>();
    let backend = field!(lowvram_system_info, backend);
    if written >= backend.offset + backend.size {
        std::ptr::write_unaligned(base.add(backend.offset).cast::<u32>(), kind as u32);
    }
    let reason_field = field!(lowvram_system_info, backend_reason);
    if written >= reason_field.offset + reason_field.size {
        let mut bytes = [0 as c_char; 256];
        copy_str(&mut bytes, &reason);
        std::ptr::write_unaligned(base.add(reason_field.offset).cast::<[c_char; 256]>(), bytes);
    }
}
