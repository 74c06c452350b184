//! The project's CUDA kernels (`kernels/*.cu`), built by `build.rs` into fat binaries (machine code for each listed
//! GPU generation + PTX of the newest) and embedded here; loaded into a CUDA context on first use and cached for the
//! process, so a launch costs one map lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::CudaDevice;
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use once_cell::sync::Lazy;

use candle_core::Result;

/// One kernel source file = one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    Attention,
    Conv2d,
    Dequant,
    GroupNorm,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Attention => include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
            Module::Conv2d => include_bytes!(concat!(env!("OUT_DIR"), "/conv2d.fatbin")),
            Module::Dequant => include_bytes!(concat!(env!("OUT_DIR"), "/dequant.fatbin")),
            Module::GroupNorm => include_bytes!(concat!(env!("OUT_DIR"), "/group_norm.fatbin")),
        }
    }
}

/// Compute capabilities the embedded machine code was built for (`LOWVRAM_CUDA_ARCHS` at build time).
pub(crate) const BUILT_ARCHS: &str = env!("LOWVRAM_CUDA_ARCHS_BUILT");

/// Loaded modules and functions, per context (a process normally has one).
#[derive(Default)]
struct Loaded {
    modules: HashMap<(usize, Module), Arc<CudaModule>>,
    functions: HashMap<(usize, String), Loadedfn>,
}

#[derive(Clone)]
struct Loadedfn {
    func: CudaFunction,
    /// The dynamic shared memory this function has been allowed (the > 48 KiB opt-in), in bytes.
    smem_allowed: u32,
}

static LOADED: Lazy<Mutex<Loaded>> = Lazy::new(Mutex::default);

/// Default dynamic shared memory every kernel may use without opting in.
const SMEM_DEFAULT: u32 = 48 * 1024;

/// A kernel ready to launch on candle's stream of `dev`.
pub(crate) struct Kernel {
    pub func: CudaFunction,
    pub stream: Arc<CudaStream>,
}

/// The function `name` of `module` on `dev`'s context, allowed `smem` bytes of dynamic shared memory.
pub(crate) fn kernel(dev: &CudaDevice, module: Module, name: &str, smem: u32) -> Result<Kernel> {
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let key = ctx.cu_ctx() as usize;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = match loaded.functions.get(&(key, name.to_string())) {
        Some(f) => f.clone(),
        None => {
            let m = match loaded.modules.get(&(key, module)) {
                Some(m) => m.clone(),
                None => {
                    let m = ctx
                        .load_module(Ptx::from_binary(module.image().to_vec()))
                        .map_err(|e| {
                            candle_core::Error::Msg(format!(
                                "loading the {module:?} CUDA kernels: {e}"
                            ))
                        })?;
                    loaded.modules.insert((key, module), m.clone());
                    m
                }
            };
            let func = m
                .load_function(name)
                .map_err(|e| candle_core::Error::Msg(format!("CUDA kernel {name}: {e}")))?;
            Loadedfn {
                func,
                smem_allowed: SMEM_DEFAULT,
            }
        }
    };
    if smem > f.smem_allowed {
        let limit = smem_optin_limit(&ctx)?;
        if smem > limit {
            return Err(candle_core::Error::Msg(format!(
                "{name} needs {smem} B of shared memory; this GPU allows {limit} B"
            )));
        }
        f.func
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| {
                candle_core::Error::Msg(format!("{name}: shared memory opt-in to {smem} B: {e}"))
            })?;
        f.smem_allowed = smem;
    }
    loaded.functions.insert((key, name.to_string()), f.clone());
    Ok(Kernel {
        func: f.func,
        stream,
    })
}

/// The most dynamic shared memory one block may opt in to on this context's GPU, in bytes.
pub(crate) fn smem_optin_limit(ctx: &Arc<CudaContext>) -> Result<u32> {
    use cudarc::driver::sys::CUdevice_attribute_enum as A;
    let v = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| candle_core::Error::Msg(format!("reading the shared memory limit: {e}")))?;
    Ok(v.max(0) as u32)
}

/// The GPU's compute capability as `major * 10 + minor` (e.g. 90 for an H100).
pub(crate) fn compute_capability(dev: &CudaDevice) -> Result<u32> {
    let (major, minor) = dev
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| candle_core::Error::Msg(format!("reading the compute capability: {e}")))?;
    Ok((major * 10 + minor) as u32)
}
