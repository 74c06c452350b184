//! Seeded Gaussian noise from a counter-based generator of our own (DECISIONS.md, Sampling).
//!
//! # The generator
//!
//! **Philox4x32-10** (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the Random123
//! reference): a bijection of a 128-bit counter under a 64-bit key, ten rounds. One call yields four `u32`.
//!
//! * key = `[seed as u32, (seed >> 32) as u32]`
//! * counter = `[block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32]`, where `block` is
//!   the index of a group of four output elements (`block = element_index / 4`).
//!
//! # From bits to normals
//!
//! Each block's four words `(w0, w1, w2, w3)` give the tensor elements `4·block .. 4·block + 4` (row-major,
//! the tail of the last block is dropped) by Box–Muller on two pairs of uniforms:
//!
//! * `u = (w as f64 + 0.5) / 2^32` — strictly inside (0, 1), so `ln u` is finite;
//! * `r = sqrt(-2 ln u_a)`, `θ = 2π u_b`; elements `r cos θ`, `r sin θ` (pair `(w0, w1)` then `(w2, w3)`),
//!   computed in `f64` and rounded once to `f32`.
//!
//! Every element depends only on `(seed, stream, element_index)`, never on the order or the thread that
//! computes it: the same seed gives the same tensor whatever the thread count. (Bit-for-bit equality across
//! operating systems additionally depends on the platform `ln`/`sin`/`cos` agreeing to within the final
//! rounding to `f32`, which is the case for glibc.)
//!
//! # Streams used by the sampler
//!
//! Stream 0 is the initial latent noise ([`initial_noise`]); stream `1 + i` is Euler ancestral's noise for
//! step `i` when the caller gives no `sampling.step_noise`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::Result;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32-10 evaluation: `counter` under `key`, as in Random123's `philox4x32_R(10, ctr, key)`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four raw words of block `block` of stream `stream` under `seed` (see the module docs).
pub fn raw_block(seed: u64, stream: u64, block: u64) -> [u32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let ctr = [block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32];
    philox4x32_10(ctr, key)
}

#[inline(always)]
fn unit_open(w: u32) -> f64 {
    (w as f64 + 0.5) * (1.0 / 4_294_967_296.0)
}

#[inline(always)]
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let r = (-2.0 * unit_open(a).ln()).sqrt();
    let theta = std::f64::consts::TAU * unit_open(b);
    ((r * theta.cos()) as f32, (r * theta.sin()) as f32)
}

/// Four standard-normal `f32` for block `block` (elements `4·block .. 4·block+4`).
pub fn normal_block(seed: u64, stream: u64, block: u64) -> [f32; 4] {
    let w = raw_block(seed, stream, block);
    let (z0, z1) = box_muller(w[0], w[1]);
    let (z2, z3) = box_muller(w[2], w[3]);
    [z0, z1, z2, z3]
}

/// Fills `out` with elements `0..out.len()` of stream `stream` under `seed`. Parallel over blocks; the result
/// does not depend on the number of threads.
pub fn fill_normal(seed: u64, stream: u64, out: &mut [f32]) {
    const BLOCKS_PER_TASK: usize = 1024;
    out.par_chunks_mut(4 * BLOCKS_PER_TASK).enumerate().for_each(|(task, chunk)| {
        let first_block = (task * BLOCKS_PER_TASK) as u64;
        for (j, quad) in chunk.chunks_mut(4).enumerate() {
            let z = normal_block(seed, stream, first_block + j as u64);
            quad.copy_from_slice(&z[..quad.len()]);
        }
    });
}

/// A standard-normal `f32` tensor of `shape` on `device`: element `k` (row-major) is element `k` of stream
/// `stream` under `seed`. Generated on the host, then copied to `device`.
pub fn seeded_normal(seed: u64, stream: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    fill_normal(seed, stream, &mut v);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

/// The initial latent noise for `seed` when the caller supplies none: `seeded_normal(seed, 0, shape, device)`.
pub fn initial_noise(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    seeded_normal(seed, 0, shape, device)
}

/// Euler ancestral's noise for step `step` when the caller supplies none: `seeded_normal(seed, 1 + step, ..)`.
pub fn step_noise(seed: u64, step: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
    seeded_normal(seed, 1 + step as u64, shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 `kat_vectors`, the three `philox4x32 10` lines (counter, key → output).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    /// Counter and key layout: (seed, stream, block) map onto Philox's words as documented.
    #[test]
    fn layout_matches_docs() {
        let seed = 0x0123_4567_89ab_cdefu64;
        let stream = 0xfedc_ba98_7654_3210u64;
        let block = 0x1111_2222_3333_4444u64;
        assert_eq!(
            raw_block(seed, stream, block),
            philox4x32_10([0x3333_4444, 0x1111_2222, 0x7654_3210, 0xfedc_ba98], [0x89ab_cdef, 0x0123_4567])
        );
    }

    /// Box–Muller on hand-picked words, against values computed from the formula in the docs.
    #[test]
    fn box_muller_hard_values() {
        // u_a = (2^31 - 0.5 + 0.5)/2^32 = 0.5 exactly; u_b = 0.5/2^32.
        let (a, b) = box_muller(0x8000_0000, 0);
        let r = (-2.0f64 * 0.5f64.ln()).sqrt(); // sqrt(2 ln 2) = 1.1774100225154747
        assert!((r - 1.1774100225154747).abs() < 1e-15);
        let th = std::f64::consts::TAU * (0.5 / 4_294_967_296.0);
        assert_eq!(a, (r * th.cos()) as f32);
        assert_eq!(b, (r * th.sin()) as f32);
        assert_eq!(a, 1.1774100f32);
        // u_b = 0.25 + 0.5/2^32 → θ just above π/2: cos ≈ 0, sin ≈ 1.
        let (c, d) = box_muller(0x8000_0000, 0x4000_0000);
        assert!(c.abs() < 1e-8, "{c}");
        assert_eq!(d, 1.1774100f32);
    }

    #[test]
    fn statistics_of_a_million() {
        let n = 1 << 20;
        let mut v = vec![0f32; n];
        fill_normal(42, 0, &mut v);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let m4 = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n as f64;
        // Standard errors: mean 1/sqrt(n) ≈ 0.001, variance sqrt(2/n) ≈ 0.0014, kurtosis sqrt(96/n) ≈ 0.0096.
        // Bounds at about 5 standard errors.
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.007, "var {var}");
        assert!((m4 / (var * var) - 3.0).abs() < 0.05, "kurtosis {}", m4 / (var * var));
        // Tail mass beyond 2σ: 0.0455 for a normal; binomial s.e. ≈ 0.0002.
        let tail = v.iter().filter(|x| x.abs() > 2.0).count() as f64 / n as f64;
        assert!((tail - 0.0455).abs() < 0.001, "tail {tail}");
        // Neighbouring elements (same block and across blocks) are uncorrelated.
        let lag1 = v.windows(2).map(|w| w[0] as f64 * w[1] as f64).sum::<f64>() / (n - 1) as f64;
        assert!(lag1.abs() < 0.005, "lag-1 correlation {lag1}");
    }

    #[test]
    fn streams_and_seeds_differ_and_repeat() {
        let a = seeded_normal(7, 0, &[2, 4, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap();
        let b = seeded_normal(7, 0, &[2, 4, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap();
        let c = seeded_normal(7, 1, &[2, 4, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap();
        let d = seeded_normal(8, 0, &[2, 4, 8, 8], &Device::Cpu).unwrap().flatten_all().unwrap();
        let (a, b, c, d) = (
            a.to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap(),
            c.to_vec1::<f32>().unwrap(),
            d.to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        // A prefix of a longer tensor equals the shorter one (element index is the counter).
        let long = seeded_normal(7, 0, &[4000], &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&long[..a.len()], &a[..]);
    }

    #[test]
    fn same_result_any_thread_count() {
        let n = 3 * 4096 * 4 + 3; // several tasks and a ragged tail
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut v = vec![0f32; n];
                fill_normal(99, 5, &mut v);
                v
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(7));
        // And equal to the plain serial definition.
        for (k, &x) in one.iter().enumerate() {
            assert_eq!(x, normal_block(99, 5, (k / 4) as u64)[k % 4]);
        }
    }
}
