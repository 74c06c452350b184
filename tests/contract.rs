//! The host contract through the Rust API (the C ABI's side is tests/c/test_contract.c): cancel per call and per
//! context, a model bound to its context, reports on failure, bounds checked before allocating, and model folders
//! that lie (a renamed tensor fails at load, naming it).

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use candle_core::{Device, Tensor};
use lowvram::api::{CancelToken, Context, ContextOptions, DenoiseOptions, RunReport};
use lowvram::Error;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cpu_context() -> Context {
    Context::new(ContextOptions { device: Some("cpu".into()), ..Default::default() }).unwrap()
}

fn cond() -> Tensor {
    let v: Vec<f32> = (0..4 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    Tensor::from_vec(v, (1, 4, 32), &Device::Cpu).unwrap()
}

fn options(steps: usize) -> DenoiseOptions {
    DenoiseOptions { steps, latent_size: (8, 8), seed: 3, ..Default::default() }
}

#[test]
fn a_context_cancel_stops_the_running_call_and_no_later_call_erases_it() {
    let ctx = cpu_context();
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let cond = cond();
    let (reached_tx, reached_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ctx, unet_ref, cond_ref) = (&ctx, &*unet, &cond);
    std::thread::scope(|s| {
        let running = s.spawn(move || {
            let mut progress = |step: usize, _| {
                if step == 1 {
                    reached_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                }
                true
            };
            ctx.denoise(unet_ref, &options(6), cond_ref, None, None, None, &mut progress).map(|_| ())
        });
        reached_rx.recv().unwrap();
        ctx.cancel();
        // A call starting after the cancel: not stopped by it, and it does not clear it for the running one.
        ctx.denoise(&unet, &options(2), &cond, None, None, None, &mut |_, _| true).expect("a later call runs");
        go_tx.send(()).unwrap();
        assert!(matches!(running.join().unwrap(), Err(Error::Cancelled)));
    });
}

#[test]
fn a_token_stops_only_its_own_call_even_when_cancelled_before_it_starts() {
    let ctx = cpu_context();
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let cond = cond();
    let token = CancelToken::new();
    token.cancel();
    let mut steps = 0;
    let mut report = RunReport::default();
    let r = ctx.denoise_with(
        &unet,
        &options(4),
        &cond,
        None,
        None,
        None,
        &mut |_, _| {
            steps += 1;
            true
        },
        Some(&token),
        &mut report,
    );
    assert!(matches!(r, Err(Error::Cancelled)) && steps == 0);
    // The report is filled on failure too.
    assert_eq!(report.model_bytes, unet.weights().total_bytes());
    ctx.denoise(&unet, &options(2), &cond, None, None, None, &mut |_, _| true).expect("other calls unaffected");
}

#[test]
fn a_model_runs_only_in_its_own_context() {
    let a = cpu_context();
    let b = cpu_context();
    let unet = a.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let e = b.denoise(&unet, &options(2), &cond(), None, None, None, &mut |_, _| true).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("another context")), "{e}");
    assert!(matches!(b.load_to_device(&unet, 1 << 20), Err(Error::InvalidArgument(_))));
}

#[test]
fn absurd_sizes_fail_before_allocating() {
    let ctx = cpu_context();
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let cond = cond();
    let run = |o: DenoiseOptions| ctx.denoise(&unet, &o, &cond, None, None, None, &mut |_, _| true).map(|_| ());
    let e = run(DenoiseOptions { latent_size: (65535, 65535), ..options(2) }).unwrap_err();
    assert!(matches!(e, Error::OutOfHostMemory(_) | Error::BudgetTooSmall { .. }), "{e}");
    let e = run(DenoiseOptions { steps: u32::MAX as usize, ..options(2) }).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("4294967295")), "{e}");
    let e = run(DenoiseOptions { guidance: 1e38, ..options(2) }).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("guidance")), "{e}");
    let e = run(DenoiseOptions { latent_size: (usize::MAX / 2, 3), ..options(2) }).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// A copy of `src` (a component folder) in a temp dir, with `from` replaced by `to` (same length) in the weights.
fn renamed_copy(src: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowvram-contract-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).expect("tensor name in the header");
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn a_renamed_tensor_fails_at_load_naming_it() {
    let ctx = cpu_context();
    for (component, from, to) in [
        ("unet", "\"down_blocks.1.attentions.0.proj_in.weight\"", "\"down_blocks.1.attentions.0.proj_in.weighx\""),
        ("vae", "\"decoder.up_blocks.0.resnets.1.norm2.bias\"", "\"decoder.up_blocks.0.resnets.1.norm2.biax\""),
    ] {
        let dir = renamed_copy(&repo().join("tests/fixtures/tiny-sd-random").join(component), component, from, to);
        let e = ctx.load_model(&dir).map(|_| ()).unwrap_err();
        let name = from.trim_matches('"');
        assert!(matches!(&e, Error::Format(m) if m.contains(name) && m.contains("missing")), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_load_reports_its_phases_and_can_be_cancelled() {
    let ctx = cpu_context();
    let dir = repo().join("tests/fixtures/tiny-sd-random/vae");
    let mut seen = Vec::new();
    ctx.load_model_with(
        &dir,
        &mut |done, total| {
            seen.push((done, total));
            true
        },
        None,
    )
    .unwrap();
    assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);
    let e = ctx.load_model_with(&dir, &mut |done, _| done < 2, None).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::Cancelled));
    let token = CancelToken::new();
    token.cancel();
    assert!(matches!(ctx.load_model_with(&dir, &mut |_, _| true, Some(&token)), Err(Error::Cancelled)));
}
