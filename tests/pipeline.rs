//! The SD runtime through the public Rust API: parity with diffusers for every sampler, identical results at every
//! VRAM budget (bytes streamed = steps × (model − resident)), cancellation, decode tiling, and clear errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions, Tiling};
use lowvram::sampling::SchedulerKind;
use lowvram::Error;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(model: &str, name: &str) -> HashMap<String, Tensor> {
    let path = repo().join("tests/fixtures").join(model).join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn pipeline_dir(model: &str) -> PathBuf {
    match model {
        "tiny-sd" => repo().join("tests/fixtures/tiny-sd-random"),
        other => repo().join("tests/fixtures").join(other).join("model"),
    }
}

fn context(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions {
        device: Some(device.into()),
        config_yaml: Some(yaml.into()),
        ..Default::default()
    })
    .expect("context")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn options(kind: SchedulerKind, karras: bool) -> DenoiseOptions {
    DenoiseOptions {
        scheduler: kind,
        karras,
        steps: 8,
        guidance: 7.5,
        seed: 0,
        latent_size: (8, 8),
    }
}

const SAMPLERS: [(&str, SchedulerKind, bool); 5] = [
    ("euler", SchedulerKind::Euler, false),
    ("euler_a", SchedulerKind::EulerAncestral, false),
    ("ddim", SchedulerKind::Ddim, false),
    ("dpmpp_2m", SchedulerKind::DpmPP2M, false),
    ("dpmpp_2m_karras", SchedulerKind::DpmPP2M, true),
];

/// 8 steps at CFG 7.5 with each sampler, then the VAE decode, against diffusers (goal: within 1e-3).
#[test]
fn every_sampler_matches_diffusers_end_to_end() {
    for model in ["tiny-sd", "tiny-sd2"] {
        let ctx = context("cpu", "");
        let dir = pipeline_dir(model);
        let unet = ctx.load_model(&dir.join("unet")).unwrap();
        let vae = ctx.load_model(&dir.join("vae")).unwrap();
        for (name, kind, karras) in SAMPLERS {
            let f = fixture(model, &format!("sample_{name}.safetensors"));
            let (latents, report) = ctx
                .denoise(
                    &unet,
                    &options(kind, karras),
                    &f["sampling.cond_embeddings"],
                    Some(&f["sampling.uncond_embeddings"]),
                    Some(&f["sampling.init_noise"]),
                    Some(&f["sampling.step_noise"]),
                    &mut |_, _| true,
                )
                .unwrap();
            let (image, _) = ctx.vae_decode(&vae, &latents, Tiling::Never).unwrap();
            let (el, ei) = (
                max_abs(&latents, &f["latents"]),
                max_abs(&image, &f["image"]),
            );
            println!(
                "{model} {name}: latents max abs err {el:.2e}, image {ei:.2e}, {} steps",
                report.step_ms.len()
            );
            assert!(el <= 1e-3, "{model} {name}: latents differ by {el}");
            assert!(ei <= 1e-3, "{model} {name}: image differs by {ei}");
        }
    }
}

/// The same run at budgets from everything resident to almost everything streamed gives bit-identical latents;
/// every step streams exactly the non-resident bytes; the device never exceeds its capacity or refuses memory.
/// Every budget, with and without prefetch (async_loading): the same latents bit for bit, bytes streamed = steps ×
/// (model − resident), peak within the capacity, nothing refused; with prefetch, the plans that hold two blocks in
/// flight copy the next block ahead of use.
#[test]
fn budgets_change_residency_never_results() {
    let f = fixture("tiny-sd", "sample_euler.safetensors");
    let run = |device: &str, yaml: &str| {
        let ctx = context(device, yaml);
        let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
        // The plan lives while the model is locked: read its slots from the progress callback.
        let mut slots = 0;
        let (latents, report) = ctx
            .denoise(
                &unet,
                &options(SchedulerKind::Euler, false),
                &f["sampling.cond_embeddings"],
                Some(&f["sampling.uncond_embeddings"]),
                Some(&f["sampling.init_noise"]),
                None,
                &mut |_, _| {
                    slots = slots.max(ctx.stats().plan.map_or(0, |p| p.slots));
                    true
                },
            )
            .unwrap();
        (
            latents.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            report,
            ctx.stats(),
            slots,
        )
    };
    let (reference, full, _, _) = run("cpu", "");
    assert_eq!(
        full.bytes_streamed, 0,
        "an unbounded CPU device keeps everything resident"
    );
    let model = full.model_bytes;
    let capacity: u64 = 64 << 20;
    let mut prefetched_somewhere = false;
    for fraction in [1.0, 0.5, 0.25, 0.1, 0.0] {
        for prefetch in [true, false] {
            let budget = (model as f64 * fraction) as u64;
            // 0 %: `vram_state: none` streams every block (a zero cache cap leaves no room for the block in flight)
            let cap = if fraction > 0.0 {
                format!("max_cache_vram_gb: {}", budget as f64 / (1u64 << 30) as f64)
            } else {
                "vram_state: none".to_string()
            };
            let yaml = format!("device_working_mem_gb: 0.01\n{cap}\nasync_loading: {prefetch}\n");
            let (latents, r, stats, slots) = run(&format!("emulated:{capacity}"), &yaml);
            println!(
                "budget {:>3.0}% prefetch {prefetch:>5}: resident {} of {} bytes, streamed {} (8 steps), prefetched {}, \
                 slots {slots}, peak {} of {capacity}",
                fraction * 100.0,
                r.resident_bytes,
                r.model_bytes,
                r.bytes_streamed,
                stats.bytes_prefetched_total,
                r.peak_device_bytes
            );
            assert_eq!(
                latents, reference,
                "budget {fraction}, prefetch {prefetch}: results changed"
            );
            assert!(
                r.resident_bytes <= budget.max(0),
                "resident {} above budget {budget}",
                r.resident_bytes
            );
            assert_eq!(
                r.bytes_streamed,
                8 * (r.model_bytes - r.resident_bytes),
                "budget {fraction}"
            );
            assert!(r.peak_device_bytes <= capacity);
            if fraction > 0.0 {
                assert!(
                    r.peak_device_bytes <= budget + r.working_bytes,
                    "peak above cap + working memory"
                );
            }
            assert_eq!(r.refused_allocations, 0);
            if fraction <= 0.1 {
                assert!(
                    r.resident_bytes < model / 5,
                    "most of the model streams at {fraction}"
                );
            }
            if !prefetch || slots < 2 {
                assert_eq!(
                    stats.bytes_prefetched_total, 0,
                    "no prefetch without two slots"
                );
            } else if r.bytes_streamed > 0 {
                // The order is learned in the first step; later steps get all but their first block prefetched.
                assert!(
                    stats.bytes_prefetched_total > 0,
                    "budget {fraction}: two slots but nothing prefetched"
                );
                assert!(stats.bytes_prefetched_total <= r.bytes_streamed);
                prefetched_somewhere = true;
            }
        }
    }
    assert!(prefetched_somewhere, "no budget exercised the prefetch");
}

/// Cancel from the progress path (as another thread would) stops at the next step with Cancelled, releases the
/// working memory, and the context keeps working.
#[test]
fn cancel_mid_loop_releases_working_memory() {
    let ctx = context("emulated:256MiB", "device_working_mem_gb: 0.05\n");
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let f = fixture("tiny-sd", "sample_euler.safetensors");
    let calls = AtomicUsize::new(0);
    let result = ctx.denoise(
        &unet,
        &DenoiseOptions {
            steps: 10,
            ..options(SchedulerKind::Euler, false)
        },
        &f["sampling.cond_embeddings"],
        None,
        Some(&f["sampling.init_noise"]),
        None,
        &mut |step, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            if step == 3 {
                ctx.cancel();
            }
            true
        },
    );
    assert!(
        matches!(result, Err(Error::Cancelled)),
        "{:?}",
        result.err()
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "stopped within the step after the cancel"
    );
    assert_eq!(
        ctx.stats().device.usage.working_bytes,
        0,
        "working memory released"
    );
    // the context is still usable, and a new call clears the stale request
    let ok = ctx.denoise(
        &unet,
        &DenoiseOptions {
            steps: 2,
            ..options(SchedulerKind::Euler, false)
        },
        &f["sampling.cond_embeddings"],
        None,
        Some(&f["sampling.init_noise"]),
        None,
        &mut |_, _| true,
    );
    assert!(ok.is_ok(), "{:?}", ok.err());
}

/// A device too small for the untiled decode's working memory decodes in tiles, close to the untiled result.
#[test]
fn decode_tiles_when_untiled_does_not_fit() {
    let f = fixture("tiny-sd", "vae_decode_large.safetensors");
    let latents = (&f["latents"] * 0.18215).unwrap(); // the API takes latents before the scaling factor
    let ctx = context("cpu", "");
    let vae = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/vae")).unwrap();
    let (untiled, r0) = ctx.vae_decode(&vae, &latents, Tiling::Never).unwrap();
    assert_eq!(r0.tile_latent, None);
    let err = max_abs(&untiled, &f["image"]);
    assert!(
        err <= 1e-3,
        "untiled decode differs from diffusers by {err}"
    );

    let vae_dir = repo().join("tests/fixtures/tiny-sd-random/vae");
    let model =
        lowvram::models::AutoencoderKL::from_config_file(&vae_dir.join("config.json")).unwrap();
    // The path an emulated device runs (CPU memory, f32: the own kernels).
    let target = lowvram::ops::OpTarget::new(&Device::Cpu, DType::F32);
    let untiled_need = model.decode_working_bytes(latents.dims(), target);
    let tiled_need = model.decode_tiled_working_bytes(latents.dims(), 8, target);
    assert!(tiled_need < untiled_need);
    // capacity: the weights and a tiled decode fit, the untiled decode does not
    let weights = vae.weights().total_bytes();
    let capacity = weights + (tiled_need + untiled_need) / 2;
    let ctx = context(
        &format!("emulated:{capacity}"),
        "device_working_mem_gb: 0\n",
    );
    let vae = ctx.load_model(&vae_dir).unwrap();
    let (tiled, r) = ctx.vae_decode(&vae, &latents, Tiling::Auto).unwrap();
    assert!(r.tile_latent.is_some(), "expected a tiled decode");
    assert!(r.peak_device_bytes <= capacity);
    let diff = (&tiled - &untiled).unwrap().abs().unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let max = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!(
        "tiled ({:?}) vs untiled: max {max:.2e}, mean {mean:.2e}",
        r.tile_latent
    );
    assert!(
        mean <= 5e-3 && max <= 5e-2,
        "tiled decode: max {max}, mean {mean}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowvram-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn bad_models_and_inputs_give_clear_errors_and_leave_the_context_usable() {
    let ctx = context("cpu", "");
    let src = repo().join("tests/fixtures/tiny-sd-random/unet");

    // missing folder / missing weights
    let err = ctx
        .load_model(Path::new("/nonexistent/unet"))
        .err()
        .unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let dir = temp_dir("noweights");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let err = ctx.load_model(&dir).err().unwrap();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("diffusion_pytorch_model"),
        "{err}"
    );

    // corrupt (truncated) weights
    let dir = temp_dir("corrupt");
    copy_dir(&src, &dir);
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = ctx.load_model(&dir).err().unwrap();
    assert!(matches!(err, Error::Format(_)), "{err}");

    // a config the code does not support
    let dir = temp_dir("unsupported");
    copy_dir(&src, &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(cfg.contains("\"addition_embed_type\": null"));
    let cfg = cfg.replace(
        "\"addition_embed_type\": null",
        "\"addition_embed_type\": \"text_image\"",
    );
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = ctx.load_model(&dir).err().unwrap();
    assert!(
        matches!(err, Error::Unsupported(_)) && err.to_string().contains("addition_embed_type"),
        "{err}"
    );

    // tensors of the wrong shape
    let unet = ctx.load_model(&src).unwrap();
    let bad_cond = Tensor::zeros((1, 77, 31), DType::F32, &Device::Cpu).unwrap();
    let err = ctx
        .denoise(
            &unet,
            &options(SchedulerKind::Euler, false),
            &bad_cond,
            None,
            None,
            None,
            &mut |_, _| true,
        )
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("31"),
        "{err}"
    );
    let flat_cond = Tensor::zeros((77, 32), DType::F32, &Device::Cpu).unwrap();
    let err = ctx
        .denoise(
            &unet,
            &options(SchedulerKind::Euler, false),
            &flat_cond,
            None,
            None,
            None,
            &mut |_, _| true,
        )
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::InvalidArgument(_))
            && err.to_string().contains("sampling.cond_embeddings has shape [77, 32]")
            && err.to_string().contains("[B, S, 32]"),
        "{err}"
    );
    let cond = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let bad_noise = Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = ctx
        .denoise(
            &unet,
            &options(SchedulerKind::Euler, false),
            &cond,
            None,
            Some(&bad_noise),
            None,
            &mut |_, _| true,
        )
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let vae = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/vae")).unwrap();
    let err = ctx
        .vae_decode(
            &vae,
            &bad_cond.reshape((1, 77, 31, 1)).unwrap(),
            Tiling::Auto,
        )
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = ctx
        .denoise(
            &vae,
            &options(SchedulerKind::Euler, false),
            &cond,
            None,
            None,
            None,
            &mut |_, _| true,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("is a Vae, a denoising model is needed"), "{err}");

    // the context still works
    let (latents, _) = ctx
        .denoise(
            &unet,
            &DenoiseOptions {
                steps: 2,
                ..options(SchedulerKind::Euler, false)
            },
            &cond,
            None,
            None,
            None,
            &mut |_, _| true,
        )
        .unwrap();
    assert_eq!(latents.dims(), &[1, 4, 8, 8]);
}

/// The fp16 weight file loads and computes in f32 close to the f32 weights' result.
#[test]
fn fp16_weights_compute_close_to_f32() {
    let f = fixture("tiny-sd", "sample_euler.safetensors");
    // a pipeline folder whose UNet has only the fp16 file (the scheduler config beside it, as in the original)
    let root = temp_dir("fp16");
    copy_dir(
        &repo().join("tests/fixtures/tiny-sd-random/scheduler"),
        &root.join("scheduler"),
    );
    let dir = root.join("unet");
    let src = repo().join("tests/fixtures/tiny-sd-random/unet");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.fp16.safetensors"),
        dir.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let ctx = context("cpu", "compute_dtype: fp32\n");
    let unet16 = ctx.load_model(&dir).unwrap();
    assert!(unet16.weights().total_bytes() < 1_300_000, "stored as fp16");
    let run = |unet| {
        ctx.denoise(
            unet,
            &DenoiseOptions {
                steps: 2,
                ..options(SchedulerKind::Euler, false)
            },
            &f["sampling.cond_embeddings"],
            Some(&f["sampling.uncond_embeddings"]),
            Some(&f["sampling.init_noise"]),
            None,
            &mut |_, _| true,
        )
        .unwrap()
        .0
    };
    let a = run(&unet16);
    let unet32 = ctx.load_model(&src).unwrap();
    let b = run(&unet32);
    let err = max_abs(&a, &b);
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!(
        "fp16 weights vs f32 weights after 2 steps: max abs {err:.2e} (values up to {scale:.1})"
    );
    assert!(err > 0.0 && err <= 1e-2 * scale);
}
