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
        (DType::F16, DType::F32) => typed(src, dst, widen::<f16>),
        (DType::BF16, DType::F32) => typed(src, dst, widen::<bf16>),
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

/// The 16-bit floats [`widen`] reads: which one (for the AVX-512 path) and `half`'s SIMD conversion of a slice.
trait Narrow: Copy {
    const KIND: Widen;
    fn to_f32_slice(s: &[Self], d: &mut [f32]);
}

impl Narrow for half::f16 {
    const KIND: Widen = Widen::F16;
    fn to_f32_slice(s: &[Self], d: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(s, d)
    }
}

impl Narrow for half::bf16 {
    const KIND: Widen = Widen::Bf16;
    fn to_f32_slice(s: &[Self], d: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(s, d)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Widen {
    F16,
    Bf16,
}

/// `s` widened to f32 into `d`: streaming stores for large outputs on AVX-512 CPUs, `half`'s SIMD conversion
/// otherwise.
fn widen<T: Narrow>(s: &[T], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of_val(d) >= STREAM_STORE_MIN && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the lengths are asserted inside.
        return unsafe { x86::widen_streaming(s, d) };
    }
    T::to_f32_slice(s, d)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Narrow, Widen};

    /// 16-bit floats `s` widened to f32 into `d` with streaming stores, 16 at a time; the elements before the first
    /// 64-byte-aligned output and the tail by `half`'s conversion. Ends with a store fence, so the bytes are visible
    /// to whichever thread is handed `d` next.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_streaming<T: Narrow>(s: &[T], d: &mut [f32]) {
        assert_eq!(s.len(), d.len());
        assert_eq!(std::mem::size_of::<T>(), 2);
        let n = d.len();
        // The stores need 64-byte-aligned outputs; d is f32-aligned, so some element within 16 is.
        let head = ((64 - (d.as_ptr() as usize % 64)) % 64 / 4).min(n);
        T::to_f32_slice(&s[..head], &mut d[..head]);
        let (sp, dp) = (s.as_ptr() as *const u16, d.as_mut_ptr());
        let mut i = head;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(sp.add(i) as *const __m256i);
            let f = match T::KIND {
                Widen::F16 => _mm512_cvtph_ps(h),
                Widen::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)),
            };
            _mm512_stream_ps(dp.add(i), f);
            i += 16;
        }
        T::to_f32_slice(&s[i..], &mut d[i..]);
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
