//! Model families through the public Rust API: the family-generic denoise (named conditioning) matches diffusers
//! and the SD 1.x entry point bit for bit, and rejects missing or misshapen conditioning by name.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions};
use lowvram::models::conditioning::{COND_EMBEDDINGS, COND_POOLED, UNCOND_EMBEDDINGS};
use lowvram::models::{Conditioning, Family};
use lowvram::sampling::SchedulerKind;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(model: &str, name: &str) -> HashMap<String, Tensor> {
    let path = repo().join("tests/fixtures").join(model).join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn context(device: &str) -> Context {
    context_with(device, "")
}

fn context_with(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions { device: Some(device.into()), config_yaml: Some(yaml.into()), ..Default::default() })
        .expect("context")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn options() -> DenoiseOptions {
    DenoiseOptions {
        scheduler: SchedulerKind::DpmPP2M,
        karras: false,
        steps: 8,
        guidance: 7.5,
        seed: 0,
        latent_size: (8, 8),
    }
}

#[test]
fn conditioned_denoise_matches_diffusers_and_the_sd1_entry_point() {
    let dir = repo().join("tests/fixtures/tiny-sd-random");
    assert_eq!(Family::of_pipeline_dir(&dir).unwrap(), Family::Sd1);
    let f = fixture("tiny-sd", "sample_dpmpp_2m.safetensors");
    // The emulated device streams a quarter of the UNet through a cap (bit-identical results are the point).
    for (device, yaml) in [("cpu", ""), ("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n")] {
        let ctx = context_with(device, yaml);
        let unet = ctx.load_model(&dir.join("unet")).unwrap();
        let mut cond = Conditioning::new();
        cond.insert(COND_EMBEDDINGS, f["sampling.cond_embeddings"].clone());
        cond.insert(UNCOND_EMBEDDINGS, f["sampling.uncond_embeddings"].clone());
        let (generic, report) = ctx
            .denoise_conditioned(&unet, &options(), &cond, Some(&f["sampling.init_noise"]), None, &mut |_, _| true)
            .unwrap();
        let (direct, _) = ctx
            .denoise(
                &unet,
                &options(),
                &f["sampling.cond_embeddings"],
                Some(&f["sampling.uncond_embeddings"]),
                Some(&f["sampling.init_noise"]),
                None,
                &mut |_, _| true,
            )
            .unwrap();
        let err = max_abs(&generic, &f["latents"]);
        println!("{device}: latents vs diffusers {err:.2e}, streamed {} bytes", report.bytes_streamed);
        assert!(err <= 1e-3, "{device}: latents differ from diffusers by {err}");
        assert_eq!(max_abs(&generic, &direct), 0.0, "{device}: generic and SD 1.x paths differ");
        assert_eq!(report.refused_allocations, 0);
        if device != "cpu" {
            assert!(report.bytes_streamed > 0, "the capped run streamed nothing");
        }
    }
}

#[test]
fn conditioning_errors_name_the_tensor_and_the_shape() {
    let ctx = context("cpu");
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let f = fixture("tiny-sd", "sample_euler.safetensors");
    let emb = &f["sampling.cond_embeddings"];
    let d = emb.dims()[2];
    let run = |cond: &Conditioning| {
        ctx.denoise_conditioned(&unet, &options(), cond, None, None, &mut |_, _| true)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = run(&Conditioning::new());
    assert!(e.contains(&format!("needs conditioning tensor sampling.cond_embeddings [B, S, {d}]")), "{e}");
    let mut wrong = Conditioning::new();
    wrong.insert(COND_EMBEDDINGS, emb.narrow(2, 0, d - 1).unwrap());
    let e = run(&wrong);
    assert!(e.contains("sampling.cond_embeddings has shape"), "{e}");
    let mut extra = Conditioning::new();
    extra.insert(COND_EMBEDDINGS, emb.clone());
    extra.insert(COND_POOLED, Tensor::zeros((1, 8), candle_core::DType::F32, &Device::Cpu).unwrap());
    let e = run(&extra);
    assert!(e.contains("does not use conditioning tensor sampling.cond_pooled"), "{e}");
    let vae = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/vae")).unwrap();
    let e = ctx
        .denoise_conditioned(&vae, &options(), &extra, None, None, &mut |_, _| true)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("a denoising model is needed"), "{e}");
}

/// SDXL through the one pipeline API: family detected from the folder, the conditioning diffusers'
/// StableDiffusionXLPipeline fed its UNet (embeddings, pooled, time ids), 8 CFG steps of euler and dpmpp_2m, the
/// decode; the same at a budget that streams, bit for bit.
#[test]
fn sdxl_pipeline_matches_diffusers_and_streams_bit_identically() {
    use lowvram::api::{ComponentPaths, Pipeline, PromptOptions, Tiling};
    let dir = repo().join("tests/fixtures/tiny-sdxl/model");
    for (name, kind) in [("euler", SchedulerKind::Euler), ("dpmpp_2m", SchedulerKind::DpmPP2M)] {
        let f = fixture("tiny-sdxl", &format!("sample_{name}.safetensors"));
        let mut cond = Conditioning::new();
        for key in [
            "sampling.cond_embeddings",
            "sampling.uncond_embeddings",
            "sampling.cond_pooled",
            "sampling.uncond_pooled",
            "sampling.time_ids",
        ] {
            cond.insert(key, f[key].clone());
        }
        let options = DenoiseOptions { scheduler: kind, guidance: 5.0, ..options() };
        let mut results = Vec::new();
        // The cache cap (0.6 MB) holds under half of the 1.5 MB UNet, so the capped run must stream.
        for (device, yaml) in [("cpu", ""), ("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0006\n")] {
            let ctx = context_with(device, yaml);
            let pipeline = Pipeline::load(&ctx, &dir, &ComponentPaths::default()).unwrap();
            assert_eq!(pipeline.family(), Family::Sdxl);
            let (latents, report) =
                pipeline.denoise(&ctx, &cond, &options, Some(&f["sampling.init_noise"]), None, &mut |_, _| true).unwrap();
            let (image, _) = pipeline.decode(&ctx, &latents, Tiling::Auto).unwrap();
            let (el, ei) = (max_abs(&latents, &f["latents"]), max_abs(&image, &f["image"]));
            println!("sdxl {name} {device}: latents {el:.2e}, image {ei:.2e}, streamed {}", report.bytes_streamed);
            assert!(el <= 1e-3, "sdxl {name} {device}: latents differ by {el}");
            assert!(ei <= 3e-3, "sdxl {name} {device}: image differs by {ei}");
            assert_eq!(report.refused_allocations, 0);
            if device != "cpu" {
                assert!(report.bytes_streamed > 0, "the capped run streamed nothing");
            }
            results.push(latents);
            // No text encoders in this fixture: encoding a prompt names the flag to pass.
            let e = pipeline.encode_prompt(&ctx, "a cat", None, &PromptOptions::default()).unwrap_err().to_string();
            assert!(e.contains("no text_encoder: pass --text-encoder"), "{e}");
        }
        assert_eq!(max_abs(&results[0], &results[1]), 0.0, "streaming changed the SDXL latents");
        // Without the pooled embedding the SDXL UNet cannot run: the error names the tensor and its shape.
        let ctx = context("cpu");
        let pipeline = Pipeline::load(&ctx, &dir, &ComponentPaths::default()).unwrap();
        cond.remove("sampling.cond_pooled");
        let e = pipeline.denoise(&ctx, &cond, &options, None, None, &mut |_, _| true).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("sampling.cond_pooled [B, 32]"), "{e}");
    }
}
