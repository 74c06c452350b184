//! Rotary position embedding over several position axes, as FLUX.1 applies it to queries and keys (BFL
//! `math.rope`/`apply_rope`; diffusers `FluxPosEmbed` + `apply_rotary_emb` with `repeat_interleave_real=True`).
//!
//! Each token has one position per axis (FLUX: `(0, row, col)` for image patches, zeros for text tokens). Axis `i`
//! owns `axes_dim[i]` consecutive features of every head (the axes' widths add up to the head dim); within it, pair
//! `j` (features `2j`, `2j+1`: **interleaved** pairs) turns by the angle `pos_i · θ^(−2j/axes_dim[i])`:
//! `(x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin)`. Angles and their cosines are taken in f64 and rounded to f32 as
//! both references do; the rotation runs in f32 whatever the compute dtype, and the result is returned in the input's
//! dtype.

use candle_core::{DType, Device, Tensor};

use super::cpu::{self, is_cpu_f32};
use crate::error::{Error, Result};

/// The cosines and sines of every (token, pair) of one sequence: `[len, head_dim / 2]` each, row-major, f32.
#[derive(Debug, Clone)]
pub struct RopeTable {
    len: usize,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The table for tokens with positions `ids` (`ids[t][i]` = position of token `t` on axis `i`), axis widths
    /// `axes_dim` (each even; their sum is the head dim) and base `theta` (FLUX: 10000).
    pub fn new(ids: &[Vec<f64>], axes_dim: &[usize], theta: f64) -> Result<Self> {
        if axes_dim.is_empty() || axes_dim.iter().any(|&d| d == 0 || d % 2 == 1) {
            return Err(Error::invalid(format!("rope: axes dims {axes_dim:?} must be even and positive")));
        }
        let half: usize = axes_dim.iter().map(|d| d / 2).sum();
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for (t, pos) in ids.iter().enumerate() {
            if pos.len() != axes_dim.len() {
                return Err(Error::invalid(format!(
                    "rope: token {t} has {} positions, expected one per axis ({})",
                    pos.len(),
                    axes_dim.len()
                )));
            }
            for (&p, &d) in pos.iter().zip(axes_dim) {
                for j in 0..d / 2 {
                    // f64 like BFL (`torch.float64`) and diffusers (`freqs_dtype=float64` on the CPU and CUDA).
                    let omega = 1.0 / theta.powf((2 * j) as f64 / d as f64);
                    let angle = p * omega;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Ok(Self { len: ids.len(), half, cos, sin })
    }

    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table covers no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The head dim it rotates (twice the pairs).
    pub fn head_dim(&self) -> usize {
        2 * self.half
    }

    /// Rotate `x` `[B, len, heads · head_dim]` (every head the same way); returns x's shape and dtype.
    ///
    /// Scratch: f32 CPU tensors are rotated in one pass into the output (none beyond it); other dtypes and devices
    /// go through a candle composition in f32 (the input in f32, both halves and their products: about 4 f32
    /// copies of `x`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, width) = x.dims3()?;
        let d = self.head_dim();
        if l != self.len || d == 0 || width % d != 0 {
            return Err(Error::invalid(format!(
                "rope: input {:?} does not match a table of {} tokens with head dim {d}",
                x.dims(),
                self.len
            )));
        }
        if is_cpu_f32(x) {
            let mut out = vec![0f32; x.elem_count()];
            cpu::with_f32(x, |xs| {
                for (row, (src, dst)) in xs.chunks_exact(width).zip(out.chunks_exact_mut(width)).enumerate() {
                    let t = row % l;
                    let (c, s) = (&self.cos[t * self.half..][..self.half], &self.sin[t * self.half..][..self.half]);
                    for (hs, hd) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
                        for j in 0..self.half {
                            let (x0, x1) = (hs[2 * j], hs[2 * j + 1]);
                            hd[2 * j] = x0 * c[j] - x1 * s[j];
                            hd[2 * j + 1] = x1 * c[j] + x0 * s[j];
                        }
                    }
                }
            })?;
            return cpu::f32_tensor(out, (b, l, width));
        }
        self.apply_reference(x)
    }

    /// The candle composition of [`Self::apply`] (other dtypes, CUDA) and its test reference.
    pub fn apply_reference(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, width) = x.dims3()?;
        let heads = width / self.head_dim();
        let dev = x.device();
        let (c, s) = self.tensors(dev)?;
        let xf = x.to_dtype(DType::F32)?.reshape((b, l, heads, self.half, 2))?;
        let x0 = xf.narrow(4, 0, 1)?;
        let x1 = xf.narrow(4, 1, 1)?;
        let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
        let o1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
        Ok(Tensor::cat(&[&o0, &o1], 4)?.reshape((b, l, width))?.to_dtype(x.dtype())?)
    }

    /// cos and sin as `[1, len, 1, half, 1]` f32 tensors on `dev`.
    fn tensors(&self, dev: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (1, self.len, 1, self.half, 1);
        Ok((
            Tensor::from_slice(&self.cos, shape, &Device::Cpu)?.to_device(dev)?,
            Tensor::from_slice(&self.sin, shape, &Device::Cpu)?.to_device(dev)?,
        ))
    }
}

/// Peak transient bytes of [`RopeTable::apply`] on `elems` elements beyond its output, on the path `target` takes.
pub fn rope_scratch_bytes(elems: usize, target: impl Into<super::OpTarget>) -> u64 {
    let target = target.into();
    if target.cpu_kernels {
        0
    } else {
        // f32 input, the two products of each half and the halves' results before the concatenation.
        5 * 4 * elems as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel equals the composition bit for bit, and a pair turns by the documented angle.
    #[test]
    fn kernel_matches_composition_and_angles() {
        let axes = [2usize, 4, 2];
        let ids: Vec<Vec<f64>> = (0..5).map(|t| vec![0.0, (t / 2) as f64, (t % 2) as f64 + 1.0]).collect();
        let table = RopeTable::new(&ids, &axes, 10000.0).unwrap();
        assert_eq!(table.head_dim(), 8);
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &Device::Cpu).unwrap();
        let a = table.apply(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r = table.apply_reference(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, r);
        // Token 3 = (0, 1, 2): axis 1 (features 2..6) pair 1 turns by 1 · 10000^(-2/4) = 0.01 rad.
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = 3 * 16 + 8 + 4; // batch 0, token 3, head 1, pair 2 of the head (axis 1, j = 1)
        let (x0, x1) = (xs[at], xs[at + 1]);
        let (c, s) = ((0.01f64).cos() as f32, (0.01f64).sin() as f32);
        assert_eq!(a[at], x0 * c - x1 * s);
        assert_eq!(a[at + 1], x1 * c + x0 * s);
        // Axis 0 has position 0 for every token: its features pass unchanged.
        assert_eq!(a[at - 4..at - 2], xs[at - 4..at - 2]);
    }

    /// Other dtypes take the composition in f32 and round once: bf16 in, bf16 out, within one bf16 rounding.
    #[test]
    fn bf16_rotates_in_f32() {
        let ids: Vec<Vec<f64>> = (0..7).map(|t| vec![0.0, t as f64, (t * 3) as f64]).collect();
        let table = RopeTable::new(&ids, &[2, 2, 4], 10000.0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 7, 16), &Device::Cpu).unwrap();
        let want = table.apply(&x).unwrap();
        let got = table.apply(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let err = (got.to_dtype(DType::F32).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 3e-2, "{err}");
    }

    #[test]
    fn bad_shapes_are_invalid() {
        assert!(RopeTable::new(&[vec![0.0]], &[3], 10000.0).is_err());
        let table = RopeTable::new(&[vec![0.0, 1.0]], &[2, 2], 10000.0).unwrap();
        let x = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(table.apply(&x).is_err());
    }
}
