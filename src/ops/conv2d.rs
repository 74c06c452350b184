//! 2-D convolution with bias (PyTorch `nn.Conv2d`, square kernel, symmetric padding), over candle's conv2d.

use candle_core::Tensor;

use super::cpu::{self, is_cpu_f32};
use super::OpTarget;
use crate::error::{Error, Result};

/// Convolve `x` `[B, Cin, H, W]` with `weight` `[Cout, Cin, k, k]`, add `bias` `[Cout]`.
///
/// Output `[B, Cout, (H + 2p - k)/s + 1, (W + 2p - k)/s + 1]`. f32 tensors on the CPU (square kernels) go through
/// the own tiled im2col + gemm kernel (bias fused); CUDA tensors (a `cuda` build) through the own implicit-GEMM kernel
/// (`kernels/conv2d.cu`: no column buffer, bias fused); other dtypes on the CPU through candle ([`conv2d_reference`]).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if cin != wcin {
        return Err(Error::invalid(format!("conv2d: input has {cin} channels, weight expects {wcin}")));
    }
    let out = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) / stride.max(1) + 1;
    super::activation::enter(super::activation::bytes_like(x, b * cout * out(h, kh) * out(w, kw)))?;
    if kh == kw && is_cpu_f32(x) && is_cpu_f32(weight) && bias.is_none_or(is_cpu_f32) {
        return cpu::conv2d::conv2d(x, weight, bias, stride, padding);
    }
    #[cfg(feature = "cuda")]
    if super::cuda::conv2d::supported(x, weight, stride, padding) {
        return Ok(super::cuda::conv2d::conv2d(x, weight, bias, stride, padding)?);
    }
    conv2d_reference(x, weight, bias, stride, padding)
}

/// [`conv2d`] as candle's conv2d followed by a broadcast bias add (the path for f16/bf16 and CUDA; tests compare the
/// CPU kernel against it).
pub fn conv2d_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, cin, _, _) = x.dims4()?;
    let (cout, wcin, _, _) = weight.dims4()?;
    if cin != wcin {
        return Err(Error::invalid(format!("conv2d: input has {cin} channels, weight expects {wcin}")));
    }
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, cout, 1, 1))?)?),
        None => Ok(y),
    }
}

/// Upper bound of the transient bytes of one [`conv2d`] call beyond its (contiguous) inputs and its output.
///
/// `target` says which path runs ([`OpTarget::new`] from the device and dtype; a bare `DType` means candle's, the
/// larger). The CUDA kernel's is zero (its columns live in shared memory). Candle's (CUDA's full im2col): the column buffer `B·Hout·Wout·Cin·k²` plus the un-permuted GEMM result
/// `B·Hout·Wout·Cout`, plus one more output for the bias add; 1×1 stride-1 convs skip im2col; its CPU backend also
/// copies the input and the weights. The own f32 CPU kernel's: a few MiB, one column tile per concurrently running
/// task (at most one per thread of the global rayon pool) plus gemm's packed operands, independent of the image
/// size beyond that; `padding` picks its path (3×3 stride-1 padding-1 convs may run Winograd, see `ops::cpu`).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_scratch_bytes(
    batch: usize,
    cin: usize,
    cout: usize,
    out_h: usize,
    out_w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    target: impl Into<OpTarget>,
) -> u64 {
    let target = target.into();
    if target.cuda_kernels {
        return 0; // implicit GEMM: the columns live in shared memory only
    }
    if target.cpu_kernels {
        return cpu::conv2d::scratch_bytes_bound(batch, cin, cout, out_h, out_w, k, stride, padding);
    }
    let dtype = target.dtype;
    let e = dtype.size_in_bytes() as u64;
    let m = (batch * out_h * out_w) as u64;
    let col = if k == 1 && stride == 1 { 0 } else { m * (cin * k * k) as u64 };
    (col + 2 * m * cout as u64) * e
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn conv_adds_bias_per_channel() {
        let dev = Device::Cpu;
        let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::new(&[0f32, 100.], &dev).unwrap();
        let y = super::conv2d(&x, &w, Some(&b), 1, 1).unwrap();
        let v: Vec<Vec<Vec<f32>>> = y.squeeze(0).unwrap().to_vec3().unwrap();
        assert_eq!(v[0][1][1], 9.0);
        assert_eq!(v[0][0][0], 4.0);
        assert_eq!(v[1][0][0], 104.0);
    }
}
