//! lowvram's side of the SD 1.5 benchmark: the same workloads as `scripts/bench/torch_bench.py`, through the Rust
//! API, plus the UNet budget sweep.
//!
//! ```text
//! cargo bench --bench sd -- --model DIR [--threads N] [--repeats R] [--only W,W] [--budgets 100,50,25,10] [--json]
//! ```
//!
//! DIR is a diffusers pipeline folder (`scripts/bench/make_sd15_random.py` writes one, default
//! `target/sd15-random`). Storage and compute are f32 (`storage_dtype: fp32`, `compute_dtype: fp32`; `--dtype fp16` for GPU runs), as in the
//! PyTorch baseline. Workloads:
//!
//! * `unet_step_32`, `unet_step_64`: one classifier-free-guidance step = one UNet forward at batch 2 (cond + uncond),
//!   sample `[2,4,S,S]`, encoder_hidden_states `[2,77,768]`, timestep 500; timed through the raw forward under one
//!   model lock (`ctx.cache().lock` + `unet.forward`), exactly the work the PyTorch baseline times. Then one 1-step
//!   `ctx.denoise` for its [`RunReport`] (peak device bytes, bytes streamed).
//! * `vae_decode_256`, `vae_decode_512`: `ctx.vae_decode` of `[1,4,32,32]` / `[1,4,64,64]` latents, `Tiling::Auto`.
//! * The budget sweep, for each selected UNet workload: a fresh context on an emulated device large enough for the
//!   whole UNet, with `max_cache_vram_gb` = P % of the UNet's bytes and the UNet loaded to the device up to that
//!   (`load_to_device`); P in `--budgets` (default 100, 50, 25, 10). Each point reports its timings, resident bytes,
//!   bytes streamed per step beside `model − resident`, peak device bytes, refused allocations and the plan's
//!   predicted peak. The 100 % point is also reported as the plain `unet_step_S` figure.
//!
//! Each timed workload: `--warmup` runs (default 1), then `--repeats` runs (default 3): median/min/max ms and every
//! run. Peak RSS: `VmHWM` from /proc/self/status, reset per workload through /proc/self/clear_refs where the kernel
//! allows (process peak kept across resets). `--config 'key: value'` appends YAML (`\n` for several lines) to the
//! benchmark's config (f32 storage/compute, `device_working_mem_gb: --working-gb`, default 2). `--json` prints one JSON object on stdout (progress goes to stderr).
//!
//! Cargo.toml needs `[[bench]] name = "sd"`, `harness = false`. `cargo bench` passes `--bench` to the binary; it is
//! accepted and ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use lowvram::api::{Context, ContextOptions, DenoiseOptions, RunReport, Tiling};

const UNET_WORKLOADS: &[(&str, usize)] = &[("unet_step_32", 32), ("unet_step_64", 64)];
const VAE_WORKLOADS: &[(&str, usize)] = &[("vae_decode_256", 256), ("vae_decode_512", 512)];
const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Clone)]
struct Args {
    model: PathBuf,
    threads: usize,
    repeats: usize,
    warmup: usize,
    only: Vec<String>,
    budgets: Vec<u32>,
    /// Sweep points run with these `async_loading` settings (prefetch of the next streamed block on/off).
    prefetch: Vec<bool>,
    device: Option<String>,
    working_gb: f64,
    extra_config: String,
    json: bool,
    seed: u64,
    /// Storage and compute dtype (`fp32` on the CPU, as the PyTorch baseline; `fp16` for GPU runs; `auto` = the
    /// default configuration: storage = the file's dtype, compute f32 on the CPU / fp16 on CUDA).
    dtype: String,
    /// Which weight file the model folders provide: `fp32` (diffusion_pytorch_model.safetensors) or `fp16` (the
    /// `.fp16.` variant users download; run from a folder of links to it).
    weights: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench sd -- [--model DIR] [--threads N] [--repeats R] [--warmup W] [--only W,W]\n\
         \x20      [--budgets 100,50,25,10] [--prefetch on,off] [--device emulated:SIZE] [--working-gb G] [--config 'key: value'] [--seed S]\n\
         \x20      [--dtype fp32|fp16|bf16|auto] [--weights fp32|fp16] [--json]\n\
         workloads: unet_step_32 unet_step_64 vae_decode_256 vae_decode_512"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        model: PathBuf::from("target/sd15-random"),
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        repeats: 3,
        warmup: 1,
        only: UNET_WORKLOADS
            .iter()
            .chain(VAE_WORKLOADS)
            .map(|(n, _)| n.to_string())
            .collect(),
        budgets: vec![100, 50, 25, 10],
        prefetch: vec![true],
        device: None,
        working_gb: 2.0,
        extra_config: String::new(),
        json: false,
        seed: 0,
        dtype: "fp32".into(),
        weights: "fp32".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage())
        };
        match key.as_str() {
            "--model" => a.model = PathBuf::from(val()),
            "--threads" => a.threads = val().parse().unwrap_or_else(|_| usage()),
            "--repeats" | "-r" => a.repeats = val().parse().unwrap_or_else(|_| usage()),
            "--warmup" => a.warmup = val().parse().unwrap_or_else(|_| usage()),
            "--only" => {
                a.only = val()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "--budgets" => {
                a.budgets = val()
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .trim_end_matches('%')
                            .parse()
                            .unwrap_or_else(|_| usage())
                    })
                    .collect()
            }
            "--prefetch" => {
                a.prefetch = val()
                    .split(',')
                    .map(|s| match s.trim() {
                        "on" => true,
                        "off" => false,
                        _ => usage(),
                    })
                    .collect()
            }
            "--device" => a.device = Some(val()),
            "--working-gb" => a.working_gb = val().parse().unwrap_or_else(|_| usage()),
            "--config" => a.extra_config = val().replace("\\n", "\n"),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage()),
            "--dtype" => a.dtype = val(),
            "--weights" => a.weights = val(),
            "--json" => a.json = true,
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other}");
                usage()
            }
        }
    }
    let known: Vec<&str> = UNET_WORKLOADS
        .iter()
        .chain(VAE_WORKLOADS)
        .map(|(n, _)| *n)
        .collect();
    if let Some(bad) = a.only.iter().find(|w| !known.contains(&w.as_str())) {
        eprintln!("unknown workload {bad}");
        usage()
    }
    if !["fp32", "fp16", "bf16", "auto"].contains(&a.dtype.as_str()) {
        eprintln!("--dtype takes fp32, fp16, bf16 or auto");
        usage()
    }
    if !["fp32", "fp16"].contains(&a.weights.as_str()) {
        eprintln!("--weights takes fp32 or fp16");
        usage()
    }
    if a.repeats == 0 || a.threads == 0 || a.budgets.iter().any(|&p| p == 0 || p > 100) {
        usage()
    }
    a
}

// --- host memory -----------------------------------------------------------------------------------------------

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak RSS with per-workload resets: `VmHWM` is reset through /proc/self/clear_refs (Linux ≥ 4.0); the process
/// peak is kept across resets.
struct Rss {
    process_peak_kib: u64,
    resettable: bool,
}

impl Rss {
    fn new() -> Self {
        let mut r = Self {
            process_peak_kib: 0,
            resettable: false,
        };
        r.resettable = r.reset();
        r
    }
    fn reset(&mut self) -> bool {
        self.process_peak_kib = self.process_peak_kib.max(status_kib("VmHWM").unwrap_or(0));
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
    /// Peak RSS since the last reset, in bytes.
    fn since_reset(&self) -> Option<u64> {
        if self.resettable {
            status_kib("VmHWM").map(|k| k * 1024)
        } else {
            None
        }
    }
    fn process_peak(&mut self) -> u64 {
        self.reset();
        self.process_peak_kib * 1024
    }
}

// --- inputs ------------------------------------------------------------------------------------------------------

/// Seeded standard-normal tensor (splitmix64 + Box–Muller): the same inputs on every run and thread count.
fn randn(seed: u64, shape: &[usize], device: &Device) -> BoxResult<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let (u1, u2) = (next().max(1e-300), next());
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        v.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

// --- timing --------------------------------------------------------------------------------------------------------

struct Timing {
    runs_ms: Vec<f64>,
}

impl Timing {
    fn median(&self) -> f64 {
        let mut v = self.runs_ms.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.runs_ms.iter().cloned().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.runs_ms
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
    }
    fn json(&self) -> Value {
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "median_ms": r3(self.median()),
            "min_ms": r3(self.min()),
            "max_ms": r3(self.max()),
            "runs_ms": self.runs_ms.iter().map(|&x| r3(x)).collect::<Vec<_>>(),
        })
    }
}

fn time_runs(args: &Args, mut f: impl FnMut() -> BoxResult<()>) -> BoxResult<Timing> {
    for _ in 0..args.warmup {
        f()?;
    }
    let mut runs_ms = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats {
        let t0 = Instant::now();
        f()?;
        runs_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Timing { runs_ms })
}

fn report_json(r: &RunReport) -> Value {
    json!({
        "total_ms": r.total_ms,
        "step_ms": r.step_ms,
        "peak_device_bytes": r.peak_device_bytes,
        "bytes_streamed": r.bytes_streamed,
        "resident_bytes": r.resident_bytes,
        "model_bytes": r.model_bytes,
        "working_bytes": r.working_bytes,
        "estimated_working_bytes": r.estimated_working_bytes,
        "refused_allocations": r.refused_allocations,
        "tile_latent": r.tile_latent,
    })
}

/// The copy/compute overlap prefetch gives at each budget below 100 %: the time streaming adds without prefetch
/// (off − resident, ≈ the copies) and the share of it the copy engine hides (off − on) / (off − resident). 100 % =
/// every copy behind compute; 0 % = no overlap. Needs points with prefetch off and on and a 100 % point.
fn log_overlap(args: &Args, name: &str, points: &[Value]) {
    let med = |pct: u64, pf: bool| {
        points
            .iter()
            .find(|p| {
                p["budget_pct"].as_u64() == Some(pct) && p["async_loading"].as_bool() == Some(pf)
            })
            .and_then(|p| p["median_ms"].as_f64())
    };
    let Some(resident) = med(100, false).or(med(100, true)) else {
        return;
    };
    for pct in args.budgets.iter().map(|&p| p as u64).filter(|&p| p < 100) {
        if let (Some(off), Some(on)) = (med(pct, false), med(pct, true)) {
            let added = off - resident;
            let hidden = if added > 0.0 {
                100.0 * (off - on) / added
            } else {
                0.0
            };
            log(
                args,
                &format!(
                    "{name}@{pct:>3}% overlap: resident {resident:.1} ms, streamed {off:.1} ms without prefetch (+{added:.1}                      ms of copies), {on:.1} ms with the copy engine: {hidden:.0} % of the copy time hidden, {:.2}x resident",
                    on / resident
                ),
            );
        }
    }
}

fn log(args: &Args, msg: &str) {
    if args.json {
        eprintln!("{msg}")
    } else {
        println!("{msg}")
    }
}

// --- contexts --------------------------------------------------------------------------------------------------------

/// Config for a run: f32 storage and compute (the PyTorch baseline's), a fixed working memory, and the cache cap.
fn config_yaml(args: &Args, max_cache_vram_bytes: Option<u64>) -> String {
    let mut y = format!(
        "device_working_mem_gb: {}\nkeep_ram_copy_of_weights: true\n",
        args.working_gb
    );
    if args.dtype != "auto" {
        y.push_str(&format!(
            "storage_dtype: {d}\ncompute_dtype: {d}\n",
            d = args.dtype
        ));
    }
    if !args.extra_config.is_empty() {
        y.push_str(&args.extra_config);
        y.push('\n');
    }
    if let Some(b) = max_cache_vram_bytes {
        y.push_str(&format!("max_cache_vram_gb: {}\n", b as f64 / GIB));
    }
    y
}

/// An emulated device that holds every component whole plus working memory, so budgets come only from
/// `max_cache_vram_gb`.
fn device_spec(args: &Args, model_bytes: u64) -> String {
    args.device.clone().unwrap_or_else(|| {
        let need = model_bytes as f64 / GIB + args.working_gb * 2.0 + 2.0;
        format!("emulated:{}GiB", need.ceil() as u64)
    })
}

fn new_context(args: &Args, device: String, cap: Option<u64>) -> BoxResult<Context> {
    Ok(Context::new(ContextOptions {
        device: Some(device),
        config_yaml: Some(config_yaml(args, cap)),
        ..Default::default()
    })?)
}

fn weight_file_bytes(dir: &Path) -> u64 {
    // f32 file only (the fp16 variant sits beside it); for sizing the emulated device before loading.
    std::fs::metadata(dir.join("diffusion_pytorch_model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(4 << 30)
}

// --- workloads -------------------------------------------------------------------------------------------------------

/// One point of the UNet sweep: `pct` % of the UNet's weights resident, S×S latents.
fn unet_point(
    args: &Args,
    rss: &mut Rss,
    name: &str,
    size: usize,
    pct: u32,
    prefetch: bool,
) -> BoxResult<Value> {
    let mut args = args.clone();
    args.extra_config
        .push_str(&format!("\nasync_loading: {prefetch}\n"));
    let args = &args;
    let unet_dir = args.model.join("unet");
    let file_bytes = weight_file_bytes(&unet_dir);
    let dev = device_spec(args, file_bytes);
    // The budget needs the model's bytes in its storage dtype: load once without a cap to learn them, then set it.
    let ctx = new_context(args, dev.clone(), None)?;
    let model = ctx.load_model(&unet_dir)?;
    // Budgets are device bytes: the weights in the compute dtype (an fp16 file computed in f32 takes twice its size).
    let total = model.weights().device_bytes();
    let target = if pct >= 100 {
        total + 64 * MIB
    } else {
        total * pct as u64 / 100
    };
    ctx.configure(&config_yaml(args, Some(target)))?;
    let loaded = ctx.load_to_device(&model, target.min(total))?;
    let (unet, _sched) = model.as_unet()?;

    let device = ctx.cache().device().clone();
    let sample = randn(args.seed + 1, &[2, 4, size, size], &device)?;
    let ehs = randn(args.seed + 2, &[2, 77, 768], &device)?;
    let working = unet.working_bytes(2, size, size, 77, ctx.cache().compute_dtype());

    rss.reset();
    ctx.cache().allocator().reset_peak();
    let refused_before = ctx.cache().allocator().refused();
    let lock = ctx.cache().lock(model.weights(), working)?;
    let resident = model.weights().resident_bytes();
    let mut streamed = Vec::new();
    let mut prefetched = Vec::new();
    let timing = time_runs(args, || {
        let before = lock.bytes_streamed();
        let pf_before = lock.bytes_prefetched();
        let out = unet.forward(&lock, &sample, 500.0, &ehs)?;
        // Make sure the work is done (candle CPU ops are eager; on CUDA this synchronises).
        let _ = out.sum_all()?.to_scalar::<f32>()?;
        streamed.push(lock.bytes_streamed() - before);
        prefetched.push(lock.bytes_prefetched() - pf_before);
        Ok(())
    })?;
    let forward_peak = ctx.cache().allocator().peak();
    let plan = serde_json::to_value(ctx.cache().stats().plan)?;
    drop(lock);
    let refused = ctx.cache().allocator().refused() - refused_before;
    let rss_peak = rss.since_reset();

    // The public path once, for its run report: a 1-step CFG denoise (cond + uncond batched = one forward).
    let cond = randn(args.seed + 3, &[1, 77, 768], &device)?;
    let uncond = randn(args.seed + 4, &[1, 77, 768], &device)?;
    let noise = randn(args.seed + 5, &[1, 4, size, size], &device)?;
    let opts = DenoiseOptions {
        steps: 1,
        guidance: 7.5,
        seed: args.seed,
        ..Default::default()
    };
    let (_latents, report) = ctx.denoise(
        &model,
        &opts,
        &cond,
        Some(&uncond),
        Some(&noise),
        None,
        &mut |_, _| true,
    )?;

    let per_step = streamed.iter().copied().max().unwrap_or(0);
    let expected = model.weights().streamed_bytes_per_forward();
    let t = timing.json();
    log(
        args,
        &format!(
            "{name}@{pct:>3}%{}  median {:>10.1} ms  min {:>10.1}  max {:>10.1}  resident {:>6} MiB / {} MiB  streamed/step \
             {:>6} MiB (model−resident {:>6} MiB, prefetched {:>6} MiB)  peak device {:>6} MiB  refused {refused}",
            if prefetch { " prefetch" } else { "" },
            timing.median(),
            timing.min(),
            timing.max(),
            resident / MIB,
            total / MIB,
            per_step / MIB,
            expected / MIB,
            prefetched.iter().copied().max().unwrap_or(0) / MIB,
            report.peak_device_bytes.max(forward_peak) / MIB,
        ),
    );
    let mut v = t;
    let o = v.as_object_mut().unwrap();
    o.insert("budget_pct".into(), json!(pct));
    o.insert("async_loading".into(), json!(prefetch));
    o.insert("bytes_prefetched_runs".into(), json!(prefetched));
    o.insert("device".into(), json!(dev));
    o.insert("max_cache_vram_bytes".into(), json!(target));
    o.insert("loaded_to_device_bytes".into(), json!(loaded));
    o.insert("model_bytes".into(), json!(total));
    o.insert("resident_bytes".into(), json!(resident));
    o.insert(
        "resident_fraction".into(),
        json!(resident as f64 / total as f64),
    );
    o.insert("working_bytes_requested".into(), json!(working));
    o.insert("bytes_streamed_per_step".into(), json!(per_step));
    o.insert("bytes_streamed_runs".into(), json!(streamed));
    o.insert("model_minus_resident_bytes".into(), json!(expected));
    o.insert(
        "streamed_equals_model_minus_resident".into(),
        json!(streamed.iter().all(|&s| s == expected)),
    );
    o.insert("peak_device_bytes_forward".into(), json!(forward_peak));
    o.insert("peak_device_bytes".into(), json!(report.peak_device_bytes));
    o.insert("refused_allocations".into(), json!(refused));
    let predicted = plan.get("predicted_peak_bytes").and_then(Value::as_u64);
    o.insert("predicted_peak_bytes".into(), json!(predicted));
    o.insert(
        "predicted_peak_equals_measured".into(),
        json!(predicted == Some(forward_peak)),
    );
    o.insert(
        "predicted_peak_covers_measured".into(),
        json!(predicted.is_some_and(|p| p >= forward_peak)),
    );
    o.insert("plan".into(), plan);
    o.insert("denoise_1_step_report".into(), report_json(&report));
    o.insert("peak_rss_bytes".into(), json!(rss_peak));
    o.insert("sample_shape".into(), json!([2, 4, size, size]));
    o.insert("ehs_shape".into(), json!([2, 77, 768]));
    o.insert("timestep".into(), json!(500));
    Ok(v)
}

fn vae_point(
    args: &Args,
    rss: &mut Rss,
    ctx: &Context,
    vae: &Arc<lowvram::api::Model>,
    name: &str,
    px: usize,
) -> BoxResult<Value> {
    let device = ctx.cache().device().clone();
    let z = randn(args.seed + 10 + px as u64, &[1, 4, px / 8, px / 8], &device)?;
    rss.reset();
    ctx.cache().allocator().reset_peak();
    let refused_before = ctx.cache().allocator().refused();
    let mut last: Option<RunReport> = None;
    let timing = time_runs(args, || {
        let (image, report) = ctx.vae_decode(vae, &z, Tiling::Auto)?;
        drop(image);
        last = Some(report);
        Ok(())
    })?;
    let report = last.expect("at least one run");
    let refused = ctx.cache().allocator().refused() - refused_before;
    if let Some(tile) = report.tile_latent {
        log(args, &format!("{name}: decoded in tiles of {tile} latent px (Tiling::Auto found the untiled decode too big)"));
    }
    log(
        args,
        &format!(
            "{name:<15} median {:>10.1} ms  min {:>10.1}  max {:>10.1}  peak device {:>6} MiB  refused {refused}",
            timing.median(),
            timing.min(),
            timing.max(),
            report.peak_device_bytes / MIB
        ),
    );
    let mut v = timing.json();
    let o = v.as_object_mut().unwrap();
    o.insert("latent_shape".into(), json!([1, 4, px / 8, px / 8]));
    o.insert("peak_device_bytes".into(), json!(report.peak_device_bytes));
    o.insert("refused_allocations".into(), json!(refused));
    o.insert("tiled".into(), json!(report.tile_latent.is_some()));
    o.insert("report".into(), report_json(&report));
    o.insert("peak_rss_bytes".into(), json!(rss.since_reset()));
    Ok(v)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn run(args: &Args) -> BoxResult<Value> {
    let mut rss = Rss::new();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let mut workloads = serde_json::Map::new();
    let mut sweep = serde_json::Map::new();

    let vae_sel: Vec<_> = VAE_WORKLOADS
        .iter()
        .filter(|(n, _)| args.only.iter().any(|o| o == n))
        .collect();
    if !vae_sel.is_empty() {
        let vae_dir = args.model.join("vae");
        let ctx = new_context(args, device_spec(args, weight_file_bytes(&vae_dir)), None)?;
        let t0 = Instant::now();
        let vae = ctx.load_model(&vae_dir)?;
        log(
            args,
            &format!(
                "vae loaded in {:.0} ms, {} MiB",
                t0.elapsed().as_secs_f64() * 1e3,
                vae.weights().total_bytes() / MIB
            ),
        );
        for (name, px) in vae_sel {
            workloads.insert(
                name.to_string(),
                vae_point(args, &mut rss, &ctx, &vae, name, *px)?,
            );
        }
    }

    for (name, size) in UNET_WORKLOADS
        .iter()
        .filter(|(n, _)| args.only.iter().any(|o| o == n))
    {
        let mut points = Vec::new();
        for &pct in &args.budgets {
            for (i, &pf) in args.prefetch.iter().enumerate() {
                let v = unet_point(args, &mut rss, name, *size, pct, pf)?;
                if pct == 100 && i == 0 {
                    workloads.insert(name.to_string(), v.clone());
                }
                points.push(v);
            }
        }
        log_overlap(args, name, &points);
        sweep.insert(name.to_string(), Value::Array(points));
    }

    Ok(json!({
        "impl": "lowvram",
        "lowvram": lowvram::VERSION,
        "candle_core": "0.11.1",
        "device": args.device.clone().unwrap_or_else(|| "emulated (CPU memory)".into()),
        "cpu": cpu_model(),
        "threads": args.threads,
        "dtype": args.dtype,
        "weights": args.weights,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "config_yaml": config_yaml(args, None),
        "model": std::fs::canonicalize(&args.model).unwrap_or_else(|_| args.model.clone()),
        "started_unix": started,
        "workloads": workloads,
        "sweep": sweep,
        "peak_rss_bytes": rss.process_peak(),
        "per_workload_rss": if rss.resettable { "VmHWM after /proc/self/clear_refs" } else { "unavailable" },
    }))
}

/// With `--weights fp16`: a pipeline folder of links to the model's fp16 files only (the loader takes the f32 file
/// when both are present), beside the model folder.
fn fp16_view(model: &Path) -> BoxResult<PathBuf> {
    let model = std::fs::canonicalize(model)?;
    let name = model
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    let view = model.with_file_name(format!("{name}-fp16-view"));
    for part in ["unet", "vae", "scheduler"] {
        let (src, dst) = (model.join(part), view.join(part));
        if !src.is_dir() {
            continue;
        }
        std::fs::create_dir_all(&dst)?;
        for f in [
            "config.json",
            "scheduler_config.json",
            "diffusion_pytorch_model.fp16.safetensors",
        ] {
            if src.join(f).exists() && !dst.join(f).exists() {
                std::os::unix::fs::symlink(src.join(f), dst.join(f))?;
            }
        }
    }
    Ok(view)
}

fn main() {
    let mut args = parse_args();
    if args.weights == "fp16" {
        args.model = fp16_view(&args.model).unwrap_or_else(|e| {
            eprintln!("cannot link the fp16 files: {e}");
            std::process::exit(2)
        });
    }
    // candle's CPU kernels size their parallelism from RAYON_NUM_THREADS; rayon's global pool is built to match.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global();
    if !args.model.join("unet").is_dir() && !args.model.join("vae").is_dir() {
        eprintln!(
            "{} has no unet/ or vae/: run scripts/bench/make_sd15_random.py first",
            args.model.display()
        );
        std::process::exit(2);
    }
    match run(&args) {
        Ok(v) => {
            if args.json {
                println!("{v}");
            }
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
