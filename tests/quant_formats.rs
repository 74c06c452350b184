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
    let conv = h
        .tensors
        .iter()
        .find(|t| t.name == "transformer_blocks.13.conv.weight")
        .unwrap();
    assert_eq!(
        conv.shape,
        [8, 4, 3, 3],
        "comfy.gguf.orig_shape reshapes the stored (9, 32)"
    );
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
    seen.dedup();
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

mod memory_support;

use lowvram::memory::ModelCache;
use lowvram::weights::{WeightSource, WeightStore};

/// Every tensor of every block of `src` (fetched in file order, each dequantised by `get`), as f32 bits.
fn fetch_all(src: &dyn WeightSource, store: &WeightStore) -> HashMap<String, Vec<u32>> {
    let mut out = HashMap::new();
    for b in store.blocks() {
        let w = src.fetch(&b.key).unwrap();
        for &ti in &b.tensors {
            let t = &store.tensors()[ti];
            let got = w.get(&t.rel_name).unwrap();
            assert_eq!(got.dims(), t.shape.as_slice(), "{}", t.name);
            assert_eq!(got.dtype(), src.dtype(), "{}: compute dtype", t.name);
            out.insert(t.name.clone(), bits(&got));
        }
        drop(w);
    }
    out
}

fn cache_config(device: &str, keep_ram_copy: bool, compute: &str) -> lowvram::config::Config {
    let mut c = memory_support::config(device, 64 << 10);
    c.set("keep_ram_copy_of_weights", if keep_ram_copy { "true" } else { "false" })
        .unwrap();
    c.set("compute_dtype", compute).unwrap();
    c
}

/// The store keeps GGUF quantised tensors in their stored form: a block's storage and device bytes are the file's
/// bytes, never the dequantised size; dense tensors (the F32 biases, the F32/F16/BF16 weights) convert as usual.
#[test]
fn a_gguf_store_counts_stored_bytes() {
    let path = fixture("types.gguf");
    let file = std::fs::read(&path).unwrap();
    let h = GgufHeader::parse(&file).unwrap();
    let store = WeightStore::open(&path, None, DType::F32).unwrap();
    assert!(lowvram::weights::gguf::is_gguf_file(&path));
    assert_eq!(store.gguf_architecture(), Some("flux"));
    assert_eq!(store.tensors().len(), h.tensors.len());
    let file_bytes: u64 = h.tensors.iter().map(|t| t.bytes.len() as u64).sum();
    assert_eq!(store.total_bytes(), file_bytes, "storage = the file's tensor bytes");
    for b in store.blocks() {
        let stored: u64 = b.tensors.iter().map(|&t| store.tensors()[t].storage_bytes()).sum();
        assert_eq!(b.storage_bytes, stored);
        let mut compute = 0u64;
        for &ti in &b.tensors {
            let t = &store.tensors()[ti];
            let g = h.tensors.iter().find(|g| g.name == t.name).unwrap();
            assert_eq!(t.storage_bytes(), g.bytes.len() as u64, "{}", t.name);
            compute += match g.kind {
                GgufKind::Stored(f) => {
                    assert_eq!(t.stored_format(), Some(f));
                    g.bytes.len() as u64
                }
                GgufKind::Dense(_) => (t.elem_count() * 4) as u64,
            };
        }
        assert_eq!(
            b.compute_bytes, compute,
            "{}: quantised tensors stay stored on the device",
            b.key
        );
    }
}

/// A quantised GGUF streamed on a tight `emulated:` device, with and without the RAM copy: bytes streamed per forward
/// = stored bytes − resident, and every fetched (dequantised) tensor is bit-identical to an unbudgeted run, which is
/// itself bit-identical to gguf-py's dequantisation.
#[test]
fn a_quantised_gguf_streams_its_stored_bytes_and_fetches_identical_tensors() {
    let path = fixture("types.gguf");
    let refs = refs("types_ref.safetensors");
    let store = WeightStore::open(&path, None, DType::F32).unwrap();
    let total = store.total_bytes();
    let max_block = store.blocks().iter().map(|b| b.storage_bytes).max().unwrap();

    let big = ModelCache::new(cache_config(
        &format!("emulated:{}", (64 << 10) + 4 * total),
        true,
        "fp32",
    ))
    .unwrap();
    let m = big.load_model(&path, "types").unwrap();
    let l = big.lock(&m, 0).unwrap();
    let reference = fetch_all(&l, &store);
    assert_eq!(l.bytes_streamed(), 0, "everything resident");
    for (name, v) in &reference {
        assert_eq!(v, &bits(&refs[name]), "{name}: unbudgeted fetch vs gguf-py");
    }
    drop((l, m, big));

    for keep_ram_copy in [true, false] {
        let budget = (64 << 10) + max_block + total / 5;
        let cache = ModelCache::new(cache_config(&format!("emulated:{budget}"), keep_ram_copy, "fp32")).unwrap();
        let m = cache.load_model(&path, "types").unwrap();
        let l = cache.lock(&m, 0).unwrap();
        let got = fetch_all(&l, &store);
        assert_eq!(got, reference, "streamed fetches (ram copy {keep_ram_copy})");
        let resident: u64 = m
            .resident_blocks()
            .iter()
            .map(|k| store.blocks()[store.block_index(k).unwrap()].storage_bytes)
            .sum();
        assert!(
            resident > 0 && resident < total,
            "a partial plan ({resident} of {total} resident)"
        );
        assert_eq!(
            l.bytes_streamed(),
            total - resident,
            "bytes streamed = stored bytes − resident"
        );
        assert_eq!(m.streamed_bytes_per_forward(), total - resident);
    }
}

/// In f16 and bf16 compute the fetched tensors are gguf-py's values rounded to nearest even.
#[test]
fn quantised_tensors_dequantise_into_the_compute_dtype() {
    let path = fixture("types.gguf");
    let refs = refs("types_ref.safetensors");
    for (dtype, name) in [(DType::F16, "fp16"), (DType::BF16, "bf16")] {
        let store = WeightStore::open(&path, None, dtype).unwrap();
        let cache = ModelCache::new(cache_config("emulated:1GiB", true, name)).unwrap();
        let m = cache.load_model(&path, "types").unwrap();
        let l = cache.lock(&m, 0).unwrap();
        for (n, v) in fetch_all(&l, &store) {
            assert_eq!(v, bits(&refs[&n].to_dtype(dtype).unwrap()), "{n} as {dtype:?}");
        }
    }
}

/// fp8 safetensors (E4M3 and E5M2) are held as bytes and dequantised on fetch, exactly as torch casts them.
#[test]
fn fp8_safetensors_are_held_as_bytes_and_fetched_exactly() {
    let path = fixture("fp8.safetensors");
    let refs = refs("fp8_ref.safetensors");
    let store = WeightStore::open(&path, None, DType::F32).unwrap();
    let weights: u64 = 2 * 256;
    let biases: u64 = 2 * 8 * 4;
    assert_eq!(store.total_bytes(), weights + biases, "one byte per fp8 weight");
    for keep_ram_copy in [true, false] {
        let cache = ModelCache::new(cache_config(
            &format!("emulated:{}", (64 << 10) + 300),
            keep_ram_copy,
            "fp32",
        ))
        .unwrap();
        let m = cache.load_model(&path, "fp8").unwrap();
        let l = cache.lock(&m, 0).unwrap();
        for (n, v) in fetch_all(&l, &store) {
            let want = bits(&refs[&n]);
            for (i, (a, b)) in v.iter().zip(&want).enumerate() {
                let nan = f32::from_bits(*a).is_nan() && f32::from_bits(*b).is_nan();
                assert!(a == b || nan, "{n}[{i}]");
            }
        }
        assert!(l.bytes_streamed() > 0, "the tight budget streams");
    }
}

/// Spans over a GGUF file (how llama.cpp-style T5 names and fused FLUX rows are mapped): a quantised tensor renamed,
/// and one made of row ranges of a quantised tensor concatenated in another order (rows of quantised blocks
/// concatenate as bytes), both fetched dequantised and equal to the reference rows.
#[test]
fn spans_over_a_gguf_rename_and_concatenate_quantised_rows() {
    use lowvram::weights::{FilePart, TensorSpan, WeightLayout};
    let path = fixture("types.gguf");
    let file = std::fs::read(&path).unwrap();
    let h = GgufHeader::parse(&file).unwrap();
    let refs = refs("types_ref.safetensors");
    let q4k = h.tensors.iter().find(|t| t.name.ends_with("q4_k.weight")).unwrap();
    let q40 = h.tensors.iter().find(|t| t.name.ends_with("q4_0.weight")).unwrap();
    let bias = h.tensors.iter().find(|t| t.name.ends_with("q4_0.bias")).unwrap();
    let row = q40.bytes.len() / q40.shape[0]; // 5 rows of 96 elements: 3 Q4_0 blocks each
    let swapped = vec![
        FilePart::of(q40.bytes.start + 3 * row..q40.bytes.end),
        FilePart::of(q40.bytes.start..q40.bytes.start + 3 * row),
    ];
    // GgufTensor's span helpers build the same spans.
    let mut by_helper = q40.rows_span("enc.1.swapped.weight", 3..5);
    by_helper.parts.extend(q40.rows_span("", 0..3).parts);
    by_helper.shape = q40.shape.clone();
    let span = |name: &str, dtype: DType, shape: &[usize], parts: Vec<FilePart>| TensorSpan {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        parts,
        transposed: false,
    };
    let spans = vec![
        span(
            "enc.0.ffn.weight",
            DType::U8,
            &q4k.shape,
            vec![FilePart::of(q4k.bytes.clone())],
        ),
        span("enc.1.swapped.weight", DType::U8, &q40.shape, swapped),
        span(
            "enc.1.swapped.bias",
            DType::F32,
            &bias.shape,
            vec![FilePart::of(bias.bytes.clone())],
        ),
    ];
    assert_eq!(spans[0], q4k.span("enc.0.ffn.weight"));
    assert_eq!(spans[1], by_helper);
    assert_eq!(spans[2], bias.span("enc.1.swapped.bias"));
    assert_eq!(GgufHeader::read_file(&path).unwrap().tensors.len(), h.tensors.len());
    fn rule(name: &str) -> &str {
        let end = name.match_indices('.').nth(1).map_or(name.len(), |(i, _)| i);
        &name[..end]
    }
    let layout = WeightLayout {
        view: "renamed".into(),
        rule,
        spans: Some(std::sync::Arc::new(spans)),
    };
    let store = WeightStore::open_with(&path, &layout, None, DType::F32).unwrap();
    assert_eq!(
        store.total_bytes(),
        (q4k.bytes.len() + q40.bytes.len() + bias.bytes.len()) as u64
    );
    let cache = ModelCache::new(cache_config("emulated:1GiB", false, "fp32")).unwrap();
    let m = cache.load_model_as(&path, "renamed", &layout).unwrap();
    let l = cache.lock(&m, 0).unwrap();
    let got = fetch_all(&l, &store);
    assert_eq!(got["enc.0.ffn.weight"], bits(&refs[&q4k.name]));
    let r = &refs[&q40.name];
    let want = Tensor::cat(&[r.narrow(0, 3, 2).unwrap(), r.narrow(0, 0, 3).unwrap()], 0).unwrap();
    assert_eq!(got["enc.1.swapped.weight"], bits(&want));
    assert_eq!(got["enc.1.swapped.bias"], bits(&refs[&bias.name]));

    // A span whose bytes do not hold whole blocks of its shape is a format error.
    let bad = vec![span(
        "x.y.weight",
        DType::U8,
        &[5, 95],
        vec![FilePart::of(q40.bytes.clone())],
    )];
    let layout = WeightLayout {
        view: "bad".into(),
        rule,
        spans: Some(std::sync::Arc::new(bad)),
    };
    assert!(WeightStore::open_with(&path, &layout, None, DType::F32).is_err());

    // Parts that cut quantised blocks are a format error even when the total size matches.
    let cut = vec![span(
        "x.y.weight",
        DType::U8,
        &q40.shape,
        vec![
            FilePart::of(q40.bytes.start + 1..q40.bytes.end),
            FilePart::of(q40.bytes.start..q40.bytes.start + 1),
        ],
    )];
    let layout = WeightLayout {
        view: "cut".into(),
        rule,
        spans: Some(std::sync::Arc::new(cut)),
    };
    let err = WeightStore::open_with(&path, &layout, None, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("whole 18-byte Q4_0 blocks"), "{err}");
}

#[test]
fn stores_refuse_unsupported_gguf_types_and_scaled_fp8_by_name() {
    let err = WeightStore::open(&fixture("unsupported.gguf"), None, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("unsupported.gguf") && err.contains("IQ4_XS") && err.contains("blocks.0.iq.weight"),
        "{err}"
    );

    let dir = memory_support::TempDir::new("scaled-fp8");
    let path = dir.path().join("scaled.safetensors");
    let w = [0x38u8; 64];
    let s = 0.5f32.to_le_bytes();
    let views = vec![
        (
            "blocks.0.w.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F8_E4M3, vec![8, 8], &w).unwrap(),
        ),
        (
            "blocks.0.w.scale_weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &s).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let err = WeightStore::open(&path, None, DType::F32).err().unwrap().to_string();
    assert!(err.contains("scale_weight") && err.contains("scaled fp8"), "{err}");
}

/// Truncated GGUF files (cut in the header and in the tensor data) opened as stores give format errors, never panics.
#[test]
fn truncated_gguf_files_give_format_errors_when_opened() {
    let file = std::fs::read(fixture("types.gguf")).unwrap();
    let data_end = GgufHeader::parse(&file)
        .unwrap()
        .tensors
        .iter()
        .map(|t| t.bytes.end)
        .max()
        .unwrap();
    let dir = memory_support::TempDir::new("gguf-cut");
    for (i, cut) in [0, 3, 4, 8, 23, 100, 1000, 2463, 2464, 5000, 80000, data_end - 1]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("cut{i}.gguf"));
        std::fs::write(&path, &file[..cut]).unwrap();
        match WeightStore::open(&path, None, DType::F32) {
            Err(lowvram::Error::Format(_)) => {}
            Err(e) => panic!("cut at {cut}: {e} is not a format error"),
            Ok(_) => panic!("cut at {cut} opened"),
        }
    }
}

/// The tiny FLUX.1-dev transformer from City96-style GGUF conversions (Q8_0, Q4_0 under Comfy's prefix, Q4_K with
/// F16 fallbacks), streamed in stored form on a tight `emulated:` device: bit-identical to the same forward over
/// the dequantised weights held dense and resident (the dequantise-then-f32 reference), with bytes streamed per
/// forward = stored bytes − resident. The quantisation error against diffusers' bf16 reference is printed.
#[test]
fn flux_from_gguf_streams_stored_bytes_and_matches_the_dequantised_forward() {
    use lowvram::models::flux::{block_of, FluxTransformer};
    use lowvram::weights::WeightLayout;
    use lowvram::ResidentWeights;
    let flux = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-flux/dev");
    let m = FluxTransformer::from_config_file(&flux.join("transformer/config.json")).unwrap();
    let f = candle_core::safetensors::load(flux.join("forward.safetensors"), &Device::Cpu).unwrap();
    let t = f["timestep"].to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
    let run = |w: &dyn WeightSource| {
        let out = m.forward(
            w,
            &f["latents"],
            t,
            &f["encoder_hidden_states"],
            &f["pooled_projections"],
            f.get("guidance"),
        );
        out.unwrap()
    };
    for q in ["Q8_0", "Q4_0", "Q4_K"] {
        let path = fixture(&format!("flux1-dev-tiny-{q}.gguf"));
        let file = std::fs::read(&path).unwrap();
        let h = GgufHeader::parse(&file).unwrap();
        let dense: HashMap<String, Tensor> = h
            .tensors
            .iter()
            .map(|t| {
                let bytes = &file[t.bytes.clone()];
                let v = match t.kind {
                    GgufKind::Dense(d) => Tensor::from_raw_buffer(bytes, d, &t.shape, &Device::Cpu).unwrap(),
                    GgufKind::Stored(f) => dequantize_slice(bytes, f, &t.shape, DType::F32).unwrap(),
                };
                (t.name.clone(), v)
            })
            .collect();
        let reference = run(&ResidentWeights::from_tensors_with(dense, block_of, &Device::Cpu, DType::F32).unwrap());

        let store = WeightStore::open_with(&path, &WeightLayout::whole(block_of), None, DType::F32).unwrap();
        let (total, max_unit) = (
            store.total_bytes(),
            store.blocks().iter().map(|b| b.storage_bytes).max().unwrap(),
        );
        let work: u64 = 1 << 20;
        let mut cfg = memory_support::config(&format!("emulated:{}", work + 2 * max_unit + total / 4), work);
        cfg.set("compute_dtype", "fp32").unwrap();
        let cache = ModelCache::new(cfg).unwrap();
        let mm = cache
            .load_model_as(&path, "transformer", &WeightLayout::whole(block_of))
            .unwrap();
        let lock = cache.lock(&mm, 0).unwrap();
        let (resident, n) = (mm.resident_blocks().len(), mm.blocks().len());
        assert!(
            resident > 0 && resident < n,
            "{q}: partial residency expected ({resident} of {n} units)"
        );
        let out = run(&lock);
        assert_eq!(
            bits(&out),
            bits(&reference),
            "{q}: streamed GGUF forward differs from the dequantised one"
        );
        let resident_stored: u64 = mm
            .blocks()
            .iter()
            .filter(|b| mm.resident_blocks().contains(&b.key))
            .map(|b| b.storage_bytes)
            .sum();
        assert_eq!(
            lock.bytes_streamed(),
            total - resident_stored,
            "{q}: streamed = stored − resident"
        );
        let err = (&out - &f["out"])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        println!(
            "{q}: {n} units, {resident} resident, {} B streamed of {total} B stored; max |out − bf16 reference| {}",
            lock.bytes_streamed(),
            err.to_scalar::<f32>().unwrap()
        );
    }
}

/// The tiny FLUX.1-dev transformer from fp8 single files (e4m3fn under Comfy's prefix through the BFL single-file
/// mapping's spans; e5m2 bare, whole file), streamed as stored bytes on a tight `emulated:` device: bit-identical to
/// the forward over the fp8 values held dense, with bytes streamed = stored bytes − resident (1 byte per weight).
#[test]
fn flux_from_fp8_single_files_streams_bytes_and_matches_the_dense_forward() {
    use lowvram::models::flux::{block_of, FluxTransformer};
    use lowvram::weights::single_file::flux::bfl_spans;
    use lowvram::weights::WeightLayout;
    use lowvram::ResidentWeights;
    let flux = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-flux/dev");
    let m = FluxTransformer::from_config_file(&flux.join("transformer/config.json")).unwrap();
    let f = candle_core::safetensors::load(flux.join("forward.safetensors"), &Device::Cpu).unwrap();
    let t = f["timestep"].to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
    let run = |w: &dyn WeightSource| {
        let out = m.forward(
            w,
            &f["latents"],
            t,
            &f["encoder_hidden_states"],
            &f["pooled_projections"],
            f.get("guidance"),
        );
        out.unwrap()
    };
    for (tag, format) in [("fp8_e4m3fn", StoredFormat::F8E4M3), ("fp8_e5m2", StoredFormat::F8E5M2)] {
        let path = fixture(&format!("flux1-dev-tiny-{tag}.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut dense = HashMap::new();
        for (name, v) in st.tensors() {
            let name = name.strip_prefix("model.diffusion_model.").unwrap_or(&name).to_string();
            let t = match v.dtype() {
                safetensors::Dtype::BF16 => {
                    Tensor::from_raw_buffer(v.data(), DType::BF16, v.shape(), &Device::Cpu).unwrap()
                }
                _ => dequantize_slice(v.data(), format, v.shape(), DType::F32).unwrap(),
            };
            dense.insert(name, t);
        }
        let reference = run(&ResidentWeights::from_tensors_with(dense, block_of, &Device::Cpu, DType::F32).unwrap());

        let layout = if tag == "fp8_e4m3fn" {
            WeightLayout {
                view: "transformer".into(),
                rule: block_of,
                spans: Some(std::sync::Arc::new(bfl_spans(&path).unwrap())),
            }
        } else {
            WeightLayout::whole(block_of)
        };
        let store = WeightStore::open_with(&path, &layout, None, DType::F32).unwrap();
        let fp8: Vec<_> = store.tensors().iter().filter(|t| t.stored_format().is_some()).collect();
        let two_d = st.tensors().iter().filter(|(_, v)| v.shape().len() == 2).count();
        assert_eq!(fp8.len(), two_d, "{tag}: every 2-D weight held as fp8 bytes");
        assert!(fp8
            .iter()
            .all(|t| t.stored_format() == Some(format) && t.storage_bytes() == t.elem_count() as u64));
        let (total, max_unit) = (
            store.total_bytes(),
            store.blocks().iter().map(|b| b.storage_bytes).max().unwrap(),
        );
        let work: u64 = 1 << 20;
        let mut cfg = memory_support::config(&format!("emulated:{}", work + 2 * max_unit + total / 4), work);
        cfg.set("compute_dtype", "fp32").unwrap();
        let cache = ModelCache::new(cfg).unwrap();
        let mm = cache.load_model_as(&path, "transformer", &layout).unwrap();
        let lock = cache.lock(&mm, 0).unwrap();
        let (resident, n) = (mm.resident_blocks().len(), mm.blocks().len());
        assert!(
            resident > 0 && resident < n,
            "{tag}: partial residency expected ({resident} of {n} units)"
        );
        assert_eq!(
            bits(&run(&lock)),
            bits(&reference),
            "{tag}: streamed fp8 forward differs from the dense one"
        );
        let resident_stored: u64 = mm
            .blocks()
            .iter()
            .filter(|b| mm.resident_blocks().contains(&b.key))
            .map(|b| b.storage_bytes)
            .sum();
        assert_eq!(
            lock.bytes_streamed(),
            total - resident_stored,
            "{tag}: streamed = stored − resident"
        );
    }
}
