//! Device out-of-memory inside ops (issue 13, items 2 and 3): the activation point at the entry of linear, conv2d,
//! attention and group_norm fails the Nth op of a run the way a device OOM inside the tensor library does (the same
//! error a `cuMemAllocAsync` failure gives on CUDA, through the same classifier). A denoise step that hits it is
//! recovered (other models evicted, then this model's residency shrunk, then the step run again from the same
//! inputs) and ends bit-identical to an unfaulted run; the VAE falls back to tiles; when nothing more can be freed
//! the call ends in a clean OUT_OF_DEVICE_MEMORY, with the accounting back at rest and the next run succeeding.
//! The same for the upload point (a block's device copy refused after its bytes were counted, as a driver with no
//! room would: the block streams instead, or the step is recovered). Through the Rust API and the C ABI.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions, Model, Tiling};
use lowvram::device::{FaultInjection, FaultSite};
use lowvram::Error;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unet_dir() -> PathBuf {
    repo().join("tests/fixtures/tiny-sd-random/unet")
}

fn vae_dir() -> PathBuf {
    repo().join("tests/fixtures/tiny-sd-random/vae")
}

struct Setup {
    ctx: Context,
    unet: Arc<Model>,
    vae: Arc<Model>,
    cond: Tensor,
}

fn setup(yaml: String) -> Setup {
    let ctx = Context::new(ContextOptions {
        device: Some("emulated:64MiB".into()),
        config_yaml: Some(yaml),
        ..Default::default()
    })
    .unwrap();
    let unet = ctx.load_model(&unet_dir()).unwrap();
    let vae = ctx.load_model(&vae_dir()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unet_dir().join("config.json")).unwrap()).unwrap();
    let dim = cfg["cross_attention_dim"].as_u64().unwrap() as usize;
    let v: Vec<f32> = (0..77 * dim).map(|i| (i as f32 * 0.37).sin()).collect();
    let cond = Tensor::from_vec(v, (1, 77, dim), &Device::Cpu).unwrap();
    Setup { ctx, unet, vae, cond }
}

/// Part of the UNet resident, part streamed with prefetch (a cap of 60 % of it), as tests/memory_faults.rs.
fn capped() -> Setup {
    let probe = Context::new(ContextOptions { device: Some("cpu".into()), ..Default::default() }).unwrap();
    let unet_bytes = probe.load_model(&unet_dir()).unwrap().weights().total_bytes();
    setup(format!(
        "device_working_mem_gb: 0\nmax_cache_vram_gb: {}\nasync_loading: true\nenable_partial_loading: true\n",
        (unet_bytes * 6 / 10) as f64 / (1u64 << 30) as f64
    ))
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn options() -> DenoiseOptions {
    DenoiseOptions { steps: 2, guidance: 7.5, seed: 7, latent_size: (8, 8), ..Default::default() }
}

fn denoise(s: &Setup) -> lowvram::Result<Tensor> {
    Ok(s.ctx.denoise(&s.unet, &options(), &s.cond, None, None, None, &mut |_, _| true)?.0)
}

/// The accounting at rest: only resident weights hold device bytes, and they are the models' resident bytes.
fn assert_at_rest(s: &Setup, what: &str) {
    let st = s.ctx.stats();
    let u = &st.device.usage;
    assert_eq!(
        (u.streaming_bytes, u.working_bytes, u.reservation_bytes, u.retiring_bytes, u.external_bytes),
        (0, 0, 0, 0, 0),
        "{what}: bytes left behind"
    );
    let resident: u64 = st.models.iter().map(|m| m.resident_bytes).sum();
    assert_eq!(u.current_bytes, resident, "{what}: device bytes = resident weights");
    assert_eq!((u.off_thread_frees, u.unwaited_copy_uses), (0, 0), "{what}");
}

fn clean_oom(e: &Error, what: &str) {
    match e {
        Error::OutOfDeviceMemory { needed_bytes, available_bytes, .. } => {
            assert!(*needed_bytes > 0, "{what}: needed 0");
            assert!(*available_bytes <= 64 << 20, "{what}: available {available_bytes} beyond the device");
        }
        e => panic!("{what}: not OUT_OF_DEVICE_MEMORY: {e}"),
    }
}

/// A faulted run's end, judged: true when it succeeded with the unfaulted latents and the unfaulted image (or, when
/// the decode fell back to tiles, the image of a tiled run of that tile size, made once per size); false when it
/// failed with a clean OUT_OF_DEVICE_MEMORY. Anything else fails the test.
fn ends_like_an_unfaulted_run(
    s: &Setup,
    r: lowvram::Result<(Vec<u32>, Vec<u32>, Option<usize>)>,
    reference: (&Vec<u32>, &Vec<u32>),
    latents: &Tensor,
    tiled_refs: &mut std::collections::HashMap<usize, Vec<u32>>,
    what: &str,
) -> bool {
    match r {
        Ok((l, i, tile)) => {
            assert_eq!(&l, reference.0, "{what}: latents");
            let expected = match tile {
                None => reference.1.clone(),
                Some(t) => tiled_refs
                    .entry(t)
                    .or_insert_with(|| {
                        bits(&s.ctx.vae_decode(&s.vae, latents, Tiling::Tiles { tile_latent: t }).unwrap().0)
                    })
                    .clone(),
            };
            assert_eq!(i, expected, "{what}: image (tile {tile:?})");
            true
        }
        Err(e) => {
            clean_oom(&e, what);
            false
        }
    }
}

/// Every op of a denoise + decode run, failed in turn: each denoise fault is recovered bit-identically, each decode
/// fault ends in the tiled decode (bit-identical to a tiled run) or, like any fault, a clean OUT_OF_DEVICE_MEMORY;
/// the accounting returns to rest and the next run is the unfaulted one.
#[test]
fn every_op_fault_recovers_or_fails_cleanly() {
    let s = capped();
    let alloc = s.ctx.cache().allocator().clone();
    let latents = denoise(&s).unwrap();
    let (image, r) = s.ctx.vae_decode(&s.vae, &latents, Tiling::Auto).unwrap();
    assert_eq!(r.tile_latent, None, "the unfaulted decode is untiled");
    let (tiled, _) = s.ctx.vae_decode(&s.vae, &latents, Tiling::Tiles { tile_latent: 64 }).unwrap();
    let reference = (bits(&latents), bits(&image));
    let tiled = bits(&tiled);

    let run = |s: &Setup| -> lowvram::Result<(Vec<u32>, Vec<u32>, Option<usize>)> {
        let latents = denoise(s)?;
        let (image, r) = s.ctx.vae_decode(&s.vae, &latents, Tiling::Auto)?;
        Ok((bits(&latents), bits(&image), r.tile_latent))
    };
    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
    let out = run(&s).unwrap();
    assert_eq!((out.0, out.1), reference.clone());
    let (denoise_ops, _) = {
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
        denoise(&s).unwrap();
        alloc.fault_counts_at(FaultSite::Activation)
    };
    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
    run(&s).unwrap();
    let (total, injected) = alloc.fault_counts_at(FaultSite::Activation);
    assert_eq!(injected, 0);
    assert!(denoise_ops >= 20 && total > denoise_ops, "{denoise_ops} ops in the denoise, {total} in the run");
    assert_at_rest(&s, "unfaulted");

    let (mut retried, mut tiled_runs, mut failed) = (0, 0, 0);
    for n in 1..=total {
        let what = format!("failing op {n} of {total}");
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Nth(n));
        let refused = alloc.refused();
        let r = run(&s);
        let (_, injected) = alloc.fault_counts_at(FaultSite::Activation);
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
        assert_eq!(injected, 1, "{what}: not injected");
        assert_eq!(alloc.refused(), refused + 1, "{what}: the refusal is counted");
        match r {
            Ok((l, i, tile)) => {
                assert_eq!(l, reference.0, "{what}: latents after recovery differ from the unfaulted run");
                if n <= denoise_ops {
                    assert_eq!((&i, tile), (&reference.1, None), "{what}");
                    retried += 1;
                } else {
                    assert_eq!(tile, Some(64), "{what}: a decode OOM must fall back to tiles");
                    assert_eq!(i, tiled, "{what}: the tiled fallback differs from a tiled run");
                    tiled_runs += 1;
                }
            }
            Err(e) => {
                clean_oom(&e, &what);
                failed += 1;
            }
        }
        assert_at_rest(&s, &what);
        let next = run(&s).unwrap();
        assert_eq!((next.0, next.1, next.2), (reference.0.clone(), reference.1.clone(), None), "{what}: the next run");
    }
    eprintln!("{total} ops: {retried} denoise faults retried, {tiled_runs} decode faults tiled, {failed} failed cleanly");
    // Part of the UNet is resident, so the first fault of a step always finds something to free.
    assert_eq!(retried, denoise_ops, "every denoise fault recovers");
    assert_eq!(tiled_runs, total - denoise_ops, "every decode fault falls back to tiles");

    // Random failure rates: each run ends like the unfaulted one (untiled, or tiled like a tiled run of the tile
    // size it fell back to) or in a clean OUT_OF_DEVICE_MEMORY.
    let mut tiled_refs: std::collections::HashMap<usize, Vec<u32>> = Default::default();
    let (mut ok, mut failed) = (0, 0);
    for seed in 0..18u64 {
        let probability = [0.0005, 0.001, 0.002, 0.005, 0.02, 1.0][seed as usize % 6];
        let what = format!("op failure rate {probability}, seed {seed}");
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Rate { probability, seed });
        let r = run(&s);
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
        if ends_like_an_unfaulted_run(&s, r, (&reference.0, &reference.1), &latents, &mut tiled_refs, &what) {
            ok += 1;
        } else {
            failed += 1;
        }
        assert_at_rest(&s, &what);
        let next = run(&s).unwrap();
        assert_eq!((next.0, next.1), reference.clone(), "{what}: the next run");
    }
    eprintln!("random op failure rates: {ok} succeeded, {failed} failed cleanly");
    assert!(failed > 0, "a failure rate of 1 must fail the run (cleanly)");
}

/// The order of recovery: another model's device copy goes first (the UNet keeps its residency); with every op
/// failing, everything is freed (the VAE's copy, then the UNet's own residency) and the call gives up with
/// OUT_OF_DEVICE_MEMORY; the next run succeeds, bit-identical.
#[test]
fn recovery_evicts_other_models_first_then_own_residency_then_gives_up() {
    let s = setup("device_working_mem_gb: 0\n".into());
    let alloc = s.ctx.cache().allocator().clone();
    let reference = bits(&denoise(&s).unwrap());
    let unet_resident = s.unet.weights().resident_bytes();
    assert_eq!(unet_resident, s.unet.weights().total_bytes(), "the UNet fits whole");
    let st = s.ctx.stats();
    assert!(st.device.pool.is_none() && st.device.external_from_driver_bytes.is_none(), "CUDA figures only on CUDA");
    let vae_all = s.vae.weights().total_bytes();
    assert_eq!(s.ctx.load_to_device(&s.vae, vae_all).unwrap(), vae_all);

    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Nth(1));
    let out = denoise(&s).unwrap();
    assert_eq!(alloc.fault_counts_at(FaultSite::Activation).1, 1);
    assert_eq!(bits(&out), reference, "retried step differs");
    assert!(s.vae.weights().resident_bytes() < vae_all, "the other model's copy was not evicted");
    assert_eq!(s.unet.weights().resident_bytes(), unet_resident, "own residency shrunk before others were evicted");
    assert_at_rest(&s, "one fault");

    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Rate { probability: 1.0, seed: 1 });
    let e = denoise(&s).unwrap_err();
    let (ops, injected) = alloc.fault_counts_at(FaultSite::Activation);
    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
    clean_oom(&e, "every op failing");
    assert!(ops >= 2 && injected == ops, "{injected} of {ops}: the step was retried after freeing");
    assert_eq!(s.vae.weights().resident_bytes(), 0, "the other model's copy is gone");
    assert_at_rest(&s, "every op failing");
    assert_eq!(bits(&denoise(&s).unwrap()), reference, "the next run");
    assert_eq!(s.unet.weights().resident_bytes(), unet_resident, "the next lock plans afresh");
}

/// The same through the C ABI: an op-level OOM the recovery cannot cure is status OUT_OF_DEVICE_MEMORY with the
/// numbers in the message; one it can is OK with the unfaulted latents; a decode OOM is OK (tiled).
#[test]
fn c_abi_reports_out_of_device_memory_and_recovers() {
    use lowvram::ffi::context::*;
    use lowvram::ffi::error::lowvram_last_error_message;
    use lowvram::ffi::model::*;
    use lowvram::ffi::run::*;
    use lowvram::ffi::status::lowvram_status;
    use lowvram::ffi::tensor::*;
    use std::ffi::{CStr, CString};
    use std::ptr::{null, null_mut};

    let last_error = || unsafe { CStr::from_ptr(lowvram_last_error_message()) }.to_string_lossy().into_owned();
    unsafe {
        let mut p: lowvram_context_params = std::mem::zeroed();
        assert_eq!(lowvram_context_params_init(&mut p, std::mem::size_of_val(&p)), lowvram_status::Ok);
        p.device = c"emulated:64MiB".as_ptr();
        p.config_yaml = c"device_working_mem_gb: 0\n".as_ptr();
        let mut ctx = null_mut();
        assert_eq!(lowvram_context_new(&p, &mut ctx), lowvram_status::Ok, "{}", last_error());
        // A context handle is the boxed Context (ffi/boundary.rs `box_handle`): the test reaches its allocator to
        // set the faults, and runs everything else through the C ABI.
        let alloc = (*(ctx as *const Context)).cache().allocator().clone();
        let load = |dir: PathBuf| {
            let path = CString::new(dir.to_str().unwrap()).unwrap();
            let mut m = null_mut();
            assert_eq!(lowvram_model_load(ctx, path.as_ptr(), &mut m), lowvram_status::Ok, "{}", last_error());
            m
        };
        let (unet, vae) = (load(unet_dir()), load(vae_dir()));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(unet_dir().join("config.json")).unwrap()).unwrap();
        let dim = cfg["cross_attention_dim"].as_i64().unwrap();
        let data: Vec<f32> = (0..77 * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let shape = [1i64, 77, dim];
        let mut cond = null_mut();
        let s = lowvram_tensor_from_host(0, shape.as_ptr(), 3, data.as_ptr().cast(), data.len() * 4, &mut cond);
        assert_eq!(s, lowvram_status::Ok);
        let mut dp: lowvram_denoise_params = std::mem::zeroed();
        assert_eq!(lowvram_denoise_params_init(&mut dp, std::mem::size_of_val(&dp)), lowvram_status::Ok);
        dp.steps = 2;
        dp.latent_height = 8;
        dp.latent_width = 8;
        dp.seed = 7;
        let read = |t: *mut lowvram_tensor| {
            let mut v = vec![0f32; 4 * 8 * 8];
            assert_eq!(lowvram_tensor_read(t, v.as_mut_ptr().cast(), v.len() * 4), lowvram_status::Ok);
            lowvram_tensor_free(t);
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let denoise = |out: &mut *mut lowvram_tensor| {
            lowvram_denoise(ctx, unet, &dp, cond, null(), null(), null_mut(), out)
        };
        let mut out = null_mut();
        assert_eq!(denoise(&mut out), lowvram_status::Ok, "{}", last_error());
        let reference = read(out);

        // Every op failing: everything that can be freed is, then a clean failure.
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Rate { probability: 1.0, seed: 3 });
        let mut out = null_mut();
        assert_eq!(denoise(&mut out), lowvram_status::OutOfDeviceMemory);
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
        assert!(out.is_null(), "no out-param on failure");
        let msg = last_error();
        assert!(msg.contains("out of device memory on emulated:") && msg.contains(" available"), "{msg}");
        let stats = (*(ctx as *const Context)).stats();
        let u = &stats.device.usage;
        assert_eq!((u.working_bytes, u.streaming_bytes, u.retiring_bytes), (0, 0, 0));
        assert_eq!(u.current_bytes, stats.models.iter().map(|m| m.resident_bytes).sum::<u64>());

        // With the VAE resident, the same fault is cured by evicting it.
        let mut loaded = 0u64;
        assert_eq!(lowvram_model_load_to_device(ctx, vae, u64::MAX, &mut loaded), lowvram_status::Ok, "{}", last_error());
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Nth(3));
        let mut out = null_mut();
        assert_eq!(denoise(&mut out), lowvram_status::Ok, "{}", last_error());
        assert_eq!(read(out), reference);

        // A decode whose first op fails falls back to tiles.
        let mut latents = null_mut();
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
        assert_eq!(denoise(&mut latents), lowvram_status::Ok);
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Nth(1));
        let mut image = null_mut();
        let s = lowvram_vae_decode(ctx, vae, null(), latents, null_mut(), &mut image);
        assert_eq!(s, lowvram_status::Ok, "{}", last_error());
        assert_eq!(alloc.fault_counts_at(FaultSite::Activation).1, 1);
        alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
        lowvram_tensor_free(image);
        lowvram_tensor_free(latents);
        lowvram_tensor_free(cond);
        lowvram_model_free(unet);
        lowvram_model_free(vae);
        lowvram_context_free(ctx);
    }
}

/// Every block upload of a run (resident placement at lock time, on demand, streamed, prefetched) refused in turn
/// as a device with no room would refuse it: the run ends like the unfaulted one (the decode possibly tiled, like a
/// tiled run) or in a clean OUT_OF_DEVICE_MEMORY; the accounting returns to rest and the next run succeeds.
#[test]
fn every_upload_fault_recovers_or_fails_cleanly() {
    let s = capped();
    let alloc = s.ctx.cache().allocator().clone();
    let run = |s: &Setup| -> lowvram::Result<(Vec<u32>, Vec<u32>, Option<usize>)> {
        let latents = denoise(s)?;
        let (image, r) = s.ctx.vae_decode(&s.vae, &latents, Tiling::Auto)?;
        Ok((bits(&latents), bits(&image), r.tile_latent))
    };
    let first = run(&s).unwrap();
    // Warm: plans and residency settle; then count the uploads of one run.
    alloc.set_faults_at(FaultSite::Upload, FaultInjection::Off);
    let reference = run(&s).unwrap();
    assert_eq!(reference, first);
    let (total, _) = alloc.fault_counts_at(FaultSite::Upload);
    assert!(total >= 5, "a run makes {total} uploads: too few to exercise anything");
    let latents = denoise(&s).unwrap();
    let mut tiled_refs: std::collections::HashMap<usize, Vec<u32>> = Default::default();
    let (mut ok, mut failed) = (0, 0);
    for n in 1..=total {
        let what = format!("refusing upload {n} of {total}");
        alloc.set_faults_at(FaultSite::Upload, FaultInjection::Nth(n));
        let r = run(&s);
        let (_, injected) = alloc.fault_counts_at(FaultSite::Upload);
        alloc.set_faults_at(FaultSite::Upload, FaultInjection::Off);
        assert_eq!(injected, 1, "{what}: not injected");
        if ends_like_an_unfaulted_run(&s, r, (&reference.0, &reference.1), &latents, &mut tiled_refs, &what) {
            ok += 1;
        } else {
            failed += 1;
        }
        assert_at_rest(&s, &what);
        assert_eq!(run(&s).unwrap(), reference, "{what}: the next run");
    }
    eprintln!("{total} uploads: {ok} runs recovered, {failed} failed cleanly");
    assert_eq!(ok, total, "a refused upload always has a way out (stream it, free and retry, or tiles)");
}
