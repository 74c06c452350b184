//! Tokenizers and CLIP text encoders against transformers 5.23.0 (issue 15, deliverables 2 and 7): token ids of
//! tricky prompts identical for both pad conventions and every tokenizer source (vocab.json + merges.txt,
//! tokenizer.json, the embedded vocabulary); encoder outputs within 1e-4 of their scale; the encoders under the
//! memory manager, streamed, bit-identical to the resident run. Fixtures: scripts/make_text_fixtures.py.

use std::path::PathBuf;

use lowvram::text::{ClipTokenizer, PadToken};
use serde_json::Value;

/// tests/fixtures/text as the script wrote it: the committed folder copied under target/tmp with each `*.gz` (the
/// BPE tables, compressed to keep the repository small) restored to its exact original bytes. Made once per run;
/// each file is written to a temporary name and renamed, so concurrent test processes agree.
fn fixtures() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text");
        let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures-text");
        restore(&src, &dst);
        dst
    })
    .clone()
}

fn restore(src: &std::path::Path, dst: &std::path::Path) {
    use std::io::Read;
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if path.is_dir() {
            restore(&path, &dst.join(&name));
            continue;
        }
        let (name, bytes) = match name.strip_suffix(".gz") {
            Some(plain) => {
                let mut bytes = Vec::new();
                flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
                    .read_to_end(&mut bytes)
                    .unwrap();
                (plain.to_string(), bytes)
            }
            None => (name, std::fs::read(&path).unwrap()),
        };
        let tmp = dst.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, dst.join(name)).unwrap();
    }
}

struct Expected {
    prompts: Vec<String>,
    /// Per tokenizer variant, per prompt: (ids, attention mask).
    tokens: serde_json::Map<String, Value>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixtures().join("tokens.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    Expected {
        prompts,
        tokens: v["tokenizers"].as_object().unwrap().clone(),
    }
}

fn column(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every prompt through `tok` against transformers' ids and mask for `variant`.
fn check_tokenizer(tok: &ClipTokenizer, variant: &str, e: &Expected) {
    let cases = e.tokens[variant].as_array().unwrap();
    assert_eq!(cases.len(), e.prompts.len());
    let mut truncated = 0;
    for (prompt, case) in e.prompts.iter().zip(cases) {
        let got = tok.encode_full(prompt).unwrap();
        assert_eq!(got.ids, column(case, "ids"), "{variant}: ids of {prompt:?}");
        assert_eq!(
            got.attention_mask,
            column(case, "mask"),
            "{variant}: mask of {prompt:?}"
        );
        assert_eq!(
            got.ids[got.eos_position], 49407,
            "{variant}: EOS position of {prompt:?}"
        );
        assert_eq!(tok.encode(prompt).unwrap(), got.ids);
        truncated += usize::from(got.eos_position == 76);
    }
    assert!(truncated >= 2, "the fixture prompts include over-long ones");
}

#[test]
fn tokenizer_from_vocab_and_merges_matches_transformers() {
    let e = expected();
    let tok = ClipTokenizer::from_dir(&fixtures().join("sd1/tokenizer")).unwrap();
    assert_eq!(tok.pad_id(), 49407);
    check_tokenizer(&tok, "sd1.vocab_merges", &e);
}

#[test]
fn tokenizer_from_tokenizer_json_with_exclamation_pad_matches_transformers() {
    let e = expected();
    let tok = ClipTokenizer::from_dir(&fixtures().join("sdxl/tokenizer_2")).unwrap();
    assert_eq!(tok.pad_id(), 0);
    check_tokenizer(&tok, "sdxl.tokenizer_json", &e);
    // A literal "!" is the special pad token there, and a lone one is id 0 (open_clip would give 256).
    assert_eq!(&tok.encode("!").unwrap()[..3], &[49406, 0, 49407]);
}

#[test]
fn embedded_vocabulary_matches_transformers_for_both_pad_tokens() {
    let e = expected();
    check_tokenizer(&ClipTokenizer::embedded(PadToken::Eos).unwrap(), "sd1.vocab_merges", &e);
    check_tokenizer(
        &ClipTokenizer::embedded(PadToken::Exclamation).unwrap(),
        "sdxl.vocab_merges",
        &e,
    );
}

/// The vocabulary files written from open-clip's gz (the fixture) agree entry by entry with the one the library
/// builds from its embedded copy of the same gz.
#[test]
fn embedded_vocabulary_equals_the_folder_vocabulary() {
    let vocab: std::collections::HashMap<String, u32> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sd1/tokenizer/vocab.json")).unwrap()).unwrap();
    let tok = ClipTokenizer::embedded(PadToken::Eos).unwrap();
    assert_eq!(vocab.len(), 49408);
    assert_eq!(tok.vocab_size(), 49408);
    for (token, id) in &vocab {
        assert_eq!(tok.token_to_id(token), Some(*id), "{token}");
    }
}

#[test]
fn tokenizer_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("lowvram-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("no tokenizer"), "{err}");
    std::fs::write(dir.join("vocab.json"), "{\"a\": 0}").unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\na\n").unwrap();
    let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("merges.txt") && err.contains("line 2"), "{err}");
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\n").unwrap();
    let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(
        err.contains("<|startoftext|>") && err.contains("not in the vocabulary"),
        "{err}"
    );
    std::fs::write(dir.join("tokenizer_config.json"), "[1]").unwrap();
    let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
    std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    let tok = ClipTokenizer::embedded(PadToken::Eos).unwrap();
    let huge = "a ".repeat(1 << 20);
    assert!(matches!(tok.encode(&huge), Err(lowvram::Error::InvalidArgument(_))));
}

// ---------------------------------------------------------------------------------------------------------------------
// Text encoders
// ---------------------------------------------------------------------------------------------------------------------

mod memory_support;

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use lowvram::memory::ModelCache;
use lowvram::models::clip::{ClipKind, ClipOutput, ClipTextEncoder, KeyLayout};
use lowvram::ops::OpTarget;
use lowvram::{BlockWeights, ResidentWeights, WeightSource};

/// (tag, encoder folder, tokenizer folder)
const MODELS: [(&str, &str, &str); 2] = [
    ("sd1", "sd1/text_encoder", "sd1/tokenizer"),
    ("sdxl", "sdxl/text_encoder_2", "sdxl/tokenizer_2"),
];

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("encoders.safetensors"), &Device::Cpu).unwrap()
}

fn encoder_prompts() -> Vec<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap()).unwrap();
    v["encoder_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// The prompts' ids from the folder's tokenizer, `[B, 77]` u32.
fn prompt_ids(tokenizer_dir: &str) -> Tensor {
    let tok = ClipTokenizer::from_dir(&fixtures().join(tokenizer_dir)).unwrap();
    let prompts = encoder_prompts();
    let ids: Vec<u32> = prompts.iter().flat_map(|p| tok.encode(p).unwrap()).collect();
    Tensor::from_vec(ids, (prompts.len(), 77), &Device::Cpu).unwrap()
}

/// max |a − b| / max(max |ref|, 1e-6): the error relative to the reference's scale.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let got = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    println!("{name:<36} max |diff| / max |ref| = {e:.2e}");
    assert!(e <= 1e-4, "{name}: relative error {e}");
}

fn resident(dir: &std::path::Path) -> ResidentWeights {
    ResidentWeights::load(&ClipTextEncoder::weights_file(dir).unwrap(), &Device::Cpu, DType::F32).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn all_bits(o: &ClipOutput) -> Vec<Vec<u32>> {
    let mut v = vec![
        bits(&o.last_hidden_state),
        bits(&o.penultimate),
        bits(&o.clip_skipped),
        bits(&o.pooled),
    ];
    v.extend(o.text_embeds.as_ref().map(bits));
    v
}

#[test]
fn encoders_match_transformers() {
    let refs = references();
    for (tag, enc_dir, tok_dir) in MODELS {
        let dir = fixtures().join(enc_dir);
        let enc = ClipTextEncoder::load_config(&dir).unwrap();
        assert_eq!(enc.layout(), KeyLayout::Prefixed);
        let w = resident(&dir);
        let ids = prompt_ids(tok_dir);
        let want_ids = refs[&format!("{tag}.input_ids")].to_dtype(DType::U32).unwrap();
        assert_eq!(
            bits(&ids.to_dtype(DType::F32).unwrap()),
            bits(&want_ids.to_dtype(DType::F32).unwrap()),
            "{tag}: ids"
        );
        // Both id dtypes are accepted.
        let out = enc.encode(&w, &refs[&format!("{tag}.input_ids")]).unwrap();
        assert_eq!(all_bits(&out), all_bits(&enc.encode(&w, &ids).unwrap()));
        assert_close(
            &format!("{tag} last_hidden_state"),
            &out.last_hidden_state,
            &refs[&format!("{tag}.last_hidden_state")],
        );
        assert_close(
            &format!("{tag} penultimate"),
            &out.penultimate,
            &refs[&format!("{tag}.penultimate")],
        );
        assert_close(&format!("{tag} pooled"), &out.pooled, &refs[&format!("{tag}.pooled")]);
        assert_eq!(
            bits(&out.clip_skipped),
            bits(&out.last_hidden_state),
            "clip_skip 0 is the last state"
        );
        match enc.config().kind {
            ClipKind::WithProjection => assert_close(
                &format!("{tag} text_embeds"),
                out.text_embeds.as_ref().unwrap(),
                &refs[&format!("{tag}.text_embeds")],
            ),
            ClipKind::TextModel => assert!(out.text_embeds.is_none()),
        }
        let layers = enc.config().num_hidden_layers;
        for k in 1..layers {
            let o = enc.encode_with_clip_skip(&w, &ids, k).unwrap();
            assert_close(
                &format!("{tag} clip_skip {k} (SD rule)"),
                &o.clip_skipped,
                &refs[&format!("{tag}.clip_skip{k}.sd")],
            );
            assert_close(
                &format!("{tag} clip_skip {k} (SDXL rule)"),
                &o.penultimate,
                &refs[&format!("{tag}.clip_skip{k}.sdxl")],
            );
            assert_eq!(bits(&o.last_hidden_state), bits(&out.last_hidden_state));
        }
        let err = enc.encode_with_clip_skip(&w, &ids, layers).unwrap_err();
        assert!(matches!(err, lowvram::Error::InvalidArgument(_)), "{err}");
    }
}

/// transformers 5 saves a `CLIPTextModel` without the `text_model.` prefix: the same weights in that layout give
/// the same outputs, bit for bit.
#[test]
fn bare_key_layout_gives_the_same_outputs() {
    let src = fixtures().join("sd1/text_encoder");
    let dir = memory_support::TempDir::new("clip-bare");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let bare: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap().to_string(), v))
        .collect();
    candle_core::safetensors::save(&bare, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let (a, b) = (
        ClipTextEncoder::load_config(&src).unwrap(),
        ClipTextEncoder::load_config(dir.path()).unwrap(),
    );
    assert_eq!(b.layout(), KeyLayout::Bare);
    let ids = prompt_ids("sd1/tokenizer");
    let oa = a.encode(&resident(&src), &ids).unwrap();
    let ob = b.encode(&resident(dir.path()), &ids).unwrap();
    assert_eq!(all_bits(&oa), all_bits(&ob));
}

/// A [`WeightSource`] that logs every fetch and how many blocks are held at once.
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

/// Every block is fetched once, in execution order; the expected tensors are exactly the checkpoint's, with their
/// shapes; a missing or misshapen tensor is a format error naming it.
#[test]
fn encoder_fetches_each_block_once_and_names_bad_tensors() {
    for (_, enc_dir, tok_dir) in MODELS {
        let dir = fixtures().join(enc_dir);
        let enc = ClipTextEncoder::load_config(&dir).unwrap();
        let file = ClipTextEncoder::weights_file(&dir).unwrap();
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let mut expected: Vec<(String, Vec<usize>)> = enc.expected_tensors();
        let mut actual: Vec<(String, Vec<usize>)> =
            tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        expected.sort();
        actual.sort();
        assert_eq!(expected, actual);
        for (name, _) in &expected {
            assert_eq!(
                lowvram::weights::block_key(name),
                lowvram::models::clip::block_of(name),
                "{name}"
            );
        }
        let w = Logging {
            inner: resident(&dir),
            log: Mutex::new(vec![]),
        };
        let ids = prompt_ids(tok_dir);
        enc.encode(&w, &ids).unwrap();
        assert_eq!(*w.log.lock().unwrap(), enc.block_keys());

        let victim = &expected[expected.len() / 2].0;
        let mut missing = tensors.clone();
        missing.remove(victim);
        let r = ResidentWeights::from_tensors(missing, &Device::Cpu, DType::F32).unwrap();
        let err = enc.encode(&r, &ids).unwrap_err().to_string();
        assert!(err.contains(victim.as_str()), "{err}");
        let mut bad = tensors.clone();
        let shape = bad[victim].dims().to_vec();
        bad.insert(
            victim.clone(),
            Tensor::zeros(shape.iter().product::<usize>() + 1, DType::F32, &Device::Cpu).unwrap(),
        );
        let r = ResidentWeights::from_tensors(bad, &Device::Cpu, DType::F32).unwrap();
        let err = enc.encode(&r, &ids).unwrap_err().to_string();
        assert!(err.contains(victim.as_str()) && err.contains("shape"), "{err}");
    }
    // Bad ids: out of the vocabulary, too many positions, wrong rank or dtype.
    let dir = fixtures().join("sd1/text_encoder");
    let (enc, w) = (ClipTextEncoder::load_config(&dir).unwrap(), resident(&dir));
    for ids in [
        Tensor::new(&[[49406u32, 49408]], &Device::Cpu).unwrap(),
        Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap(),
        Tensor::zeros(77, DType::U32, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 77), DType::F32, &Device::Cpu).unwrap(),
        Tensor::new(&[[-1i64]], &Device::Cpu).unwrap(),
    ] {
        assert!(
            matches!(enc.encode(&w, &ids), Err(lowvram::Error::InvalidArgument(_))),
            "{ids:?}"
        );
    }
}

/// Both encoders in one `memory::ModelCache` on an `emulated:` device whose budget holds neither completely: each
/// locked in turn (evicting the other), streamed, outputs bit-identical to the resident run, zero refused
/// allocations, bytes streamed = the storage bytes of the blocks not resident, peak ≤ capacity. Two capacities:
/// the smallest that runs (every block streamed, the token table included) and that plus two of the largest layer
/// (two blocks in flight with prefetch: the token table resident, layers streamed).
#[test]
fn encoders_stream_under_the_memory_manager() {
    let refs: Vec<(ClipTextEncoder, std::path::PathBuf, Tensor, Vec<Vec<u32>>)> = MODELS
        .iter()
        .map(|(_, enc_dir, tok_dir)| {
            let dir = fixtures().join(enc_dir);
            let enc = ClipTextEncoder::load_config(&dir).unwrap();
            let ids = prompt_ids(tok_dir);
            let out = all_bits(&enc.encode_with_clip_skip(&resident(&dir), &ids, 1).unwrap());
            (enc, ClipTextEncoder::weights_file(&dir).unwrap(), ids, out)
        })
        .collect();
    // Size the device from the blocks in the compute dtype (f32 here; the files are fp16).
    let probe = ModelCache::new(memory_support::config("emulated:1GiB", 1 << 20)).unwrap();
    let (mut max_fetch, mut second_fetch) = (0u64, 0u64);
    for (_, file, _, _) in &refs {
        let m = probe.load_model(file, "probe").unwrap();
        let mut sizes: Vec<u64> = m.blocks().iter().map(|b| b.compute_bytes).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert!(m.blocks()[0].key.ends_with("embeddings") && m.blocks()[0].compute_bytes == sizes[0]);
        max_fetch = max_fetch.max(sizes[0]);
        second_fetch = second_fetch.max(sizes[1]);
    }
    let target = OpTarget::new(probe.device(), probe.compute_dtype());
    drop(probe);
    let work: u64 = refs
        .iter()
        .map(|(e, _, ids, _)| e.working_bytes(ids.dim(0).unwrap(), 77, target))
        .max()
        .unwrap();
    for table_resident in [false, true] {
        let cap = work + max_fetch + if table_resident { 2 * second_fetch } else { 0 };
        let cache = ModelCache::new(memory_support::config(&format!("emulated:{cap}"), 0)).unwrap();
        assert_eq!(cache.compute_dtype(), DType::F32);
        for round in 0..2 {
            for (i, (enc, file, ids, want)) in refs.iter().enumerate() {
                let m = cache.load_model(file, &format!("text_encoder_{i}")).unwrap();
                // Both lock the larger of the two estimates (a lock may ask for more than its own), so one
                // capacity splits both models.
                assert!(enc.working_bytes(ids.dim(0).unwrap(), 77, target) <= work);
                let lock = cache.lock(&m, work).unwrap();
                let resident = m.resident_bytes();
                assert!(resident < m.device_bytes(), "the budget must force streaming");
                if table_resident {
                    assert!(
                        m.resident_blocks().contains(&"text_model.embeddings".to_string()),
                        "the table stays"
                    );
                } else {
                    assert_eq!(resident, 0, "at the smallest capacity every block streams");
                }
                let expect_streamed = m.streamed_bytes_per_forward();
                let out = enc.encode_with_clip_skip(&lock, ids, 1).unwrap();
                assert_eq!(
                    &all_bits(&out),
                    want,
                    "round {round}, encoder {i}: differs from the resident run"
                );
                assert_eq!(
                    lock.bytes_streamed(),
                    expect_streamed,
                    "streamed = storage bytes not resident"
                );
                assert!(expect_streamed > 0);
                assert_eq!(cache.allocator().refused(), 0, "runs that fit refuse nothing");
                assert!(cache.allocator().peak() <= cap);
                println!(
                    "capacity {cap} B round {round} encoder {i}: model {} B on the device, resident {resident} B, \
                     streamed {} B (storage), peak {} B",
                    m.device_bytes(),
                    lock.bytes_streamed(),
                    cache.allocator().peak()
                );
            }
        }
    }
}

/// The f16 compute path (what CUDA runs; on the CPU the candle compositions) stays close to f32.
#[test]
fn f16_compute_is_close_to_f32() {
    for (tag, enc_dir, tok_dir) in MODELS {
        let dir = fixtures().join(enc_dir);
        let enc = ClipTextEncoder::load_config(&dir).unwrap();
        let ids = prompt_ids(tok_dir);
        let file = ClipTextEncoder::weights_file(&dir).unwrap();
        let w16 = ResidentWeights::load(&file, &Device::Cpu, DType::F16).unwrap();
        let (a, b) = (
            enc.encode(&resident(&dir), &ids).unwrap(),
            enc.encode_with_clip_skip(&w16, &ids, 0).unwrap(),
        );
        assert_eq!(b.last_hidden_state.dtype(), DType::F16);
        for (name, x, y) in [
            ("last_hidden_state", &a.last_hidden_state, &b.last_hidden_state),
            ("penultimate", &a.penultimate, &b.penultimate),
            ("pooled", &a.pooled, &b.pooled),
        ] {
            let e = rel_err(y, x);
            println!("{tag} f16 vs f32 {name:<18} {e:.2e}");
            assert!(e < 1e-2, "{tag} {name}: {e}");
        }
    }
}

/// Through the API's traits (`TextEncoder`, `PromptTokenizer`): the layers a family asks for are the ones diffusers
/// takes, and the pooled output is the projection for `CLIPTextModelWithProjection`.
#[test]
fn traits_give_the_states_each_pipeline_uses() {
    use lowvram::models::text_encoder::{HiddenLayer, PromptTokenizer, TextEncoder};
    let refs = references();
    for (tag, enc_dir, tok_dir) in MODELS {
        let dir = fixtures().join(enc_dir);
        let enc = ClipTextEncoder::load_config(&dir).unwrap();
        let tok = ClipTokenizer::from_dir(&fixtures().join(tok_dir)).unwrap();
        let (enc, tok): (&dyn TextEncoder, &dyn PromptTokenizer) = (&enc, &tok);
        let prompts = encoder_prompts();
        let ids: Vec<u32> = prompts.iter().flat_map(|p| tok.tokenize(p).unwrap()).collect();
        let ids = Tensor::from_vec(ids, (prompts.len(), 77), &Device::Cpu).unwrap();
        let w = resident(&dir);
        let last = enc.encode(&w, &ids, HiddenLayer::Last).unwrap();
        assert_close(
            &format!("{tag} trait Last"),
            &last.hidden,
            &refs[&format!("{tag}.last_hidden_state")],
        );
        let pooled = refs
            .get(&format!("{tag}.text_embeds"))
            .unwrap_or(&refs[&format!("{tag}.pooled")]);
        assert_close(&format!("{tag} trait pooled"), last.pooled.as_ref().unwrap(), pooled);
        let skip1 = enc.encode(&w, &ids, HiddenLayer::Skip(1)).unwrap();
        assert_close(
            &format!("{tag} trait Skip(1)"),
            &skip1.hidden,
            &refs[&format!("{tag}.penultimate")],
        );
        let normed1 = enc.encode(&w, &ids, HiddenLayer::SkipNormed(1)).unwrap();
        assert_close(
            &format!("{tag} trait SkipNormed(1)"),
            &normed1.hidden,
            &refs[&format!("{tag}.clip_skip1.sd")],
        );
        let layers = enc
            .expected_tensors()
            .0
            .iter()
            .filter(|(n, _)| n.ends_with("layer_norm1.weight"))
            .count();
        for k in 2..layers {
            let s = enc.encode(&w, &ids, HiddenLayer::Skip(k)).unwrap();
            assert_close(
                &format!("{tag} trait Skip({k})"),
                &s.hidden,
                &refs[&format!("{tag}.clip_skip{}.sdxl", k - 1)],
            );
        }
        assert!(
            enc.encode(&w, &ids, HiddenLayer::Skip(layers)).is_ok(),
            "the embeddings are hidden_states[0]"
        );
        let err = enc.encode(&w, &ids, HiddenLayer::Skip(layers + 1)).unwrap_err();
        assert!(matches!(err, lowvram::Error::InvalidArgument(_)), "{err}");
        assert_eq!(enc.hidden_size(), last.hidden.dim(2).unwrap());
    }
}

/// Through the public API: `Context::load_model` on a diffusers text-encoder folder finds its tokenizer beside it,
/// and `Context::encode_text` (tokenize, lock in the cache, encode) gives transformers' states for each prompt, on
/// the CPU and on an emulated device that streams. A folder with no tokenizer beside it loads, and encoding a
/// prompt then fails naming it.
#[test]
fn context_encodes_prompts_like_transformers() {
    use lowvram::api::{Context, ContextOptions};
    use lowvram::models::text_encoder::HiddenLayer;
    let refs = references();
    let prompts = encoder_prompts();
    for (device, yaml) in [("cpu", ""), ("emulated:6MB", "device_working_mem_gb: 0\n")] {
        let ctx = Context::new(ContextOptions {
            device: Some(device.into()),
            config_yaml: Some(yaml.into()),
            ..Default::default()
        })
        .unwrap();
        for (tag, enc_dir, _) in MODELS {
            let model = ctx.load_model(&fixtures().join(enc_dir)).unwrap();
            for (r, prompt) in prompts.iter().enumerate() {
                let row = |name: &str| refs[&format!("{tag}.{name}")].narrow(0, r, 1).unwrap();
                let last = ctx.encode_text(&model, prompt, HiddenLayer::Last).unwrap();
                assert_close(
                    &format!("{device} {tag} prompt {r} last"),
                    &last.hidden,
                    &row("last_hidden_state"),
                );
                let pooled = if refs.contains_key(&format!("{tag}.text_embeds")) {
                    "text_embeds"
                } else {
                    "pooled"
                };
                assert_close(
                    &format!("{device} {tag} prompt {r} {pooled}"),
                    last.pooled.as_ref().unwrap(),
                    &row(pooled),
                );
                let pen = ctx.encode_text(&model, prompt, HiddenLayer::Skip(1)).unwrap();
                assert_close(
                    &format!("{device} {tag} prompt {r} Skip(1)"),
                    &pen.hidden,
                    &row("penultimate"),
                );
            }
        }
    }
    let dir = memory_support::TempDir::new("clip-no-tokenizer");
    let lone = dir.path().join("text_encoder");
    std::fs::create_dir_all(&lone).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("sd1/text_encoder").join(f), lone.join(f)).unwrap();
    }
    let ctx = Context::new(ContextOptions {
        device: Some("cpu".into()),
        ..Default::default()
    })
    .unwrap();
    let model = ctx.load_model(&lone).unwrap();
    let err = ctx
        .encode_text(&model, "a cat", HiddenLayer::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokenizer"), "{err}");
}

/// Older exports carry `text_model.embeddings.position_ids` (an i64 buffer, e.g. SD 1.5's text encoder): it is
/// not read, and loading and encoding through the API and the cache work as without it.
#[test]
fn position_ids_buffer_is_tolerated() {
    use lowvram::api::{Context, ContextOptions};
    use lowvram::models::text_encoder::HiddenLayer;
    let dir = memory_support::TempDir::new("clip-position-ids");
    let (enc_dir, tok_dir) = (dir.path().join("text_encoder"), dir.path().join("tokenizer"));
    std::fs::create_dir_all(&enc_dir).unwrap();
    std::fs::create_dir_all(&tok_dir).unwrap();
    let src = fixtures().join("sd1");
    let mut tensors = candle_core::safetensors::load(src.join("text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    let pos = Tensor::arange(0i64, 77, &Device::Cpu)
        .unwrap()
        .reshape((1, 77))
        .unwrap();
    tensors.insert("text_model.embeddings.position_ids".into(), pos);
    candle_core::safetensors::save(&tensors, enc_dir.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("text_encoder/config.json"), enc_dir.join("config.json")).unwrap();
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join("tokenizer").join(f), tok_dir.join(f)).unwrap();
    }
    let refs = references();
    for (device, yaml) in [("cpu", ""), ("emulated:6MB", "device_working_mem_gb: 0\n")] {
        let ctx = Context::new(ContextOptions {
            device: Some(device.into()),
            config_yaml: Some(yaml.into()),
            ..Default::default()
        })
        .unwrap();
        let model = ctx.load_model(&enc_dir).unwrap();
        let prompt = &encoder_prompts()[0];
        let out = ctx.encode_text(&model, prompt, HiddenLayer::Last).unwrap();
        let want = refs["sd1.last_hidden_state"].narrow(0, 0, 1).unwrap();
        assert_close(&format!("{device} with position_ids"), &out.hidden, &want);
    }
}
