//! Own CPU kernels for the hot ops (f32, multi-threaded over the global rayon pool, GEMMs through the `gemm` crate).
//! The functions in `ops/` call them for f32 tensors on the CPU (and on `emulated:` devices, which are CPU memory)
//! and keep candle compositions for other dtypes and for CUDA, so `models/` sees one API.

#![allow(dead_code)] // the kernels adopt these helpers one by one

use candle_core::{CpuStorage, DType, Device, Shape, Storage, Tensor};

use crate::error::{Error, Result};

pub(crate) mod attention;
pub(crate) mod conv2d;
pub(crate) mod dequant;
pub(crate) mod elementwise;
pub(crate) mod norm;
#[cfg(test)]
mod timing;
pub(crate) mod winograd;

/// Whether `t` is an f32 tensor in host memory, the case the kernels here handle.
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Run `f` on the row-major f32 data of a CPU f32 tensor (copying first only when `t` is strided).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if !is_cpu_f32(t) {
        return Err(Error::invalid(format!("cpu kernel: expected an f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device())));
    }
    let owned;
    let t = if t.is_contiguous() {
        t
    } else {
        owned = t.contiguous()?;
        &owned
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err(Error::invalid("cpu kernel: tensor storage is not f32 host memory"));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::invalid("cpu kernel: tensor is not contiguous after contiguous()"))?;
    Ok(f(&data[start..end]))
}

/// Wrap a kernel's output buffer as a CPU tensor (no copy).
pub(crate) fn f32_tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Threads the kernels split work over: the global rayon pool's size (set by `RAYON_NUM_THREADS` or the host).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Test helpers shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::Tensor;

    /// The bits of `f`'s f32 output when run in a rayon pool of `threads` threads.
    pub fn bits_with_threads(threads: usize, f: &(dyn Fn() -> Tensor + Sync)) -> Vec<u32> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let y = pool.install(f);
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// `f` gives bit-identical results run to run and with 1, 2 and 3 threads.
    pub fn assert_thread_count_independent(f: &(dyn Fn() -> Tensor + Sync)) {
        let one = bits_with_threads(1, f);
        for n in [2, 2, 3] {
            assert!(one == bits_with_threads(n, f), "{n} threads changed the result");
        }
    }

    /// (max |a − b|, max |b|).
    pub fn max_err(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        (d, m)
    }
}
