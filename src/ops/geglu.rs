//! GEGLU (diffusers' `GEGLU`): project to twice the width, split, `value · GELU(gate)` with the exact (erf) GELU.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::ops::linear::linear;

/// `x` `[..., in]`, `weight` `[2·inner, in]`, `bias` `[2·inner]` → `[..., inner]`: the first half of the projection
/// is the value, the second half the gate.
pub fn geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let h = linear(x, weight, bias)?;
    let inner = h.dim(D::Minus1)? / 2;
    let value = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
    Ok((value * gate)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn value_times_gelu_of_gate() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32]], &dev).unwrap();
        let w = Tensor::new(&[[2f32], [1.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = super::geglu(&x, &w, None).unwrap().to_vec2().unwrap();
        // gelu(1) = 0.8413447
        assert!((y[0][0] - 2.0 * 0.841_344_7).abs() < 1e-5, "{}", y[0][0]);
    }
}
