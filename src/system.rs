//! What the machine has: host RAM and CUDA devices.
//!
//! CUDA is probed by loading the driver (`libcuda.so.1`) at run time with libloading, so the CPU build runs
//! everywhere and reports why no GPU is usable instead of failing to start (DECISIONS.md: cudarc's dynamic loading
//! cannot coexist with candle's dynamic linking in one build).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use once_cell::sync::OnceCell;
use serde::Serialize;

/// Host memory in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct RamStats {
    pub total_bytes: u64,
    /// Memory available to new allocations without swapping (Linux `MemAvailable`).
    pub free_bytes: u64,
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceStats {
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Whether CUDA can be used, and why not.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CudaStatus {
    pub available: bool,
    /// Empty when available; otherwise what failed (no driver, cuInit error, no devices).
    pub reason: String,
}

/// Host RAM, CUDA devices and CUDA availability; serialises to the `system-stats --json` shape.
#[derive(Debug, Clone, Serialize)]
pub struct SystemStats {
    pub ram: RamStats,
    pub devices: Vec<DeviceStats>,
    pub cuda: CudaStatus,
}

/// Read host RAM: `/proc/meminfo` where it exists, else `sysinfo(2)`.
pub fn ram_stats() -> RamStats {
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        };
        if let (Some(total), Some(free)) = (field("MemTotal:"), field("MemAvailable:")) {
            return RamStats { total_bytes: total, free_bytes: free };
        }
    }
    // SAFETY: sysinfo writes into the zeroed struct we own.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) == 0 {
            let unit = info.mem_unit.max(1) as u64;
            return RamStats { total_bytes: info.totalram as u64 * unit, free_bytes: info.freeram as u64 * unit };
        }
    }
    RamStats { total_bytes: 0, free_bytes: 0 }
}

/// Probe everything. Never panics; a missing or broken driver is reported in `cuda.reason`.
pub fn system_stats() -> SystemStats {
    let (devices, cuda) = match probe_cuda() {
        Ok(devices) if devices.is_empty() => {
            (devices, CudaStatus { available: false, reason: "the CUDA driver reports no devices".into() })
        }
        Ok(devices) => (devices, CudaStatus { available: true, reason: String::new() }),
        Err(reason) => (Vec::new(), CudaStatus { available: false, reason }),
    };
    SystemStats { ram: ram_stats(), devices, cuda }
}

type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;

/// The driver entry points the probe uses.
struct Driver {
    _lib: libloading::Library,
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    ctx_push: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_pop: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    get_error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    driver_get_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
}

impl Driver {
    fn load() -> Result<Self, String> {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what every CUDA program does.
        let lib = unsafe { libloading::Library::new("libcuda.so.1") }
            .map_err(|e| format!("no NVIDIA driver: cannot load libcuda.so.1 ({})", dl_error(&e)))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the signature matches the CUDA driver API's declaration of this symbol.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("libcuda.so.1 lacks {}: {e}", $name))?
            };
        }
        Ok(Self {
            init: sym!("cuInit"),
            device_get_count: sym!("cuDeviceGetCount"),
            device_get: sym!("cuDeviceGet"),
            device_get_name: sym!("cuDeviceGetName"),
            primary_ctx_retain: sym!("cuDevicePrimaryCtxRetain"),
            primary_ctx_release: sym!("cuDevicePrimaryCtxRelease_v2"),
            ctx_push: sym!("cuCtxPushCurrent_v2"),
            ctx_pop: sym!("cuCtxPopCurrent_v2"),
            mem_get_info: sym!("cuMemGetInfo_v2"),
            get_error_name: sym!("cuGetErrorName"),
            driver_get_version: sym!("cuDriverGetVersion"),
            _lib: lib,
        })
    }

    /// Turn a CUresult into `Err("what: CUDA_ERROR_NAME (code)")`.
    fn check(&self, what: &str, code: CuResult) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a static string pointer or leaves it NULL.
        let name = unsafe {
            if (self.get_error_name)(code, &mut name) == 0 && !name.is_null() {
                CStr::from_ptr(name).to_string_lossy().into_owned()
            } else {
                "unknown error".to_string()
            }
        };
        Err(format!("{what} failed: {name} ({code})"))
    }
}

/// The loader's own words for a failed dlopen/dlsym (libloading's message alone is "dlopen failed").
pub fn dl_error(e: &libloading::Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), |s| s.to_string())
}

static DRIVER: OnceCell<Result<Driver, String>> = OnceCell::new();

/// The CUDA driver's version and device count, without touching any device (no context is created).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    /// The CUDA version the driver supports, e.g. "13.0".
    pub version: String,
    pub devices: u32,
}

/// Probe the driver only: cheap enough for choosing a backend at a process's first call. The error is the same
/// reason `system_stats` reports (no driver, cuInit failed, no devices).
pub fn cuda_driver() -> Result<DriverInfo, String> {
    let driver = DRIVER.get_or_init(Driver::load).as_ref().map_err(Clone::clone)?;
    // SAFETY: every call follows the driver API contract; out-parameters are ours.
    unsafe {
        driver.check("cuInit", (driver.init)(0))?;
        let mut version = 0;
        driver.check("cuDriverGetVersion", (driver.driver_get_version)(&mut version))?;
        let mut count = 0;
        driver.check("cuDeviceGetCount", (driver.device_get_count)(&mut count))?;
        if count <= 0 {
            return Err("the CUDA driver reports no devices".into());
        }
        Ok(DriverInfo { version: format!("{}.{}", version / 1000, version % 1000 / 10), devices: count as u32 })
    }
}

fn probe_cuda() -> Result<Vec<DeviceStats>, String> {
    let driver = DRIVER.get_or_init(Driver::load).as_ref().map_err(Clone::clone)?;
    // SAFETY: every call follows the driver API contract; buffers are sized as passed.
    unsafe {
        driver.check("cuInit", (driver.init)(0))?;
        let mut count = 0;
        driver.check("cuDeviceGetCount", (driver.device_get_count)(&mut count))?;
        let mut devices = Vec::new();
        for i in 0..count {
            let mut dev = 0;
            driver.check("cuDeviceGet", (driver.device_get)(&mut dev, i))?;
            let mut name = [0 as c_char; 256];
            driver.check("cuDeviceGetName", (driver.device_get_name)(name.as_mut_ptr(), 256, dev))?;
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            let mut ctx: CuContext = std::ptr::null_mut();
            driver.check("cuDevicePrimaryCtxRetain", (driver.primary_ctx_retain)(&mut ctx, dev))?;
            let mut free = 0usize;
            let mut total = 0usize;
            let info = driver
                .check("cuCtxPushCurrent", (driver.ctx_push)(ctx))
                .and_then(|_| driver.check("cuMemGetInfo", (driver.mem_get_info)(&mut free, &mut total)));
            let mut popped: CuContext = std::ptr::null_mut();
            (driver.ctx_pop)(&mut popped);
            (driver.primary_ctx_release)(dev);
            info?;
            devices.push(DeviceStats { index: i as u32, name, total_bytes: total as u64, free_bytes: free as u64 });
        }
        Ok(devices)
    }
}
