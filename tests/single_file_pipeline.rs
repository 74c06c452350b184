//! Single-file checkpoints through the pipeline API: a `.safetensors` in the LDM/SGM layout loads as a pipeline
//! (family and components from its keys, tensors read in place under diffusers' names) and computes exactly what
//! the diffusers folder of the same weights computes — UNet and VAE (SD 1.x, SDXL), the OpenCLIP text encoder whose
//! q/k/v are row slices of one fused tensor (SD 2.x) and bigG's transposed projection (SDXL) — also when streamed.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lowvram::api::{ComponentPaths, Context, ContextOptions, DenoiseOptions, Pipeline, Tiling};
use lowvram::models::conditioning::{COND_EMBEDDINGS, COND_POOLED, TIME_IDS, UNCOND_EMBEDDINGS};
use lowvram::models::text_encoder::HiddenLayer;
use lowvram::models::{Conditioning, Family};
use lowvram::sampling::SchedulerKind;
use lowvram::weights::single_file::{Component, SingleFile};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-file")
}

fn context(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions { device: Some(device.into()), config_yaml: Some(yaml.into()), ..Default::default() })
        .unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn options() -> DenoiseOptions {
    DenoiseOptions { scheduler: SchedulerKind::Euler, karras: false, steps: 4, guidance: 5.0, seed: 3, latent_size: (8, 8) }
}

/// Latents and image of a pipeline at `path` on `device` with `cond`.
fn run(path: &PathBuf, device: &str, yaml: &str, cond: &Conditioning) -> (Tensor, Tensor, u64) {
    let ctx = context(device, yaml);
    let p = Pipeline::load(&ctx, path, &ComponentPaths::default()).unwrap();
    let (latents, report) = p.denoise(&ctx, cond, &options(), None, None, &mut |_, _| true).unwrap();
    let (image, _) = p.decode(&ctx, &latents, Tiling::Auto).unwrap();
    (latents, image, report.bytes_streamed)
}

#[test]
fn sd1_single_file_equals_its_folder_also_streamed() {
    let mut cond = Conditioning::new();
    cond.insert(COND_EMBEDDINGS, random(&[1, 77, 32], 1));
    cond.insert(UNCOND_EMBEDDINGS, random(&[1, 77, 32], 2));
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd-random");
    let (want_l, want_i, _) = run(&folder, "cpu", "", &cond);
    let file = fixtures().join("sd1.safetensors");
    let ctx = context("cpu", "");
    assert_eq!(Pipeline::load(&ctx, &file, &ComponentPaths::default()).unwrap().family(), Family::Sd1);
    let (l, i, _) = run(&file, "cpu", "", &cond);
    assert!(same(&l, &want_l) && same(&i, &want_i), "the single file computes other latents than its folder");
    let (l, i, streamed) =
        run(&file, "emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n", &cond);
    assert!(streamed > 0, "the capped run streamed nothing");
    assert!(same(&l, &want_l) && same(&i, &want_i), "streaming from the single file changed the result");
}

#[test]
fn sdxl_single_file_equals_its_folder() {
    let mut cond = Conditioning::new();
    cond.insert(COND_EMBEDDINGS, random(&[1, 77, 72], 4));
    cond.insert(UNCOND_EMBEDDINGS, random(&[1, 77, 72], 5));
    cond.insert(COND_POOLED, random(&[1, 24], 6));
    cond.insert(TIME_IDS, Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]], &Device::Cpu).unwrap());
    let (want_l, want_i, _) = run(&fixtures().join("sdxl"), "cpu", "", &cond);
    let (l, i, _) = run(&fixtures().join("sdxl.safetensors"), "cpu", "", &cond);
    assert!(same(&l, &want_l) && same(&i, &want_i), "the SDXL single file computes other results than its folder");
    let (l, _, streamed) =
        run(&fixtures().join("sdxl.safetensors"), "emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0003\n", &cond);
    assert!(streamed > 0 && same(&l, &want_l), "streaming the SDXL single file changed the latents");
}

/// The text encoders of single files: OpenCLIP's fused in_proj read as three row ranges (SD 2.x), bigG's
/// projection stored transposed (SDXL), each equal to the diffusers folder's encoder, in every hidden layer asked.
#[test]
fn single_file_text_encoders_equal_their_folders() {
    let ids: Vec<u32> = (0..77u32).map(|i| (i * 37 + 5) % 256).collect();
    for (name, component, folder, layer) in [
        ("sd2", Component::TextEncoder, "sd2/text_encoder", HiddenLayer::Last),
        ("sdxl", Component::TextEncoder, "sdxl/text_encoder", HiddenLayer::Skip(1)),
        ("sdxl", Component::TextEncoder2, "sdxl/text_encoder_2", HiddenLayer::Skip(1)),
    ] {
        let ctx = context("cpu", "");
        let file = SingleFile::open_with_config(&fixtures().join(format!("{name}.safetensors")), Some(&fixtures().join(name)))
            .unwrap();
        let from_file = ctx.load_single_file_component(&file, component).unwrap();
        let from_folder = ctx.load_model(&fixtures().join(folder)).unwrap();
        let mut r = Default::default();
        let a = ctx.encode_ids(&from_file, &ids, layer, None, &mut r).unwrap();
        let b = ctx.encode_ids(&from_folder, &ids, layer, None, &mut r).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(same(&f32s(&a.hidden), &f32s(&b.hidden)), "{name} {component:?}: hidden states differ");
        let (pa, pb) = (a.pooled.unwrap(), b.pooled.unwrap());
        assert!(same(&f32s(&pa), &f32s(&pb)), "{name} {component:?}: pooled output differs");
    }
}

#[test]
fn a_single_file_without_a_vae_names_the_flag() {
    let dir = tempdir();
    // The SD 1.x file without its first_stage_model.* tensors: written by the test from the fixture.
    let src = fixtures().join("sd1.safetensors");
    let tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let kept: std::collections::HashMap<String, Tensor> =
        tensors.into_iter().filter(|(k, _)| !k.starts_with("first_stage_model.")).collect();
    let path = dir.join("novae.safetensors");
    candle_core::safetensors::save(&kept, &path).unwrap();
    std::fs::copy(fixtures().join("sd1.yaml"), dir.join("novae.yaml")).unwrap();
    copy_dir(&fixtures().join("sd1"), &dir.join("novae"));
    let ctx = context("cpu", "");
    let e = Pipeline::load(&ctx, &path, &ComponentPaths::default()).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("no VAE in this file: pass --vae"), "{e}");
    // With --vae the same file loads and runs.
    let vae = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd-random/vae");
    let over = ComponentPaths { vae: Some(vae), ..Default::default() };
    let p = Pipeline::load(&ctx, &path, &over);
    assert!(p.is_ok(), "{:?}", p.err());
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowvram-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
