//! CPU dequantisation of GGML blocks and fp8 bytes into f32, one block at a time.
//!
//! Every formula follows gguf-py 0.19.0's `gguf.quants` element order and its f32 arithmetic step by step (one
//! rounding per numpy operation: products and sums are never fused), so the output is bit-identical to
//! `gguf.quants.dequantize`. fp8 goes through 256-entry tables (exact: every fp8 value is an f32).

use half::f16;

use crate::weights::{QuantType, StoredFormat};

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantise one block `b` (`q.block_bytes()` bytes) into `out` (`q.block_elems()` values).
pub(crate) fn dequant_block(q: QuantType, b: &[u8], out: &mut [f32]) {
    match q {
        QuantType::Q4_0 => {
            let d = h(b, 0);
            let qs = &b[2..18];
            for i in 0..16 {
                out[i] = d * ((qs[i] & 0xF) as i32 - 8) as f32;
                out[i + 16] = d * ((qs[i] >> 4) as i32 - 8) as f32;
            }
        }
        QuantType::Q4_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qs = &b[4..20];
            for i in 0..16 {
                out[i] = d * (qs[i] & 0xF) as f32 + m;
                out[i + 16] = d * (qs[i] >> 4) as f32 + m;
            }
        }
        QuantType::Q5_0 => {
            let d = h(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for i in 0..16 {
                let lo = (qs[i] & 0xF) as u32 | ((qh >> i) & 1) << 4;
                let hi = (qs[i] >> 4) as u32 | ((qh >> (i + 16)) & 1) << 4;
                out[i] = d * (lo as i32 - 16) as f32;
                out[i + 16] = d * (hi as i32 - 16) as f32;
            }
        }
        QuantType::Q5_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for i in 0..16 {
                let lo = (qs[i] & 0xF) as u32 | ((qh >> i) & 1) << 4;
                let hi = (qs[i] >> 4) as u32 | ((qh >> (i + 16)) & 1) << 4;
                out[i] = d * lo as f32 + m;
                out[i + 16] = d * hi as f32 + m;
            }
        }
        QuantType::Q8_0 => {
            let d = h(b, 0);
            for i in 0..32 {
                out[i] = (b[2 + i] as i8) as f32 * d;
            }
        }
        QuantType::Q2_K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (h(b, 80), h(b, 82));
            for j in 0..2 {
                for s in 0..4 {
                    for l in 0..32 {
                        let e = j * 128 + s * 32 + l;
                        let sc = scales[e / 16];
                        let dl = d * (sc & 0xF) as f32;
                        let ml = dmin * (sc >> 4) as f32;
                        let q = (qs[j * 32 + l] >> (2 * s)) & 3;
                        out[e] = dl * q as f32 - ml;
                    }
                }
            }
        }
        QuantType::Q3_K => {
            let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = h(b, 108);
            let mut scale = [0f32; 16];
            for (i, s) in scale.iter_mut().enumerate() {
                let lo = (sc[i % 8] >> (4 * (i / 8))) & 0xF;
                let hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
                *s = d * ((lo | hi << 4) as i32 - 32) as f32;
            }
            for j in 0..2 {
                for s in 0..4 {
                    for l in 0..32 {
                        let e = j * 128 + s * 32 + l;
                        let ql = ((qs[j * 32 + l] >> (2 * s)) & 3) as i32;
                        let k = e / 32;
                        let qh = (((hmask[l] >> k) & 1) ^ 1) as i32;
                        out[e] = scale[e / 16] * (ql - (qh << 2)) as f32;
                    }
                }
            }
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let (sc, m) = scale_min_k4(&b[4..16]);
            let (qh, qs) = if q == QuantType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..4 {
                for s in 0..2 {
                    let sb = 2 * j + s;
                    let dl = d * sc[sb] as f32;
                    let ml = dmin * m[sb] as f32;
                    for l in 0..32 {
                        let mut v = (qs[j * 32 + l] >> (4 * s)) & 0xF;
                        if let Some(qh) = qh {
                            v |= ((qh[l] >> sb) & 1) << 4;
                        }
                        out[sb * 32 + l] = dl * v as f32 - ml;
                    }
                }
            }
        }
        QuantType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for j in 0..2 {
                for s in 0..4 {
                    for l in 0..32 {
                        let e = j * 128 + s * 32 + l;
                        // ql: element j·128 + s'·64 + l' holds nibble s' of byte j·64 + l'.
                        let lo = (ql[j * 64 + (s % 2) * 32 + l] >> (4 * (s / 2))) & 0xF;
                        let hi = (qh[j * 32 + l] >> (2 * s)) & 3;
                        let v = (lo | hi << 4) as i32 - 32;
                        out[e] = d * (sc[e / 16] as i8) as f32 * v as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scales and mins of a Q4_K/Q5_K block (12 packed bytes).
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for i in 0..4 {
        sc[i] = s[i] & 0x3F;
        m[i] = s[4 + i] & 0x3F;
        sc[4 + i] = (s[8 + i] & 0x0F) | ((s[i] >> 2) & 0x30);
        m[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
    }
    (sc, m)
}

/// The f32 value of an fp8 e4m3fn byte (bias 7, no infinities, S.1111.111 = NaN).
pub(crate) const fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 0xF && b & 7 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m * pow2(-9)
    } else {
        (1.0 + m / 8.0) * pow2(e - 7)
    };
    sign * mag
}

/// The f32 value of an fp8 e5m2 byte (bias 15, IEEE-style: exponent 31 = inf/NaN).
pub(crate) const fn f8_e5m2_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 2) & 0x1F) as i32;
    let m = (b & 3) as f32;
    if e == 0x1F {
        return if b & 3 == 0 { sign * f32::INFINITY } else { f32::NAN };
    }
    let mag = if e == 0 {
        m * pow2(-16)
    } else {
        (1.0 + m / 4.0) * pow2(e - 15)
    };
    sign * mag
}

const fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

const fn table(e5m2: bool) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if e5m2 {
            f8_e5m2_to_f32(i as u8)
        } else {
            f8_e4m3_to_f32(i as u8)
        };
        i += 1;
    }
    t
}

/// fp8 → f32 tables, indexed by the byte.
pub(crate) static F8_E4M3: [f32; 256] = table(false);
pub(crate) static F8_E5M2: [f32; 256] = table(true);

/// An output element: f32, f16 or bf16 (rounded to nearest even from the f32 value).
pub(crate) trait OutElem: Copy + Send + Sync + Default {
    fn from_f32(v: f32) -> Self;
}
impl OutElem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl OutElem for half::f16 {
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
impl OutElem for half::bf16 {
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// Dequantise `bytes` (whole blocks of `format`) into `out` (`blocks × block_elems` values), in parallel over groups
/// of rows of blocks for large tensors. The caller checks the lengths.
pub(crate) fn dequantize_into<T: OutElem>(bytes: &[u8], format: StoredFormat, out: &mut [T]) {
    use rayon::prelude::*;
    let (be, bb) = (format.block_elems(), format.block_bytes());
    debug_assert_eq!(bytes.len() / bb * be, out.len());
    // ~64 Ki elements per task: small enough to spread a layer over the pool, big enough to amortise the task.
    let blocks_per_task = (1 << 16) / be;
    let run = |src: &[u8], dst: &mut [T]| match format {
        StoredFormat::F8E4M3 => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &b)| *d = T::from_f32(F8_E4M3[b as usize])),
        StoredFormat::F8E5M2 => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &b)| *d = T::from_f32(F8_E5M2[b as usize])),
        StoredFormat::Quant(q) => {
            let mut tmp = [0f32; 256];
            for (s, d) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
                dequant_block(q, s, &mut tmp[..be]);
                d.iter_mut().zip(&tmp[..be]).for_each(|(d, &v)| *d = T::from_f32(v));
            }
        }
    };
    if out.len() <= blocks_per_task * be {
        return run(bytes, out);
    }
    bytes
        .par_chunks(blocks_per_task * bb)
        .zip(out.par_chunks_mut(blocks_per_task * be))
        .for_each(|(s, d)| run(s, d));
}
