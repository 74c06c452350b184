//! The FLUX.1 transformer (issue 16, deliverable 1) against diffusers 0.42.1: the tiny dev and schnell models and
//! references written by `scripts/fixtures_flux.py` (tests/fixtures/tiny-flux). Through the public Rust API: the
//! forward from the BFL single files (bare and under Comfy's `model.diffusion_model.`), the family's streaming units
//! (each fetched once, one at a time), streaming under a tight `emulated:` budget bit-identical to resident weights,
//! the config derived from a BFL file's shapes, detection and key errors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use lowvram::config::Config;
use lowvram::memory::ModelCache;
use lowvram::models::flux::{block_of, FluxConfig, FluxTransformer};
use lowvram::weights::single_file::{flux as flux_map, Component, Family, SingleFile};
use lowvram::weights::{FilePart, TensorSpan, WeightLayout};
use lowvram::{BlockWeights, Error, ResidentWeights, WeightSource};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-flux")
}

/// The fixtures are committed: a missing file is a failure, never a skip.
fn fixture(variant: &str) -> HashMap<String, Tensor> {
    let p = root().join(variant).join("forward.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e} (see tests/fixtures/README.md)", p.display()))
}

fn bfl_file(variant: &str) -> PathBuf {
    root().join(variant).join(format!("flux1-{variant}-tiny.safetensors"))
}

fn model(variant: &str) -> FluxTransformer {
    FluxTransformer::from_config_file(&root().join(variant).join("transformer/config.json")).unwrap()
}

/// The transformer of a BFL file read through the single-file mapping (prefix stripped), every tensor resident.
fn resident_bfl(variant: &str, dtype: DType) -> ResidentWeights {
    let sf = SingleFile::open(&bfl_file(variant)).unwrap();
    assert_eq!(sf.family(), Family::Flux);
    let tensors = sf.read_component(Component::Transformer).unwrap();
    ResidentWeights::from_tensors_with(tensors, block_of, &Device::Cpu, dtype).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_of(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn timestep(f: &HashMap<String, Tensor>) -> f64 {
    f["timestep"].to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0]
}

fn run(m: &FluxTransformer, w: &dyn WeightSource, f: &HashMap<String, Tensor>) -> lowvram::Result<Tensor> {
    m.forward(w, &f["latents"], timestep(f), &f["encoder_hidden_states"], &f["pooled_projections"], f.get("guidance"))
}

/// Tolerance DECISIONS sets for latents: 1e-3 of max(1, |ref|); measured ~1e-6 on the CPU in f32.
fn check_parity(what: &str, out: &Tensor, reference: &Tensor) {
    let (err, scale) = (max_abs(out, reference), max_of(reference));
    println!("{what}: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= 1e-4 * scale.max(1.0), "{what}: max abs err {err}");
}

#[test]
fn pack_and_positions_match_diffusers() {
    for variant in ["dev", "schnell"] {
        let f = fixture(variant);
        let packed = FluxTransformer::pack(&f["latents"]).unwrap();
        assert_eq!(bits(&packed), bits(&f["hidden_states"]), "{variant}: packing");
        let (_, _, h, w) = f["latents"].dims4().unwrap();
        assert_eq!(bits(&FluxTransformer::unpack(&packed, h, w).unwrap()), bits(&f["latents"]));
        assert_eq!(bits(&FluxTransformer::unpack(&f["out_packed"], h, w).unwrap()), bits(&f["out"]));
        let txt_len = f["txt_ids"].dim(0).unwrap();
        let ids = FluxTransformer::position_ids(txt_len, h, w);
        let want: Vec<Vec<f32>> = Tensor::cat(&[&f["txt_ids"], &f["img_ids"]], 0).unwrap().to_vec2().unwrap();
        let got: Vec<Vec<f32>> = ids.iter().map(|r| r.iter().map(|&x| x as f32).collect()).collect();
        assert_eq!(got, want, "{variant}: position ids");
    }
}

/// One transformer call of the dev model (guidance per row) and of schnell (Comfy prefix), from the BFL files.
#[test]
fn forward_from_bfl_file_matches_diffusers() {
    for variant in ["dev", "schnell"] {
        let f = fixture(variant);
        let out = run(&model(variant), &resident_bfl(variant, DType::F32), &f).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        check_parity(&format!("{variant} BFL file"), &out, &f["out"]);
    }
    // The inputs matter: dev's guidance rows swapped give another output.
    let f = fixture("dev");
    let m = model("dev");
    let w = resident_bfl("dev", DType::F32);
    let swapped = Tensor::new(&[5.0f32, 3.5], &Device::Cpu).unwrap();
    let other = m
        .forward(&w, &f["latents"], timestep(&f), &f["encoder_hidden_states"], &f["pooled_projections"], Some(&swapped))
        .unwrap();
    assert!(max_abs(&other, &f["out"]) > 1e-3);
}

/// Through the `Denoiser` interface the sampler and the API call: named conditioning checked against the model's
/// specs (dev needs `sampling.guidance`, schnell refuses it), one forward per step (no classifier-free guidance),
/// the same result as the direct call.
#[test]
fn denoiser_interface_takes_named_conditioning() {
    use lowvram::models::conditioning::{COND_EMBEDDINGS, COND_POOLED, GUIDANCE};
    use lowvram::models::{Conditioning, Denoiser};
    use lowvram::ops::OpTarget;
    for variant in ["dev", "schnell"] {
        let f = fixture(variant);
        let m = model(variant);
        let d: &dyn Denoiser = &m;
        assert!(!d.classifier_free_guidance());
        assert_eq!(d.latent_channels(), 16);
        let mut cond = Conditioning::new();
        cond.insert(COND_EMBEDDINGS, f["encoder_hidden_states"].clone());
        cond.insert(COND_POOLED, f["pooled_projections"].clone());
        let specs = d.conditioning();
        if variant == "dev" {
            let e = cond.check(&specs, d.name()).unwrap_err().to_string();
            assert!(e.contains("sampling.guidance [B]"), "{e}");
            cond.insert(GUIDANCE, f["guidance"].clone());
        } else {
            let mut with = cond.clone();
            with.insert(GUIDANCE, Tensor::new(&[3.5f32, 3.5], &Device::Cpu).unwrap());
            let e = with.check(&specs, d.name()).unwrap_err().to_string();
            assert!(e.contains("sampling.guidance"), "{e}");
        }
        assert_eq!(cond.check(&specs, d.name()).unwrap(), 2);
        let batched = cond.batched(false, &Device::Cpu, DType::F32).unwrap();
        let w = resident_bfl(variant, DType::F32);
        let out = d.forward(&w, &f["latents"], timestep(&f), &batched).unwrap();
        assert_eq!(bits(&out), bits(&run(&m, &w, &f).unwrap()), "{variant}");
        let t = OpTarget::new(&Device::Cpu, DType::F32);
        assert_eq!(d.working_bytes(2, 12, 8, &cond, t), m.working_bytes(2, 12, 8, 7, t));
    }
}

/// bf16 compute (the dtype FLUX ships in) stays close to the f32 reference.
#[test]
fn bf16_compute_is_close_to_f32() {
    let f = fixture("dev");
    let out = run(&model("dev"), &resident_bfl("dev", DType::BF16), &f).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let (err, scale) = (max_abs(&out, &f["out"]), max_of(&f["out"]));
    println!("dev bf16: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= 5e-2 * scale.max(1.0), "max abs err {err}");
}

#[test]
fn bad_inputs_are_invalid_argument_naming_them() {
    let f = fixture("dev");
    let (dev, w) = (model("dev"), resident_bfl("dev", DType::F32));
    let invalid = |r: lowvram::Result<Tensor>| match r {
        Err(Error::InvalidArgument(msg)) => msg,
        other => panic!("expected InvalidArgument, got {:?}", other.map(|t| t.dims().to_vec())),
    };
    let (x, t, txt, pooled) = (&f["latents"], timestep(&f), &f["encoder_hidden_states"], &f["pooled_projections"]);
    let msg = invalid(dev.forward(&w, x, t, txt, pooled, None));
    assert!(msg.contains("sampling.guidance [2]"), "{msg}");
    let one = Tensor::new(&[3.5f32], &Device::Cpu).unwrap();
    let msg = invalid(dev.forward(&w, x, t, txt, pooled, Some(&one)));
    assert!(msg.contains("sampling.guidance") && msg.contains("[1]"), "{msg}");
    let nan = Tensor::new(&[3.5f32, f32::NAN], &Device::Cpu).unwrap();
    assert!(invalid(dev.forward(&w, x, t, txt, pooled, Some(&nan))).contains("sampling.guidance"));
    let g = &f["guidance"];
    let msg = invalid(dev.forward(&w, x, t, &txt.narrow(2, 0, 16).unwrap(), pooled, Some(g)));
    assert!(msg.contains("sampling.cond_embeddings"), "{msg}");
    let msg = invalid(dev.forward(&w, x, t, txt, &txt.get(0).unwrap(), Some(g)));
    assert!(msg.contains("sampling.cond_pooled"), "{msg}");
    let odd = x.narrow(2, 0, 11).unwrap();
    assert!(invalid(dev.forward(&w, &odd, t, txt, pooled, Some(g))).contains("even"));
    let schnell = model("schnell");
    let sw = resident_bfl("schnell", DType::F32);
    let fs = fixture("schnell");
    let msg = invalid(schnell.forward(
        &sw,
        &fs["latents"],
        t,
        &fs["encoder_hidden_states"],
        &fs["pooled_projections"],
        Some(g),
    ));
    assert!(msg.contains("schnell"), "{msg}");
}

/// A WeightSource that records every fetch and how many BlockWeights were alive when it happened.
struct Recording {
    blocks: HashMap<String, HashMap<String, Tensor>>,
    live: Arc<AtomicUsize>,
    log: Mutex<Vec<(String, usize)>>,
}

struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WeightSource for Recording {
    fn fetch(&self, block: &str) -> lowvram::Result<BlockWeights> {
        let live = self.live.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((block.to_string(), live));
        let t = self.blocks.get(block).cloned().unwrap_or_default();
        Ok(BlockWeights::new(block, t, Some(Box::new(Lease(self.live.clone())))))
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}

/// The FLUX partition: a double block in 8 sub-module units, a single block one unit; the forward fetches every
/// unit of the checkpoint exactly once, one at a time, in the documented order.
#[test]
fn forward_fetches_every_unit_once_one_at_a_time() {
    let sf = SingleFile::open(&bfl_file("dev")).unwrap();
    let mut blocks: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (name, t) in sf.read_component(Component::Transformer).unwrap() {
        let key = block_of(&name);
        let rel = name[key.len()..].trim_start_matches('.').to_string();
        blocks.entry(key.to_string()).or_default().insert(rel, t.to_dtype(DType::F32).unwrap());
    }
    let units: BTreeSet<String> = blocks.keys().cloned().collect();
    let double: Vec<&String> = units.iter().filter(|u| u.starts_with("double_blocks.1.")).collect();
    assert_eq!(double.len(), 8, "{double:?}");
    let src = Recording { blocks, live: Arc::new(AtomicUsize::new(0)), log: Mutex::new(vec![]) };
    let f = fixture("dev");
    let out = run(&model("dev"), &src, &f).unwrap();
    check_parity("dev (recording source)", &out, &f["out"]);
    let log = src.log.lock().unwrap().clone();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, live) in &log {
        assert_eq!(*live, 0, "{k} fetched while another unit was held");
        *counts.entry(k.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_eq!(counts.keys().map(|s| s.to_string()).collect::<BTreeSet<_>>(), units);
    let order: Vec<&str> = log.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(order[..5], ["img_in", "time_in", "guidance_in", "vector_in", "txt_in"]);
    let d0: Vec<&str> = order.iter().copied().filter(|k| k.starts_with("double_blocks.0.")).collect();
    let sub: Vec<&str> = d0.iter().map(|k| &k["double_blocks.0.".len()..]).collect();
    assert_eq!(
        sub,
        ["img_mod", "txt_mod", "img_attn", "txt_attn", "img_attn.proj", "img_mlp", "txt_attn.proj", "txt_mlp"]
    );
    assert_eq!(order.last(), Some(&"final_layer"));
}

/// Streamed through the memory manager under a budget that holds about a third of the model: zero refused
/// allocations, bytes streamed per forward = model − resident, results bit-identical to resident weights; with
/// and without prefetch, bare BFL file (whole-file layout), Comfy-prefixed file (single-file spans) and the
/// diffusers folder (fused multi-range spans).
#[test]
fn streamed_under_tight_budget_is_bit_identical_to_resident() {
    for variant in ["dev", "schnell"] {
        let m = model(variant);
        let f = fixture(variant);
        let reference = run(&m, &resident_bfl(variant, DType::F32), &f).unwrap();
        let path = bfl_file(variant);
        let sf = SingleFile::open(&path).unwrap();
        let bfl = if sf.component(Component::Transformer).unwrap().prefix.is_empty() {
            WeightLayout::whole(block_of)
        } else {
            flux_layout(&sf)
        };
        let folder = folder_file(variant);
        let total: u64 = 4 * m.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum::<u64>();
        let work: u64 = 1 << 20;
        let cases = [(false, &path, bfl.clone()), (true, &path, bfl), (false, &folder, folder_layout(&folder))];
        for (prefetch, path, layout) in cases {
            let source = if path == &folder { "folder" } else { "BFL file" };
            let mut cfg = Config::default();
            cfg.set("device", &format!("emulated:{}", work + total / 3)).unwrap();
            cfg.set("device_working_mem_gb", &format!("{}", work as f64 / (1u64 << 30) as f64)).unwrap();
            cfg.set("async_loading", if prefetch { "true" } else { "false" }).unwrap();
            let cache = ModelCache::new(cfg).unwrap();
            let mm = cache.load_model_as(path, "transformer", &layout).unwrap();
            let lock = cache.lock(&mm, 0).unwrap();
            let (resident, n) = (mm.resident_blocks().len(), mm.blocks().len());
            assert!(resident > 0 && resident < n, "partial residency expected: {resident} of {n} units");
            let per_forward = mm.streamed_bytes_per_forward();
            let mut outs = Vec::new();
            for _ in 0..2 {
                outs.push(run(&m, &lock, &f).unwrap());
            }
            let largest = mm.blocks().iter().map(|b| b.storage_bytes).max().unwrap();
            println!(
                "{variant} {source}, prefetch {prefetch}: {n} units ({resident} resident), largest {largest} B, {} B streamed of {} B \
                 stored, over 2 forwards",
                lock.bytes_streamed(),
                mm.total_bytes()
            );
            for out in &outs {
                assert_eq!(bits(out), bits(&reference), "{variant}: streamed result differs from resident");
            }
            let resident_stored: u64 =
                mm.blocks().iter().filter(|b| mm.resident_blocks().contains(&b.key)).map(|b| b.storage_bytes).sum();
            assert_eq!(per_forward, mm.total_bytes() - resident_stored);
            assert_eq!(lock.bytes_streamed(), 2 * per_forward, "streamed = forwards × (model − resident)");
            assert_eq!(cache.allocator().refused(), 0, "refused allocations");
        }
    }
}

/// The spans of a single file's transformer under its BFL names.
fn flux_layout(sf: &SingleFile) -> WeightLayout {
    let map = sf.component(Component::Transformer).unwrap();
    let spans = map
        .entries
        .iter()
        .map(|e| TensorSpan {
            name: e.internal_name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            parts: vec![FilePart::of(e.bytes.clone())],
            transposed: false,
        })
        .collect();
    WeightLayout { view: "transformer".into(), rule: block_of, spans: Some(Arc::new(spans)) }
}

/// A diffusers `transformer/` checkpoint (file or shard index) under BFL names: fused q/k/v and linear1 read from
/// several byte ranges, norm_out's halves swapped.
fn folder_layout(path: &Path) -> WeightLayout {
    let spans = flux_map::diffusers_spans(path).unwrap();
    WeightLayout { view: "transformer".into(), rule: block_of, spans: Some(Arc::new(spans)) }
}

fn folder_file(variant: &str) -> PathBuf {
    root().join(variant).join("transformer/diffusion_pytorch_model.safetensors")
}

fn cpu_cache() -> ModelCache {
    let mut c = Config::default();
    c.set("device", "cpu").unwrap();
    ModelCache::new(c).unwrap()
}

/// Split a safetensors file into `n` shards beside an index, as `save_pretrained(max_shard_size=...)` does.
fn shard(src: &Path, dir: &Path, n: usize) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all = st.tensors();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let per = all.len().div_ceil(n);
    let mut map = serde_json::Map::new();
    for (i, chunk) in all.chunks(per).enumerate() {
        let file = format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", i + 1);
        for (name, _) in chunk {
            map.insert(name.clone(), file.clone().into());
        }
        safetensors::tensor::serialize_to_file(chunk.to_vec(), None, &dir.join(&file)).unwrap();
    }
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    index
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowvram-flux-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The diffusers folders, mapped to BFL names at load (fused q/k/v rows, swapped halves read in place), match
/// diffusers; so does the same folder split into shards, bit-identical to the unsharded one.
#[test]
fn forward_from_diffusers_folder_matches_diffusers() {
    let dir = temp_dir("shards");
    for variant in ["dev", "schnell"] {
        let f = fixture(variant);
        let m = model(variant);
        let cache = cpu_cache();
        let path = folder_file(variant);
        let mm = cache.load_model_as(&path, "transformer", &folder_layout(&path)).unwrap();
        let lock = cache.lock(&mm, 0).unwrap();
        let out = run(&m, &lock, &f).unwrap();
        check_parity(&format!("{variant} diffusers folder"), &out, &f["out"]);
        // Fused spans give the BFL file's tensors exactly.
        let bfl = run(&m, &resident_bfl(variant, DType::F32), &f).unwrap();
        assert_eq!(bits(&out), bits(&bfl), "{variant}: folder and BFL file differ");
        drop(lock);
        let vdir = dir.join(variant);
        std::fs::create_dir_all(&vdir).unwrap();
        let index = shard(&path, &vdir, 3);
        let mm = cache.load_model_as(&index, "transformer-sharded", &folder_layout(&index)).unwrap();
        let lock = cache.lock(&mm, 0).unwrap();
        assert_eq!(bits(&run(&m, &lock, &f).unwrap()), bits(&out), "{variant}: sharded folder differs");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A diffusers checkpoint with a key no rule maps, or a fused tensor with a part missing, fails naming it.
#[test]
fn diffusers_folder_key_errors_name_the_keys() {
    let dir = temp_dir("keys");
    let mut tensors = candle_core::safetensors::load(folder_file("schnell"), &Device::Cpu).unwrap();
    let p = dir.join("diffusion_pytorch_model.safetensors");
    tensors
        .insert("transformer_blocks.0.attn.to_qq.weight".into(), Tensor::zeros(2, DType::BF16, &Device::Cpu).unwrap());
    write(&p, &tensors);
    let e = flux_map::diffusers_spans(&p).unwrap_err().to_string();
    assert!(e.contains("transformer_blocks.0.attn.to_qq.weight"), "{e}");
    tensors.remove("transformer_blocks.0.attn.to_qq.weight");
    tensors.remove("single_transformer_blocks.1.proj_mlp.bias");
    write(&p, &tensors);
    let e = flux_map::diffusers_spans(&p).unwrap_err().to_string();
    assert!(e.contains("single_blocks.1.linear1.bias"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The config a BFL file's shapes give equals the diffusers folder's (the rotary axes given, as shapes cannot
/// tell them); the tensors the model reads are exactly the file's.
#[test]
fn config_from_bfl_shapes_matches_the_folder() {
    for variant in ["dev", "schnell"] {
        let sf = SingleFile::open(&bfl_file(variant)).unwrap();
        let map = sf.component(Component::Transformer).unwrap();
        let shapes: BTreeMap<String, Vec<usize>> =
            map.entries.iter().map(|e| (e.internal_name.clone(), e.shape.clone())).collect();
        let folder = FluxConfig::from_file(&root().join(variant).join("transformer/config.json")).unwrap();
        let derived = FluxConfig::from_bfl_shapes(&shapes, Some(&folder.axes_dims_rope)).unwrap();
        assert_eq!(derived, folder, "{variant}");
        assert_eq!(derived.guidance_embeds, variant == "dev");
        // 16-wide heads are not FLUX.1's: the axes must be given.
        let e = FluxConfig::from_bfl_shapes(&shapes, None).unwrap_err().to_string();
        assert!(e.contains("axes_dims_rope"), "{e}");
        let ours: BTreeMap<String, Vec<usize>> = model(variant).tensor_shapes().into_iter().collect();
        assert_eq!(ours, shapes, "{variant}");
    }
}

/// Write `tensors` as a safetensors file.
fn write(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn comfy_all_in_one_is_flux_and_unknown_keys_are_named() {
    let dir = std::env::temp_dir().join(format!("lowvram-flux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors = candle_core::safetensors::load(bfl_file("schnell"), &Device::Cpu).unwrap();
    // A Comfy all-in-one file: the VAE and CLIP-L keys are mapped as those components (tests/flux_pipeline.rs runs
    // a whole one), T5's are skipped (it comes from --text-encoder-2).
    let small = Tensor::zeros((2, 2), DType::BF16, &Device::Cpu).unwrap();
    for k in [
        "vae.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
    ] {
        tensors.insert(k.into(), small.clone());
    }
    let p = dir.join("comfy.safetensors");
    write(&p, &tensors);
    let sf = SingleFile::open(&p).unwrap();
    assert_eq!(sf.family(), Family::Flux);
    assert_eq!(sf.components(), vec![Component::Vae, Component::TextEncoder, Component::Transformer]);
    assert_eq!(sf.skipped(), ["text_encoders.t5xxl.transformer.shared.weight".to_string()]);
    let cfg = sf.config(Component::Transformer).unwrap_err().to_string();
    assert!(cfg.contains("axes_dims_rope"), "{cfg}");
    // A key no rule knows is an error naming it.
    tensors.insert("model.diffusion_model.double_blocks.0.img_attn.bogus.weight".into(), small.clone());
    write(&p, &tensors);
    let e = SingleFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("model.diffusion_model.double_blocks.0.img_attn.bogus.weight"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// FLUX.1 dev and schnell at their real size, from a header alone (names, bf16 dtypes, shapes, byte ranges; no
/// 24 GB file): detected as FLUX under Comfy's prefix, the transformer mapped, its config derived from the shapes
/// (FLUX.1's rotary axes for 128-wide heads) equal to diffusers' defaults, dev told by `guidance_in`, and the
/// family's scheduler the flow-matching one.
#[test]
fn real_size_header_gives_flux1_configs() {
    use lowvram::weights::single_file::{SingleFileMap, StoredTensor};
    for (cfg, name) in [(FluxConfig::dev(), "dev"), (FluxConfig::schnell(), "schnell")] {
        let m = FluxTransformer::new(cfg.clone()).unwrap();
        let mut at = 0usize;
        let tensors: Vec<StoredTensor> = m
            .tensor_shapes()
            .into_iter()
            .map(|(n, shape)| {
                let len = 2 * shape.iter().product::<usize>();
                at += len;
                StoredTensor {
                    name: format!("model.diffusion_model.{n}"),
                    dtype: Some(DType::BF16),
                    shape,
                    bytes: at - len..at,
                }
            })
            .collect();
        // dev: 11,901,408,320 parameters (diffusers' count); schnell lacks guidance_in (256→3072→3072 with biases).
        let guidance_in = 256 * 3072 + 3072 + 3072 * 3072 + 3072;
        let params = if name == "dev" { 11_901_408_320 } else { 11_901_408_320 - guidance_in };
        assert_eq!(at, 2 * params);
        let map = SingleFileMap::new(name, tensors, None, None).unwrap();
        assert_eq!(map.family(), Family::Flux);
        assert_eq!(map.components(), vec![Component::Transformer]);
        let json = map.config(Component::Transformer).unwrap();
        assert_eq!(FluxConfig::from_json(&json.to_string()).unwrap(), cfg, "{name}");
        let sched = map.scheduler_config().unwrap();
        assert_eq!(sched["_class_name"], "FlowMatchEulerDiscreteScheduler");
    }
}
