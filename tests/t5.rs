//! The T5 encoder and its tokenizer against transformers 5.23.0 (issue 16, item 2): token ids identical at the
//! folder's length (48) and a caller's (20); `last_hidden_state` within 1e-4 of its scale, without a mask (FLUX's
//! use) and with one; transformers' relative-position buckets for the tiny and the real settings; streamed under the
//! memory manager on a tight `emulated:` device bit-identical to the resident run; a folder without `tokenizer.json`
//! named in the error. Fixtures: scripts/fixtures_t5.py.

mod memory_support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use lowvram::memory::ModelCache;
use lowvram::models::t5::{block_of, relative_position_bucket, T5Encoder};
use lowvram::models::text_encoder::{HiddenLayer, PromptTokenizer, TextEncoder};
use lowvram::ops::OpTarget;
use lowvram::text::T5Tokenizer;
use lowvram::weights::WeightLayout;
use lowvram::{BlockWeights, ResidentWeights, WeightSource};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5")
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn prompts() -> Vec<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("prompts.json")).unwrap()).unwrap();
    v["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

fn tokenizer() -> T5Tokenizer {
    T5Tokenizer::from_dir(&fixtures().join("tokenizer_2"), 512).unwrap()
}

/// The prompts' ids `[B, n]` (u32) from the folder's tokenizer at length `n`.
fn prompt_ids(n: usize) -> Tensor {
    let tok = tokenizer().with_max_length(n).unwrap();
    let ps = prompts();
    let ids: Vec<u32> = ps.iter().flat_map(|p| tok.encode(p).unwrap()).collect();
    Tensor::from_vec(ids, (ps.len(), n), &Device::Cpu).unwrap()
}

fn encoder_dir() -> PathBuf {
    fixtures().join("text_encoder_2")
}

fn resident(dtype: DType) -> ResidentWeights {
    let file = T5Encoder::weights_file(&encoder_dir()).unwrap();
    ResidentWeights::load_with(&file, lowvram::models::t5::block_of, &Device::Cpu, dtype).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    flat(t).into_iter().map(f32::to_bits).collect()
}

/// max |a − b| / max |ref|.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (flat(got), flat(want));
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = rel_err(got, want);
    println!("{name:<40} max |diff| / max |ref| = {e:.2e}");
    assert!(e <= tol, "{name}: relative error {e}");
}

#[test]
fn tokenizer_ids_match_transformers_at_both_lengths() {
    let r = refs();
    let ps = prompts();
    let tok = tokenizer();
    assert_eq!(tok.max_length(), 48, "the folder's model_max_length wins over the caller's default");
    assert_eq!((tok.pad_id(), tok.eos_id()), (0, 1));
    for (n, tok) in [(48, tok), (20, tokenizer().with_max_length(20).unwrap())] {
        let (want_ids, want_mask) = (rows_u32(&r[&format!("ids_{n}")]), rows_u32(&r[&format!("mask_{n}")]));
        let mut truncated = 0;
        for (i, p) in ps.iter().enumerate() {
            let got = tok.encode_full(p).unwrap();
            assert_eq!(got.ids, want_ids[i], "length {n}: ids of {p:?}");
            assert_eq!(got.attention_mask, want_mask[i], "length {n}: mask of {p:?}");
            assert_eq!(tok.tokenize(p).unwrap(), got.ids);
            truncated += usize::from(got.attention_mask[n - 1] == 1);
        }
        assert!(truncated >= 2, "length {n}: the prompts include truncated ones ({truncated})");
    }
    // The empty prompt is `</s>` and pads.
    assert_eq!(&tokenizer().encode("").unwrap()[..3], &[1, 0, 0]);
}

/// A T5 GGUF file carries its SentencePiece vocabulary (`tokenizer.ggml.*`): the tokenizer built from those lists
/// (here the fixture's pieces, scores and NFKC charsmap, typed and padded to the embedding rows as llama.cpp writes
/// them) gives transformers' ids.
#[test]
fn tokenizer_from_a_gguf_vocabulary_matches_transformers() {
    use lowvram::text::{T5TokenType, T5Vocab};
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_2/tokenizer.json")).unwrap()).unwrap();
    let mut v = T5Vocab { unk_id: 2, pad_id: 0, eos_id: 1, ..Default::default() };
    for entry in json["model"]["vocab"].as_array().unwrap() {
        let piece = entry[0].as_str().unwrap().to_string();
        v.types.push(match piece.as_str() {
            "<unk>" => T5TokenType::Unknown,
            "<pad>" | "</s>" => T5TokenType::Control,
            p if p.starts_with("<extra_id_") => T5TokenType::Control,
            _ => T5TokenType::Normal,
        });
        v.scores.push(entry[1].as_f64().unwrap() as f32);
        v.tokens.push(piece);
    }
    assert_eq!(v.tokens.len(), 484);
    while v.tokens.len() < 512 {
        v.tokens.push(format!("[PAD{}]", v.tokens.len()));
        v.scores.push(-1000.0);
        v.types.push(T5TokenType::Unused);
    }
    v.precompiled_charsmap = Some(base64(json["normalizer"]["precompiled_charsmap"].as_str().unwrap()));
    let r = refs();
    for n in [48, 20] {
        let tok = T5Tokenizer::from_vocab(&v, n).unwrap();
        let want = rows_u32(&r[&format!("ids_{n}")]);
        for (i, p) in prompts().iter().enumerate() {
            assert_eq!(tok.encode(p).unwrap(), want[i], "length {n}: {p:?}");
        }
    }
    // Unused pieces are never produced, even from their literal text.
    let tok = T5Tokenizer::from_vocab(&v, 48).unwrap();
    assert!(tok.encode("[PAD500] x [PAD484]").unwrap().iter().all(|&id| id < 484));
    // Inconsistent lists and ids are format errors.
    let mut bad = v.clone();
    bad.scores.pop();
    assert!(matches!(T5Tokenizer::from_vocab(&bad, 48), Err(lowvram::Error::Format(_))));
    let mut bad = v.clone();
    bad.eos_id = 512;
    assert!(matches!(T5Tokenizer::from_vocab(&bad, 48), Err(lowvram::Error::Format(_))));
    let mut bad = v.clone();
    bad.precompiled_charsmap = Some(vec![1, 2, 3]);
    assert!(matches!(T5Tokenizer::from_vocab(&bad, 48), Err(lowvram::Error::Format(_))));
}

/// Standard base64 (the charsmap as tokenizer.json stores it).
fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        out.extend(&acc.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A folder that states no usable `model_max_length` (absent, or transformers' 1e30 "no limit") takes the caller's
/// default; without tokenizer_config.json the special tokens take T5's defaults.
#[test]
fn tokenizer_length_falls_back_to_the_callers_default() {
    let r = refs();
    let want = rows_u32(&r["ids_20"]);
    let dir = memory_support::TempDir::new("t5-tok-default");
    std::fs::copy(fixtures().join("tokenizer_2/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_2/tokenizer_config.json")).unwrap())
            .unwrap();
    for stated in [None, Some(Value::from(1e30)), Some(Value::from(0)), Some(Value::from("48"))] {
        let mut c = config.as_object().unwrap().clone();
        match &stated {
            None => c.remove("model_max_length"),
            Some(v) => c.insert("model_max_length".into(), v.clone()),
        };
        std::fs::write(dir.path().join("tokenizer_config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        let tok = T5Tokenizer::from_dir(dir.path(), 20).unwrap();
        assert_eq!(tok.max_length(), 20, "{stated:?}");
        for (i, p) in prompts().iter().enumerate() {
            assert_eq!(tok.encode(p).unwrap(), want[i], "{stated:?}: {p:?}");
        }
    }
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let tok = T5Tokenizer::from_dir(dir.path(), 20).unwrap();
    assert_eq!(tok.encode(&prompts()[1]).unwrap(), want[1]);
    for bad in [0, 100_000] {
        assert!(matches!(T5Tokenizer::from_dir(dir.path(), bad), Err(lowvram::Error::InvalidArgument(_))));
    }
    let huge = "a ".repeat(1 << 20);
    assert!(matches!(tok.encode(&huge), Err(lowvram::Error::InvalidArgument(_))));
}

/// A tokenizer folder without `tokenizer.json` (e.g. only `spiece.model`, as google/t5-v1_1-xxl ships): the error
/// names the file, directly and when a T5 encoder folder is loaded through the API with that folder beside it.
#[test]
fn missing_tokenizer_json_is_named() {
    let dir = memory_support::TempDir::new("t5-no-tokenizer");
    let tok_dir = dir.path().join("tokenizer_2");
    std::fs::create_dir_all(&tok_dir).unwrap();
    std::fs::copy(fixtures().join("tokenizer_2/tokenizer_config.json"), tok_dir.join("tokenizer_config.json")).unwrap();
    std::fs::write(tok_dir.join("spiece.model"), b"not read").unwrap();
    let err = T5Tokenizer::from_dir(&tok_dir, 512).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("tokenizer_2"), "{err}");

    let enc_dir = dir.path().join("text_encoder_2");
    std::fs::create_dir_all(&enc_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(encoder_dir().join(f), enc_dir.join(f)).unwrap();
    }
    let ctx =
        lowvram::api::Context::new(lowvram::api::ContextOptions { device: Some("cpu".into()), ..Default::default() })
            .unwrap();
    let err = ctx.load_model(&enc_dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    // Malformed files are named too.
    std::fs::write(tok_dir.join("tokenizer.json"), "{not json").unwrap();
    let err = T5Tokenizer::from_dir(&tok_dir, 512).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// `T5Attention._relative_position_bucket` (bidirectional) of every relative position in −1000..=1000, for the
/// fixture's setting (32 buckets, max distance 20), T5-XXL's (32, 128) and two others.
#[test]
fn relative_position_buckets_match_transformers() {
    let r = refs();
    for (nb, md) in [(32, 20), (32, 128), (16, 50), (64, 256)] {
        let want = r[&format!("buckets_{nb}_{md}")].to_vec1::<i64>().unwrap();
        let got: Vec<i64> = (-1000..=1000).map(|rel| relative_position_bucket(rel, nb, md) as i64).collect();
        assert_eq!(got, want, "{nb} buckets, max distance {md}");
    }
}

#[test]
fn encoder_matches_transformers() {
    let r = refs();
    let enc = T5Encoder::load_config(&encoder_dir()).unwrap();
    let w = resident(DType::F32);
    for n in [48, 20] {
        let ids = prompt_ids(n);
        assert_eq!(rows_u32(&ids), rows_u32(&r[&format!("ids_{n}")]), "length {n}: ids");
        let out = enc.encode(&w, &ids).unwrap();
        // i64 ids (as transformers passes them) give the same bits.
        assert_eq!(bits(&out), bits(&enc.encode(&w, &r[&format!("ids_{n}")]).unwrap()));
        assert_close(&format!("last_hidden_state, length {n}"), &out, &r[&format!("hidden_{n}")], 1e-4);
        let mask: Vec<u32> = rows_u32(&r[&format!("mask_{n}")]).concat();
        let masked = enc.encode_masked(&w, &ids, &mask).unwrap();
        assert_close(
            &format!("masked last_hidden_state, length {n}"),
            &masked,
            &r[&format!("hidden_masked_{n}")],
            1e-4,
        );
        // Without the mask the pads change the states: the unmasked reference is not the masked one.
        assert!(rel_err(&out, &r[&format!("hidden_masked_{n}")]) > 1e-2);
    }
    // Through the trait.
    let te: &dyn TextEncoder = &enc;
    let ids = prompt_ids(48);
    let e = te.encode(&w, &ids, HiddenLayer::Last).unwrap();
    assert!(e.pooled.is_none());
    assert_eq!(bits(&e.hidden), bits(&enc.encode(&w, &ids).unwrap()));
    assert_eq!(te.hidden_size(), 32);
    assert_eq!(te.name(), "T5EncoderModel");
    assert!(matches!(te.encode(&w, &ids, HiddenLayer::Skip(1)), Err(lowvram::Error::InvalidArgument(_))));
}

/// T5 v1.0's feed-forward (`relu`, one `wi`) against transformers.
#[test]
fn v1_0_relu_encoder_matches_transformers() {
    let r = refs();
    let dir = fixtures().join("text_encoder_v1_0");
    let enc = T5Encoder::load_config(&dir).unwrap();
    assert_eq!((enc.config().gated, enc.config().activation), (false, lowvram::models::t5::FfActivation::Relu));
    let file = T5Encoder::weights_file(&dir).unwrap();
    let w = ResidentWeights::load_with(&file, block_of, &Device::Cpu, DType::F32).unwrap();
    let out = enc.encode(&w, &prompt_ids(20)).unwrap();
    assert_close("v1.0 last_hidden_state, length 20", &out, &r["hidden_v1_0_20"], 1e-4);
    let mut expected = enc.expected_tensors();
    let mut actual: Vec<(String, Vec<usize>)> = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    expected.sort();
    actual.sort();
    assert_eq!(expected, actual);
}

/// A [`WeightSource`] that logs every fetch.
struct Logging {
    inner: ResidentWeights,
    log: Mutex<Vec<String>>,
}

impl WeightSource for Logging {
    fn fetch(&self, block: &str) -> lowvram::Result<BlockWeights> {
        self.log.lock().unwrap().push(block.to_string());
        self.inner.fetch(block)
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
}

/// Every block is fetched once, in order; the expected tensors are exactly the checkpoint's; a missing or
/// misshapen tensor is a format error naming it; bad ids and masks are invalid arguments.
#[test]
fn encoder_fetches_each_block_once_and_names_bad_tensors() {
    let enc = T5Encoder::load_config(&encoder_dir()).unwrap();
    let file = T5Encoder::weights_file(&encoder_dir()).unwrap();
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let mut expected = enc.expected_tensors();
    let mut actual: Vec<(String, Vec<usize>)> = tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    expected.sort();
    actual.sort();
    assert_eq!(expected, actual);
    let w = Logging { inner: resident(DType::F32), log: Mutex::new(vec![]) };
    let ids = prompt_ids(20);
    enc.encode(&w, &ids).unwrap();
    assert_eq!(*w.log.lock().unwrap(), enc.block_keys());
    assert_eq!(enc.block_keys().len(), 4);

    for victim in [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi_1.weight",
        "shared.weight",
    ] {
        let mut missing = tensors.clone();
        missing.remove(victim);
        let r = ResidentWeights::from_tensors_with(missing, block_of, &Device::Cpu, DType::F32).unwrap();
        let err = enc.encode(&r, &ids).unwrap_err().to_string();
        assert!(err.contains(victim), "{err}");
        let mut bad = tensors.clone();
        let n = bad[victim].elem_count();
        bad.insert(victim.to_string(), Tensor::zeros(n + 1, DType::F32, &Device::Cpu).unwrap());
        let r = ResidentWeights::from_tensors_with(bad, block_of, &Device::Cpu, DType::F32).unwrap();
        let err = enc.encode(&r, &ids).unwrap_err().to_string();
        assert!(err.contains(victim) && err.contains("shape"), "{err}");
    }
    let w = resident(DType::F32);
    for ids in [
        Tensor::new(&[[3u32, 512]], &Device::Cpu).unwrap(),
        Tensor::zeros(7, DType::U32, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 4097), DType::U32, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap(),
        Tensor::new(&[[-1i64]], &Device::Cpu).unwrap(),
    ] {
        assert!(matches!(enc.encode(&w, &ids), Err(lowvram::Error::InvalidArgument(_))), "{ids:?}");
    }
    let ids = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
    for mask in [vec![1u32; 5], vec![1, 1, 1, 0, 0, 0], vec![1, 2, 1, 1, 1, 1]] {
        assert!(matches!(enc.encode_masked(&w, &ids, &mask), Err(lowvram::Error::InvalidArgument(_))), "{mask:?}");
    }
}

/// The encoder in a `memory::ModelCache` with T5's block rule on an `emulated:` device that holds only the working
/// memory and the largest block: every block streams, the output is bit-identical to the resident run, bytes
/// streamed = the storage bytes of the blocks, nothing is refused, the peak stays within the capacity. Then a
/// capacity one byte short of the whole model: part resident, the rest streamed, same bits.
#[test]
fn streamed_encoder_is_bit_identical_to_resident() {
    let enc = T5Encoder::load_config(&encoder_dir()).unwrap();
    let file = T5Encoder::weights_file(&encoder_dir()).unwrap();
    let ids = prompt_ids(48);
    let want = bits(&enc.encode(&resident(DType::F32), &ids).unwrap());
    let layout = WeightLayout::whole(lowvram::models::t5::block_of);
    let probe = ModelCache::new(memory_support::config("emulated:1GiB", 1 << 20)).unwrap();
    let m = probe.load_model_as(&file, "probe", &layout).unwrap();
    let keys: Vec<String> = m.blocks().iter().map(|b| b.key.clone()).collect();
    let mut sorted_keys = keys.clone();
    sorted_keys.sort();
    let mut want_keys = enc.block_keys();
    want_keys.sort();
    assert_eq!(sorted_keys, want_keys, "one unit per T5 block");
    let table = m.blocks().iter().find(|b| b.key == "shared").unwrap().compute_bytes;
    let layer =
        m.blocks().iter().filter(|b| b.key.starts_with("encoder.block.")).map(|b| b.compute_bytes).max().unwrap();
    let total: u64 = m.blocks().iter().map(|b| b.compute_bytes).sum();
    let target = OpTarget::new(probe.device(), probe.compute_dtype());
    drop((m, probe));
    let work = enc.working_bytes(ids.dim(0).unwrap(), 48, target);
    for partial in [false, true] {
        let cap = if partial { work + total - 1 } else { work + table.max(layer) };
        let cache = ModelCache::new(memory_support::config(&format!("emulated:{cap}"), 0)).unwrap();
        for round in 0..2 {
            let m = cache.load_model_as(&file, "text_encoder_2", &layout).unwrap();
            let lock = cache.lock(&m, work).unwrap();
            let resident = m.resident_bytes();
            assert!(resident < m.device_bytes(), "the budget must force streaming");
            if partial {
                assert!(resident > 0, "a capacity just short of the model keeps part of it");
            } else {
                assert_eq!(resident, 0, "at the smallest capacity every block streams");
            }
            let expect_streamed = m.streamed_bytes_per_forward();
            let out = enc.encode(&lock, &ids).unwrap();
            assert_eq!(bits(&out), want, "capacity {cap}, round {round}: differs from the resident run");
            assert_eq!(lock.bytes_streamed(), expect_streamed, "streamed = storage bytes not resident");
            assert!(expect_streamed > 0);
            assert_eq!(cache.allocator().refused(), 0, "runs that fit refuse nothing");
            assert!(cache.allocator().peak() <= cap);
            println!(
                "capacity {cap} B round {round}: resident {resident} B, streamed {} B, peak {} B",
                lock.bytes_streamed(),
                cache.allocator().peak()
            );
        }
    }
}

/// Through the public API: `Context::load_model` on the `text_encoder_2/` folder (the `T5EncoderModel` arm) finds
/// `tokenizer_2/` beside it, and `Context::encode_text` gives transformers' states at the folder's length, on the
/// CPU and on an emulated device that streams.
#[test]
fn context_encodes_prompts_like_transformers() {
    use lowvram::api::{Context, ContextOptions};
    let r = refs();
    for (device, yaml) in [("cpu", ""), ("emulated:2MB", "device_working_mem_gb: 0\n")] {
        let ctx = Context::new(ContextOptions {
            device: Some(device.into()),
            config_yaml: Some(yaml.into()),
            ..Default::default()
        })
        .unwrap();
        let model = ctx.load_model(&encoder_dir()).unwrap();
        for (i, p) in prompts().iter().enumerate() {
            let out = ctx.encode_text(&model, p, HiddenLayer::Last).unwrap();
            assert!(out.pooled.is_none());
            let want = r["hidden_48"].narrow(0, i, 1).unwrap();
            assert_close(&format!("{device} prompt {i}"), &out.hidden, &want, 1e-4);
        }
    }
}

/// FLUX ships `text_encoder_2/` sharded (`model-0000N-of-00002.safetensors` + `model.safetensors.index.json`): the
/// same weights split over two shards load through the API, stream, and give the same bits as the single file.
#[test]
fn sharded_folder_gives_the_same_states() {
    use lowvram::api::{Context, ContextOptions};
    let dir = memory_support::TempDir::new("t5-sharded");
    let (enc_dir, tok_dir) = (dir.path().join("text_encoder_2"), dir.path().join("tokenizer_2"));
    std::fs::create_dir_all(&enc_dir).unwrap();
    std::fs::create_dir_all(&tok_dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer_2").join(f), tok_dir.join(f)).unwrap();
    }
    std::fs::copy(encoder_dir().join("config.json"), enc_dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(encoder_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut first, mut second, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (name, t) in tensors {
        // The token table and block 0 in the first shard, the rest in the second.
        let shard = if name == "shared.weight" || name.starts_with("encoder.block.0.") { 1 } else { 2 };
        let file = format!("model-0000{shard}-of-00002.safetensors");
        map.insert(name.clone(), Value::from(file));
        if shard == 1 {
            first.insert(name, t)
        } else {
            second.insert(name, t)
        };
    }
    candle_core::safetensors::save(&first, enc_dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&second, enc_dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(enc_dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let prompt = &prompts()[2];
    for (device, yaml) in [("cpu", ""), ("emulated:2MB", "device_working_mem_gb: 0\n")] {
        let ctx = Context::new(ContextOptions {
            device: Some(device.into()),
            config_yaml: Some(yaml.into()),
            ..Default::default()
        })
        .unwrap();
        let single = ctx.load_model(&encoder_dir()).unwrap();
        let sharded = ctx.load_model(&enc_dir).unwrap();
        let a = ctx.encode_text(&single, prompt, HiddenLayer::Last).unwrap();
        let b = ctx.encode_text(&sharded, prompt, HiddenLayer::Last).unwrap();
        assert_eq!(bits(&a.hidden), bits(&b.hidden), "{device}");
    }
}

/// bf16 compute stays close to f32; an f16 compute dtype runs T5 in f32 (weights rounded to f16 only).
#[test]
fn half_precision_compute() {
    let enc = T5Encoder::load_config(&encoder_dir()).unwrap();
    let ids = prompt_ids(48);
    let f32_out = enc.encode(&resident(DType::F32), &ids).unwrap();
    let bf = enc.encode(&resident(DType::BF16), &ids).unwrap();
    assert_eq!(bf.dtype(), DType::BF16);
    let e = rel_err(&bf, &f32_out);
    println!("bf16 vs f32: {e:.2e}");
    assert!(e < 3e-2, "{e}");
    let h = enc.encode(&resident(DType::F16), &ids).unwrap();
    assert_eq!(h.dtype(), DType::F32, "f16 compute runs T5 in f32");
    let e = rel_err(&h, &f32_out);
    println!("f16 weights, f32 compute vs f32: {e:.2e}");
    assert!(e < 5e-3, "{e}");
}

/// `--text-encoder-2 FILE`: a T5 stored alone in a file — a llama.cpp-style GGUF carrying its vocabulary
/// (scripts/fixtures_t5_gguf.py: the same F32 weights under `enc.blk.N.*` names), or a safetensors file in
/// transformers' names with its tokenizer in a `NAME/` folder beside it — loads through `Context::load_t5_file` with
/// its config read from the shapes, and encodes every prompt bit-identically to the folder, resident and streamed.
/// A safetensors file without a tokenizer names what to pass.
#[test]
fn t5_files_encode_like_the_folder() {
    use lowvram::api::{Context, ContextOptions};
    let dir = memory_support::TempDir::new("t5-file");
    let st = dir.path().join("t5tiny.safetensors");
    std::fs::copy(encoder_dir().join("model.safetensors"), &st).unwrap();
    let err = Context::new(ContextOptions { device: Some("cpu".into()), ..Default::default() })
        .unwrap()
        .load_t5_file(&st)
        .err()
        .expect("no tokenizer beside the file")
        .to_string();
    assert!(err.contains("--text-encoder-2"), "{err}");
    let tok_dir = dir.path().join("t5tiny");
    std::fs::create_dir_all(&tok_dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer_2").join(f), tok_dir.join(f)).unwrap();
    }
    // The tiny model's relative distance (20) is not T5's 128: its config sits in the `NAME/` folder beside each file.
    std::fs::copy(encoder_dir().join("config.json"), tok_dir.join("config.json")).unwrap();
    let gguf = fixtures().join("t5-tiny-f32.gguf");
    for (device, yaml) in [("cpu", ""), ("emulated:2MB", "device_working_mem_gb: 0\n")] {
        let ctx = Context::new(ContextOptions {
            device: Some(device.into()),
            config_yaml: Some(yaml.into()),
            ..Default::default()
        })
        .unwrap();
        let folder = ctx.load_model(&encoder_dir()).unwrap();
        let folder_tok = folder.as_text_encoder().unwrap().1.unwrap();
        for file in [&gguf, &st] {
            let model = ctx.load_t5_file(file).unwrap();
            let tok = model.as_text_encoder().unwrap().1.expect("a tokenizer");
            for (i, p) in prompts().iter().enumerate() {
                // The folder states a length (48); a GGUF's vocabulary none (512, FLUX-dev's): same ids up to the
                // folder's length, padding beyond.
                let (want_ids, got_ids) = (folder_tok.tokenize(p).unwrap(), tok.tokenize(p).unwrap());
                let n = want_ids.len();
                // A prompt truncated at 48 (it ends in </s>, not a pad) runs on at 512: compare the untruncated ones.
                if want_ids.last() == Some(&0) {
                    assert_eq!(
                        &got_ids[..n.min(got_ids.len())],
                        &want_ids[..n.min(got_ids.len())],
                        "{} prompt {i}",
                        file.display()
                    );
                    assert!(
                        got_ids[n.min(got_ids.len())..].iter().all(|&t| t == 0),
                        "{} prompt {i}: pads",
                        file.display()
                    );
                }
                let mut r = lowvram::api::RunReport::default();
                let want = ctx.encode_ids(&folder, &want_ids, HiddenLayer::Last, None, &mut r).unwrap().hidden;
                let got = ctx.encode_ids(&model, &want_ids, HiddenLayer::Last, None, &mut r).unwrap().hidden;
                assert!(bits(&got) == bits(&want), "{device} {} prompt {i}: states differ", file.display());
            }
        }
    }
}
