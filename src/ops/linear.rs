//! `y = x Wᵀ + b` over the last dimension (PyTorch `nn.Linear`).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Apply a linear layer: `x` is `[..., in]`, `weight` is `[out, in]`, `bias` (if any) is `[out]`; returns `[..., out]`.
///
/// Scratch: none beyond the output (plus a contiguous copy of `x` when it is strided).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_f, in_f) = weight.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(Error::invalid("linear: input must have at least one dimension"));
    };
    if last != in_f {
        return Err(Error::invalid(format!("linear: input has {last} features, weight expects {in_f}")));
    }
    let rows: usize = lead.iter().product();
    let x2 = x.contiguous()?.reshape((rows, in_f))?;
    let mut y = x2.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let mut out_shape = lead.to_vec();
    out_shape.push(out_f);
    Ok(y.reshape(out_shape)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn linear_matches_manual_sum() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2., 3.], [4., 5., 6.]]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0., -1.], [0.5, 0.5, 0.5]], &dev).unwrap();
        let b = Tensor::new(&[10f32, -1.], &dev).unwrap();
        let y = super::linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2]);
        let v: Vec<Vec<f32>> = y.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v, vec![vec![8.0, 2.0], vec![8.0, 6.5]]);
    }
}
