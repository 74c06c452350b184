//! GGUF and fp8 weights: dequantisation bit-exact against gguf-py 0.19.0 / torch (fixtures written by
//! scripts/fixtures_gguf.py), GGUF headers parsed robustly (truncations and bit flips give errors, never panics),
//! unsupported types refused by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lowvram::ops::dequant::dequantize_slice;
use lowvram::weights::gguf::{GgufHeader, GgufKind};
use lowvram::weights::StoredFormat;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Bit-identical, with any NaN equal to any NaN (torch and Rust spell NaN's payload differently).
fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let (g, w) = (bits(got), bits(want));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let nan = f32::from_bits(*a).is_nan() && f32::from_bits(*b).is_nan();
        assert!(
            a == b || nan,
            "{name}[{i}]: {} != reference {}",
            f32::from_bits(*a),
            f32::from_bits(*b)
        );
    }
}

#[test]
fn every_gguf_type_dequantises_bit_exact_against_gguf_py() {
    let file = std::fs::read(fixture("types.gguf")).unwrap();
    let h = GgufHeader::parse(&file).unwrap();
    assert_eq!(h.architecture(), Some("flux"));
    let refs = refs("types_ref.safetensors");
    let mut seen = Vec::new();
    for t in &h.tensors {
        assert!(
            !t.name.starts_with("model.diffusion_model."),
            "{}: prefix stripped",
            t.name
        );
        let want = &refs[&t.name];
        let bytes = &file[t.bytes.clone()];
        let got = match t.kind {
            GgufKind::Dense(d) => Tensor::from_raw_buffer(bytes, d, &t.shape, &Device::Cpu).unwrap(),
            GgufKind::Stored(f) => {
                seen.push(f.name());
                dequantize_slice(bytes, f, &t.shape, DType::F32).unwrap()
            }
        };
        assert_same(&t.name, &got, want);
        if let GgufKind::Stored(f) = t.kind {
            // f16 / bf16 outputs are the f32 values rounded to nearest even.
            for dt in [DType::F16, DType::BF16] {
                let got = dequantize_slice(bytes, f, &t.shape, dt).unwrap();
                assert_eq!(got.dtype(), dt);
                assert_same(&format!("{} as {dt:?}", t.name), &got, &want.to_dtype(dt).unwrap());
            }
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
    );
    let dense: Vec<_> = h
        .tensors
        .iter()
        .filter_map(|t| match t.kind {
            GgufKind::Dense(d) if t.shape.len() == 2 => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(dense, [DType::F32, DType::F16, DType::BF16]);
}

#[test]
fn fp8_bytes_dequantise_exactly_to_torch_casts() {
    let st = std::fs::read(fixture("fp8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let refs = refs("fp8_ref.safetensors");
    for (name, format) in [
        ("transformer_blocks.0.e4m3.weight", StoredFormat::F8E4M3),
        ("transformer_blocks.1.e5m2.weight", StoredFormat::F8E5M2),
    ] {
        let v = st.tensor(name).unwrap();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let got = dequantize_slice(v.data(), format, v.shape(), dt).unwrap();
            assert_same(&format!("{name} as {dt:?}"), &got, &refs[name].to_dtype(dt).unwrap());
        }
    }
}

#[test]
fn dequantize_checks_its_input() {
    let f = StoredFormat::Quant(lowvram::weights::QuantType::Q4_0);
    assert!(
        dequantize_slice(&[0u8; 17], f, &[32], DType::F32).is_err(),
        "short bytes"
    );
    assert!(
        dequantize_slice(&[0u8; 18], f, &[31], DType::F32).is_err(),
        "not whole blocks"
    );
    assert!(
        dequantize_slice(&[0u8; 18], f, &[32], DType::U8).is_err(),
        "dense output dtype only"
    );
}

#[test]
fn unsupported_gguf_types_are_refused_by_name() {
    let file = std::fs::read(fixture("unsupported.gguf")).unwrap();
    let err = GgufHeader::parse(&file).unwrap_err().to_string();
    assert!(
        err.contains("blocks.0.iq.weight") && err.contains("IQ4_XS") && err.contains("Q4_K"),
        "{err}"
    );
}

/// Truncations at every header byte and many data bytes, and single bit flips all over the header: every one is an
/// error or a header whose tensors all lie inside the file — never a panic.
#[test]
fn corrupt_or_truncated_gguf_headers_give_errors_never_panics() {
    let file = std::fs::read(fixture("types.gguf")).unwrap();
    let h = GgufHeader::parse(&file).unwrap();
    let header_end = h.data_offset;
    let check = |bytes: &[u8]| {
        if let Ok(h) = GgufHeader::parse(bytes) {
            for t in &h.tensors {
                assert!(t.bytes.end <= bytes.len());
            }
        }
    };
    let data_end = h.tensors.iter().map(|t| t.bytes.end).max().unwrap();
    for cut in (0..header_end).chain((header_end..data_end).step_by(97)) {
        let r = GgufHeader::parse(&file[..cut]);
        assert!(r.is_err(), "truncated at {cut} of {data_end} data bytes parsed");
    }
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut flipped = file.clone();
    for i in 0..header_end * 8 {
        flipped[i / 8] ^= 1 << (i % 8);
        check(&flipped);
        flipped[i / 8] ^= 1 << (i % 8);
    }
    // Random multi-byte corruption of the header.
    for _ in 0..2000 {
        let mut f = file[..header_end].to_vec();
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state as usize) % f.len();
            f[at] = (state >> 32) as u8;
        }
        check(&f);
    }
}
