//! SDXL (issue 15, deliverable 3) against diffusers 0.42.1: the tiny SDXL-style pipeline and references written by
//! `scripts/make_sdxl_fixtures.py` (tests/fixtures/tiny-sdxl). Through the public Rust API: the UNet with added
//! conditioning, the denoise loop with CFG (euler, dpmpp_2m) as StableDiffusionXLPipeline runs it, the SDXL VAE
//! decode, the UNet family's block partition, and streaming under a tight budget bit-identical to resident weights.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use lowvram::config::Config;
use lowvram::memory::ModelCache;
use lowvram::models::unet::block_of;
use lowvram::models::{AddedCond, AutoencoderKL, UNet2DConditionModel, VaeConfig};
use lowvram::sampling::{denoise, DenoiseParams, SchedulerConfig, SchedulerKind};
use lowvram::{block_key, BlockWeights, Error, ResidentWeights, WeightSource};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir(part: &str) -> PathBuf {
    root().join("tests/fixtures/tiny-sdxl/model").join(part)
}

fn weights(part: &str) -> PathBuf {
    model_dir(part).join("diffusion_pytorch_model.safetensors")
}

/// The fixtures are committed: a missing file is a failure, never a skip.
fn fixture(file: &str) -> HashMap<String, Tensor> {
    let p = root().join("tests/fixtures/tiny-sdxl").join(file);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e} (see tests/fixtures/README.md)", p.display()))
}

fn unet() -> UNet2DConditionModel {
    UNet2DConditionModel::from_config_file(&model_dir("unet").join("config.json")).unwrap()
}

fn resident(part: &str) -> ResidentWeights {
    ResidentWeights::load(&weights(part), &Device::Cpu, DType::F32).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_of(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn config_reads_sdxl_keys() {
    let m = unet();
    let c = m.config();
    assert_eq!(c.transformer_layers, vec![1, 2]);
    assert_eq!(c.attention_heads, vec![2, 4]);
    assert!(c.use_linear_projection);
    assert_eq!(c.cross_attention_dim, 64);
    assert_eq!(m.needs_added_cond(), Some((32, 6)));
    let v = VaeConfig::from_file(&model_dir("vae").join("config.json")).unwrap();
    assert_eq!(v.scaling_factor, 0.13025);
    assert!(v.force_upcast());
    assert_eq!(v.shift_factor, None);
}

/// One UNet call with per-row, non-default micro-conditioning.
#[test]
fn unet_forward_with_added_cond_matches_diffusers() {
    let f = fixture("unet_forward.safetensors");
    let added = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: f["time_ids"].clone(),
    };
    let out = unet()
        .forward_with(
            &resident("unet"),
            &f["sample"],
            scalar(&f["timestep"]),
            &f["encoder_hidden_states"],
            Some(&added),
        )
        .unwrap();
    let (err, scale) = (max_abs(&out, &f["out"]), max_of(&f["out"]));
    println!("unet forward: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= 1e-4 * scale.max(1.0), "max abs err {err}");
    // The conditioning is used: other time ids give another output.
    let other = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: Tensor::cat(
            &[
                f["time_ids"].get(1).unwrap().unsqueeze(0).unwrap(),
                f["time_ids"].get(0).unwrap().unsqueeze(0).unwrap(),
            ],
            0,
        )
        .unwrap(),
    };
    let out2 = unet()
        .forward_with(
            &resident("unet"),
            &f["sample"],
            scalar(&f["timestep"]),
            &f["encoder_hidden_states"],
            Some(&other),
        )
        .unwrap();
    assert!(max_abs(&out, &out2) > 1e-2);
}

#[test]
fn missing_or_misshapen_added_cond_is_invalid_argument_naming_it() {
    let f = fixture("unet_forward.safetensors");
    let (m, w) = (unet(), resident("unet"));
    let (x, ehs) = (&f["sample"], &f["encoder_hidden_states"]);
    let invalid = |r: lowvram::Result<Tensor>| match r {
        Err(Error::InvalidArgument(msg)) => msg,
        other => panic!("expected InvalidArgument, got {:?}", other.map(|t| t.dims().to_vec())),
    };
    let msg = invalid(m.forward(&w, x, 10.0, ehs));
    assert!(
        msg.contains("sampling.cond_pooled [2, 32]") && msg.contains("sampling.time_ids [2, 6]"),
        "{msg}"
    );
    let bad = AddedCond {
        text_embeds: Tensor::zeros((2, 31), DType::F32, &Device::Cpu).unwrap(),
        time_ids: f["time_ids"].clone(),
    };
    let msg = invalid(m.forward_with(&w, x, 10.0, ehs, Some(&bad)));
    assert!(
        msg.contains("sampling.cond_pooled") && msg.contains("[2, 31]") && msg.contains("[2, 32]"),
        "{msg}"
    );
    let bad = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap(),
    };
    let msg = invalid(m.forward_with(&w, x, 10.0, ehs, Some(&bad)));
    assert!(msg.contains("sampling.time_ids") && msg.contains("[2, 6]"), "{msg}");
    let nan = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: (f["time_ids"].clone() * f64::NAN).unwrap(),
    };
    let msg = invalid(m.forward_with(&w, x, 10.0, ehs, Some(&nan)));
    assert!(msg.contains("sampling.time_ids"), "{msg}");
    // An SD 1.x UNet takes none.
    let sd = UNet2DConditionModel::from_config_file(&root().join("tests/fixtures/tiny-sd-random/unet/config.json")).unwrap();
    assert_eq!(sd.needs_added_cond(), None);
    let sdw = ResidentWeights::load(
        &root().join("tests/fixtures/tiny-sd-random/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let x1 = Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e1 = Tensor::zeros((2, 77, sd.config().cross_attention_dim), DType::F32, &Device::Cpu).unwrap();
    let msg = invalid(sd.forward_with(
        &sdw,
        &x1,
        10.0,
        &e1,
        Some(&AddedCond {
            text_embeds: f["text_embeds"].clone(),
            time_ids: f["time_ids"].clone(),
        }),
    ));
    assert!(msg.contains("no added conditioning"), "{msg}");
}

/// The closure StableDiffusionXLPipeline's loop amounts to: CFG batch `[uncond; cond]` for the embeddings, the
/// pooled embeddings and the time ids (the same for both halves).
struct Sdxl {
    ehs: Tensor,
    added: AddedCond,
}

impl Sdxl {
    fn new(f: &HashMap<String, Tensor>, latent_hw: (usize, usize), vae_scale: usize) -> Self {
        let ehs = Tensor::cat(&[&f["sampling.uncond_embeddings"], &f["sampling.cond_embeddings"]], 0).unwrap();
        let pooled = Tensor::cat(&[&f["sampling.uncond_pooled"], &f["sampling.cond_pooled"]], 0).unwrap();
        // add_time_ids = original_size + crops_coords_top_left + target_size = (H, W, 0, 0, H, W) in pixels.
        let (h, w) = ((latent_hw.0 * vae_scale) as f32, (latent_hw.1 * vae_scale) as f32);
        let ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w], [h, w, 0.0, 0.0, h, w]], &Device::Cpu).unwrap();
        assert_eq!(
            bits(&ids),
            bits(&f["debug.unet_time_ids"]),
            "time ids differ from the pipeline's"
        );
        assert_eq!(
            bits(&pooled),
            bits(&f["debug.unet_text_embeds"]),
            "pooled embeddings differ from the pipeline's"
        );
        Self {
            ehs,
            added: AddedCond {
                text_embeds: pooled,
                time_ids: ids,
            },
        }
    }

    fn run(&self, m: &UNet2DConditionModel, w: &dyn WeightSource, kind: SchedulerKind, init: &Tensor) -> Tensor {
        let cfg = SchedulerConfig::from_file(model_dir("scheduler").join("scheduler_config.json")).unwrap();
        let params = DenoiseParams {
            kind,
            karras: false,
            steps: 8,
            guidance: 5.0,
            seed: 0,
            scheduler_config: cfg,
        };
        let mut model = |x: &Tensor, t: f64| m.forward_with(w, x, t, &self.ehs, Some(&self.added));
        denoise(
            &mut model,
            &params,
            init,
            None,
            &mut |_, _| true,
            &AtomicBool::new(false),
        )
        .unwrap()
    }
}

#[test]
fn denoise_with_cfg_and_decode_match_diffusers() {
    let (m, w) = (unet(), resident("unet"));
    let vae = AutoencoderKL::from_config_file(&model_dir("vae").join("config.json")).unwrap();
    let vw = resident("vae");
    for (kind, file) in [
        (SchedulerKind::Euler, "sample_euler.safetensors"),
        (SchedulerKind::DpmPP2M, "sample_dpmpp_2m.safetensors"),
    ] {
        let f = fixture(file);
        let init = &f["sampling.init_noise"];
        let (_, _, h, wd) = init.dims4().unwrap();
        let s = Sdxl::new(&f, (h, wd), vae.config().downscale());
        let latents = s.run(&m, &w, kind, init);
        let (err, scale) = (max_abs(&latents, &f["latents"]), max_of(&f["latents"]));
        let image = vae
            .decode(&vw, &(&latents / vae.config().scaling_factor).unwrap())
            .unwrap();
        let img_err = max_abs(&image, &f["image"]);
        // The decode alone, from diffusers' latents.
        let image_ref = vae
            .decode(&vw, &(&f["latents"] / vae.config().scaling_factor).unwrap())
            .unwrap();
        let dec_err = max_abs(&image_ref, &f["image"]);
        println!("{kind}: latents max abs err {err:.3e} (max |ref| {scale:.2}); image {img_err:.3e}; decode alone {dec_err:.3e}");
        assert!(err <= 1e-3 * scale.max(1.0), "{kind}: latents max abs err {err}");
        assert!(img_err <= 3e-3, "{kind}: image max abs err {img_err}");
        assert!(dec_err <= 3e-3, "{kind}: decode max abs err {dec_err}");
    }
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

/// The UNet family's partition: attention stacks split at `transformer_blocks.k` with proj_out apart; the forward
/// fetches every unit of the checkpoint exactly once, one at a time; the store's global rule agrees.
#[test]
fn forward_fetches_every_unit_once_one_at_a_time() {
    let tensors = candle_core::safetensors::load(weights("unet"), &Device::Cpu).unwrap();
    let mut blocks: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (name, t) in &tensors {
        let key = block_of(name);
        assert_eq!(block_key(name), key, "{name}");
        blocks
            .entry(key.to_string())
            .or_default()
            .insert(name[key.len()..].trim_start_matches('.').to_string(), t.clone());
    }
    let units: BTreeSet<String> = blocks.keys().cloned().collect();
    for u in [
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.0.transformer_blocks.1",
        "down_blocks.1.attentions.0.proj_out",
        "add_embedding",
        "mid_block.attentions.0.transformer_blocks.1",
    ] {
        assert!(units.contains(u), "no unit {u}: {units:?}");
    }
    assert!(
        !units.iter().any(|u| u.starts_with("down_blocks.0.attentions")),
        "the first down block has no attention"
    );
    let src = Recording {
        blocks,
        live: Arc::new(AtomicUsize::new(0)),
        log: Mutex::new(vec![]),
    };
    let f = fixture("unet_forward.safetensors");
    let added = AddedCond {
        text_embeds: f["text_embeds"].clone(),
        time_ids: f["time_ids"].clone(),
    };
    let out = unet()
        .forward_with(
            &src,
            &f["sample"],
            scalar(&f["timestep"]),
            &f["encoder_hidden_states"],
            Some(&added),
        )
        .unwrap();
    assert!(max_abs(&out, &f["out"]) <= 1e-4);
    let log = src.log.lock().unwrap().clone();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, live) in &log {
        assert_eq!(*live, 0, "{k} fetched while another unit was held");
        *counts.entry(k.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_eq!(counts.keys().map(|s| s.to_string()).collect::<BTreeSet<_>>(), units);
    // The SD 1.x / 2.x and VAE checkpoints: the unit rule and the store's rule agree on every name.
    for p in [
        "tests/fixtures/tiny-sd-random/unet",
        "tests/fixtures/tiny-sd-random/vae",
        "tests/fixtures/tiny-sd2/model/unet",
        "tests/fixtures/tiny-sdxl/model/vae",
    ] {
        for name in
            candle_core::safetensors::load(root().join(p).join("diffusion_pytorch_model.safetensors"), &Device::Cpu)
                .unwrap()
                .keys()
        {
            assert_eq!(block_of(name), block_key(name), "{p}: {name}");
        }
    }
}

/// The whole SDXL denoise streamed through the memory manager under a budget that holds about a third of the
/// UNet: zero refused allocations, bytes streamed per forward = model − resident, and latents bit-identical to
/// resident weights.
#[test]
fn streamed_under_tight_budget_is_bit_identical_to_resident() {
    let m = unet();
    let f = fixture("sample_euler.safetensors");
    let init = &f["sampling.init_noise"];
    let (_, _, h, w) = init.dims4().unwrap();
    let s = Sdxl::new(&f, (h, w), 8);
    let reference = s.run(&m, &resident("unet"), SchedulerKind::Euler, init);

    let total = std::fs::metadata(weights("unet")).unwrap().len();
    let work: u64 = 1 << 20;
    for prefetch in [false, true] {
        let mut cfg = Config::default();
        cfg.set("device", &format!("emulated:{}", work + total / 3)).unwrap();
        cfg.set(
            "device_working_mem_gb",
            &format!("{}", work as f64 / (1u64 << 30) as f64),
        )
        .unwrap();
        cfg.set("async_loading", if prefetch { "true" } else { "false" })
            .unwrap();
        let cache = ModelCache::new(cfg).unwrap();
        let mm = cache.load_model(&weights("unet"), "unet").unwrap();
        let largest = mm.blocks().iter().map(|b| b.storage_bytes).max().unwrap();
        let lock = cache.lock(&mm, 0).unwrap();
        let resident_bytes = mm.resident_bytes();
        assert!(
            resident_bytes > 0 && resident_bytes < mm.total_bytes(),
            "partial residency expected: {resident_bytes}"
        );
        let latents = s.run(&m, &lock, SchedulerKind::Euler, init);
        println!(
            "prefetch {prefetch}: {} units, largest {largest} B, resident {resident_bytes} of {} B, streamed {} B over 8 forwards",
            mm.blocks().len(),
            mm.total_bytes(),
            lock.bytes_streamed()
        );
        assert_eq!(
            bits(&latents),
            bits(&reference),
            "streamed result differs from resident"
        );
        assert_eq!(
            lock.bytes_streamed(),
            8 * (mm.total_bytes() - resident_bytes),
            "streamed = steps × (model − resident)"
        );
        assert_eq!(cache.allocator().refused(), 0, "refused allocations");
    }

    // The SDXL VAE decode of those latents, streamed the same way.
    let vae = AutoencoderKL::from_config_file(&model_dir("vae").join("config.json")).unwrap();
    let z = (&reference / vae.config().scaling_factor).unwrap();
    let image = vae.decode(&resident("vae"), &z).unwrap();
    let total = std::fs::metadata(weights("vae")).unwrap().len();
    let mut cfg = Config::default();
    cfg.set("device", &format!("emulated:{}", work + total / 3)).unwrap();
    cfg.set(
        "device_working_mem_gb",
        &format!("{}", work as f64 / (1u64 << 30) as f64),
    )
    .unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let mv = cache.load_model(&weights("vae"), "vae").unwrap();
    let lock = cache.lock(&mv, 0).unwrap();
    assert!(mv.resident_bytes() < mv.total_bytes());
    let streamed = vae.decode(&lock, &z).unwrap();
    assert_eq!(bits(&streamed), bits(&image), "streamed decode differs from resident");
    assert!(lock.bytes_streamed() > 0);
    assert_eq!(cache.allocator().refused(), 0, "refused allocations");
}

/// The checkpoint layout the model derives from its config is exactly the tiny SDXL file's (names and shapes), so
/// unit sizes computed from a config alone (the real SDXL's, in the library's unit tests) are those of real files.
#[test]
fn tensor_shapes_match_the_checkpoint() {
    for (model, file) in [
        (unet(), weights("unet")),
        (
            UNet2DConditionModel::from_config_file(&root().join("tests/fixtures/tiny-sd-random/unet/config.json")).unwrap(),
            root().join("tests/fixtures/tiny-sd-random/unet/diffusion_pytorch_model.safetensors"),
        ),
    ] {
        let ours: BTreeMap<String, Vec<usize>> = model.tensor_shapes().into_iter().collect();
        let file: BTreeMap<String, Vec<usize>> = candle_core::safetensors::load(&file, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
        assert_eq!(ours, file);
    }
}

/// The SDXL UNet computing in f16 (weights, activations and the added embedding's input cast like diffusers does)
/// stays close to the f32 reference.
#[test]
fn f16_compute_is_close_to_f32() {
    let f = fixture("unet_forward.safetensors");
    let added = AddedCond { text_embeds: f["text_embeds"].clone(), time_ids: f["time_ids"].clone() };
    let w16 = ResidentWeights::load(&weights("unet"), &Device::Cpu, DType::F16).unwrap();
    let out = unet()
        .forward_with(&w16, &f["sample"], scalar(&f["timestep"]), &f["encoder_hidden_states"], Some(&added))
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let (err, scale) = (max_abs(&out, &f["out"]), max_of(&f["out"]));
    println!("f16 unet forward: max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= 2e-2 * scale.max(1.0), "max abs err {err}");
}
