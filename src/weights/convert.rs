//! Dtype conversion of weight bytes: a resident block once when it is placed, a streamed block on every arrival.
//!
//! Arrival conversion runs on the copy thread beside the compute threads, so its cost is paid by them too. Whole
//! slices go through SIMD conversions (`half`'s, F16C on x86: the CPU feature checked once per slice, where a
//! feature-checked call per element made a streamed fp16 step's arrival cost about 1 s of a core per 1.4 GB). The
//! widening to f32, the common case (fp16 and bf16 files computed in f32), has an AVX-512 path whose large outputs
//! are written with streaming stores: they bypass the caches the compute threads' kernels work in, and skip reading
//! the destination first.

use candle_core::DType;

/// Outputs from this size on (bytes) are written around the caches (see the module doc).
const STREAM_STORE_MIN: usize = 1 << 20;

/// Convert `src` (elements of `from`) into `dst` (elements of `to`), little-endian, any alignment. Unaligned bytes
/// (a mapped file's tensor may start anywhere) pass through small aligned buffers first.
pub(super) fn convert_into(src: &[u8], from: DType, to: DType, dst: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    match (from, to) {
        (DType::F16, DType::F32) => typed(src, dst, widen_f16),
        (DType::BF16, DType::F32) => typed(src, dst, widen_bf16),
        (DType::F32, DType::F16) => typed(src, dst, |s: &[f32], d: &mut [f16]| d.convert_from_f32_slice(s)),
        (DType::F32, DType::BF16) => typed(src, dst, |s: &[f32], d: &mut [bf16]| d.convert_from_f32_slice(s)),
        (DType::F16, _) => typed(src, dst, |s: &[f16], d: &mut [bf16]| {
            for (x, y) in s.iter().zip(d) {
                *y = bf16::from_f32(x.to_f32());
            }
        }),
        _ => typed(src, dst, |s: &[bf16], d: &mut [f16]| {
            for (x, y) in s.iter().zip(d) {
                *y = f16::from_f32(x.to_f32());
            }
        }),
    }
}

/// [`convert_into`] split over the rayon pool for large blocks (a resident placement or a synchronous fetch).
pub(super) fn convert_par(src: &[u8], from: DType, to: DType, dst: &mut [u8], parallel: bool) {
    const CHUNK: usize = 1 << 18; // elements
    let n = src.len() / from.size_in_bytes();
    if !parallel || n < 4 * CHUNK || from == to {
        return convert_into(src, from, to, dst);
    }
    use rayon::prelude::*;
    src.par_chunks(CHUNK * from.size_in_bytes())
        .zip(dst.par_chunks_mut(CHUNK * to.size_in_bytes()))
        .for_each(|(s, d)| convert_into(s, from, to, d));
}

/// Run `f` over `src` and `dst` as typed slices: directly when both are aligned, else through aligned chunks.
fn typed<A: Copy + Default, B: Copy + Default>(src: &[u8], dst: &mut [u8], f: impl Fn(&[A], &mut [B])) {
    let (sa, sb) = (std::mem::size_of::<A>(), std::mem::size_of::<B>());
    let n = (src.len() / sa).min(dst.len() / sb);
    let (src, dst) = (&src[..n * sa], &mut dst[..n * sb]);
    if src.as_ptr() as usize % std::mem::align_of::<A>() == 0 && dst.as_ptr() as usize % std::mem::align_of::<B>() == 0 {
        // SAFETY: aligned, in bounds, and both are plain numbers valid for every bit pattern.
        let (s, d) = unsafe {
            (
                std::slice::from_raw_parts(src.as_ptr() as *const A, n),
                std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut B, n),
            )
        };
        return f(s, d);
    }
    const CHUNK: usize = 1024;
    let (mut a, mut b) = ([A::default(); CHUNK], [B::default(); CHUNK]);
    for (s, d) in src.chunks(CHUNK * sa).zip(dst.chunks_mut(CHUNK * sb)) {
        let k = s.len() / sa;
        // SAFETY: `a` and `b` are plain numbers; the byte views cover exactly their first k elements.
        let (ab, bb) = unsafe {
            (
                std::slice::from_raw_parts_mut(a.as_mut_ptr() as *mut u8, k * sa),
                std::slice::from_raw_parts(b.as_ptr() as *const u8, k * sb),
            )
        };
        ab.copy_from_slice(s);
        f(&a[..k], &mut b[..k]);
        d.copy_from_slice(&bb[..k * sb]);
    }
}

fn widen_f16(s: &[half::f16], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of_val(d) >= STREAM_STORE_MIN && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the slices have the same length (asserted inside).
        return unsafe { x86::widen_streaming(s, d, x86::Widen::F16) };
    }
    use half::slice::HalfFloatSliceExt;
    s.convert_to_f32_slice(d)
}

fn widen_bf16(s: &[half::bf16], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of_val(d) >= STREAM_STORE_MIN && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: as in `widen_f16`.
        return unsafe { x86::widen_streaming(s, d, x86::Widen::Bf16) };
    }
    use half::slice::HalfFloatSliceExt;
    s.convert_to_f32_slice(d)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[derive(Clone, Copy, PartialEq)]
    pub(super) enum Widen {
        F16,
        Bf16,
    }

    /// 16-bit floats (`s`, either kind, as raw u16 bits) widened to f32 into `d` with streaming stores, 16 at a
    /// time; the unaligned head and the tail element by element. Ends with a store fence, so the bytes are visible
    /// to whichever thread is handed `d` next.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_streaming<T: Copy>(s: &[T], d: &mut [f32], kind: Widen) {
        assert_eq!(s.len(), d.len());
        assert_eq!(std::mem::size_of::<T>(), 2);
        let n = d.len();
        let (sp, dp) = (s.as_ptr() as *const u16, d.as_mut_ptr());
        let one = |i: usize| -> f32 {
            let bits = *sp.add(i);
            match kind {
                Widen::F16 => half::f16::from_bits(bits).to_f32(),
                Widen::Bf16 => half::bf16::from_bits(bits).to_f32(),
            }
        };
        // Elements before the first 64-byte-aligned output (the stores need it); d is f32-aligned, so this ends.
        let head = ((64 - (dp as usize % 64)) % 64 / 4).min(n);
        for i in 0..head {
            *dp.add(i) = one(i);
        }
        let mut i = head;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(sp.add(i) as *const __m256i);
            let f = match kind {
                Widen::F16 => _mm512_cvtph_ps(h),
                Widen::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)),
            };
            _mm512_stream_ps(dp.add(i), f);
            i += 16;
        }
        for j in i..n {
            *dp.add(j) = one(j);
        }
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised conversions equal the element-by-element ones for every dtype pair, aligned or not, on
    /// lengths that are not a multiple of any SIMD width or chunk.
    #[test]
    fn convert_into_matches_per_element_conversion_at_any_alignment() {
        use half::{bf16, f16};
        // Past the streaming-store size too (1 MiB of f32), with an odd length.
        let n = (1 << 18) + 2 * 1024 + 7;
        let f32s: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37 - 300.0).sin() * 1e3 / (1.0 + i as f32 % 17.0)).collect();
        let bytes_of = |d: DType| -> Vec<u8> {
            match d {
                DType::F32 => f32s.iter().flat_map(|x| x.to_le_bytes()).collect(),
                DType::F16 => f32s.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
                _ => f32s.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            }
        };
        let one = |b: &[u8], from: DType, to: DType| -> Vec<u8> {
            let x = match from {
                DType::F32 => f32::from_le_bytes(b.try_into().unwrap()),
                DType::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
                _ => bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            };
            match to {
                DType::F32 => x.to_le_bytes().to_vec(),
                DType::F16 => f16::from_f32(x).to_le_bytes().to_vec(),
                _ => bf16::from_f32(x).to_le_bytes().to_vec(),
            }
        };
        for from in [DType::F32, DType::F16, DType::BF16] {
            for to in [DType::F32, DType::F16, DType::BF16] {
                let src = bytes_of(from);
                let want: Vec<u8> = src.chunks(from.size_in_bytes()).flat_map(|b| one(b, from, to)).collect();
                for (so, dof) in [(0, 0), (1, 0), (0, 1), (1, 3)] {
                    let mut s = vec![0u8; src.len() + so];
                    s[so..].copy_from_slice(&src);
                    let mut d = vec![0u8; want.len() + dof];
                    convert_into(&s[so..], from, to, &mut d[dof..]);
                    assert!(d[dof..] == want[..], "{from:?} -> {to:?}, offsets {so}/{dof}");
                }
            }
        }
    }

}
