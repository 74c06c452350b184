//! lowvram's side of issue 16's real-size benchmark (item 7): one 256×256 FLUX.1-dev step from a GGUF transformer
//! and one T5-XXL encoding from a GGUF encoder, streamed through an `emulated:` device, with
//! `keep_ram_copy_of_weights` on and off. The diffusers/transformers side is `scripts/bench_flux_diffusers.py` on
//! the same files (BENCHMARKS.md runs both in one session, side by side).
//!
//! ```text
//! cargo bench --bench flux -- --part flux --file FLUX.gguf [--device emulated:4GiB] [--keep-ram true|false]
//!                             [--size 256] [--txt-len 512] [--steps 2] [--config 'key: value']
//! cargo bench --bench flux -- --part t5 --file T5.gguf [--device emulated:4GiB] [--keep-ram true|false] [--txt-len 512]
//! ```
//!
//! Files: `scripts/make_flux_gguf.py` (random FLUX.1-dev architecture, BFL names, Q4_0 by default) and
//! `scripts/make_t5_gguf.py` (random T5-XXL encoder, llama.cpp names, Q8_0). The FLUX file's tensors are read under
//! their own names (city96 GGUFs are BFL-named, lowvram's FLUX layout); the T5 file goes through
//! `Context::load_t5_file` (`--text-encoder-2 FILE`: llama.cpp names mapped to transformers', its vocabulary read). Weights stay in their stored form in RAM and on the device and are
//! dequantised per layer into working memory (the compute dtype: f32 on the CPU).
//!
//! One FLUX step = one transformer forward on 16×(size/8)² latents packed to (size/16)² tokens, `--txt-len` T5
//! tokens (512: dev's max_sequence_length), pooled [1, 768], t = 1000, guidance 3.5 — the inputs
//! `scripts/bench_flux_diffusers.py` feeds diffusers. The T5 encoding = one forward on `--txt-len` token ids.
//! Inputs are seeded random (the weights are random too). `--steps` forwards are timed under one lock; the first
//! includes placing the planned resident blocks.
//!
//! Printed: one JSON object per run (step times, bytes streamed per step beside stored − resident, resident bytes,
//! the device's peak bytes and refused allocations, the working memory reserved, peak RSS from /proc/self/status
//! `VmHWM`). `cargo bench` passes `--bench`; it is ignored.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use lowvram::api::{Context, ContextOptions, RunReport};
use lowvram::models::text_encoder::HiddenLayer;
use lowvram::models::flux::{block_of as flux_block_of, FluxConfig, FluxTransformer};
use lowvram::ops::OpTarget;
use lowvram::weights::WeightLayout;

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    part: String,
    file: PathBuf,
    device: String,
    keep_ram: bool,
    size: usize,
    txt_len: usize,
    steps: usize,
    config: String,
}

fn parse_args() -> BoxResult<Args> {
    let mut a = Args {
        part: String::new(),
        file: PathBuf::new(),
        device: "emulated:4GiB".into(),
        keep_ram: true,
        size: 256,
        txt_len: 512,
        steps: 2,
        config: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--bench" => {}
            "--part" => a.part = v()?,
            "--file" => a.file = v()?.into(),
            "--device" => a.device = v()?,
            "--keep-ram" => a.keep_ram = v()?.parse()?,
            "--size" => a.size = v()?.parse()?,
            "--txt-len" => a.txt_len = v()?.parse()?,
            "--steps" => a.steps = v()?.parse()?,
            "--config" => a.config = v()?.replace("\\n", "\n"),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if !matches!(a.part.as_str(), "flux" | "t5") || a.file.as_os_str().is_empty() {
        return Err("usage: --part flux|t5 --file FILE.gguf [options] (see the doc comment)".into());
    }
    if a.size % 16 != 0 || a.size == 0 {
        return Err("--size must be a positive multiple of 16".into());
    }
    Ok(a)
}

/// Peak resident set of this process (`VmHWM`), bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .map_or(0, |kb: u64| kb * 1024)
}

/// Seeded uniform values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn context(a: &Args) -> BoxResult<Context> {
    let yaml = format!("keep_ram_copy_of_weights: {}\n{}", a.keep_ram, a.config);
    Ok(Context::new(ContextOptions { device: Some(a.device.clone()), config_yaml: Some(yaml), ..Default::default() })?)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn run_flux(a: &Args) -> BoxResult<serde_json::Value> {
    let ctx = context(a)?;
    let cache = ctx.cache();
    let t_load = Instant::now();
    let model = cache.load_model_as(&a.file, "transformer", &WeightLayout::whole(flux_block_of))?;
    let load_ms = ms(t_load);
    let flux = FluxTransformer::new(FluxConfig::dev())?;
    let (h, w) = (a.size / 8, a.size / 8);
    let target = OpTarget::new(&Device::Cpu, cache.compute_dtype());
    let working = flux.working_bytes(1, h, w, a.txt_len, target);
    let latents = Tensor::from_vec(noise(16 * h * w, 1), (1, 16, h, w), &Device::Cpu)?;
    let txt = Tensor::from_vec(noise(a.txt_len * 4096, 2), (1, a.txt_len, 4096), &Device::Cpu)?;
    let pooled = Tensor::from_vec(noise(768, 3), (1, 768), &Device::Cpu)?;
    let guidance = Tensor::new(&[3.5f32], &Device::Cpu)?;
    cache.allocator().reset_peak();
    let refused_before = cache.allocator().refused();
    let lock = cache.lock(&model, working)?;
    let mut steps = Vec::new();
    let mut streamed = Vec::new();
    for _ in 0..a.steps {
        let before = lock.bytes_streamed();
        let t = Instant::now();
        let out = flux.forward(&lock, &latents, 1000.0, &txt, &pooled, Some(&guidance))?;
        let _ = out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        steps.push(ms(t));
        streamed.push(lock.bytes_streamed() - before);
    }
    let resident: u64 = model.blocks().iter().filter(|b| model.resident_blocks().contains(&b.key)).map(|b| b.storage_bytes).sum();
    let stored: u64 = model.blocks().iter().map(|b| b.storage_bytes).sum();
    drop(lock);
    Ok(json!({
        "part": "flux", "file": a.file, "device": a.device, "keep_ram_copy_of_weights": a.keep_ram,
        "size": a.size, "txt_len": a.txt_len, "load_ms": load_ms, "step_ms": steps,
        "bytes_streamed_per_step": streamed, "stored_bytes": stored, "resident_bytes": resident,
        "stored_minus_resident": stored - resident, "units": model.blocks().len(),
        "working_bytes_reserved": working, "peak_device_bytes": cache.allocator().peak(),
        "refused_allocations": cache.allocator().refused() - refused_before, "peak_rss_bytes": peak_rss(),
    }))
}

fn run_t5(a: &Args) -> BoxResult<serde_json::Value> {
    let ctx = context(a)?;
    // The path users take: `--text-encoder-2 FILE` (config from the shapes, vocabulary from the GGUF).
    let t_load = Instant::now();
    let model = ctx.load_t5_file(&a.file)?;
    let load_ms = ms(t_load);
    let ids: Vec<u32> = noise(a.txt_len, 4).iter().map(|v| ((v + 1.0) * 15999.0) as u32).collect();
    let (mut steps, mut reports) = (Vec::new(), Vec::new());
    for _ in 0..a.steps {
        let mut report = RunReport::default();
        let t = Instant::now();
        let out = ctx.encode_ids(&model, &ids, HiddenLayer::Last, None, &mut report)?;
        let _ = out.hidden.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        steps.push(ms(t));
        reports.push(report);
    }
    let last = reports.last().ok_or("--steps must be at least 1")?;
    Ok(json!({
        "part": "t5", "file": a.file, "device": a.device, "keep_ram_copy_of_weights": a.keep_ram,
        "txt_len": a.txt_len, "load_ms": load_ms, "encode_ms": steps,
        "bytes_streamed_per_encode": reports.iter().map(|r| r.bytes_streamed).collect::<Vec<_>>(),
        "stored_bytes": last.model_bytes, "resident_bytes": last.resident_bytes,
        "stored_minus_resident": last.model_bytes - last.resident_bytes,
        "working_bytes_reserved": last.working_bytes, "peak_device_bytes": reports.iter().map(|r| r.peak_device_bytes).max(),
        "refused_allocations": reports.iter().map(|r| r.refused_allocations).sum::<u64>(), "peak_rss_bytes": peak_rss(),
    }))
}

fn main() {
    let result = parse_args().and_then(|a| if a.part == "flux" { run_flux(&a) } else { run_t5(&a) });
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("bench flux: {e}");
            std::process::exit(1);
        }
    }
}
