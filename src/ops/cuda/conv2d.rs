//! conv2d on CUDA as an implicit GEMM (`kernels/conv2d.cu`): the im2col columns are gathered tile by tile into
//! shared memory inside the kernel, so the call needs no scratch beyond its output (candle's CUDA conv builds a column
//! buffer k² times the input and a permuted copy of the result); bias fused in the epilogue. f16/bf16 on tensor cores
//! (f32 accumulators), f32 with FMAs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};

use super::module::{kernel, Module};
use super::{config, dtype_runs, dtype_suffix, grid_dim, launch_error, output, view};

/// Launch geometry (kernels/conv2d.cu): output pixels per block (grid x), output channels per block (grid y),
/// threads per block; the kernel uses static shared memory only.
const TILE_N: usize = 128;
const TILE_M: usize = 128;
const THREADS: u32 = 256;

/// Whether the kernel runs `x` and `weight` (CUDA tensors of one dtype the GPU supports) with this stride and padding:
/// the kernel's preconditions (kernels/conv2d.cu) are checked here, because a kernel that traps leaves the CUDA
/// context unusable; shapes beyond them (e.g. one image of more than 2³¹ elements) go to candle's conv instead.
pub(crate) fn supported(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> bool {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return false;
    };
    if x.dtype() != weight.dtype()
        || !weight.device().same_device(x.device())
        || !dtype_runs(dev, x.dtype())
    {
        return false;
    }
    let (Ok((b, cin, h, w)), Ok((cout, wcin, k, kw))) = (x.dims4(), weight.dims4()) else {
        return false;
    };
    if cin != wcin
        || k != kw
        || stride == 0
        || k == 0
        || b == 0
        || cin == 0
        || cout == 0
        || h + 2 * padding < k
        || w + 2 * padding < k
    {
        return false;
    }
    let (oh, ow) = (
        (h + 2 * padding - k) / stride + 1,
        (w + 2 * padding - k) / stride + 1,
    );
    let lim = 1usize << 31;
    let fits = |n: Option<usize>| n.is_some_and(|n| n < lim);
    fits(b.checked_mul(oh).and_then(|n| n.checked_mul(ow)))
        && fits(cin.checked_mul(k * k))
        && fits(cin.checked_mul(h).and_then(|n| n.checked_mul(w)))
        && [b, cin, h, w, cout, k, stride, padding]
            .iter()
            .all(|&d| d < lim)
        && cout.div_ceil(TILE_M) <= 65535 // grid y
}

/// `x` `[B, Cin, H, W]` convolved with `weight` `[Cout, Cin, k, k]` (+ `bias` `[Cout]`), stride and symmetric
/// padding; the caller has checked the channel counts.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    let op = ConvOp { stride, padding };
    match bias {
        Some(b) => x.apply_op3_no_bwd(&w, &b.to_dtype(x.dtype())?.contiguous()?, &op),
        None => x.apply_op2_no_bwd(&w, &op),
    }
}

struct ConvOp {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "lowvram-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lowvram-conv2d: the CUDA kernel got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.dispatch(x, xl, w, wl, None)
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "lowvram-conv2d"
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
        candle_core::bail!("lowvram-conv2d: the CUDA kernel got CPU tensors")
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
        self.dispatch(x, xl, w, wl, Some((b, bl)))
    }
}

impl ConvOp {
    fn dispatch(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        with_element_type!(x.dtype(), "lowvram-conv2d", T => self.run::<T>(x, xl, w, wl, b))
    }

    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, cin, h, wd) = xl.shape().dims4()?;
        let (cout, wcin, k, kw) = wl.shape().dims4()?;
        if !xl.is_contiguous() || !wl.is_contiguous() || cin != wcin || k != kw || self.stride == 0
        {
            candle_core::bail!(
                "lowvram-conv2d: x {:?}, weight {:?}, stride {}",
                xl.dims(),
                wl.dims(),
                self.stride
            );
        }
        let (s, p) = (self.stride, self.padding);
        if h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!(
                "lowvram-conv2d: kernel {k} larger than the padded input {h}×{wd} (+{p})"
            );
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
        let dev = &x.device;
        let xv = view::<T>(x, xl)?;
        let wv = view::<T>(w, wl)?;
        let mut y = output::<T>(dev, batch * cout * oh * ow)?;
        let grid = (
            grid_dim((batch * oh * ow).div_ceil(TILE_N), "conv2d")?,
            grid_dim(cout.div_ceil(TILE_M), "conv2d")?,
            1,
        );
        let name = format!("lowvram_conv2d_{}", dtype_suffix(x.dtype()).unwrap_or("?"));
        let kern = kernel(dev, Module::Conv2d, &name, 0)?;
        let dims = [batch, cin, h, wd, cout, k, s, p, oh, ow].map(|d| d as i32);
        let null: u64 = 0;
        let bv = match b {
            Some((bs, bl)) => {
                if !bl.is_contiguous() || bl.shape().elem_count() != cout {
                    candle_core::bail!("lowvram-conv2d: bias {:?} for {cout} channels", bl.dims());
                }
                Some(view::<T>(bs, bl)?)
            }
            None => None,
        };
        let mut launch = kern.stream.launch_builder(&kern.func);
        launch.arg(&xv).arg(&wv);
        match &bv {
            Some(bv) => launch.arg(bv),
            None => launch.arg(&null), // a NULL pointer: the kernel adds no bias
        };
        launch.arg(&mut y);
        for d in &dims {
            launch.arg(d);
        }
        // SAFETY: the argument list is the kernel's (kernels/conv2d.cu); the pointers cover the NCHW input, the
        // [Cout, Cin, k, k] weights, Cout biases (or NULL) and the B·Cout·Ho·Wo output, which the grid covers exactly.
        unsafe { launch.launch(config(grid, THREADS, 0)) }.map_err(|e| launch_error(&name, e))?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((batch, cout, oh, ow)),
        ))
    }
}
