//! Prompt → image end to end (issue 15, deliverable 7) against diffusers 0.42.1 / transformers 5.23.0: the small
//! CLIP tokenizers, SD 1.x and SDXL text encoders and references written by `scripts/make_prompt_fixtures.py`
//! (tests/fixtures/prompt), with the tiny SD 1.x and SDXL pipelines. Through the public API: token ids,
//! `Pipeline::encode_prompt`, prompt → latents → image for euler and dpmpp_2m, the same under a budget that streams
//! every model (text encoders included) bit for bit, the CLI's `generate --prompt` and `encode`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lowvram::api::{
    ComponentPaths, Context, ContextOptions, DenoiseOptions, Pipeline, PromptOptions, RunReport, Tiling,
};
use lowvram::models::text_encoder::HiddenLayer;
use lowvram::models::{Conditioning, Family};
use lowvram::sampling::SchedulerKind;
use lowvram::text::ClipTokenizer;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn prompt_dir() -> PathBuf {
    repo().join("tests/fixtures/prompt")
}

/// prompts.json: the prompts, settings and token ids the fixture script used.
fn meta() -> Value {
    let p = prompt_dir().join("prompts.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (see tests/fixtures/prompt/README.md)", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// The tiny SD 1.x pipeline: where the fixture script found it, or where it may have moved (the same files).
fn sd1_model() -> PathBuf {
    let recorded = repo().join(meta()["sd1_model"].as_str().unwrap());
    [recorded, repo().join("tests/fixtures/tiny-sd-random"), repo().join("tests/fixtures/tiny-sd/model")]
        .into_iter()
        .find(|d| d.join("unet").is_dir())
        .expect("the tiny SD 1.x pipeline folder")
}

/// An SD-family pipeline folder without text encoders (the shipped tiny model now carries one).
fn model_without_text_encoder() -> PathBuf {
    repo().join("tests/fixtures/tiny-sd2/model")
}

fn sdxl_model() -> PathBuf {
    repo().join(meta()["sdxl_model"].as_str().unwrap())
}

fn fixture(family: &str, name: &str) -> HashMap<String, Tensor> {
    let path = prompt_dir().join(family).join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn context_with(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions { device: Some(device.into()), config_yaml: Some(yaml.into()), ..Default::default() })
        .expect("context")
}

/// A cache cap per family that holds its largest block (SD 1.x: a 128 KB UNet resnet; SDXL: a 128 KB UNet unit)
/// but not any whole model, the text encoders included (f32 on the device: SD 1.x ≈ 260 KB; SDXL ≈ 230 KB and
/// 450 KB), so every model streams.
fn tight(family: &str) -> (&'static str, &'static str) {
    match family {
        "sd1" => ("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.00013\n"),
        _ => ("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.00014\n"),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_of(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `|a - ref| ≤ tol · max(1, max|ref|)`.
fn assert_close(what: &str, a: &Tensor, reference: &Tensor, tol: f32) {
    let (err, scale) = (max_abs(a, reference), max_of(reference).max(1.0));
    println!("{what}: max abs err {err:.2e} (scale {scale:.3})");
    assert!(err <= tol * scale, "{what}: max abs err {err} > {tol} x {scale}");
}

fn sd1_components() -> ComponentPaths {
    ComponentPaths { text_encoder: Some(prompt_dir().join("sd1/text_encoder")), ..Default::default() }
}

fn sdxl_components() -> ComponentPaths {
    ComponentPaths {
        text_encoder: Some(prompt_dir().join("sdxl/text_encoder")),
        text_encoder_2: Some(prompt_dir().join("sdxl/text_encoder_2")),
        ..Default::default()
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap()
}

fn latent_hw(v: &Value) -> (usize, usize) {
    let a = v["latent_hw"].as_array().unwrap();
    (a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize)
}

fn denoise_options(kind: SchedulerKind, guidance: f64, latent_size: (usize, usize)) -> DenoiseOptions {
    DenoiseOptions {
        scheduler: kind,
        karras: false,
        steps: meta()["steps"].as_u64().unwrap() as usize,
        guidance,
        seed: 0,
        latent_size,
    }
}

const SAMPLERS: [(&str, SchedulerKind); 2] = [("euler", SchedulerKind::Euler), ("dpmpp_2m", SchedulerKind::DpmPP2M)];

#[test]
fn token_ids_equal_transformers() {
    let m = meta();
    let prompts: Vec<&str> = m["token_prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    for (name, dir) in [
        ("sd1.tokenizer", "sd1/tokenizer"),
        ("sdxl.tokenizer", "sdxl/tokenizer"),
        ("sdxl.tokenizer_2", "sdxl/tokenizer_2"),
    ] {
        let tok = ClipTokenizer::from_dir(&prompt_dir().join(dir)).unwrap();
        let expected = m["tokens"][name].as_array().unwrap();
        assert_eq!(expected.len(), prompts.len());
        for (p, ids) in prompts.iter().zip(expected) {
            let ids: Vec<u32> = ids.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(p).unwrap(), ids, "{name}: {p:?}");
        }
    }
    // The vocabulary is small (byte tokens + a few dozen words): the known words are one token each.
    let tok = ClipTokenizer::from_dir(&prompt_dir().join("sd1/tokenizer")).unwrap();
    let words = m["words"].as_array().unwrap();
    assert!(words.len() >= 30);
    for w in words {
        let ids = tok.encode(w.as_str().unwrap()).unwrap();
        assert_eq!(ids[2], ids[3], "{w}: one token, then EOS and EOS padding");
    }
}

#[test]
fn sd1_encode_prompt_matches_diffusers() {
    let (m, f) = (meta(), fixture("sd1", "encode.safetensors"));
    let sd1 = &m["sd1"];
    let ctx = context_with("cpu", "");
    let pipeline = Pipeline::load(&ctx, &sd1_model(), &sd1_components()).unwrap();
    assert_eq!(pipeline.family(), Family::Sd1);
    let opts = PromptOptions { batch: 1, image_size: (64, 64), clip_skip: 0 };
    let cond = pipeline.encode_prompt(&ctx, s(sd1, "prompt"), Some(s(sd1, "negative_prompt")), &opts).unwrap();
    assert_close("sd1 cond", cond.get("sampling.cond_embeddings").unwrap(), &f["prompt_embeds"], 1e-4);
    assert_close("sd1 uncond", cond.get("sampling.uncond_embeddings").unwrap(), &f["negative_prompt_embeds"], 1e-4);
    assert!(cond.get("sampling.cond_pooled").is_none() && cond.get("sampling.time_ids").is_none());
    let skip = PromptOptions { clip_skip: 1, ..opts.clone() };
    let cond = pipeline.encode_prompt(&ctx, s(sd1, "prompt"), Some(s(sd1, "negative_prompt")), &skip).unwrap();
    assert_close(
        "sd1 clip_skip 1",
        cond.get("sampling.cond_embeddings").unwrap(),
        &f["clip_skip1.prompt_embeds"],
        1e-4,
    );
    assert_close(
        "sd1 clip_skip 1 uncond",
        cond.get("sampling.uncond_embeddings").unwrap(),
        &f["clip_skip1.negative_prompt_embeds"],
        1e-4,
    );
    // No negative prompt: SD 1.x encodes "".
    let cond = pipeline.encode_prompt(&ctx, s(sd1, "prompt"), None, &opts).unwrap();
    assert_close(
        "sd1 empty negative",
        cond.get("sampling.uncond_embeddings").unwrap(),
        &f["empty_negative_prompt_embeds"],
        1e-4,
    );
    // A batch repeats the rows.
    let cond = pipeline.encode_prompt(&ctx, s(sd1, "prompt"), None, &PromptOptions { batch: 3, ..opts }).unwrap();
    let e = cond.get("sampling.cond_embeddings").unwrap();
    assert_eq!(e.dims(), &[3, 77, 32]);
    assert_close("sd1 batch row 2", &e.narrow(0, 2, 1).unwrap(), &f["prompt_embeds"], 1e-4);
}

#[test]
fn sdxl_encode_prompt_matches_diffusers() {
    let (m, f) = (meta(), fixture("sdxl", "encode.safetensors"));
    let sdxl = &m["sdxl"];
    let (h, w) = latent_hw(sdxl);
    let ctx = context_with("cpu", "");
    let pipeline = Pipeline::load(&ctx, &sdxl_model(), &sdxl_components()).unwrap();
    assert_eq!(pipeline.family(), Family::Sdxl);
    let opts = PromptOptions { batch: 1, image_size: (h * 8, w * 8), clip_skip: 0 };
    for (tag, negative) in [("none", None), ("neg", Some(s(sdxl, "negative_prompt"))), ("empty", Some(""))] {
        let cond = pipeline.encode_prompt(&ctx, s(sdxl, "prompt"), negative, &opts).unwrap();
        for (name, key) in [
            ("sampling.cond_embeddings", "prompt_embeds"),
            ("sampling.uncond_embeddings", "negative_prompt_embeds"),
            ("sampling.cond_pooled", "pooled_prompt_embeds"),
            ("sampling.uncond_pooled", "negative_pooled_prompt_embeds"),
        ] {
            assert_close(&format!("sdxl {tag} {name}"), cond.get(name).unwrap(), &f[&format!("{tag}.{key}")], 1e-4);
        }
        let ids = cond.get("sampling.time_ids").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (hp, wp) = ((h * 8) as f32, (w * 8) as f32);
        assert_eq!(ids, vec![hp, wp, 0.0, 0.0, hp, wp]);
    }
    let skip = PromptOptions { clip_skip: 1, ..opts };
    let cond = pipeline.encode_prompt(&ctx, s(sdxl, "prompt"), None, &skip).unwrap();
    assert_close(
        "sdxl clip_skip 1",
        cond.get("sampling.cond_embeddings").unwrap(),
        &f["clip_skip1.prompt_embeds"],
        1e-4,
    );
    assert_close(
        "sdxl clip_skip 1 pooled",
        cond.get("sampling.cond_pooled").unwrap(),
        &f["clip_skip1.pooled_prompt_embeds"],
        1e-4,
    );
}

/// Prompt → conditioning → latents → image on one context; returns the latents and each stage's report.
fn prompt_to_image(
    ctx: &Context,
    pipeline: &Pipeline,
    prompt: &str,
    negative: Option<&str>,
    prompt_options: &PromptOptions,
    options: &DenoiseOptions,
    init_noise: &Tensor,
) -> (Conditioning, Tensor, Tensor, RunReport) {
    let cond = pipeline.encode_prompt(ctx, prompt, negative, prompt_options).unwrap();
    let (latents, report) = pipeline.denoise(ctx, &cond, options, Some(init_noise), None, &mut |_, _| true).unwrap();
    let (image, _) = pipeline.decode(ctx, &latents, Tiling::Auto).unwrap();
    (cond, latents, image, report)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Runs every case resident and at the tight budget: each matches diffusers, and the two runs are bit-identical.
fn check_family(
    family: &str,
    model: &Path,
    components: &ComponentPaths,
    cases: &[(&str, Option<&str>)],
    guidance: f64,
) {
    let m = meta();
    let v = &m[family];
    let (h, w) = latent_hw(v);
    let prompt_options = PromptOptions { batch: 1, image_size: (h * 8, w * 8), clip_skip: 0 };
    for (tag, negative) in cases {
        for (name, kind) in SAMPLERS {
            let file = if tag.is_empty() {
                format!("sample_{name}.safetensors")
            } else {
                format!("sample_{tag}_{name}.safetensors")
            };
            let f = fixture(family, &file);
            let options = denoise_options(kind, guidance, (h, w));
            let mut runs = Vec::new();
            for (device, yaml) in [("cpu", ""), tight(family)] {
                let ctx = context_with(device, yaml);
                let pipeline = Pipeline::load(&ctx, model, components).unwrap();
                let (cond, latents, image, report) = prompt_to_image(
                    &ctx,
                    &pipeline,
                    s(v, "prompt"),
                    *negative,
                    &prompt_options,
                    &options,
                    &f["sampling.init_noise"],
                );
                let what = format!("{family} {file} {device}");
                assert_close(&format!("{what} latents"), &latents, &f["latents"], 1e-3);
                let ei = max_abs(&image, &f["image"]);
                println!("{what} image: max abs err {ei:.2e}");
                assert!(ei <= 3e-3, "{what}: image differs by {ei}");
                if let Some(t) = f.get("time_ids") {
                    assert_eq!(max_abs(cond.get("sampling.time_ids").unwrap(), t), 0.0);
                }
                assert_eq!(report.refused_allocations, 0);
                if device != "cpu" {
                    assert!(report.bytes_streamed > 0, "{what}: the capped UNet streamed nothing");
                }
                runs.push((cond, latents, image));
            }
            let ((c0, l0, i0), (c1, l1, i1)) = (&runs[0], &runs[1]);
            for (name, t) in c0.iter() {
                assert_eq!(bits(t), bits(c1.get(name).unwrap()), "{family} {file}: streaming changed {name}");
            }
            assert_eq!(bits(l0), bits(l1), "{family} {file}: streaming changed the latents");
            assert_eq!(bits(i0), bits(i1), "{family} {file}: streaming changed the image");
        }
    }
}

#[test]
fn sd1_prompt_to_image_matches_diffusers_and_streams_bit_identically() {
    let m = meta();
    check_family(
        "sd1",
        &sd1_model(),
        &sd1_components(),
        &[("", Some(s(&m["sd1"], "negative_prompt")))],
        m["sd1"]["guidance"].as_f64().unwrap(),
    );
}

#[test]
fn sdxl_prompt_to_image_matches_diffusers_and_streams_bit_identically() {
    let m = meta();
    let sdxl = &m["sdxl"];
    let cases = [("none", None), ("neg", Some(s(sdxl, "negative_prompt")))];
    check_family("sdxl", &sdxl_model(), &sdxl_components(), &cases, sdxl["guidance"].as_f64().unwrap());
}

/// At the tight budget the text encoders themselves stream (their reports show streamed bytes), with outputs
/// bit-identical to resident weights.
#[test]
fn text_encoders_stream_under_the_tight_budget() {
    let m = meta();
    for (family, model, components, prompt) in [
        ("sd1", sd1_model(), sd1_components(), s(&m["sd1"], "prompt")),
        ("sdxl", sdxl_model(), sdxl_components(), s(&m["sdxl"], "prompt")),
    ] {
        let mut outs = Vec::new();
        for (device, yaml) in [("cpu", ""), tight(family)] {
            let ctx = context_with(device, yaml);
            let pipeline = Pipeline::load(&ctx, &model, &components).unwrap();
            let dirs = match &components.text_encoder_2 {
                Some(d2) => vec![components.text_encoder.clone().unwrap(), d2.clone()],
                None => vec![components.text_encoder.clone().unwrap()],
            };
            drop(pipeline);
            for dir in dirs {
                let enc = ctx.load_model(&dir).unwrap();
                let tok = ClipTokenizer::from_dir(
                    &dir.parent()
                        .unwrap()
                        .join(dir.file_name().unwrap().to_str().unwrap().replace("text_encoder", "tokenizer")),
                )
                .unwrap();
                let ids = tok.encode(prompt).unwrap();
                let mut report = RunReport::default();
                let out = ctx.encode_ids(&enc, &ids, HiddenLayer::Skip(1), None, &mut report).unwrap();
                println!(
                    "{family} {} {device}: streamed {} of {} bytes",
                    dir.display(),
                    report.bytes_streamed,
                    report.model_bytes
                );
                if device != "cpu" {
                    assert!(report.bytes_streamed > 0, "{family} {}: the text encoder did not stream", dir.display());
                    assert!(report.resident_bytes < report.model_bytes);
                }
                outs.push(bits(&out.hidden));
            }
        }
        let half = outs.len() / 2;
        assert_eq!(outs[..half], outs[half..], "{family}: streaming changed the encoder output");
    }
}

#[test]
fn missing_text_encoder_is_a_clear_error() {
    let ctx = context_with("cpu", "");
    // An SD pipeline without a text encoder and no --text-encoder: encoding names the flag.
    let pipeline = Pipeline::load(&ctx, &model_without_text_encoder(), &ComponentPaths::default()).unwrap();
    assert!(!pipeline.has_text_encoders());
    let e = pipeline.encode_prompt(&ctx, "a cat", None, &PromptOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no text_encoder: pass --text-encoder"), "{e}");
    // SDXL with only the first encoder: names the second.
    let one = ComponentPaths { text_encoder: sdxl_components().text_encoder, ..Default::default() };
    let pipeline = Pipeline::load(&ctx, &sdxl_model(), &one).unwrap();
    let e = pipeline.encode_prompt(&ctx, "a cat", None, &PromptOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no text_encoder_2: pass --text-encoder-2"), "{e}");
    // A --text-encoder folder that does not exist fails at load, naming the path.
    let gone = ComponentPaths { text_encoder: Some(prompt_dir().join("sd1/no_such_encoder")), ..Default::default() };
    let e = Pipeline::load(&ctx, &sd1_model(), &gone).err().expect("a missing folder must fail").to_string();
    assert!(e.contains("no_such_encoder"), "{e}");
}

fn lowvram() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lowvram"))
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowvram-prompt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "lowvram failed: {stderr}");
    stderr
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn cli_generate_prompt_matches_diffusers_and_encode_equals_encode_prompt() {
    let m = meta();
    let sd1 = &m["sd1"];
    let dir = out_dir("cli");
    let f = fixture("sd1", "sample_euler.safetensors");
    // The fixture's noise as --inputs (only sampling.init_noise: the conditioning comes from the prompt).
    let noise = dir.join("noise.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("sampling.init_noise".to_string(), f["sampling.init_noise"].clone())]),
        &noise,
    )
    .unwrap();
    let common = |cmd: &mut Command| {
        cmd.arg("--model").arg(sd1_model()).arg("--text-encoder").arg(prompt_dir().join("sd1/text_encoder"));
        cmd.args(["--prompt", s(sd1, "prompt"), "--negative-prompt", s(sd1, "negative_prompt"), "--device", "cpu"]);
    };
    let mut gen = lowvram();
    gen.args(["generate", "--scheduler", "euler", "--steps", "8", "--guidance", "7.5"]);
    common(&mut gen);
    gen.arg("--inputs").arg(&noise).arg("--out").arg(dir.join("img.png"));
    gen.arg("--latents-out")
        .arg(dir.join("latents.safetensors"))
        .arg("--image-raw-out")
        .arg(dir.join("image.safetensors"));
    run_ok(&mut gen);
    assert!(dir.join("img.png").is_file());
    assert_close("cli latents", &load(&dir.join("latents.safetensors"))["latents"], &f["latents"], 1e-3);
    let ei = max_abs(&load(&dir.join("image.safetensors"))["image"], &f["image"]);
    assert!(ei <= 3e-3, "cli image differs by {ei}");

    let mut enc = lowvram();
    enc.arg("encode");
    common(&mut enc);
    enc.arg("--out").arg(dir.join("cond.safetensors"));
    run_ok(&mut enc);
    let written = load(&dir.join("cond.safetensors"));
    let ctx = context_with("cpu", "");
    let pipeline = Pipeline::load(&ctx, &sd1_model(), &sd1_components()).unwrap();
    let opts = PromptOptions { batch: 1, image_size: (64, 64), clip_skip: 0 };
    let cond = pipeline.encode_prompt(&ctx, s(sd1, "prompt"), Some(s(sd1, "negative_prompt")), &opts).unwrap();
    let mut names: Vec<&str> = cond.iter().map(|(n, _)| n).collect();
    names.sort();
    let mut keys: Vec<&str> = written.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(names, keys);
    for (name, t) in cond.iter() {
        assert_eq!(bits(t), bits(&written[name]), "encode's {name} differs from encode_prompt's");
    }

    // Without a text encoder a prompt is a clear error naming the flag.
    let out = lowvram()
        .arg("encode")
        .arg("--model")
        .arg(model_without_text_encoder())
        .args(["--prompt", "a cat", "--out"])
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--text-encoder"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
