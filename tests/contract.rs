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
fn model_ids_are_unique_across_contexts() {
    let (a, b) = (cpu_context(), cpu_context());
    let unet = repo().join("tests/fixtures/tiny-sd-random/unet");
    let vae = repo().join("tests/fixtures/tiny-sd-random/vae");
    let (ua, va) = (a.load_model(&unet).unwrap(), a.load_model(&vae).unwrap());
    let (ub, vb) = (b.load_model(&unet).unwrap(), b.load_model(&vae).unwrap());
    let ids = [ua.id(), va.id(), ub.id(), vb.id()];
    for i in 0..ids.len() {
        for j in i + 1..ids.len() {
            assert_ne!(ids[i], ids[j], "models {i} and {j} share an id: {ids:?}");
        }
    }
    // The same folder loaded again in one context is the cache's one model (a hit), with its one id.
    assert_eq!(a.load_model(&unet).unwrap().id(), ua.id());
    // Stats name each model by that id.
    let listed: Vec<u64> = b.stats().models.iter().map(|m| m.id).collect();
    assert!(listed.contains(&ub.id()) && listed.contains(&vb.id()) && !listed.contains(&ua.id()), "{listed:?}");
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

/// An `emulated:` device of `size` without the default working memory: a run holds what its op needs.
fn emulated_context(size: &str) -> Context {
    Context::new(ContextOptions {
        device: Some(format!("emulated:{size}")),
        config_yaml: Some("device_working_mem_gb: 0\n".into()),
        ..Default::default()
    })
    .unwrap()
}

/// The cache's accounting: device bytes by kind and each model's residency.
fn accounting(ctx: &Context) -> (u64, u64, u64, u64, u64, Vec<(u64, u64)>) {
    let s = ctx.stats();
    let u = &s.device.usage;
    let models = s.models.iter().map(|m| (m.id, m.resident_bytes)).collect();
    (u.current_bytes, u.weights_bytes, u.working_bytes, u.reservation_bytes, u.retiring_bytes, models)
}

/// A denoise on `ctx` in a scoped thread that stops inside its progress callback at step 1 (holding its lock:
/// working memory and resident blocks) until `go` is sent.
struct PausedRun<'s> {
    go: mpsc::Sender<()>,
    done: std::thread::ScopedJoinHandle<'s, lowvram::Result<Tensor>>,
}

fn paused_run<'s, 'e: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    ctx: &'e Context,
    unet: &'e lowvram::api::Model,
    cond: &'e Tensor,
    steps: usize,
) -> PausedRun<'s> {
    let (reached_tx, reached_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let done = s.spawn(move || {
        let mut progress = |step: usize, _| {
            if step == 1 {
                reached_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            true
        };
        ctx.denoise(unet, &options(steps), cond, None, None, None, &mut progress).map(|(t, _)| t)
    });
    reached_rx.recv().unwrap();
    PausedRun { go, done }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// A reservation waiting with a timeout while a streamed denoise runs on another thread: (a) one the running call
/// can make room for returns once the run passes its next block boundary; (b) one that does not fit beside the
/// run's memory times out with TIMEOUT and the numbers (also with a zero timeout, at once); (c) one cancelled by
/// its token (or a context cancel) returns CANCELLED. After each failure the accounting is back where it was, and
/// the run's result is bit-identical to an undisturbed one.
#[test]
fn a_reservation_waits_as_long_as_the_host_says_and_can_be_cancelled() {
    use std::time::{Duration, Instant};
    let ctx = emulated_context("64MiB");
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let cond = cond();
    let (reference, report) = ctx.denoise(&unet, &options(3), &cond, None, None, None, &mut |_, _| true).unwrap();
    let cap = 64u64 << 20;
    let (model, working) = (report.model_bytes, report.working_bytes);
    assert!(report.resident_bytes == model && working > 0, "{report:?}");
    let at_rest = accounting(&ctx);
    let token = CancelToken::new();

    std::thread::scope(|s| {
        // (a) Half the model's residency must go: the run releases it at its next block boundary.
        let run = paused_run(s, &ctx, &unet, &cond, 3);
        let held = accounting(&ctx);
        let free_now = cap - held.0;
        let want = free_now + model / 2;
        let (tx, rx) = mpsc::channel();
        let ctx_ref = &ctx;
        let reserver = s.spawn(move || {
            let r = ctx_ref.reserve_with(want, Some(Duration::from_secs(30)), None);
            tx.send(Instant::now()).unwrap();
            r
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(rx.try_recv().is_err(), "returned while the run still held the blocks");
        let released = Instant::now();
        run.go.send(()).unwrap();
        let returned = rx.recv_timeout(Duration::from_secs(20)).expect("the reservation returned");
        assert!(returned >= released);
        let r = reserver.join().unwrap().expect("reserved once the run released blocks");
        assert_eq!(r.bytes(), want);
        let out = run.done.join().unwrap().expect("the run completes streamed");
        assert_eq!(bits(&out), bits(&reference));
        drop(r);

        // (b) More than fits beside the run's working memory: waits, then TIMEOUT with the numbers.
        let run = paused_run(s, &ctx, &unet, &cond, 3);
        let held = accounting(&ctx);
        let want = cap - working / 2;
        let t = Instant::now();
        let e = ctx.reserve_with(want, Some(Duration::from_millis(400)), None).map(|_| ()).unwrap_err();
        let waited = t.elapsed();
        match &e {
            Error::Timeout { needed_bytes, available_bytes, .. } => {
                assert_eq!(*needed_bytes, want);
                assert!(*available_bytes < want, "{e}");
            }
            _ => panic!("expected a timeout, got {e}"),
        }
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(accounting(&ctx), held, "a timed-out reservation leaves nothing behind");
        // Zero: not free now, so at once.
        let t = Instant::now();
        let e = ctx.reserve_with(want, Some(Duration::ZERO), None).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }) && t.elapsed() < Duration::from_millis(200), "{e}");
        assert_eq!(accounting(&ctx), held);
        // More than the device has: BUDGET_TOO_SMALL at once, whatever the timeout.
        let e = ctx.reserve_with(cap + 1, None, None).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::BudgetTooSmall { .. }), "{e}");

        // (c) Cancelled by its token from another thread while it waits, and by a context cancel.
        let (token_ref, ctx_ref) = (&token, &ctx);
        let canceller = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            token_ref.cancel();
        });
        let t = Instant::now();
        let e = ctx.reserve_with(want, None, Some(&token)).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::Cancelled) && t.elapsed() < Duration::from_secs(5), "{e}");
        canceller.join().unwrap();
        assert_eq!(accounting(&ctx), held, "a cancelled reservation leaves nothing behind");
        // The context cancel stops calls running when it is issued: make sure the waiter has started (a thread
        // spawned on a loaded machine may not run for a while), then give it time to be inside its wait.
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started_ref = started.clone();
        let waiting = s.spawn(move || {
            started_ref.store(true, std::sync::atomic::Ordering::SeqCst);
            ctx_ref.reserve_with(want, None, None).map(|_| ())
        });
        while !started.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        ctx.cancel();
        assert!(matches!(waiting.join().unwrap(), Err(Error::Cancelled)));
        // The context cancel stops the paused run as well.
        run.go.send(()).unwrap();
        assert!(matches!(run.done.join().unwrap(), Err(Error::Cancelled)));
    });
    // Back at rest: the same accounting as before any of it, and the context runs bit-identically.
    assert_eq!(accounting(&ctx), at_rest);
    let (again, _) = ctx.denoise(&unet, &options(3), &cond, None, None, None, &mut |_, _| true).unwrap();
    assert_eq!(bits(&again), bits(&reference));
    // With nothing running, the reservation of (b) is granted at once.
    drop(ctx.reserve_with(cap - working / 2, Some(Duration::ZERO), None).unwrap());
}

/// A cancel issued in the middle of one large block stops the call within a small part of that block's time (the
/// ops poll the call's cancel between chunks of work), and the context stays usable: the next run is bit-identical.
/// The block is the longest of an untiled VAE decode of a `side`² latent (`LOWVRAM_CANCEL_SIDE`, default 128: the
/// mid-block attention over 16384 positions); the ratio is measured in the same test, never a fixed time.
#[test]
fn a_cancel_inside_one_block_stops_it_long_before_it_ends() {
    use lowvram::api::Tiling;
    use std::time::{Duration, Instant};
    let side: usize = std::env::var("LOWVRAM_CANCEL_SIDE").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    let ctx = cpu_context();
    let vae = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/vae")).unwrap();
    let v: Vec<f32> = (0..4 * side * side).map(|i| ((i as f32) * 0.013).sin()).collect();
    let latents = Tensor::from_vec(v, (1, 4, side, side), &Device::Cpu).unwrap();
    let decode = |progress: &mut dyn FnMut(usize, usize) -> bool, token: Option<&CancelToken>| {
        let mut report = RunReport::default();
        ctx.vae_decode_with(&vae, &latents, Tiling::Never, progress, token, &mut report)
    };

    // Uncancelled: when each decoder block starts; the longest gap is the longest block.
    let mut starts = Vec::new();
    let t0 = Instant::now();
    let reference = decode(&mut |_, _| {
        starts.push(Instant::now());
        true
    }, None)
    .unwrap();
    let total = t0.elapsed();
    starts.push(Instant::now());
    let (longest, block_time) =
        (0..starts.len() - 1).map(|i| (i, starts[i + 1] - starts[i])).max_by_key(|&(_, d)| d).unwrap();

    // Cancelled a third of the way into that block, from another thread.
    let token = CancelToken::new();
    let (tx, rx) = mpsc::channel::<()>();
    let (token_ref, into) = (&token, block_time / 3);
    let (result, cancelled_at, returned_at) = std::thread::scope(|s| {
        let canceller = s.spawn(move || {
            rx.recv().unwrap();
            std::thread::sleep(into);
            token_ref.cancel();
            Instant::now()
        });
        let mut calls = 0;
        let r = decode(&mut |_, _| {
            if calls == longest {
                tx.send(()).unwrap();
            }
            calls += 1;
            true
        }, Some(&token));
        let returned = Instant::now();
        (r, canceller.join().unwrap(), returned)
    });
    assert!(matches!(result, Err(Error::Cancelled)), "{:?}", result.map(|_| ()));
    let latency = returned_at.saturating_duration_since(cancelled_at);
    println!(
        "decode {side}x{side}: {total:?} in all, longest block #{longest} {block_time:?}; cancel issued {into:?} \
         into it returned after {latency:?} ({:.1} % of the block)",
        100.0 * latency.as_secs_f64() / block_time.as_secs_f64()
    );
    assert!(block_time > Duration::from_millis(100), "the block is too short to judge: {block_time:?}");
    assert!(latency < block_time / 4, "cancel latency {latency:?} vs block {block_time:?}");

    // The context is usable and the next run is the uncancelled one, bit for bit.
    let again = decode(&mut |_, _| true, None).unwrap();
    assert_eq!(bits(&again), bits(&reference));
}
