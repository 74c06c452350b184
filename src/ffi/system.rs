//! Version and machine facts.

use std::ffi::c_char;

use crate::ffi::boundary::{check_out_size, field, guard, non_null, write_out, CStruct, Field};
use crate::ffi::status::lowvram_status;
use crate::system::system_stats;

/// Major version of this header; `lowvram_version()` gives the library's at run time.
pub const LOWVRAM_VERSION_MAJOR: u32 = 0;
/// Minor version of this header.
pub const LOWVRAM_VERSION_MINOR: u32 = 2;
/// Patch version of this header.
pub const LOWVRAM_VERSION_PATCH: u32 = 0;

/// Most devices `lowvram_system_info` can list.
pub const LOWVRAM_MAX_DEVICES: usize = 16;

/// The library's version string, e.g. "0.1.0" (as in Cargo.toml). Owned by the library, valid for the life of the
/// process; do not free. Thread-safe.
#[no_mangle]
pub extern "C" fn lowvram_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
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
        };
        copy_str(&mut info.cuda_reason, &stats.cuda.reason);
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
