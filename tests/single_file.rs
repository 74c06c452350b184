//! Single-file (LDM/SGM) checkpoints through the public API: the mapping gives exactly the diffusers folders'
//! tensors (names, shapes, dtypes, bytes), the family and components are detected, extras are skipped, stray keys
//! and missing components fail with clear errors, and the derived configs agree with the folders'.
//!
//! The fixtures (tests/fixtures/single-file) are written by scripts/make_single_file_fixtures.py, which checks
//! them against diffusers' own single-file loader.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use lowvram::weights::single_file::{
    config, Component, ComponentFile, Family, SingleFile, SingleFileMap, StoredTensor,
};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/single-file").join(name)
}

/// The diffusers-folder file holding a component of a fixture.
fn folder_file(model: &str, c: Component) -> PathBuf {
    let base = match (model, c) {
        ("sd1", Component::Unet | Component::Vae) => repo().join("tests/fixtures/tiny-sd-random"),
        ("sd2", Component::Unet | Component::Vae) => repo().join("tests/fixtures/tiny-sd2/model"),
        _ => fixture(model),
    };
    let dir = base.join(c.name());
    match c {
        Component::Unet | Component::Vae => dir.join("diffusion_pytorch_model.safetensors"),
        _ => dir.join("model.safetensors"),
    }
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    // f16/bf16 → f32 is exact, so equal f32 bits ⇔ equal stored bits.
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn components_of(model: &str) -> Vec<Component> {
    match model {
        "sdxl" => vec![Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2],
        _ => vec![Component::Unet, Component::Vae, Component::TextEncoder],
    }
}

#[test]
fn mapping_reproduces_every_folder_tensor_bit_for_bit() {
    for model in ["sd1", "sd2", "sdxl"] {
        let sf = SingleFile::open(&fixture(&format!("{model}.safetensors"))).unwrap();
        for c in components_of(model) {
            let map = sf.component(c).unwrap();
            let want = load(&folder_file(model, c));
            let got: BTreeSet<&str> = map.entries.iter().map(|e| e.internal_name.as_str()).collect();
            let names: BTreeSet<&str> = want.keys().map(String::as_str).collect();
            let extra: Vec<_> = got.difference(&names).collect();
            let missing: Vec<_> = names.difference(&got).collect();
            assert!(
                extra.is_empty() && missing.is_empty(),
                "{model} {c}: mapped but not in the folder {extra:?}, in the folder but not mapped {missing:?}"
            );
            for e in &map.entries {
                let w = &want[&e.internal_name];
                assert_eq!(e.shape, w.dims(), "{model} {c} {}", e.internal_name);
                assert_eq!(e.dtype, w.dtype(), "{model} {c} {}", e.internal_name);
                let t = sf.read_tensor(e).unwrap();
                assert_eq!(t.dims(), w.dims(), "{model} {c} {}", e.internal_name);
                assert_eq!(t.dtype(), w.dtype(), "{model} {c} {}", e.internal_name);
                assert!(bits(&t) == bits(w), "{model} {c} {}: bytes differ (from {})", e.internal_name, e.stored_name);
                // A mapped tensor is one contiguous byte range of the file (row slices included).
                let elems: usize = e.shape.iter().product();
                assert_eq!(e.bytes.len(), elems * e.dtype.size_in_bytes(), "{model} {c} {}", e.internal_name);
            }
        }
    }
}

#[test]
fn family_and_components_are_detected() {
    for (model, family) in [("sd1", Family::Sd1), ("sd2", Family::Sd2), ("sdxl", Family::Sdxl)] {
        let sf = SingleFile::open(&fixture(&format!("{model}.safetensors"))).unwrap();
        assert_eq!(sf.family(), family, "{model}");
        assert_eq!(sf.components(), components_of(model), "{model}");
        assert!(sf.missing().is_empty(), "{model}");
    }
}

#[test]
fn open_clip_in_proj_is_split_into_row_ranges_and_text_projection_transposed() {
    let sf = SingleFile::open(&fixture("sd2.safetensors")).unwrap();
    let te = sf.component(Component::TextEncoder).unwrap();
    let stored = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight";
    let parts: Vec<_> = te.entries.iter().filter(|e| e.stored_name == stored).collect();
    assert_eq!(parts.len(), 3);
    let base = parts.iter().map(|e| e.bytes.start).min().unwrap();
    for (name, r) in [("q_proj", 0..40), ("k_proj", 40..80), ("v_proj", 80..120)] {
        let e = te.get(&format!("text_model.encoder.layers.3.self_attn.{name}.weight")).unwrap();
        assert_eq!(e.stored_name, stored);
        assert_eq!(e.rows, Some(r.clone()));
        assert_eq!(e.stored_shape, vec![120, 40]);
        assert_eq!(e.shape, vec![40, 40]);
        assert_eq!(e.bytes.start - base, r.start * 40 * 4, "{name}: rows are consecutive byte ranges");
        assert!(!e.transpose && !e.reshape);
    }
    let sdxl = SingleFile::open(&fixture("sdxl.safetensors")).unwrap();
    let te2 = sdxl.component(Component::TextEncoder2).unwrap();
    let p = te2.get("text_projection.weight").unwrap();
    assert_eq!(p.stored_name, "conditioner.embedders.1.model.text_projection");
    assert!(p.transpose);
    assert_eq!((p.stored_shape.clone(), p.shape.clone()), (vec![40, 24], vec![24, 40]));
    // VAE attention: LDM's 1x1 convs read as linears, same bytes.
    let vae = sdxl.component(Component::Vae).unwrap();
    let q = vae.get("decoder.mid_block.attentions.0.to_q.weight").unwrap();
    assert_eq!(q.stored_name, "first_stage_model.decoder.mid.attn_1.q.weight");
    assert!(q.reshape && !q.transpose);
    assert_eq!((q.stored_shape.clone(), q.shape.clone()), (vec![16, 16, 1, 1], vec![16, 16]));
    // SDXL's label_emb is the text_time add_embedding.
    let unet = sdxl.component(Component::Unet).unwrap();
    assert_eq!(
        unet.get("add_embedding.linear_1.weight").unwrap().stored_name,
        "model.diffusion_model.label_emb.0.0.weight"
    );
}

#[test]
fn known_extras_are_skipped() {
    let sd1 = SingleFile::open(&fixture("sd1.safetensors")).unwrap();
    let skipped: BTreeSet<&str> = sd1.skipped().iter().map(String::as_str).collect();
    for k in [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "model_ema.decay",
        "model_ema.num_updates",
        "model_ema.diffusion_modelinput_blocks00weight",
        "alphas_cumprod",
        "betas",
        "sqrt_alphas_cumprod",
    ] {
        assert!(skipped.contains(k), "sd1: {k} not skipped: {skipped:?}");
    }
    assert_eq!(skipped.len(), 7, "{skipped:?}");
    let sd2 = SingleFile::open(&fixture("sd2.safetensors")).unwrap();
    let s2 = sd2.skipped();
    assert!(s2.iter().any(|k| k == "cond_stage_model.model.text_projection"));
    assert!(s2.iter().any(|k| k == "cond_stage_model.model.logit_scale"));
    // diffusers' SD 2 text encoder keeps 23 of OpenCLIP-H's 24 resblocks.
    assert_eq!(s2.iter().filter(|k| k.contains("resblocks.23.")).count(), 12);
    let sdxl = SingleFile::open(&fixture("sdxl.safetensors")).unwrap();
    assert_eq!(sdxl.skipped(), ["conditioner.embedders.1.model.logit_scale"]);
}

/// Copy `src` to a temporary file, dropping keys `drop` rejects and adding `add` (name, f32 shape).
fn rewrite(src: &Path, tag: &str, drop: impl Fn(&str) -> bool, add: &[(&str, Vec<usize>)]) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| !drop(n)).collect();
    let extra: Vec<(String, Vec<usize>, Vec<u8>)> =
        add.iter().map(|(n, s)| (n.to_string(), s.clone(), vec![0u8; s.iter().product::<usize>() * 4])).collect();
    for (n, s, d) in &extra {
        views.push((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()));
    }
    let dir = std::env::temp_dir().join(format!("lowvram-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.safetensors"));
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn a_stray_key_fails_naming_it() {
    for stray in [
        "model.diffusion_model.input_blocks.1.7.weight",
        "cond_stage_model.transformer.text_model.foo.weight",
        "unrelated.tensor",
    ] {
        let path = rewrite(&fixture("sd1.safetensors"), "stray", |_| false, &[(stray, vec![2, 2])]);
        let err = SingleFile::open(&path).unwrap_err().to_string();
        assert!(err.contains(stray) && err.contains("no SD 1.x single-file rule maps"), "{err}");
    }
}

#[test]
fn a_file_without_vae_says_pass_vae() {
    let path = rewrite(&fixture("sd1.safetensors"), "novae", |n| n.starts_with("first_stage_model."), &[]);
    let sf = SingleFile::open(&path).unwrap();
    assert_eq!(sf.family(), Family::Sd1);
    assert_eq!(sf.components(), vec![Component::Unet, Component::TextEncoder]);
    assert_eq!(sf.missing(), vec![Component::Vae]);
    let err = sf.component(Component::Vae).unwrap_err().to_string();
    assert!(err.contains("no VAE in this file: pass --vae"), "{err}");
    // Without text encoders, the tiny UNet's 32-wide context does not tell the family.
    let unet_only = rewrite(&fixture("sd1.safetensors"), "unetonly", |n| !n.starts_with("model.diffusion_model."), &[]);
    let err = SingleFile::open(&unet_only).unwrap_err().to_string();
    assert!(err.contains("32-wide cross-attention") && err.contains("cannot tell the family"), "{err}");
    let path = rewrite(&fixture("sdxl.safetensors"), "note2", |n| n.starts_with("conditioner.embedders.1."), &[]);
    let sf = SingleFile::open(&path).unwrap();
    assert_eq!(sf.family(), Family::Sdxl);
    let err = sf.component(Component::TextEncoder2).unwrap_err().to_string();
    assert!(err.contains("pass --text-encoder-2"), "{err}");
}

fn folder_config(model: &str, c: Component) -> Value {
    let p = folder_file(model, c).parent().unwrap().join("config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every derived key equals the folder's, except those LDM cannot express (norm groups: LDM fixes 32).
fn assert_config_matches(model: &str, c: Component, derived: &Value, except: &[&str]) {
    let want = folder_config(model, c);
    for (k, v) in derived.as_object().unwrap() {
        if except.contains(&k.as_str()) || k.starts_with('_') || k == "architectures" {
            continue;
        }
        assert_eq!(Some(v), want.get(k), "{model} {c} config key {k}");
    }
}

#[test]
fn configs_from_shapes_and_the_ldm_yaml_match_the_folders() {
    for model in ["sd1", "sd2", "sdxl"] {
        let sf = SingleFile::open(&fixture(&format!("{model}.safetensors"))).unwrap();
        let unet = sf.config(Component::Unet).unwrap();
        assert_config_matches(model, Component::Unet, &unet, &["norm_num_groups", "sample_size"]);
        let vae = sf.config(Component::Vae).unwrap();
        assert_config_matches(model, Component::Vae, &vae, &["norm_num_groups", "sample_size"]);
        // The tiny encoders' heads are not 64 wide: the derived config says so instead of guessing.
        let err = sf.config(Component::TextEncoder).unwrap_err().to_string();
        assert!(err.contains("attention heads") && err.contains("config folder"), "{err}");
    }
    let sd2 = SingleFile::open(&fixture("sd2.safetensors")).unwrap();
    assert_eq!(sd2.config(Component::Unet).unwrap()["attention_head_dim"], serde_json::json!([2, 4, 8]));
    assert_eq!(sd2.prediction_type(), "v_prediction");
    assert_eq!(SingleFile::open(&fixture("sd1.safetensors")).unwrap().prediction_type(), "epsilon");
    let sdxl = SingleFile::open(&fixture("sdxl.safetensors")).unwrap();
    let u = sdxl.config(Component::Unet).unwrap();
    assert_eq!(u["addition_time_embed_dim"], 8);
    assert_eq!(u["transformer_layers_per_block"], serde_json::json!([1, 2, 2]));
    assert_eq!(sdxl.config(Component::Vae).unwrap()["scaling_factor"], 0.13025);
}

#[test]
fn a_config_folder_gives_the_components_configs() {
    for model in ["sd1", "sd2", "sdxl"] {
        let sf =
            SingleFile::open_with_config(&fixture(&format!("{model}.safetensors")), Some(&fixture(model))).unwrap();
        for c in components_of(model) {
            assert_eq!(sf.config(c).unwrap(), folder_config(model, c), "{model} {c}");
        }
        let sched = fixture(model).join("scheduler/scheduler_config.json");
        let want: Value = serde_json::from_str(&std::fs::read_to_string(sched).unwrap()).unwrap();
        assert_eq!(sf.scheduler_config().unwrap(), want, "{model}");
    }
    let sf = SingleFile::open_with_config(&fixture("sdxl.safetensors"), Some(&fixture("sdxl"))).unwrap();
    assert_eq!(sf.config(Component::TextEncoder2).unwrap()["projection_dim"], 24);
}

/// A real-size key list (tests/fixtures/single-file/real-keys, written from the standard architectures and
/// checked against diffusers' converters) as the header of a file: names, dtypes, shapes, consecutive byte ranges.
fn real_size_map(name: &str) -> (SingleFileMap, Value) {
    // Stored gzip-compressed (the script writes `NAME.json.gz`): decompressed here.
    let path = fixture(&format!("real-keys/{name}.json.gz"));
    let doc: Value = serde_json::from_reader(flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())).unwrap();
    let mut offset = 0;
    let mut tensors = Vec::new();
    for t in doc["tensors"].as_array().unwrap() {
        let shape: Vec<usize> = t[2].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let (dtype, size) = match t[1].as_str().unwrap() {
            "F16" => (Some(DType::F16), 2),
            _ => (None, 8),
        };
        let len = shape.iter().product::<usize>() * size;
        tensors.push(StoredTensor {
            name: t[0].as_str().unwrap().to_string(),
            dtype,
            shape,
            bytes: offset..offset + len,
        });
        offset += len;
    }
    (SingleFileMap::new(name, tensors, None, None).unwrap(), doc["expected"].clone())
}

#[test]
fn real_size_checkpoints_map_completely_and_get_the_standard_configs() {
    for (name, family, prediction) in
        [("sd15", Family::Sd1, "epsilon"), ("sd21", Family::Sd2, "v_prediction"), ("sdxl", Family::Sdxl, "epsilon")]
    {
        let (map, expected) = real_size_map(name);
        assert_eq!(map.family(), family, "{name}");
        assert!(map.missing().is_empty(), "{name}: {:?}", map.missing());
        assert_eq!(map.prediction_type(), prediction, "{name}");
        for c in map.components() {
            let m = map.component(c).unwrap();
            let want = &expected[c.name()];
            let elements: usize = m.entries.iter().map(|e| e.shape.iter().product::<usize>()).sum();
            assert_eq!(m.entries.len() as u64, want["tensors"].as_u64().unwrap(), "{name} {c}: tensors");
            assert_eq!(elements as u64, want["elements"].as_u64().unwrap(), "{name} {c}: elements");
            let standard = match c {
                Component::Unet => config::standard_unet(family).unwrap(),
                Component::Vae => config::standard_vae(family),
                _ => config::standard_text_encoder(family, c),
            };
            assert_eq!(map.config(c).unwrap(), standard, "{name} {c}: not recognised as the standard config");
        }
    }
    // The derived SD 1.x/2.x configs are accepted by the models' config parsers (SDXL's UNet is not supported by
    // the UNet model yet, so only its VAE is parsed).
    use lowvram::models::{UNetConfig, VaeConfig};
    for name in ["sd15", "sd21", "sdxl"] {
        let (map, _) = real_size_map(name);
        if name != "sdxl" {
            UNetConfig::from_json(&map.config(Component::Unet).unwrap().to_string()).unwrap();
        }
        VaeConfig::from_json(&map.config(Component::Vae).unwrap().to_string()).unwrap();
    }
    let (sd21, _) = real_size_map("sd21");
    assert_eq!(sd21.config(Component::TextEncoder).unwrap()["num_hidden_layers"], 23);
    let (sdxl, _) = real_size_map("sdxl");
    let te2 = sdxl.component(Component::TextEncoder2).unwrap();
    assert!(te2.get("text_projection.weight").unwrap().transpose);
    let unet = sdxl.component(Component::Unet).unwrap();
    // SDXL's deepest attention stack: 10 transformer blocks per attention at 1280 channels.
    assert!(unet.get("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight").is_some());
    assert_eq!(
        unet.get("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight").unwrap().shape,
        vec![1280, 2048]
    );
}

#[test]
fn v_pred_and_ztsnr_markers_set_the_prediction_type() {
    let path = rewrite(&fixture("sdxl.safetensors"), "vpred", |_| false, &[("v_pred", vec![0]), ("ztsnr", vec![0])]);
    let sf = SingleFile::open(&path).unwrap();
    assert_eq!(sf.prediction_type(), "v_prediction");
    assert!(sf.zero_terminal_snr());
    assert!(sf.skipped().iter().any(|k| k == "v_pred"));
    let sched = sf.scheduler_config().unwrap();
    assert_eq!(
        (sched["prediction_type"].as_str(), sched["rescale_betas_zero_snr"].as_bool()),
        (Some("v_prediction"), Some(true))
    );
    let plain = SingleFile::open(&fixture("sdxl.safetensors")).unwrap();
    assert_eq!(plain.prediction_type(), "epsilon");
    assert!(!plain.zero_terminal_snr());
}

#[test]
fn scheduler_configs_follow_the_family_and_the_yaml() {
    use lowvram::sampling::{PredictionType, SchedulerConfig, SchedulerKind};
    for (model, class, prediction) in [
        ("sd1", "PNDMScheduler", PredictionType::Epsilon),
        ("sd2", "DDIMScheduler", PredictionType::VPrediction),
        ("sdxl", "EulerDiscreteScheduler", PredictionType::Epsilon),
    ] {
        let sf = SingleFile::open(&fixture(&format!("{model}.safetensors"))).unwrap();
        let v = sf.scheduler_config().unwrap();
        assert_eq!(v["_class_name"], class, "{model}");
        let resolved = SchedulerConfig::from_value(&v).unwrap().resolve(SchedulerKind::Euler).unwrap();
        assert_eq!(resolved.prediction_type, prediction, "{model}");
    }
    // SD 2.x without its yaml: v-prediction, as diffusers' SD 2.1 default; with an epsilon yaml: epsilon.
    let path = rewrite(&fixture("sd2.safetensors"), "sd2-bare", |_| false, &[]);
    let bare = SingleFile::open(&path).unwrap();
    assert_eq!(bare.prediction_type(), "v_prediction");
    std::fs::write(path.with_extension("yaml"), "model:\n  params:\n    scale_factor: 0.18215\n").unwrap();
    assert_eq!(SingleFile::open(&path).unwrap().prediction_type(), "epsilon");
}

/// The single file through the models: the tiny UNets and VAEs built from the file's derived configs and mapped
/// tensors give diffusers' reference outputs (tests/fixtures/tiny-sd*/), bit-identical to the folder-loaded run.
#[test]
fn single_file_models_match_the_folder_and_diffusers() {
    use candle_core::Device;
    use lowvram::models::{AutoencoderKL, UNet2DConditionModel, UNetConfig, VaeConfig};
    use lowvram::ResidentWeights;
    for (model, refs) in [("sd1", "tiny-sd"), ("sd2", "tiny-sd2")] {
        let sf =
            SingleFile::open_with_config(&fixture(&format!("{model}.safetensors")), Some(&fixture(model))).unwrap();
        let cfg = UNetConfig::from_json(&sf.config(Component::Unet).unwrap().to_string()).unwrap();
        let unet = UNet2DConditionModel::new(cfg).unwrap();
        let from_file =
            ResidentWeights::from_tensors(sf.read_component(Component::Unet).unwrap(), &Device::Cpu, DType::F32)
                .unwrap();
        let from_folder =
            ResidentWeights::load(&folder_file(model, Component::Unet), &Device::Cpu, DType::F32).unwrap();
        let f = load(&repo().join("tests/fixtures").join(refs).join("unet_forward.safetensors"));
        let t = f["timestep"].flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
        let out = unet.forward(&from_file, &f["sample"], t, &f["encoder_hidden_states"]).unwrap();
        let folder_out = unet.forward(&from_folder, &f["sample"], t, &f["encoder_hidden_states"]).unwrap();
        assert!(bits(&out) == bits(&folder_out), "{model}: single-file UNet output differs from the folder's");
        let max = (&out - &f["out"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max <= 1e-4, "{model}: UNet vs diffusers max abs {max}");

        let vcfg = VaeConfig::from_json(&sf.config(Component::Vae).unwrap().to_string()).unwrap();
        let vae = AutoencoderKL::new(vcfg).unwrap();
        let w = ResidentWeights::from_tensors(sf.read_component(Component::Vae).unwrap(), &Device::Cpu, DType::F32)
            .unwrap();
        let f = load(&repo().join("tests/fixtures").join(refs).join("vae_decode.safetensors"));
        let img = vae.decode(&w, &f["latents"]).unwrap();
        let max = (&img - &f["image"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max <= 1e-3, "{model}: VAE decode vs diffusers max abs {max}");
    }
}

/// Copy the tensors of `src` that `rename` keeps (under their new names) to a temporary file.
fn extract(src: &Path, tag: &str, rename: impl Fn(&str) -> Option<String>) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter_map(|(n, v)| rename(&n).map(|m| (m, v))).collect();
    let dir = std::env::temp_dir().join(format!("lowvram-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.safetensors"));
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
    path
}

fn assert_component_file_matches(file: &ComponentFile, model: &str, c: Component) {
    let want = load(&folder_file(model, c));
    let got = file.read_all().unwrap();
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "{}: names", file.path().display());
    for (k, w) in &want {
        assert!(got[k].dims() == w.dims() && bits(&got[k]) == bits(w), "{}: {k} differs", file.path().display());
    }
}

#[test]
fn standalone_component_files_map_to_the_folders() {
    // An LDM VAE file (bare keys, as vae-ft-mse-840000 is stored) and the same under `vae.`.
    let sd1 = fixture("sd1.safetensors");
    let bare = extract(&sd1, "vae-bare", |n| n.strip_prefix("first_stage_model.").map(str::to_string));
    let f = ComponentFile::open(&bare, Component::Vae).unwrap();
    assert!(f.map().get("decoder.mid_block.attentions.0.to_q.weight").unwrap().reshape);
    assert_component_file_matches(&f, "sd1", Component::Vae);
    let vae_prefix =
        extract(&sd1, "vae-prefixed", |n| n.strip_prefix("first_stage_model.").map(|r| format!("vae.{r}")));
    assert_component_file_matches(&ComponentFile::open(&vae_prefix, Component::Vae).unwrap(), "sd1", Component::Vae);
    // A VAE already in diffusers layout maps to itself.
    let diffusers_vae = folder_file("sd1", Component::Vae);
    assert_component_file_matches(&ComponentFile::open(&diffusers_vae, Component::Vae).unwrap(), "sd1", Component::Vae);
    // transformers-layout encoders (ComfyUI's clip_l / clip_g files), with and without projection.
    for (model, c) in [("sd1", Component::TextEncoder), ("sdxl", Component::TextEncoder2)] {
        let f = ComponentFile::open(&folder_file(model, c), c).unwrap();
        assert_component_file_matches(&f, model, c);
    }
    // OpenCLIP towers: bigG bare (with its transposed projection), OpenCLIP-H under SD 2's prefix (23 of 24 layers).
    let sdxl = fixture("sdxl.safetensors");
    let g = extract(&sdxl, "bigg", |n| n.strip_prefix("conditioner.embedders.1.model.").map(str::to_string));
    let f = ComponentFile::open(&g, Component::TextEncoder2).unwrap();
    assert!(f.map().get("text_projection.weight").unwrap().transpose);
    assert_eq!(f.skipped(), ["logit_scale"]);
    assert_component_file_matches(&f, "sdxl", Component::TextEncoder2);
    let h = extract(&fixture("sd2.safetensors"), "openclip-h", |n| {
        n.starts_with("cond_stage_model.model.").then(|| n.to_string())
    });
    let f = ComponentFile::open(&h, Component::TextEncoder).unwrap();
    assert_component_file_matches(&f, "sd2", Component::TextEncoder);
    // A UNet tensor in a VAE file is named.
    let mixed = extract(&sd1, "vae-mixed", |n| {
        (n.starts_with("first_stage_model.") || n == "model.diffusion_model.out.2.weight").then(|| n.to_string())
    });
    let err = ComponentFile::open(&mixed, Component::Vae).unwrap_err().to_string();
    assert!(err.contains("model.diffusion_model.out.2.weight"), "{err}");
}
