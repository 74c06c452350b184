//! FLUX's sampler and autoencoder against diffusers 0.42.1, from fixtures written by `scripts/fixtures_flow.py`
//! (tests/fixtures/flow/):
//!
//! * `flow_euler` schedules (timesteps, sigmas) as FluxPipeline sets them: FLUX.1 dev (dynamic shift at several
//!   latent sizes), schnell (no shift), a static shift, the linear time shift, and a config as `save_config` writes it;
//! * the Euler update step by step on recorded tensors, and whole loops through `sampling::denoise`;
//! * the tiny SD UNet driven by the FLUX.1-dev scheduler through `Context::denoise_conditioned` (one forward per step,
//!   no classifier-free guidance whatever the guidance);
//! * a tiny 16-channel VAE with `shift_factor` ≠ 0 and no quant convs, decoded from its diffusers folder and from
//!   the BFL `ae.safetensors` layout through `Context::vae_decode`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions, Tiling};
use lowvram::models::conditioning::COND_EMBEDDINGS;
use lowvram::models::Conditioning;
use lowvram::models::{AutoencoderKL, VaeConfig};
use lowvram::sampling::{denoise, make_scheduler_for, DenoiseParams, SchedulerConfig, SchedulerKind};
use lowvram::weights::single_file::{Component, ComponentFile, SingleFile};
use lowvram::ResidentWeights;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dir() -> PathBuf {
    repo().join("tests/fixtures/flow")
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn schedules() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("schedules.json")).unwrap()).unwrap()
}

fn config(s: &Value, name: &str) -> SchedulerConfig {
    SchedulerConfig::from_value(&s["configs"][name]).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_of(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn context(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions { device: Some(device.into()), config_yaml: Some(yaml.into()), ..Default::default() })
        .unwrap()
}

#[test]
fn schedules_match_flux_pipeline() {
    let s = schedules();
    let runs = s["runs"].as_array().unwrap();
    assert!(runs.len() >= 150, "{} runs", runs.len());
    let mut worst = 0f64;
    let mut failures = Vec::new();
    for r in runs {
        let name = r["config"].as_str().unwrap();
        let steps = r["steps"].as_u64().unwrap() as usize;
        let size = (r["latent_size"][0].as_u64().unwrap() as usize, r["latent_size"][1].as_u64().unwrap() as usize);
        let sched = make_scheduler_for(SchedulerKind::FlowEuler, &config(&s, name), steps, false, Some(size)).unwrap();
        let want_t: Vec<f64> = r["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let want_s: Vec<f64> = r["sigmas"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let ours_s: Vec<f64> = sched.sigmas().unwrap().iter().map(|&x| x as f64).collect();
        assert_eq!(sched.timesteps().len(), want_t.len(), "{name} {steps} {size:?}");
        assert_eq!(ours_s.len(), want_s.len(), "{name} {steps} {size:?}");
        assert_eq!(*ours_s.last().unwrap(), 0.0, "terminal sigma");
        assert_eq!(sched.init_noise_sigma(), 1.0);
        // Absolute on sigma ∈ [0, 1], relative to 1000 on the timesteps.
        let e_s = ours_s.iter().zip(&want_s).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let e_t = sched.timesteps().iter().zip(&want_t).map(|(a, b)| (a - b).abs() / 1000.0).fold(0.0, f64::max);
        worst = worst.max(e_s).max(e_t);
        if e_s > 1e-6 || e_t > 1e-6 {
            failures.push(format!(
                "{name} steps {steps} latent {size:?}: sigmas {ours_s:?} vs {want_s:?}; timesteps {:?} vs {want_t:?}",
                sched.timesteps()
            ));
        }
    }
    println!("{} schedules, worst difference {worst:e}", runs.len());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Dynamic shifting depends on the size; schnell's schedule does not, and is FLUX's unshifted linspace.
#[test]
fn dev_shift_grows_with_the_image_and_schnell_is_unshifted() {
    let s = schedules();
    let dev = config(&s, "dev");
    let sigma1 =
        |size| make_scheduler_for(SchedulerKind::FlowEuler, &dev, 4, false, Some(size)).unwrap().sigmas().unwrap()[1];
    assert!(sigma1((32, 32)) < sigma1((128, 128)) && sigma1((128, 128)) < sigma1((200, 200)));
    let schnell =
        make_scheduler_for(SchedulerKind::FlowEuler, &config(&s, "schnell"), 4, false, Some((128, 128))).unwrap();
    assert_eq!(schnell.sigmas().unwrap(), &[1.0, 0.75, 0.5, 0.25, 0.0]);
}

/// Each Euler update against diffusers' `scheduler.step` on the recorded sample and velocity, then the whole loop
/// through `sampling::denoise` with the same fake velocity model (one forward per step even with guidance 3.5).
#[test]
fn steps_and_loops_match_diffusers() {
    let s = schedules();
    let t = tensors("loops.safetensors");
    let (fixed, init) = (&t["fixed"], &t["init"]);
    let (_, _, h, w) = init.dims4().unwrap();
    for l in s["loops"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let steps = l["steps"].as_u64().unwrap() as usize;
        let cfg = config(&s, name);
        let mut sched = make_scheduler_for(SchedulerKind::FlowEuler, &cfg, steps, false, Some((h, w))).unwrap();
        for i in 0..steps {
            let sample = &t[&format!("{name}/sample.{i}")];
            let want =
                if i + 1 < steps { &t[&format!("{name}/sample.{}", i + 1)] } else { &t[&format!("{name}/final")] };
            let got = sched.step(&t[&format!("{name}/v.{i}")], i, sample, None).unwrap();
            let err = max_abs(&got, want);
            assert!(err <= 1e-6 * max_of(want).max(1.0), "{name} step {i}: max abs err {err:e}");
        }
        let params = DenoiseParams {
            kind: SchedulerKind::FlowEuler,
            karras: false,
            steps,
            guidance: 3.5,
            seed: 0,
            scheduler_config: cfg,
        };
        let mut calls = 0;
        let mut model = |x: &Tensor, t: f64| -> lowvram::Result<Tensor> {
            calls += 1;
            assert_eq!(x.dims(), init.dims(), "one batch per step, no classifier-free guidance");
            let a = (x.affine(0.9, 0.0)? + x.tanh()?.affine(0.1, 0.0)?)?;
            Ok((a + fixed.affine(t / 1000.0, 0.0)?)?)
        };
        let out = denoise(&mut model, &params, init, None, &mut |_, _| true, &AtomicBool::new(false)).unwrap();
        assert_eq!(calls, steps);
        let want = &t[&format!("{name}/final")];
        let err = max_abs(&out, want);
        println!("{name}: {steps} steps, max |latent| {:.3}, max abs err {err:.3e}", max_of(want));
        assert!(err <= 1e-5 * max_of(want).max(1.0), "{name}: final latents max abs err {err:e}");
    }
}

/// A copy of the shipped tiny SD UNet's folder with FLUX.1-dev's scheduler config beside it.
fn unet_with_flux_scheduler(s: &Value) -> PathBuf {
    let root = std::env::temp_dir().join(format!("lowvram-flow-unet-{}", std::process::id()));
    let unet = root.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::create_dir_all(root.join("scheduler")).unwrap();
    let src = repo().join("tests/fixtures/tiny-sd-random/unet");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), unet.join(f)).unwrap();
    }
    std::fs::write(root.join("scheduler/scheduler_config.json"), s["configs"]["dev"].to_string()).unwrap();
    root
}

/// `flow_euler` drives a denoiser through `Context::denoise_conditioned`: dynamic shift from the latent size, no
/// noise scaling, one forward per step with guidance 3.5 — as diffusers' FlowMatchEulerDiscreteScheduler on the same
/// UNet; also streamed under a tight device budget (bit-identical on the CPU).
#[test]
fn denoise_conditioned_runs_flow_euler_like_diffusers() {
    let s = schedules();
    let t = tensors("unet_flow.safetensors");
    let root = unet_with_flux_scheduler(&s);
    let mut cond = Conditioning::new();
    cond.insert(COND_EMBEDDINGS, t["cond"].clone());
    let options = DenoiseOptions {
        scheduler: SchedulerKind::FlowEuler,
        karras: false,
        steps: 3,
        guidance: 3.5,
        seed: 0,
        latent_size: (12, 8),
    };
    let want = &t["final"];
    let mut results = Vec::new();
    for (device, yaml) in [("cpu", ""), ("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n")]
    {
        let ctx = context(device, yaml);
        let unet = ctx.load_model(&root.join("unet")).unwrap();
        let mut seen = 0;
        let (latents, report) = ctx
            .denoise_conditioned(&unet, &options, &cond, Some(&t["init"]), None, &mut |i, n| {
                seen = i;
                n == 3
            })
            .unwrap();
        assert_eq!(seen, 3);
        assert_eq!(report.step_ms.len(), 3);
        let err = max_abs(&latents, want);
        println!(
            "{device}: max abs err {err:.3e} (max |latent| {:.3}), streamed {}",
            max_of(want),
            report.bytes_streamed
        );
        assert!(err <= 1e-3 * max_of(want).max(1.0), "{device}: latents differ from diffusers by {err:e}");
        if device != "cpu" {
            assert!(report.bytes_streamed > 0, "the capped run streamed nothing");
        }
        results.push(latents);
    }
    assert_eq!(max_abs(&results[0], &results[1]), 0.0, "streaming changed the result");
    let _ = std::fs::remove_dir_all(&root);
}

fn vae_folder() -> PathBuf {
    dir().join("vae")
}

fn bfl_file() -> PathBuf {
    dir().join("ae.safetensors")
}

/// Decode through the context (scaling and shift applied there) from the folder and from BFL's `ae.safetensors`
/// layout: diffusers' `vae.decode(latents / 0.3611 + 0.1159)` within 3e-3; the file and the folder agree exactly,
/// also streamed.
#[test]
fn flux_vae_decodes_like_diffusers_from_folder_and_bfl_file() {
    let r = tensors("vae_ref.safetensors");
    let want = &r["image"];
    let mut images = Vec::new();
    for (device, yaml) in [("cpu", ""), ("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0001\n")]
    {
        let ctx = context(device, yaml);
        let folder = ctx.load_model(&vae_folder()).unwrap();
        let file = ctx.load_vae_file(&bfl_file(), None).unwrap();
        for (what, vae) in [("folder", &folder), ("ae.safetensors", &file)] {
            let c = vae.as_vae().unwrap().config();
            assert_eq!((c.latent_channels, c.scaling_factor, c.shift_factor), (16, 0.3611, Some(0.1159)), "{what}");
            assert!(!c.use_quant_conv && !c.use_post_quant_conv, "{what}");
            let (image, report) = ctx.vae_decode(vae, &r["latents"], Tiling::Never).unwrap();
            let err = max_abs(&image, want);
            println!("{device} {what}: image max abs err {err:.3e}, streamed {}", report.bytes_streamed);
            assert!(err <= 3e-3, "{device} {what}: image differs from diffusers by {err:e}");
            if device != "cpu" {
                assert!(report.bytes_streamed > 0, "the capped run streamed nothing");
            }
            images.push(image);
        }
    }
    for i in &images[1..] {
        assert_eq!(max_abs(i, &images[0]), 0.0, "folder, file and streamed decodes differ");
    }
}

/// The encoder and `latents_from_z`: `(mean − 0.1159) · 0.3611` as FLUX's img2img pipeline scales it, from both
/// layouts.
#[test]
fn flux_vae_encodes_like_diffusers() {
    let r = tensors("vae_ref.safetensors");
    let folder =
        candle_core::safetensors::load(vae_folder().join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let file = ComponentFile::open(&bfl_file(), Component::Vae).unwrap();
    let cfg = VaeConfig::from_json(&file.vae_config(None).unwrap().to_string()).unwrap();
    let folder_cfg = VaeConfig::from_file(&vae_folder().join("config.json")).unwrap();
    assert_eq!(
        format!("{cfg:?}").replace("sample_size: Some(Number(1024))", ""),
        format!("{folder_cfg:?}").replace("sample_size: Some(Number(32))", "")
    );
    let vae = AutoencoderKL::new(cfg).unwrap();
    for (what, tensors) in [("folder", folder), ("ae.safetensors", file.read_all().unwrap())] {
        let w = ResidentWeights::from_tensors(tensors, &Device::Cpu, DType::F32).unwrap();
        let (mean, _) = vae.encode(&w, &r["pixels"]).unwrap();
        let latents = vae.config().latents_from_z(&mean).unwrap();
        let err = max_abs(&latents, &r["encoded"]);
        println!("{what}: encoded latents max abs err {err:.3e}");
        assert!(err <= 1e-3 * max_of(&r["encoded"]).max(1.0), "{what}: {err:e}");
    }
}

/// What the shapes of an SD VAE file give is unchanged (4 channels, quant convs, SD scaling, no shift).
#[test]
fn sd_vae_file_config_has_no_shift() {
    let sd1 = repo().join("tests/fixtures/single-file/sd1.safetensors");
    let c = SingleFile::open(&sd1).unwrap().config(Component::Vae).unwrap();
    assert_eq!(
        (&c["latent_channels"], &c["use_quant_conv"], &c["scaling_factor"]),
        (&4.into(), &true.into(), &0.18215.into())
    );
    assert!(c.get("shift_factor").is_none(), "{c}");
    // A BFL file opened as something else is refused by name.
    let e = ComponentFile::open(&bfl_file(), Component::TextEncoder).err().unwrap().to_string();
    assert!(e.contains("decoder.conv_in.weight"), "{e}");
}
