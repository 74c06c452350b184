//! GroupNorm(+SiLU) on CUDA: `kernels/group_norm.cu` — one pass of per-chunk statistics (Welford, f32) into a small
//! scratch buffer, one pass that merges them per group and normalises; the input is read twice and the output
//! written once, in place of candle's ~10 ops and three f32 copies.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};

use super::module::{kernel, Module};
use super::{config, dtype_runs, dtype_suffix, grid_dim, launch_error, output, view};

const THREADS: u32 = 256;
/// Elements per statistics chunk the launch aims at, and the most chunks per group (each normalising block merges
/// all of its group's chunks, so their count bounds that work).
const CHUNK_ELEMS: usize = 8192;
const MAX_CHUNKS: usize = 256;

/// Chunks per group of `n` elements.
pub(crate) fn chunks(n: usize) -> usize {
    n.div_ceil(CHUNK_ELEMS).clamp(1, MAX_CHUNKS)
}

/// Whether the kernel runs `x` (a CUDA tensor) with `groups` groups: f32, f16, or bf16 where the GPU supports it, and
/// within the kernel's preconditions (checked here: a kernel that traps leaves the CUDA context unusable).
pub(crate) fn supported(x: &Tensor, groups: usize) -> bool {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return false;
    };
    let dims = x.dims();
    let lim = 1usize << 31;
    dtype_runs(dev, x.dtype())
        && dims.len() >= 2
        && x.elem_count() > 0
        && (1..=65535).contains(&dims[0])
        && (1..=65535).contains(&groups)
        && dims[1] % groups == 0
        && dims[1] < lim
}

/// `x` `[B, C, ...]` normalised over `groups` groups, scaled by `weight` and shifted by `bias` (`[C]`, converted to
/// x's dtype), SiLU when `silu`. The caller has checked the shapes.
pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    let b = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(
        &w,
        &b,
        &GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "lowvram-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lowvram-group-norm: the CUDA kernel got CPU tensors (ops::group_norm dispatches those to the CPU kernel)")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        with_element_type!(x.dtype(), "lowvram-group-norm", T => self.run::<T>(x, xl, w, wl, b, bl))
    }
}

impl GroupNormOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = xl.dims();
        if !xl.is_contiguous() || !wl.is_contiguous() || !bl.is_contiguous() || dims.len() < 2 {
            candle_core::bail!(
                "lowvram-group-norm: needs contiguous [B, C, ...] input, got {dims:?}"
            );
        }
        let (batch, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let g = self.groups;
        if g == 0 || c % g != 0 || wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!(
                "lowvram-group-norm: {c} channels, {g} groups, weight {:?}, bias {:?}",
                wl.dims(),
                bl.dims()
            );
        }
        let chunks = chunks(c / g * spatial);
        let dev = &x.device;
        let suffix = dtype_suffix(x.dtype()).unwrap_or("?");
        let (xv, wv, bv) = (view::<T>(x, xl)?, view::<T>(w, wl)?, view::<T>(b, bl)?);
        let partial = output::<f32>(dev, batch * g * chunks * 3)?;
        let mut y = output::<T>(dev, xl.shape().elem_count())?;
        let grid = (
            grid_dim(chunks, "group_norm")?,
            grid_dim(g, "group_norm")?,
            grid_dim(batch, "group_norm")?,
        );
        let (ci, gi, si, ki) = (c as i32, g as i32, spatial as i64, chunks as i32);

        let name = format!("lowvram_group_norm_stats_{suffix}");
        let k = kernel(dev, Module::GroupNorm, &name, 0)?;
        let mut launch = k.stream.launch_builder(&k.func);
        launch
            .arg(&xv)
            .arg(&partial)
            .arg(&ci)
            .arg(&gi)
            .arg(&si)
            .arg(&ki);
        // SAFETY: the argument list is the kernel's (kernels/group_norm.cu), pointers cover B·C·S inputs and
        // B·G·chunks·3 partials, the grid/block are the documented ones.
        unsafe { launch.launch(config(grid, THREADS, 0)) }.map_err(|e| launch_error(&name, e))?;

        let (eps, silu) = (self.eps, self.silu as i32);
        let name = format!("lowvram_group_norm_apply_{suffix}");
        let k = kernel(dev, Module::GroupNorm, &name, 0)?;
        let mut launch = k.stream.launch_builder(&k.func);
        launch
            .arg(&xv)
            .arg(&partial)
            .arg(&wv)
            .arg(&bv)
            .arg(&mut y)
            .arg(&ci)
            .arg(&gi)
            .arg(&si)
            .arg(&ki)
            .arg(&eps)
            .arg(&silu);
        // SAFETY: as above; y has B·C·S elements, every one written by exactly one block.
        unsafe { launch.launch(config(grid, THREADS, 0)) }.map_err(|e| launch_error(&name, e))?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            xl.shape().clone(),
        ))
    }
}
