//! Flash attention on CUDA (`kernels/attention.cu`): online softmax over key tiles, q·kᵀ and p·v on tensor cores for
//! f16/bf16 (f32 accumulators, f32 softmax), plain FMAs for f32. Reads q, k, v in place (`[B, N, H·D]` with any row
//! stride, e.g. slices of a fused projection) and writes `[B, Nq, H·D]` directly: no head-split copies, no score
//! matrix, no scratch beyond the output.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use cudarc::driver::{DeviceRepr, PushKernelArg};

use super::geometry::attention as geometry;
use super::module::{kernel, smem_optin_limit, Module};
use super::{config, dtype_runs, dtype_suffix, grid_dim, launch_error, output, view};

/// Whether the kernel runs attention with head size `d` on `q`'s device and dtype (k and v alike), within the
/// kernel's launch limits (at most 65535 batches and heads: grid y and z). Checked here rather than trapped on: a
/// kernel that traps leaves the CUDA context unusable.
pub(crate) fn supported(q: &Tensor, k: &Tensor, v: &Tensor, d: usize) -> bool {
    let candle_core::Device::Cuda(dev) = q.device() else {
        return false;
    };
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() || !dtype_runs(dev, q.dtype()) {
        return false;
    }
    let (Ok((b, nq, c)), Ok((bk, nk, ck))) = (q.dims3(), k.dims3()) else {
        return false;
    };
    if v.dims() != k.dims() || bk != b || ck != c {
        return false;
    }
    if b == 0
        || b > 65535
        || d == 0
        || c / d > 65535
        || nq == 0
        || nk == 0
        || nq >= 1 << 31
        || nk >= 1 << 31
    {
        return false;
    }
    let Some(g) = geometry(d, q.dtype()) else {
        return false;
    };
    g.smem <= 48 * 1024 || smem_optin_limit(dev.cuda_stream().context()).is_ok_and(|l| g.smem <= l)
}

/// Attention over `q` `[B, Nq, H·D]`, `k`, `v` `[B, Nk, H·D]` (feature dimension contiguous); the caller has checked
/// the shapes and [`supported`].
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let last_contiguous = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[2] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (
        last_contiguous(q)?,
        last_contiguous(k)?,
        last_contiguous(v)?,
    );
    q.apply_op3_no_bwd(
        &k,
        &v,
        &FlashAttention {
            heads,
            scale: scale as f32,
        },
    )
}

struct FlashAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "lowvram-flash-attention"
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
        candle_core::bail!("lowvram-flash-attention: the CUDA kernel got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        with_element_type!(q.dtype(), "lowvram-flash-attention", T => self.run::<T>(q, ql, k, kl, v, vl))
    }
}

impl FlashAttention {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, nq, c) = ql.shape().dims3()?;
        let (bk, nk, ck) = kl.shape().dims3()?;
        let h = self.heads;
        if kl.dims() != vl.dims()
            || bk != b
            || ck != c
            || h == 0
            || c % h != 0
            || nq == 0
            || nk == 0
            || b > 65535
            || h > 65535
        {
            candle_core::bail!(
                "lowvram-flash-attention: q {:?}, k {:?}, v {:?}, {h} heads",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        for l in [ql, kl, vl] {
            if l.stride()[2] != 1 {
                candle_core::bail!(
                    "lowvram-flash-attention: the feature dimension must be contiguous ({:?})",
                    l.stride()
                );
            }
        }
        let d = c / h;
        let Some(g) = geometry(d, q.dtype()) else {
            candle_core::bail!(
                "lowvram-flash-attention: no kernel for head size {d} in {:?}",
                q.dtype()
            )
        };
        let dev = &q.device;
        let name = format!(
            "lowvram_flash_attn_{}_d{d}",
            dtype_suffix(q.dtype()).unwrap_or("?")
        );
        let kern = kernel(dev, Module::Attention, &name, g.smem)?;
        let (qv, kv, vv) = (view::<T>(q, ql)?, view::<T>(k, kl)?, view::<T>(v, vl)?);
        let mut out = output::<T>(dev, b * nq * c)?;
        let grid = (
            grid_dim(nq.div_ceil(g.rows), "attention")?,
            grid_dim(h, "attention")?,
            grid_dim(b, "attention")?,
        );
        let (nqi, nki, hi) = (nq as i32, nk as i32, h as i32);
        let strides = |l: &Layout| (l.stride()[0] as i64, l.stride()[1] as i64);
        let ((qsb, qsn), (ksb, ksn), (vsb, vsn)) = (strides(ql), strides(kl), strides(vl));
        let (scale, smem) = (self.scale, g.smem as i32);
        let mut launch = kern.stream.launch_builder(&kern.func);
        launch
            .arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&mut out)
            .arg(&nqi)
            .arg(&nki)
            .arg(&hi);
        launch
            .arg(&qsb)
            .arg(&qsn)
            .arg(&ksb)
            .arg(&ksn)
            .arg(&vsb)
            .arg(&vsn)
            .arg(&scale)
            .arg(&smem);
        // SAFETY: the argument list is the kernel's (kernels/attention.cu); q, k, v are read at the strides of their
        // layouts within their storages, out has B·Nq·H·D elements and the grid covers them exactly once.
        unsafe { launch.launch(config(grid, g.threads, g.smem)) }
            .map_err(|e| launch_error(&name, e))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, nq, c)),
        ))
    }
}
