//! FLUX.1 through the pipeline API end to end, against diffusers' `FluxPipeline` on tiny random dev and schnell
//! pipelines (tests/fixtures/flux-pipeline, `scripts/fixtures_flux_pipeline.py`): the diffusers folder and the BFL
//! single file (plus `--vae ae.safetensors` and `--text-encoder`) load as a FLUX pipeline, CLIP-L's pooled output
//! matches transformers', and from the same embeddings and initial noise the flow-matching latents and the decoded
//! image match diffusers' — also streamed on a tight `emulated:` device, bit for bit.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lowvram::api::{
    ComponentPaths, Context, ContextOptions, DenoiseOptions, ModelKind, Pipeline, PromptOptions, Tiling,
};
use lowvram::models::conditioning::{COND_EMBEDDINGS, COND_POOLED};
use lowvram::models::{Conditioning, Family};
use lowvram::sampling::SchedulerKind;

const PROMPT: &str = "a photo of a cat";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn folder(variant: &str) -> PathBuf {
    fixtures().join("flux-pipeline").join(variant)
}

/// The BFL single file, with the config folder diffusers' `config=` would name beside it (`flux1-dev-tiny/` → the
/// pipeline folder): its 16-wide heads are not FLUX.1's, so the rotary axes come from there.
fn bfl_file(variant: &str) -> PathBuf {
    fixtures().join("flux-pipeline").join(format!("flux1-{variant}-tiny.safetensors"))
}

fn reference(variant: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(folder(variant).join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// Steps as the fixture script runs them (dev: 3 steps at guidance 3.5; schnell: 2).
fn options(variant: &str) -> DenoiseOptions {
    let steps = if variant == "dev" { 3 } else { 2 };
    DenoiseOptions {
        scheduler: SchedulerKind::FlowEuler,
        karras: false,
        steps,
        guidance: 3.5,
        seed: 0,
        latent_size: (12, 8),
    }
}

fn context(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions { device: Some(device.into()), config_yaml: Some(yaml.into()), ..Default::default() })
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// The single file with the components it lacks: the BFL autoencoder file and the CLIP-L folder.
fn single_file_components() -> ComponentPaths {
    ComponentPaths {
        vae: Some(fixtures().join("flow/ae.safetensors")),
        text_encoder: Some(fixtures().join("prompt/sd1/text_encoder")),
        text_encoder_2: None,
    }
}

/// Latents and raw image from the reference's init noise and T5-like states, with the pipeline's own CLIP pooled
/// vector for PROMPT (checked against transformers' on the way); bytes streamed by the denoise.
fn run(ctx: &Context, p: &Pipeline, variant: &str) -> (Tensor, Tensor, u64) {
    let r = reference(variant);
    let pooled = p.flux_pooled(ctx, PROMPT).unwrap();
    let scale = max_abs(&r["pooled"]).max(1e-6);
    let d = max_diff(&pooled, &r["pooled"]);
    assert!(d <= 1e-4 * scale, "{variant}: CLIP pooled differs from transformers' by {d} (scale {scale})");
    let mut cond = Conditioning::new();
    cond.insert(COND_EMBEDDINGS, r["prompt_embeds"].clone());
    cond.insert(COND_POOLED, pooled);
    let (latents, report) =
        p.denoise(ctx, &cond, &options(variant), Some(&r["init_noise"]), None, &mut |_, _| true).unwrap();
    let (image, _) = p.decode(ctx, &latents, Tiling::Never).unwrap();
    (latents, image, report.bytes_streamed)
}

fn check_parity(what: &str, latents: &Tensor, image: &Tensor, r: &HashMap<String, Tensor>) {
    let (dl, scale) = (max_diff(latents, &r["latents"]), max_abs(&r["latents"]).max(1.0));
    let di = max_diff(image, &r["image"]);
    println!("{what}: latents max |diff| {dl:.3e} (scale {scale:.2}), image {di:.3e}");
    assert!(dl <= 1e-3 * scale, "{what}: latents differ from diffusers' by {dl}");
    assert!(di <= 3e-3, "{what}: image differs from diffusers' by {di}");
}

#[test]
fn folder_matches_diffusers_from_embeddings() {
    for variant in ["dev", "schnell"] {
        let ctx = context("cpu", "");
        let p = Pipeline::load(&ctx, &folder(variant), &ComponentPaths::default()).unwrap();
        assert_eq!(p.family(), Family::Flux);
        assert_eq!(p.denoiser().kind(), ModelKind::Transformer);
        let (latents, image, _) = run(&ctx, &p, variant);
        check_parity(&format!("{variant} folder"), &latents, &image, &reference(variant));
    }
}

#[test]
fn bfl_single_file_matches_diffusers_from_embeddings() {
    // dev's file has bare BFL keys, schnell's is Comfy-style (`model.diffusion_model.`); the scheduler is the
    // variant's FLUX.1 default, the folder's scheduler_config.json.
    for variant in ["dev", "schnell"] {
        let ctx = context("cpu", "");
        let p = Pipeline::load(&ctx, &bfl_file(variant), &single_file_components()).unwrap();
        assert_eq!(p.family(), Family::Flux);
        let (latents, image, _) = run(&ctx, &p, variant);
        check_parity(&format!("{variant} BFL file"), &latents, &image, &reference(variant));
    }
}

#[test]
fn streamed_on_a_tight_device_is_bit_identical() {
    for variant in ["dev", "schnell"] {
        let ctx = context("cpu", "");
        let p = Pipeline::load(&ctx, &folder(variant), &ComponentPaths::default()).unwrap();
        let (want_l, want_i, _) = run(&ctx, &p, variant);
        for path in [folder(variant), bfl_file(variant)] {
            let tight = context("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0002\n");
            let components = if path.is_file() { single_file_components() } else { ComponentPaths::default() };
            let p = Pipeline::load(&tight, &path, &components).unwrap();
            let (l, i, streamed) = run(&tight, &p, variant);
            assert!(streamed > 0, "{variant} {}: the capped run streamed nothing", path.display());
            assert_eq!(bits(&l), bits(&want_l), "{variant} {}: streaming changed the latents", path.display());
            assert_eq!(bits(&i), bits(&want_i), "{variant} {}: streaming changed the image", path.display());
        }
    }
}

/// A Comfy-style all-in-one file (transformer under `model.diffusion_model.`, `vae.` in LDM names,
/// `text_encoders.clip_l.transformer.` in transformers' names, a T5 key that is skipped) written from the fixtures,
/// with the config folder beside it.
fn comfy_all_in_one(dir: &std::path::Path) -> PathBuf {
    let mut all = candle_core::safetensors::load(bfl_file("schnell"), &Device::Cpu).unwrap();
    for (prefix, file) in [
        ("vae.", fixtures().join("flow/ae.safetensors")),
        ("text_encoders.clip_l.transformer.", fixtures().join("prompt/sd1/text_encoder/model.safetensors")),
    ] {
        for (k, v) in candle_core::safetensors::load(file, &Device::Cpu).unwrap() {
            all.insert(format!("{prefix}{k}"), v);
        }
    }
    all.insert(
        "text_encoders.t5xxl.transformer.shared.weight".into(),
        Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.join("flux1-schnell-aio.safetensors");
    candle_core::safetensors::save(&all, &path).unwrap();
    let config_dir = dir.join("flux1-schnell-aio");
    let _ = std::fs::remove_file(&config_dir);
    #[cfg(unix)]
    std::os::unix::fs::symlink(folder("schnell"), &config_dir).unwrap();
    #[cfg(not(unix))]
    panic!("the config folder beside the file is a symbolic link");
    path
}

/// The Comfy all-in-one file gives the transformer, the VAE and CLIP-L (its T5 is left to --text-encoder-2): CLIP-L
/// encodes exactly as the folder's, and the latents and image match diffusers'.
#[test]
fn comfy_all_in_one_file_gives_vae_and_clip() {
    let dir = std::env::temp_dir().join(format!("lowvram-flux-aio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = comfy_all_in_one(&dir);
    let ctx = context("cpu", "");
    let p = Pipeline::load(&ctx, &path, &ComponentPaths::default()).unwrap();
    assert_eq!(p.family(), Family::Flux);
    let folder_p = Pipeline::load(&ctx, &folder("schnell"), &ComponentPaths::default()).unwrap();
    // The file's CLIP takes the vocabulary compiled into the library (the real CLIP-L's); the tiny model's ids come
    // from the fixture's tokenizer.
    let (_, tokenizer) = folder_p.text_encoder(0).unwrap().as_text_encoder().unwrap();
    let ids = tokenizer.unwrap().tokenize(PROMPT).unwrap();
    let layer = lowvram::models::text_encoder::HiddenLayer::Last;
    let mut report = lowvram::api::RunReport::default();
    let a = ctx.encode_ids(p.text_encoder(0).unwrap(), &ids, layer, None, &mut report).unwrap();
    let b = ctx.encode_ids(folder_p.text_encoder(0).unwrap(), &ids, layer, None, &mut report).unwrap();
    assert_eq!(bits(a.pooled.as_ref().unwrap()), bits(b.pooled.as_ref().unwrap()), "CLIP-L from the file differs");
    assert_eq!(bits(&a.hidden), bits(&b.hidden));
    let r = reference("schnell");
    let mut cond = Conditioning::new();
    cond.insert(COND_EMBEDDINGS, r["prompt_embeds"].clone());
    cond.insert(COND_POOLED, r["pooled"].clone());
    let (latents, _) =
        p.denoise(&ctx, &cond, &options("schnell"), Some(&r["init_noise"]), None, &mut |_, _| true).unwrap();
    let (image, _) = p.decode(&ctx, &latents, Tiling::Never).unwrap();
    check_parity("schnell Comfy all-in-one", &latents, &image, &r);
    let _ = std::fs::remove_dir_all(&dir);
}

fn err_text(r: lowvram::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_components_and_unused_inputs_are_named() {
    let ctx = context("cpu", "");
    // A transformer file alone: the VAE must be passed.
    let e = err_text(Pipeline::load(&ctx, &bfl_file("dev"), &ComponentPaths::default()));
    assert!(e.contains("--vae"), "{e}");
    // Without CLIP-L, prompts need --text-encoder.
    let vae_only = ComponentPaths { vae: Some(fixtures().join("flow/ae.safetensors")), ..Default::default() };
    let p = Pipeline::load(&ctx, &bfl_file("schnell"), &vae_only).unwrap();
    let e = err_text(p.encode_prompt(&ctx, PROMPT, None, &PromptOptions::default()));
    assert!(e.contains("--text-encoder"), "{e}");
    // Without T5, prompts need --text-encoder-2 (or given states).
    let p = Pipeline::load(&ctx, &bfl_file("schnell"), &single_file_components()).unwrap();
    let e = err_text(p.encode_prompt(&ctx, PROMPT, None, &PromptOptions::default()));
    assert!(e.contains("--text-encoder-2"), "{e}");
    // FLUX runs no classifier-free guidance: a negative prompt is refused, not ignored.
    let e = err_text(p.encode_prompt(&ctx, PROMPT, Some("blurry"), &PromptOptions::default()));
    assert!(e.contains("negative prompt"), "{e}");
}

/// The CLI from `--inputs` (init noise, T5 states, CLIP pooled): `generate --model <FLUX folder or BFL file>` with
/// the default scheduler (flow_euler) and guidance (3.5) writes diffusers' latents.
#[test]
fn cli_generates_from_inputs() {
    let dir = std::env::temp_dir().join(format!("lowvram-flux-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for variant in ["dev", "schnell"] {
        let r = reference(variant);
        let inputs = dir.join(format!("{variant}-inputs.safetensors"));
        let map: HashMap<String, Tensor> = [
            ("sampling.init_noise", r["init_noise"].clone()),
            ("sampling.cond_embeddings", r["prompt_embeds"].clone()),
            ("sampling.cond_pooled", r["pooled"].clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&map, &inputs).unwrap();
        let steps = options(variant).steps.to_string();
        for (model, extra) in [(folder(variant), vec![]), (bfl_file(variant), vec!["--vae".to_string()])] {
            let out = dir.join(format!("{variant}.png"));
            let latents_out = dir.join(format!("{variant}-latents.safetensors"));
            let raw_out = dir.join(format!("{variant}-image.safetensors"));
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lowvram"));
            cmd.args(["generate", "--device", "cpu", "--steps", &steps, "--model"]).arg(&model);
            if !extra.is_empty() {
                cmd.arg("--vae").arg(fixtures().join("flow/ae.safetensors"));
            }
            cmd.arg("--inputs").arg(&inputs).arg("--out").arg(&out);
            cmd.arg("--latents-out").arg(&latents_out).arg("--image-raw-out").arg(&raw_out);
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{variant} {}: {}", model.display(), String::from_utf8_lossy(&o.stderr));
            let l = candle_core::safetensors::load(&latents_out, &Device::Cpu).unwrap();
            let i = candle_core::safetensors::load(&raw_out, &Device::Cpu).unwrap();
            check_parity(&format!("{variant} CLI {}", model.display()), &l["latents"], &i["image"], &r);
            assert!(out.exists());
        }
    }
    // FLUX sizes are multiples of twice the VAE's downscale (16 px for FLUX.1's VAE; the tiny one's is 2: 4 px).
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lowvram"))
        .args(["generate", "--device", "cpu", "--steps", "1", "--width", "18", "--height", "32", "--prompt", "x"])
        .arg("--model")
        .arg(folder("schnell"))
        .arg("--out")
        .arg(dir.join("x.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("multiples of 4"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The GGUF conversions of the dev transformer (Q8_0, Q4_0 under Comfy's prefix, Q4_K) as `--model` with `--vae`
/// and `--text-encoder`: the pipeline computes exactly what it computes from a dense BFL file of the dequantised
/// weights (the quantisation is the only difference from diffusers' bf16 reference, printed), also streamed on a
/// tight device.
#[test]
fn gguf_transformer_file_equals_its_dequantised_weights() {
    use lowvram::ops::dequant::dequantize_slice;
    use lowvram::weights::gguf::{GgufHeader, GgufKind};
    let dir = std::env::temp_dir().join(format!("lowvram-flux-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let r = reference("dev");
    for q in ["Q8_0", "Q4_0", "Q4_K"] {
        let gguf = fixtures().join("flux-pipeline").join(format!("flux1-dev-tiny-{q}.gguf"));
        let bytes = std::fs::read(&gguf).unwrap();
        let dense: HashMap<String, Tensor> = GgufHeader::parse(&bytes)
            .unwrap()
            .tensors
            .iter()
            .map(|t| {
                let b = &bytes[t.bytes.clone()];
                let v = match t.kind {
                    GgufKind::Dense(d) => Tensor::from_raw_buffer(b, d, &t.shape, &Device::Cpu).unwrap(),
                    GgufKind::Stored(f) => dequantize_slice(b, f, &t.shape, candle_core::DType::F32).unwrap(),
                };
                (t.name.clone(), v.to_dtype(candle_core::DType::F32).unwrap())
            })
            .collect();
        let dense_path = dir.join(format!("dense-{q}.safetensors"));
        candle_core::safetensors::save(&dense, &dense_path).unwrap();
        let _ = std::fs::remove_file(dir.join(format!("dense-{q}")));
        #[cfg(unix)]
        std::os::unix::fs::symlink(folder("dev"), dir.join(format!("dense-{q}"))).unwrap();
        let ctx = context("cpu", "");
        let want = Pipeline::load(&ctx, &dense_path, &single_file_components()).unwrap();
        let (want_l, want_i, _) = run(&ctx, &want, "dev");
        let p = Pipeline::load(&ctx, &gguf, &single_file_components()).unwrap();
        assert_eq!(p.family(), Family::Flux);
        let (l, i, _) = run(&ctx, &p, "dev");
        assert_eq!(bits(&l), bits(&want_l), "{q}: GGUF latents differ from the dequantised weights'");
        assert_eq!(bits(&i), bits(&want_i), "{q}: GGUF image differs from the dequantised weights'");
        let tight = context("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0001\n");
        let p = Pipeline::load(&tight, &gguf, &single_file_components()).unwrap();
        let (l, i, streamed) = run(&tight, &p, "dev");
        assert!(streamed > 0, "{q}: the capped run streamed nothing");
        assert_eq!(bits(&l), bits(&want_l), "{q}: streaming the GGUF changed the latents");
        assert_eq!(bits(&i), bits(&want_i), "{q}: streaming the GGUF changed the image");
        println!(
            "{q}: latents max |diff| from diffusers' bf16 reference {:.3e}, image {:.3e}",
            max_diff(&l, &r["latents"]),
            max_diff(&i, &r["image"])
        );
    }
    // A GGUF transformer alone: the VAE must be passed.
    let ctx = context("cpu", "");
    let e = err_text(Pipeline::load(
        &ctx,
        &fixtures().join("flux-pipeline/flux1-dev-tiny-Q8_0.gguf"),
        &ComponentPaths::default(),
    ));
    assert!(e.contains("--vae"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// From the prompt: CLIP-L's pooled vector and T5's states (at the tokenizer folder's max length, 48) match
/// transformers', and the latents and image diffusers' FluxPipeline computes from the same prompt.
#[test]
fn folder_matches_diffusers_from_the_prompt() {
    for variant in ["dev", "schnell"] {
        let r = reference(variant);
        let ctx = context("cpu", "");
        let p = Pipeline::load(&ctx, &folder(variant), &ComponentPaths::default()).unwrap();
        let cond = p.encode_prompt(&ctx, PROMPT, None, &PromptOptions::default()).unwrap();
        for (name, want) in [(COND_EMBEDDINGS, &r["t5_states"]), (COND_POOLED, &r["pooled"])] {
            let got = cond.get(name).unwrap();
            let (d, scale) = (max_diff(got, want), max_abs(want).max(1e-6));
            println!("{variant} {name}: max |diff| {d:.3e} (scale {scale:.3})");
            assert!(d <= 1e-4 * scale, "{variant}: {name} differs from transformers' by {d}");
        }
        let (latents, _) =
            p.denoise(&ctx, &cond, &options(variant), Some(&r["init_noise"]), None, &mut |_, _| true).unwrap();
        let (image, _) = p.decode(&ctx, &latents, Tiling::Never).unwrap();
        let mut from_prompt = r.clone();
        from_prompt.insert("latents".into(), r["prompt_latents"].clone());
        from_prompt.insert("image".into(), r["prompt_image"].clone());
        check_parity(&format!("{variant} folder from the prompt"), &latents, &image, &from_prompt);
    }
}

/// Without a `model_max_length` in the T5 tokenizer folder, dev encodes 512 tokens and schnell 256 (BFL's lengths).
#[test]
fn t5_length_defaults_to_512_for_dev_and_256_for_schnell() {
    let dir = std::env::temp_dir().join(format!("lowvram-flux-t5len-{}", std::process::id()));
    for (variant, want) in [("dev", 512), ("schnell", 256)] {
        let pipe = dir.join(variant);
        std::fs::create_dir_all(pipe.join("tokenizer_2")).unwrap();
        let src = folder(variant);
        for name in
            ["model_index.json", "scheduler", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2"]
        {
            let _ = std::fs::remove_file(pipe.join(name));
            #[cfg(unix)]
            std::os::unix::fs::symlink(std::fs::canonicalize(src.join(name)).unwrap(), pipe.join(name)).unwrap();
        }
        let tok = src.join("tokenizer_2");
        std::fs::copy(tok.join("tokenizer.json"), pipe.join("tokenizer_2/tokenizer.json")).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tok.join("tokenizer_config.json")).unwrap()).unwrap();
        config.as_object_mut().unwrap().remove("model_max_length");
        std::fs::write(pipe.join("tokenizer_2/tokenizer_config.json"), config.to_string()).unwrap();
        let ctx = context("cpu", "");
        let p = Pipeline::load(&ctx, &pipe, &ComponentPaths::default()).unwrap();
        let cond = p.encode_prompt(&ctx, PROMPT, None, &PromptOptions::default()).unwrap();
        assert_eq!(cond.get(COND_EMBEDDINGS).unwrap().dims(), [1, want, 32], "{variant}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `encode` writes FLUX's conditioning (T5 states, CLIP pooled) and `generate --prompt` draws diffusers' latents.
#[test]
fn cli_encodes_and_generates_from_the_prompt() {
    let dir = std::env::temp_dir().join(format!("lowvram-flux-cli-prompt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_lowvram");
    for variant in ["dev", "schnell"] {
        let r = reference(variant);
        let enc = dir.join(format!("{variant}-cond.safetensors"));
        let o = std::process::Command::new(bin)
            .args(["encode", "--device", "cpu", "--prompt", PROMPT, "--width", "16", "--height", "24", "--model"])
            .arg(folder(variant))
            .arg("--out")
            .arg(&enc)
            .output()
            .unwrap();
        assert!(o.status.success(), "{variant} encode: {}", String::from_utf8_lossy(&o.stderr));
        let c = candle_core::safetensors::load(&enc, &Device::Cpu).unwrap();
        assert!(max_diff(&c["sampling.cond_embeddings"], &r["t5_states"]) <= 1e-4 * max_abs(&r["t5_states"]));
        assert!(max_diff(&c["sampling.cond_pooled"], &r["pooled"]) <= 1e-4 * max_abs(&r["pooled"]));
        let mut names: Vec<&String> = c.keys().collect();
        names.sort();
        assert_eq!(names, ["sampling.cond_embeddings", "sampling.cond_pooled"], "{variant}");

        let inputs = dir.join(format!("{variant}-noise.safetensors"));
        let noise: HashMap<String, Tensor> = [("sampling.init_noise".to_string(), r["init_noise"].clone())].into();
        candle_core::safetensors::save(&noise, &inputs).unwrap();
        let (latents_out, raw_out) =
            (dir.join(format!("{variant}-l.safetensors")), dir.join(format!("{variant}-i.safetensors")));
        let o = std::process::Command::new(bin)
            .args(["generate", "--device", "cpu", "--prompt", PROMPT, "--steps", &options(variant).steps.to_string()])
            .arg("--model")
            .arg(folder(variant))
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(dir.join(format!("{variant}.png")))
            .arg("--latents-out")
            .arg(&latents_out)
            .arg("--image-raw-out")
            .arg(&raw_out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{variant} generate: {}", String::from_utf8_lossy(&o.stderr));
        let l = candle_core::safetensors::load(&latents_out, &Device::Cpu).unwrap();
        let i = candle_core::safetensors::load(&raw_out, &Device::Cpu).unwrap();
        let mut from_prompt = r.clone();
        from_prompt.insert("latents".into(), r["prompt_latents"].clone());
        from_prompt.insert("image".into(), r["prompt_image"].clone());
        check_parity(&format!("{variant} CLI from the prompt"), &l["latents"], &i["image"], &from_prompt);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--text-encoder-2 FILE`: the pipeline takes T5 from a GGUF file (its vocabulary inside, its config and length in
/// the `NAME/` folder beside it: tests/fixtures/t5/t5-tiny-f32.gguf, the same F32 weights) and encodes the prompt
/// exactly as from the folder's `text_encoder_2/`.
#[test]
fn t5_from_a_gguf_file_encodes_like_the_folder() {
    let ctx = context("cpu", "");
    let want = Pipeline::load(&ctx, &folder("dev"), &ComponentPaths::default())
        .unwrap()
        .encode_prompt(&ctx, PROMPT, None, &PromptOptions::default())
        .unwrap();
    let gguf = fixtures().join("t5/t5-tiny-f32.gguf");
    let components = ComponentPaths { text_encoder_2: Some(gguf.clone()), ..Default::default() };
    let p = Pipeline::load(&ctx, &folder("dev"), &components).unwrap();
    assert_eq!(p.text_encoder(1).expect("T5 loaded").dir(), gguf.as_path(), "the flag's file, not the folder's");
    let got = p.encode_prompt(&ctx, PROMPT, None, &PromptOptions::default()).unwrap();
    for name in [COND_EMBEDDINGS, COND_POOLED] {
        assert!(bits(got.get(name).unwrap()) == bits(want.get(name).unwrap()), "{name} differs");
    }
}
