//! GPU checks, run on a machine with an NVIDIA GPU by `scripts/gpu/run.sh` (build here with `--features cuda`, run
//! there). Everywhere else — the CPU build, CI, a cuda build on a machine without a GPU — each test prints a
//! single line saying it was skipped and why, and passes.
//!
//! On a GPU it checks, through the public API: the tiny SD pipeline on `cuda:0` in f32 against the diffusers
//! reference (8 Euler steps at CFG 7.5 + VAE decode, within 1e-3); partial loading on the GPU (a cap that streams
//! most blocks) gives the same latents as the fully resident run, with bytes streamed = steps × (model − resident);
//! and the allocator's accounting against the driver's free memory; prefetch from pinned RAM with the pool keeping
//! freed blocks gives the same latents as synchronous streaming, and does prefetch and pin.
//! The CUDA dequantisation kernels give the CPU decoders' bits on every GGUF type and fp8 format of the fixtures.
//! Stream order and the copy engine (`gpu_copy_engine`): one explicit compute stream owns every device buffer, the
//! copy engine uploads on its own stream and hands over by events, and the copy/compute overlap is printed.
//! Device OOM and our own pool (`gpu_oom_and_own_pool`): a driver OOM inside candle is OUT_OF_DEVICE_MEMORY, an
//! op-level OOM is recovered, a reservation's bytes are allocatable from outside, the default pool is untouched.
//!
//! Paths: the repo is `LOWVRAM_REPO`, else the current directory when it holds `tests/fixtures/tiny-sd-random` (the GPU machine
//! runs the binary from the project root), else the build-time `CARGO_MANIFEST_DIR`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lowvram::api::{Context, ContextOptions, DenoiseOptions, Tiling};
use lowvram::sampling::SchedulerKind;

fn repo() -> PathBuf {
    if let Ok(r) = std::env::var("LOWVRAM_REPO") {
        return PathBuf::from(r);
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("tests/fixtures/tiny-sd-random").is_dir() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Why the GPU checks cannot run here, or None when a CUDA device opens.
fn skip_reason() -> Option<String> {
    if !cfg!(feature = "cuda") {
        return Some("built without the `cuda` feature".into());
    }
    let stats = lowvram::system::system_stats();
    if !stats.cuda.available {
        return Some(format!("no CUDA device ({})", stats.cuda.reason));
    }
    match Device::new_cuda(0) {
        Ok(_) => None,
        Err(e) => Some(format!("cuda:0 does not open ({e})")),
    }
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = repo().join("tests/fixtures/tiny-sd").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn context(yaml: &str) -> Context {
    Context::new(ContextOptions {
        device: Some("cuda:0".into()),
        config_yaml: Some(yaml.into()),
        ..Default::default()
    })
    .expect("a context on cuda:0")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap();
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

fn device_free_bytes() -> u64 {
    lowvram::system::system_stats()
        .devices
        .first()
        .map(|d| d.free_bytes)
        .unwrap_or(0)
}

const F32: &str = "storage_dtype: fp32\ncompute_dtype: fp32\n";

#[test]
fn gpu_suite() {
    if let Some(why) = skip_reason() {
        // Straight to stderr (libtest captures println!): the skip must show in every log.
        let _ = writeln!(std::io::stderr(), "gpu tests skipped: {why}");
        return;
    }
    let dir = repo().join("tests/fixtures/tiny-sd-random");
    let f = fixture("sample_euler.safetensors");
    let opts = DenoiseOptions {
        scheduler: SchedulerKind::Euler,
        karras: false,
        steps: 8,
        guidance: 7.5,
        seed: 0,
        latent_size: (8, 8),
    };
    let run = |ctx: &Context, unet: &lowvram::api::Model| {
        ctx.denoise(
            unet,
            &opts,
            &f["sampling.cond_embeddings"],
            Some(&f["sampling.uncond_embeddings"]),
            Some(&f["sampling.init_noise"]),
            None,
            &mut |_, _| true,
        )
        .expect("denoise on cuda:0")
    };

    // 1. Parity with diffusers, fully resident.
    let free_before = device_free_bytes();
    let cold = std::time::Instant::now();
    let ctx = context(F32);
    let unet = ctx.load_model(&dir.join("unet")).unwrap();
    let vae = ctx.load_model(&dir.join("vae")).unwrap();
    let (latents, report) = run(&ctx, &unet);
    let (image, _) = ctx.vae_decode(&vae, &latents, Tiling::Never).unwrap();
    // The first image in a fresh process: context, kernel modules (own: machine code; candle's: PTX, JIT-compiled on a
    // machine whose driver cache does not have them yet), cuBLAS, loading, 8 steps and the decode.
    println!(
        "gpu cold start: first context + load + 8 steps + decode in this process {:.2} s (own kernels built for sm {})",
        cold.elapsed().as_secs_f64(),
        lowvram::ops::cuda_kernel_archs().unwrap_or("-")
    );
    let (el, ei) = (
        max_abs(&latents, &f["latents"]),
        max_abs(&image, &f["image"]),
    );
    println!("gpu parity (euler, 8 steps, CFG 7.5): latents max abs err {el:.2e}, image {ei:.2e}");
    assert!(
        el <= 1e-3 && ei <= 1e-3,
        "cuda:0 differs from diffusers: latents {el}, image {ei}"
    );
    assert_eq!(
        report.bytes_streamed, 0,
        "a fully resident run streams nothing"
    );

    // 2. Accounting vs the driver: what the allocator counts is what the driver lost (within the pool's granularity).
    let counted = ctx.stats().device.usage.current_bytes;
    let driver = free_before.saturating_sub(device_free_bytes());
    println!("gpu accounting: allocator counts {counted} B on the device, the driver's free memory fell by {driver} B");
    assert!(counted > 0);
    assert!(
        driver + (64 << 20) >= counted,
        "the allocator counts more than the driver lost"
    );

    // 3. Partial loading on the GPU: a cap that keeps ~a quarter of the UNet resident; same latents.
    let total = unet.weights().total_bytes();
    drop((unet, vae));
    drop(ctx);
    let ctx = context(&format!(
        "{F32}max_cache_vram_gb: {}\n",
        (total / 4) as f64 / (1u64 << 30) as f64
    ));
    let unet = ctx.load_model(&dir.join("unet")).unwrap();
    let (partial, report) = run(&ctx, &unet);
    let d = max_abs(&partial, &latents);
    println!(
        "gpu partial loading: resident {} of {total} B, streamed {} B over 8 steps, max abs diff vs resident {d:.2e}",
        report.resident_bytes, report.bytes_streamed
    );
    assert!(
        report.resident_bytes < total,
        "the cap should leave blocks to stream"
    );
    assert_eq!(report.bytes_streamed, 8 * (total - report.resident_bytes));
    assert!(
        d <= 1e-6,
        "partial loading changed the result on the GPU by {d}"
    );
    drop(unet);
    drop(ctx);

    // 4. Prefetch (async_loading) from pinned RAM (pin_memory) with the pool keeping freed blocks (pool_keep), at a
    //    cap of half the UNet (room for two blocks in flight), against the same cap with all three off.
    let half = format!(
        "{F32}max_cache_vram_gb: {}\n",
        (total / 2) as f64 / (1u64 << 30) as f64
    );
    let ctx = context(&format!(
        "{half}async_loading: true\npin_memory: true\ncuda_allocator: pool_keep\n"
    ));
    let unet = ctx.load_model(&dir.join("unet")).unwrap();
    let (fast, report) = run(&ctx, &unet);
    let stats = ctx.stats();
    let slots = stats.plan.as_ref().map_or(0, |p| p.slots);
    println!(
        "gpu prefetch: slots {slots}, resident {} of {total} B, streamed {} B, prefetched {} B, wasted {} B, pinned {} B, \
         {:.1} ms/step",
        report.resident_bytes,
        report.bytes_streamed,
        stats.bytes_prefetched_total,
        stats.bytes_prefetch_wasted_total,
        stats.ram.pinned_bytes,
        report.total_ms / 8.0
    );
    assert_eq!(
        slots, 2,
        "half the UNet should leave room for two blocks in flight"
    );
    assert!(stats.bytes_prefetched_total > 0, "nothing was prefetched");
    // The whole RAM copy is one pinned arena (registered once with the driver).
    assert_eq!(stats.ram.models_pinned, 1, "the UNet's RAM copy should be pinned");
    assert!(stats.ram.pinned_bytes >= total, "the whole RAM copy should be pinned");
    assert_eq!(report.bytes_streamed, 8 * (total - report.resident_bytes));
    drop(unet);
    // Unloading unpins (on its own thread, after the device's reads) and only then frees.
    let alloc = ctx.cache().allocator().clone();
    ctx.unload_all();
    let t0 = std::time::Instant::now();
    while alloc.pinned_bytes() > 0 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(ctx);
    assert_eq!((alloc.pinned_bytes(), alloc.pin_violations()), (0, 0), "{:?}", alloc.pin_events());
    let ctx = context(&format!(
        "{half}async_loading: false\npin_memory: false\ncuda_allocator: pool\n"
    ));
    let unet = ctx.load_model(&dir.join("unet")).unwrap();
    let (plain, _) = run(&ctx, &unet);
    let stats = ctx.stats();
    assert_eq!(
        (stats.bytes_prefetched_total, stats.ram.pinned_bytes),
        (0, 0)
    );
    let d = max_abs(&fast, &plain);
    println!(
        "gpu prefetch vs synchronous streaming: max abs diff {d:.2e}; vs resident {:.2e}",
        max_abs(&fast, &latents)
    );
    assert!(
        d <= 1e-6 && max_abs(&fast, &latents) <= 1e-6,
        "prefetch changed the result on the GPU"
    );
}

/// Calls on one CUDA context from several threads: their device work is serialised by the context's compute gate
/// (one cuBLAS handle and workspace per context), so three threads denoising at once get the single-threaded
/// latents bit for bit, with no allocation freed off its compute thread.
#[test]
fn gpu_concurrent_calls_on_one_context() {
    if let Some(why) = skip_reason() {
        let _ = writeln!(std::io::stderr(), "gpu tests skipped: {why}");
        return;
    }
    let ctx = context(F32);
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let cond = fixture("sample_euler.safetensors")["sampling.cond_embeddings"].clone();
    let opts = DenoiseOptions { steps: 6, latent_size: (16, 16), ..Default::default() };
    let run = || ctx.denoise(&unet, &opts, &cond, None, None, None, &mut |_, _| true).unwrap().0;
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let alone = bits(&run());
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..3).map(|_| s.spawn(|| bits(&run()))).collect();
        for r in runs {
            assert!(r.join().unwrap() == alone, "a concurrent run on one CUDA context changed the latents");
        }
    });
    assert_eq!(ctx.stats().device.usage.off_thread_frees, 0);
    println!("gpu: 3 concurrent denoises on one context, bit-identical to the single-threaded run");
}

/// The own CUDA kernels (flash attention, implicit-GEMM conv2d, fused GroupNorm+SiLU) through `lowvram::ops`, against
/// the f32 candle compositions on the same GPU from the same (rounded) inputs, in f32, f16 and bf16, at SD's shapes
/// (spatial sizes cut down) and with tails; prints the worst error per op and dtype.
#[test]
fn gpu_kernels() {
    use candle_core::DType;
    use lowvram::ops;
    if let Some(why) = skip_reason() {
        let _ = writeln!(std::io::stderr(), "gpu kernel tests skipped: {why}");
        return;
    }
    // A lowvram allocator's device, its own memory pool current throughout (the peaks below are that pool's).
    let alloc = lowvram::device::DeviceAllocator::new(&lowvram::device::DeviceSpec::Cuda(0)).unwrap();
    let _route = alloc.route_pool().unwrap();
    let dev = alloc.device().clone();
    // (dtype, tolerance relative to max(1, max |reference|)): f32 exact up to summation order; f16/bf16 one rounding
    // of the output plus the rounding of p before p·v.
    let dtypes = [
        (DType::F32, 2e-5f32),
        (DType::F16, 4e-3),
        (DType::BF16, 3e-2),
    ];
    let rel = |got: &Tensor, want: &Tensor| -> f32 {
        let m = want
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        max_abs(
            &got.to_dtype(DType::F32).unwrap(),
            &want.to_dtype(DType::F32).unwrap(),
        ) / m
    };
    let randn = |shape: &[usize], dtype: DType| {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    for (dtype, tol) in dtypes {
        let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // Attention: (batch, nq, nk, heads, head size); SD1.x 40/80/160, SD2/SDXL 64, FLUX 128.
        let mut worst = 0f32;
        for (b, nq, nk, h, d) in [
            (2, 256, 256, 8, 40),
            (2, 256, 77, 8, 40),
            (2, 100, 77, 8, 80),
            (2, 64, 64, 8, 160),
            (1, 130, 70, 10, 64),
            (1, 33, 1, 24, 128),
            (1, 1, 5, 2, 64),
        ] {
            let (q, k, v) = (
                randn(&[b, nq, h * d], dtype),
                randn(&[b, nk, h * d], dtype),
                randn(&[b, nk, h * d], dtype),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let got = ops::attention(&q, &k, &v, h, scale, false).unwrap();
            assert_eq!((got.dims(), got.dtype()), (q.dims(), dtype));
            let want =
                ops::attention_with_budget(&up(&q), &up(&k), &up(&v), h, scale, true, 64 << 20)
                    .unwrap();
            let e = rel(&got, &want);
            assert!(
                e <= tol,
                "attention {dtype:?} b{b} nq{nq} nk{nk} h{h} d{d}: error {e}"
            );
            worst = worst.max(e);
        }
        // A strided q (a slice of a fused qkv projection).
        let qkv = randn(&[2, 50, 3 * 320], dtype);
        let (q, k, v) = (
            qkv.narrow(2, 0, 320).unwrap(),
            qkv.narrow(2, 320, 320).unwrap(),
            qkv.narrow(2, 640, 320).unwrap(),
        );
        let got = ops::attention(&q, &k, &v, 8, 0.15, false).unwrap();
        let want =
            ops::attention_with_budget(&up(&q), &up(&k), &up(&v), 8, 0.15, true, 64 << 20).unwrap();
        worst = worst.max(rel(&got, &want));
        assert!(
            rel(&got, &want) <= tol,
            "strided attention {dtype:?}: {}",
            rel(&got, &want)
        );
        println!("gpu kernel attention {dtype:?}: worst error {worst:.2e} (relative to max(1, |ref|); tolerance {tol:.0e})");

        // conv2d: (batch, cin, h, w, cout, k, stride, pad, bias).
        let mut worst = 0f32;
        for (b, cin, hh, ww, cout, k, s, p, bias) in [
            (2, 320, 16, 16, 320, 3, 1, 1, true),
            (2, 4, 16, 16, 320, 3, 1, 1, true),
            (1, 320, 8, 8, 4, 3, 1, 1, true),
            (2, 640, 8, 8, 640, 3, 2, 1, true),
            (2, 640, 8, 8, 1280, 1, 1, 0, true),
            (1, 17, 6, 11, 33, 3, 1, 1, false),
            (1, 128, 40, 24, 3, 3, 1, 1, true),
        ] {
            let x = randn(&[b, cin, hh, ww], dtype);
            let w = (randn(&[cout, cin, k, k], DType::F32) * (1.0 / ((cin * k * k) as f64).sqrt()))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bb = bias.then(|| randn(&[cout], dtype));
            let got = ops::conv2d(&x, &w, bb.as_ref(), s, p).unwrap();
            let want =
                ops::conv2d::conv2d_reference(&up(&x), &up(&w), bb.as_ref().map(up).as_ref(), s, p)
                    .unwrap();
            let e = rel(&got, &want);
            assert!(
                e <= tol,
                "conv2d {dtype:?} {b}x{cin}x{hh}x{ww} -> {cout} k{k} s{s} p{p}: error {e}"
            );
            worst = worst.max(e);
        }
        println!("gpu kernel conv2d {dtype:?}: worst error {worst:.2e}");

        // GroupNorm(+SiLU): (shape, groups); the last is a VAE-sized group (4·256² elements) split in many chunks.
        let mut worst = 0f32;
        for (shape, g) in [
            (vec![2, 320, 16, 16], 32),
            (vec![2, 1280, 4, 4], 32),
            (vec![1, 6, 7], 3),
            (vec![1, 128, 256, 256], 32),
        ] {
            let x = randn(&shape, DType::F32)
                .affine(3.0, 0.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (w, bias) = (randn(&[shape[1]], dtype), randn(&[shape[1]], dtype));
            for silu in [false, true] {
                let got = ops::group_norm(&x, g, &w, &bias, 1e-6, silu).unwrap();
                let want = ops::group_norm::group_norm_reference(
                    &up(&x),
                    g,
                    &up(&w),
                    &up(&bias),
                    1e-6,
                    silu,
                )
                .unwrap();
                let e = rel(&got, &want);
                assert!(
                    e <= tol,
                    "group_norm {dtype:?} {shape:?} g{g} silu {silu}: error {e}"
                );
                worst = worst.max(e);
            }
        }
        println!("gpu kernel group_norm {dtype:?}: worst error {worst:.2e}");
    }

    // Working memory on the GPU (f16): the CUDA pool's own high-water mark during one call, beyond what was in use
    // before it, against the op's estimate + its output; the pool rounds each allocation up (to 2 MiB at most), hence
    // the slack.
    let target = ops::OpTarget::new(&dev, DType::F16);
    assert!(
        target.cuda_kernels,
        "f16 on the GPU should run the own kernels"
    );
    let measure = |f: &dyn Fn() -> Tensor| -> u64 {
        lowvram::device::pool_peak_reset(&alloc).unwrap();
        let before = lowvram::device::pool_peak_bytes(&alloc).unwrap().unwrap().0;
        let y = f();
        let high = lowvram::device::pool_peak_bytes(&alloc).unwrap().unwrap().1;
        drop(y);
        high.saturating_sub(before)
    };
    let slack = 4u64 << 20;
    let (q, k, v) = (
        randn(&[2, 4096, 320], DType::F16),
        randn(&[2, 4096, 320], DType::F16),
        randn(&[2, 4096, 320], DType::F16),
    );
    let x = randn(&[1, 256, 256, 256], DType::F16);
    let w = randn(&[256, 256, 3, 3], DType::F16);
    let (c, bias) = (randn(&[256], DType::F16), randn(&[256], DType::F16));
    let out_bytes = |shape: &[usize]| 2 * shape.iter().product::<usize>() as u64;
    let cases: [(&str, u64, Box<dyn Fn() -> Tensor>); 3] = [
        (
            "attention 2x4096x320, 8 heads",
            ops::attention_scratch_bytes(2, 8, 4096, 4096, 40, target) + out_bytes(&[2, 4096, 320]),
            Box::new(|| ops::attention(&q, &k, &v, 8, 0.158, false).unwrap()),
        ),
        (
            "conv2d 1x256x256x256 -> 256, 3x3",
            ops::conv2d_scratch_bytes(1, 256, 256, 256, 256, 3, 1, 1, target)
                + out_bytes(&[1, 256, 256, 256]),
            Box::new(|| ops::conv2d(&x, &w, Some(&bias), 1, 1).unwrap()),
        ),
        (
            "group_norm+silu 1x256x256x256",
            ops::group_norm_scratch_bytes(256 * 256 * 256, target) + out_bytes(&[1, 256, 256, 256]),
            Box::new(|| ops::group_norm(&x, 32, &c, &bias, 1e-6, true).unwrap()),
        ),
    ];
    for (what, estimate, f) in cases {
        let measured = measure(&*f);
        println!("gpu working memory {what}: measured {measured} B, estimate {estimate} B");
        assert!(
            measured <= estimate + slack,
            "{what}: measured {measured} B above the estimate {estimate} B"
        );
        assert!(
            estimate <= measured + measured / 2 + slack,
            "{what}: estimate {estimate} B far above the measured {measured} B"
        );
    }
}

/// The CUDA dequantisation kernels (`kernels/dequant.cu`) through `lowvram::ops::dequantize` on every GGUF type and
/// fp8 format of the fixtures, in f32, f16 and bf16: bit-identical to the CPU decoders (which match gguf-py).
#[test]
fn gpu_dequant() {
    use candle_core::DType;
    use lowvram::weights::gguf::{GgufHeader, GgufKind};
    use lowvram::weights::StoredFormat;
    if let Some(why) = skip_reason() {
        let _ = writeln!(std::io::stderr(), "gpu dequant tests skipped: {why}");
        return;
    }
    let dev = Device::new_cuda(0).unwrap();
    let dir = repo().join("tests/fixtures/gguf");
    let gguf = std::fs::read(dir.join("types.gguf")).unwrap();
    let mut cases: Vec<(String, Vec<u8>, StoredFormat, Vec<usize>)> = Vec::new();
    for t in GgufHeader::parse(&gguf).unwrap().tensors {
        if let GgufKind::Stored(f) = t.kind {
            cases.push((t.name, gguf[t.bytes].to_vec(), f, t.shape));
        }
    }
    let st = std::fs::read(dir.join("fp8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    for (name, f) in [
        ("transformer_blocks.0.e4m3.weight", StoredFormat::F8E4M3),
        ("transformer_blocks.1.e5m2.weight", StoredFormat::F8E5M2),
    ] {
        let v = st.tensor(name).unwrap();
        cases.push((name.into(), v.data().to_vec(), f, v.shape().to_vec()));
    }
    assert_eq!(cases.len(), 13, "11 quantised tensors and 2 fp8 ones");
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        v.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
            .collect()
    };
    for (name, bytes, f, shape) in &cases {
        let n = bytes.len();
        let host = Tensor::from_vec(bytes.clone(), n, &Device::Cpu).unwrap();
        let on_gpu = host.to_device(&dev).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let want = lowvram::ops::dequantize(&host, *f, shape, dtype).unwrap();
            let got = lowvram::ops::dequantize(&on_gpu, *f, shape, dtype).unwrap();
            assert!(
                got.device().is_cuda() && got.dtype() == dtype && got.dims() == shape.as_slice()
            );
            assert!(
                bits(&got) == bits(&want),
                "{name} ({}) as {dtype:?}: CUDA differs from the CPU decoder",
                f.name()
            );
        }
    }
    println!(
        "gpu dequant: {} tensors x 3 dtypes bit-identical to the CPU decoders",
        cases.len()
    );
}

/// Stream order and the copy engine on the GPU (issue 13 item 1): what the library relies on about candle's stream,
/// asserted — the device's compute stream is one explicit stream (not the legacy default stream 0 nor the per-thread
/// default stream 0x2), fixed for the device's life and the same from every thread, and the tensors made on the
/// device (candle's uploads and ops, from any thread) are freed on it; the copy engine copies on a stream of its own,
/// its uploads are owned by the compute stream and arrive exact; the copy/compute overlap it gives, printed; and the
/// budget's view of other users from the driver (issue 13 item 2): blocks the pool keeps are ours, memory allocated
/// outside the pool is another user's.
#[test]
fn gpu_copy_engine() {
    if let Some(why) = skip_reason() {
        let _ = writeln!(std::io::stderr(), "gpu copy engine tests skipped: {why}");
        return;
    }
    #[cfg(feature = "cuda")]
    copy_engine_checks();
}

#[cfg(feature = "cuda")]
fn copy_engine_checks() {
    use candle_core::{DType, Storage};
    use lowvram::device::{DeviceAllocator, DeviceSpec, HostArena};
    use std::time::Instant;

    let alloc = DeviceAllocator::new(&DeviceSpec::Cuda(0)).expect("cuda:0");
    let dev = alloc.device().clone();
    let handle = dev.as_cuda_device().unwrap().cuda_stream().cu_stream() as usize;
    // 1. One explicit compute stream, the same from every thread and for the device's life.
    assert!(
        handle != 0 && handle != 2,
        "the compute stream must be an explicit stream, got handle {handle:#x}"
    );
    let other = {
        let d = dev.clone();
        std::thread::spawn(move || d.as_cuda_device().unwrap().cuda_stream().cu_stream() as usize)
            .join()
            .unwrap()
    };
    assert_eq!(other, handle, "another thread sees another compute stream");
    // 2. Tensors made on the device hold that stream (cudarc frees a slice on the stream it holds).
    fn stream_of(t: &Tensor) -> usize {
        let (s, _) = t.storage_and_layout();
        let Storage::Cuda(c) = &*s else {
            panic!("not a CUDA tensor")
        };
        match t.dtype() {
            DType::F16 => c.as_cuda_slice::<half::f16>().unwrap().stream().cu_stream() as usize,
            _ => c.as_cuda_slice::<f32>().unwrap().stream().cu_stream() as usize,
        }
    }
    let x = Tensor::randn(0f32, 1.0, (512, 512), &dev).unwrap();
    let y = x.matmul(&x).unwrap();
    let up = Tensor::ones((64, 64), DType::F32, &Device::Cpu)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let from_thread = {
        let d = dev.clone();
        std::thread::spawn(move || {
            let t = Tensor::ones((64, 64), DType::F32, &d).unwrap();
            let u = (&t + 1.0).unwrap();
            (stream_of(&t), stream_of(&u))
        })
        .join()
        .unwrap()
    };
    assert_eq!(
        [
            stream_of(&x),
            stream_of(&y),
            stream_of(&up),
            from_thread.0,
            from_thread.1
        ],
        [handle; 5],
        "a tensor on the device holds another stream"
    );

    // 3. The copy engine: its own stream; uploads (tensor and raw bytes paths) owned by the compute stream, exact.
    let n = 1 << 20;
    let host = Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let host = (host * 0.37).unwrap();
    let half_host = host.to_dtype(DType::F16).unwrap();
    let engine = alloc.copy_engine().unwrap();
    let (a2, h2, f2) = (alloc.clone(), host.clone(), half_host.clone());
    let mut hand = engine
        .submit(move |lane| {
            let view = a2.on_lane(lane);
            let t = view.copy_to_device(&h2)?;
            let bytes: Vec<u8> = f2
                .to_vec1::<half::f16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let f = view.tensor_from_bytes(&bytes, DType::F16, &[n])?;
            Ok((lane.stream_handle(), t, f))
        })
        .unwrap()
        .recv(&alloc)
        .unwrap();
    hand.wait().unwrap();
    let (lane, t, f) = hand.take();
    let lane = lane.expect("the engine has a stream on CUDA");
    println!("gpu streams: compute {handle:#x}, copy engine {lane:#x}");
    assert!(
        lane != handle && lane != 0 && lane != 2,
        "the engine copies on the compute stream"
    );
    assert_eq!(
        (stream_of(&t), stream_of(&f)),
        (handle, handle),
        "uploads must be owned by the compute stream"
    );
    let same = |a: &Tensor, b: &Tensor| {
        let a: Vec<f32> = a
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    assert!(
        same(&t, &host) && same(&f, &half_host),
        "an upload arrived wrong"
    );
    assert_eq!(alloc.usage().unwaited_copy_uses, 0);
    drop((t, f, x, y, up));

    // 4. Overlap: compute = matmuls on the compute stream, copy = 256 MiB from pinned RAM through the engine; each
    //    alone, then both issued together and handed over by the event (medians of 5).
    let mut arena = HostArena::new(&alloc, 256 << 20).unwrap();
    assert!(arena.pin(true).is_ok(), "a 256 MiB arena is pinned: {:?}", arena.pinned());
    let big = std::sync::Arc::new(arena);
    let m = Tensor::randn(0f32, 1.0, (4096, 4096), &dev).unwrap();
    let compute = || {
        let mut z = m.clone();
        for _ in 0..2 {
            z = z.matmul(&m).unwrap();
        }
        z
    };
    let copy = || {
        let (a2, b2) = (alloc.clone(), big.clone());
        let p = engine
            .submit(move |lane| {
                let view = a2.on_lane(lane);
                let t = view.tensor_from_bytes(b2.as_slice(), DType::F32, &[64 << 20]);
                b2.note_read(&view)?;
                t
            })
            .unwrap();
        let mut h = p.recv(&alloc).unwrap();
        h.wait().unwrap();
        h.take()
    };
    let sync = || dev.synchronize().unwrap();
    let time = |f: &dyn Fn()| {
        let mut v: Vec<f64> = (0..5)
            .map(|_| {
                sync();
                let t = Instant::now();
                f();
                sync();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[2]
    };
    let _ = (compute(), copy());
    sync();
    let tc = time(&|| drop(compute()));
    let tx = time(&|| drop(copy()));
    let tb = time(&|| {
        let z = compute();
        let c = copy();
        // First use after the hand-off, on the compute stream.
        drop((z, c.sum_all().unwrap()));
    });
    let hidden = (tc + tx - tb) / tc.min(tx);
    println!(
        "gpu copy/compute overlap (copy engine): compute {tc:.2} ms, copy 256 MiB pinned {tx:.2} ms ({:.1} GB/s), both \
         {tb:.2} ms = {:.0} % of the sum; {:.0} % of the shorter one hidden; pinned {} B",
        (256u64 << 20) as f64 / tx / 1e6,
        100.0 * tb / (tc + tx),
        100.0 * hidden,
        big.pinned_bytes()
    );
    assert_eq!(alloc.usage().unwaited_copy_uses, 0);
    drop(big);

    // 5. Budgets from the driver: blocks the pool keeps after a free are ours (not another program's), while memory
    //    allocated outside the pool is another user's.
    use candle_core::cuda_backend::cudarc::driver::result;
    lowvram::device::set_pool_keep(&alloc, true).unwrap();
    sync();
    let before = alloc.external_from_driver().expect("the driver answers");
    // Our pool current (as during a call of ours), so the tensor comes from it.
    let route = alloc.route_pool().unwrap();
    let t = Tensor::zeros(128 << 20, DType::F32, &dev).unwrap();
    sync();
    drop(t);
    sync();
    let kept = lowvram::device::pool_reserved_bytes(&alloc).unwrap().unwrap();
    let after_free = alloc.external_from_driver().unwrap();
    let ctx = dev
        .as_cuda_device()
        .unwrap()
        .cuda_stream()
        .context()
        .clone();
    ctx.bind_to_thread().unwrap();
    // SAFETY: a plain device allocation, freed below.
    let other = unsafe { result::malloc_sync(256 << 20) }.unwrap();
    let with_other = alloc.external_from_driver().unwrap();
    unsafe { result::free_sync(other) }.unwrap();
    println!(
        "gpu budgets from the driver: external {before} B; after a 512 MiB tensor freed into the pool (pool holds \
         {kept} B) {after_free} B; with 256 MiB allocated outside the pool {with_other} B"
    );
    assert!(
        after_free <= before + (64 << 20),
        "kept pool bytes counted as another program's: {before} -> {after_free}"
    );
    assert!(
        with_other >= after_free + (192 << 20),
        "memory outside the pool not seen as another user's: {after_free} -> {with_other}"
    );
    drop(route);
    lowvram::device::set_pool_keep(&alloc, false).unwrap();
}

/// Device OOM and our own pool on a real GPU (issue 13, item 2): an OOM the driver raises inside candle is
/// OUT_OF_DEVICE_MEMORY through the one classifier; an op-level OOM injected on CUDA is recovered (the denoise
/// retried, the same latents) or, with every op failing, a clean OUT_OF_DEVICE_MEMORY with the next run succeeding;
/// after a reservation returns, a raw `cuMemAlloc` of its bytes from outside succeeds even though our pool kept more
/// than the driver had free; and a run leaves the process default pool's attributes and the device's current pool
/// as they were.
#[test]
fn gpu_oom_and_own_pool() {
    if let Some(why) = skip_reason() {
        let _ = writeln!(std::io::stderr(), "gpu OOM and own-pool tests skipped: {why}");
        return;
    }
    #[cfg(feature = "cuda")]
    oom_and_pool_checks();
}

#[cfg(feature = "cuda")]
fn oom_and_pool_checks() {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::DType;
    use lowvram::device::{FaultInjection, FaultSite};
    use lowvram::Error;

    // The process default pool, as the host would see it: its attributes and the device's current pool.
    let probe = Device::new_cuda(0).unwrap();
    let cu_dev = probe.as_cuda_device().unwrap().cuda_stream().context().cu_device();
    probe.as_cuda_device().unwrap().cuda_stream().context().bind_to_thread().unwrap();
    let default_pool = || {
        let mut p: sys::CUmemoryPool = std::ptr::null_mut();
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut p, cu_dev).result().unwrap() };
        p
    };
    let current_pool = || {
        let mut p: sys::CUmemoryPool = std::ptr::null_mut();
        unsafe { sys::cuDeviceGetMemPool(&mut p, cu_dev).result().unwrap() };
        p
    };
    let attr = |p: sys::CUmemoryPool, a: sys::CUmemPool_attribute| {
        let mut v: u64 = 0;
        unsafe { sys::cuMemPoolGetAttribute(p, a, &mut v as *mut u64 as *mut _).result().unwrap() };
        v
    };
    use sys::CUmemPool_attribute as A;
    let threshold_before = attr(default_pool(), A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD);
    let current_before = current_pool();

    let ctx = context(&format!("{F32}cuda_allocator: pool_keep\n"));
    let alloc = ctx.cache().allocator().clone();
    let unet = ctx.load_model(&repo().join("tests/fixtures/tiny-sd-random/unet")).unwrap();
    let cond = Tensor::randn(0f32, 1.0, (1, 77, 32), &Device::Cpu).unwrap();
    let opts = DenoiseOptions { steps: 2, seed: 5, latent_size: (8, 8), ..Default::default() };
    let denoise = || ctx.denoise(&unet, &opts, &cond, None, None, None, &mut |_, _| true).map(|r| r.0);
    let reference = denoise().unwrap();

    // 1. A real driver OOM inside candle (an allocation beyond the device, our pool current) is classified.
    {
        let total = alloc.capacity().unwrap();
        let _route = alloc.route_pool().unwrap();
        assert!(alloc.pool_is_routed(), "our pool is current while routed");
        let e = Tensor::zeros((total / 2 + (1 << 30)) as usize, DType::F32, alloc.device()).unwrap_err();
        match alloc.classify(e.into(), 7) {
            Error::OutOfDeviceMemory { needed_bytes, available_bytes, .. } => {
                println!("gpu real OOM: needed {needed_bytes} B (the caller's figure), available {available_bytes} B");
                assert!(available_bytes < total);
            }
            e => panic!("a driver OOM was not classified: {e}"),
        }
    }
    assert!(!alloc.pool_is_routed(), "the previous pool comes back");

    // 2. Op-level OOM on CUDA: recovered, or clean when nothing more can be freed; the next run succeeds.
    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Nth(3));
    let retried = denoise().expect("a step that hit an op-level OOM is retried");
    assert_eq!(alloc.fault_counts_at(FaultSite::Activation).1, 1);
    // The retry streams blocks that were resident: the same kernels on the same values (f32, no conversion).
    let diff = max_abs(&retried, &reference);
    println!("gpu op-level OOM: retried run vs unfaulted, max |diff| {diff:e}");
    assert!(diff <= 1e-5, "the retried run differs by {diff}");
    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Rate { probability: 1.0, seed: 1 });
    let e = denoise().unwrap_err();
    alloc.set_faults_at(FaultSite::Activation, FaultInjection::Off);
    assert!(matches!(e, Error::OutOfDeviceMemory { .. }), "{e}");
    assert_eq!(alloc.usage().working_bytes, 0);
    assert!(max_abs(&denoise().unwrap(), &reference) <= 1e-5, "the next run");
    let st = ctx.stats();
    let pool = st.device.pool.expect("stats report our pool on CUDA");
    println!(
        "gpu stats: pool used {} B reserved {} B high {} B; external per the driver {:?} B",
        pool.used, pool.reserved, pool.high, st.device.external_from_driver_bytes
    );
    assert!(pool.reserved >= pool.used && pool.high >= pool.used);

    // 3. A reservation's bytes are allocatable from outside when it returns: our pool keeps 8 GiB (pool_keep) that
    //    the driver's free bytes do not show; the reservation asks for more than the driver has free.
    {
        let _route = alloc.route_pool().unwrap();
        let t = Tensor::zeros(2usize << 30, DType::F32, alloc.device()).unwrap();
        alloc.device().synchronize().unwrap();
        drop(t);
        alloc.device().synchronize().unwrap();
    }
    let kept = lowvram::device::pool_stats(&alloc).unwrap().unwrap();
    let free = alloc.mem_info().unwrap().0;
    let bytes = free + (4u64 << 30);
    println!("gpu reservation: pool used {} B reserved {} B, driver free {free} B, reserving {bytes} B", kept.used, kept.reserved);
    assert!(kept.reserved >= kept.used + (8u64 << 30) - (64 << 20), "pool_keep kept the freed 8 GiB");
    let r = ctx.reserve_with(bytes, Some(std::time::Duration::from_secs(10)), None).expect("the reservation");
    let ptr = unsafe { result::malloc_sync(bytes as usize) }.expect("a raw cuMemAlloc of the reserved bytes");
    unsafe { result::free_sync(ptr) }.unwrap();
    drop(r);

    // 4. The default pool's attributes and the device's current pool are as before.
    drop((unet, ctx));
    assert_eq!(attr(default_pool(), A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD), threshold_before);
    assert_eq!(current_pool(), current_before, "the device's current pool is restored");
    println!("gpu own pool: default pool threshold {threshold_before} unchanged, current pool restored");
}
