//! The `lowvram` command line: generate images, decode latents, and report memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use lowvram::api::{write_pngs, Context, ContextOptions, DenoiseOptions, Model, RunReport, Tiling};
use lowvram::sampling::SchedulerKind;
use lowvram::{Error, Result};
use serde_json::json;

mod embedded;

#[derive(Parser)]
#[command(name = "lowvram", version, about = "Run diffusion models on GPUs too small to hold them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image: denoise with a UNet, decode with the VAE, write a PNG.
    Generate(GenerateArgs),
    /// Decode saved latents with a pipeline's VAE.
    Decode(DecodeArgs),
    /// Host RAM and CUDA devices (never fails for lack of a GPU).
    SystemStats {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Where and how to run: shared by generate and decode.
#[derive(Args)]
struct RunArgs {
    /// Pipeline folder in diffusers layout (unet/, vae/, scheduler/). Default: the tiny model built into lowvram.
    #[arg(long)]
    model: Option<PathBuf>,
    /// auto | cpu | cuda:N | emulated:SIZE (a CPU-backed device with a hard capacity, e.g. emulated:256MiB).
    #[arg(long)]
    device: Option<String>,
    /// Cap on the device cache (max_cache_vram_gb), as a size: 3.5GiB, 512MiB, 100MB, 1048576.
    #[arg(long, value_name = "SIZE")]
    vram_budget: Option<String>,
    /// YAML configuration file (keys in README.md).
    #[arg(long, value_name = "FILE.yaml")]
    config: Option<PathBuf>,
    /// Print one JSON object with timings and memory figures.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    /// euler | euler_a | ddim | dpmpp_2m
    #[arg(long, default_value = "euler")]
    scheduler: String,
    /// Karras sigma schedule (euler, dpmpp_2m).
    #[arg(long)]
    karras: bool,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels (multiple of 8). Default: the UNet's sample_size × 8.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (multiple of 8). Default: the UNet's sample_size × 8.
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// safetensors with sampling.init_noise [B,4,h,w], sampling.cond_embeddings and sampling.uncond_embeddings
    /// [B,77,D], optionally sampling.step_noise [steps,B,4,h,w].
    #[arg(long, value_name = "FILE.safetensors")]
    inputs: Option<PathBuf>,
    /// Output PNG (a batch writes NAME-0.png, NAME-1.png, ...).
    #[arg(long, value_name = "IMAGE.png")]
    out: PathBuf,
    /// Write the final latents (tensor `latents`, before dividing by the VAE scaling factor).
    #[arg(long, value_name = "FILE.safetensors")]
    latents_out: Option<PathBuf>,
    /// Write the raw decoder output (tensor `image` [B,3,H,W], unclamped, f32).
    #[arg(long, value_name = "FILE.safetensors")]
    image_raw_out: Option<PathBuf>,
}

#[derive(Args)]
struct DecodeArgs {
    #[command(flatten)]
    run: RunArgs,
    /// safetensors with a tensor `latents` [B,4,h,w] (as generate --latents-out writes it).
    #[arg(long, value_name = "FILE.safetensors")]
    latents: PathBuf,
    #[arg(long, value_name = "IMAGE.png")]
    out: PathBuf,
    #[arg(long, value_name = "FILE.safetensors")]
    image_raw_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lowvram: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Decode(args) => decode(args),
        Command::SystemStats { json } => {
            system_stats(json);
            Ok(())
        }
    }
}

fn context(run: &RunArgs) -> Result<Context> {
    let mut yaml = String::new();
    if let Some(budget) = &run.vram_budget {
        let bytes = lowvram::config::parse_size(budget)
            .map_err(|e| Error::invalid(format!("--vram-budget {budget}: {e}")))?;
        yaml.push_str(&format!("max_cache_vram_gb: {}\n", bytes as f64 / (1u64 << 30) as f64));
    }
    let ctx = Context::new(ContextOptions {
        device: run.device.clone(),
        config_yaml: (!yaml.is_empty()).then_some(yaml),
        config_path: run.config.clone(),
        log: None,
    })?;
    if !run.json {
        for line in ctx.cache().sizing().log {
            eprintln!("lowvram: {line}");
        }
    }
    Ok(ctx)
}

fn pipeline_dir(run: &RunArgs) -> Result<PathBuf> {
    match &run.model {
        Some(dir) => Ok(dir.clone()),
        None => embedded::tiny_sd_dir(),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let scheduler = SchedulerKind::from_str(&args.scheduler)?;
    if args.batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    let dir = pipeline_dir(&args.run)?;
    let ctx = context(&args.run)?;
    let unet = ctx.load_model(&dir.join("unet"))?;
    let vae = ctx.load_model(&dir.join("vae"))?;
    let (unet_model, _) = unet.as_unet()?;
    let cfg = unet_model.config();

    let mut inputs = match &args.inputs {
        Some(path) => read_tensors(path)?,
        None => HashMap::new(),
    };
    let init_noise = inputs.remove("sampling.init_noise");
    let step_noise = inputs.remove("sampling.step_noise");
    let (batch, latent_size) = match &init_noise {
        Some(n) => {
            let (b, _, h, w) = n.dims4()?;
            (b, (h, w))
        }
        None => {
            let default_px = cfg.sample_size.unwrap_or(64) * 8;
            let (w, h) = (args.width.unwrap_or(default_px), args.height.unwrap_or(default_px));
            if w % 8 != 0 || h % 8 != 0 || w == 0 || h == 0 {
                return Err(Error::invalid(format!("--width {w} --height {h}: both must be positive multiples of 8")));
            }
            (args.batch, (h / 8, w / 8))
        }
    };
    let cond = match inputs.remove("sampling.cond_embeddings") {
        Some(c) => c,
        None => Tensor::zeros((batch, 77, cfg.cross_attention_dim), DType::F32, &Device::Cpu)?,
    };
    let uncond = inputs.remove("sampling.uncond_embeddings");
    let options = DenoiseOptions {
        scheduler,
        karras: args.karras,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        latent_size,
    };
    let mut bar = StepProgress::new(!args.run.json);
    let mut progress = |step: usize, total: usize| {
        bar.step(step, total);
        true
    };
    let (latents, denoise_report) = ctx.denoise(
        &unet,
        &options,
        &cond,
        uncond.as_ref(),
        init_noise.as_ref(),
        step_noise.as_ref(),
        &mut progress,
    )?;
    if let Some(path) = &args.latents_out {
        save(path, "latents", &latents)?;
    }
    let (image, decode_report) = ctx.vae_decode(&vae, &latents, Tiling::Auto)?;
    finish(&ctx, &[&unet, &vae], &image, &args.out, args.image_raw_out.as_deref(), args.run.json, Some(denoise_report), decode_report)
}

fn decode(args: DecodeArgs) -> Result<()> {
    let dir = pipeline_dir(&args.run)?;
    let ctx = context(&args.run)?;
    let vae = ctx.load_model(&dir.join("vae"))?;
    let mut tensors = read_tensors(&args.latents)?;
    let latents = tensors
        .remove("latents")
        .ok_or_else(|| Error::format(format!("{}: no tensor named `latents`", args.latents.display())))?;
    let (image, report) = ctx.vae_decode(&vae, &latents, Tiling::Auto)?;
    finish(&ctx, &[&vae], &image, &args.out, args.image_raw_out.as_deref(), args.run.json, None, report)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &Context,
    models: &[&Model],
    image: &Tensor,
    out: &Path,
    raw_out: Option<&Path>,
    json: bool,
    denoise: Option<RunReport>,
    decode: RunReport,
) -> Result<()> {
    if let Some(path) = raw_out {
        save(path, "image", image)?;
    }
    let written = write_pngs(image, out)?;
    if json {
        let model_bytes: u64 = models.iter().map(|m| m.weights().total_bytes()).sum();
        let resident: u64 = models.iter().map(|m| m.weights().resident_bytes()).sum();
        let runs: Vec<&RunReport> = denoise.iter().chain(std::iter::once(&decode)).collect();
        let report = json!({
            "images": written,
            "denoise": denoise,
            "decode": decode,
            "timings_ms": {
                "denoise": denoise.as_ref().map(|r| r.total_ms),
                "steps": denoise.as_ref().map(|r| r.step_ms.clone()),
                "decode": decode.total_ms,
            },
            "peak_device_bytes": runs.iter().map(|r| r.peak_device_bytes).max(),
            "bytes_streamed": runs.iter().map(|r| r.bytes_streamed).sum::<u64>(),
            "resident_bytes": resident,
            "model_bytes": model_bytes,
            "cache": ctx.stats(),
        });
        println!("{report}");
    } else {
        for p in written {
            eprintln!("lowvram: wrote {}", p.display());
        }
    }
    Ok(())
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::format(format!("{}: {e}", path.display())))
}

fn save(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let map = HashMap::from([(name.to_string(), t.to_dtype(DType::F32)?.contiguous()?)]);
    candle_core::safetensors::save(&map, path).map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
}

fn system_stats(json: bool) {
    let stats = lowvram::system::system_stats();
    if json {
        println!("{}", serde_json::to_string(&stats).expect("stats serialise"));
        return;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("RAM: {:.2} GiB total, {:.2} GiB free", gib(stats.ram.total_bytes), gib(stats.ram.free_bytes));
    if stats.cuda.available {
        for d in &stats.devices {
            println!("cuda:{} {}: {:.2} GiB total, {:.2} GiB free", d.index, d.name, gib(d.total_bytes), gib(d.free_bytes));
        }
    } else {
        println!("CUDA: unavailable ({})", stats.cuda.reason);
    }
}

/// The denoise progress on stderr: a bar with the rate and the time left when stderr is a terminal, else one
/// complete line per step (logs and CI capture stay readable).
struct StepProgress {
    enabled: bool,
    terminal: bool,
    start: std::time::Instant,
}

impl StepProgress {
    fn new(enabled: bool) -> Self {
        use std::io::IsTerminal;
        Self { enabled, terminal: std::io::stderr().is_terminal(), start: std::time::Instant::now() }
    }

    fn step(&mut self, step: usize, total: usize) {
        if !self.enabled {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 { step as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 { total.saturating_sub(step) as f64 / rate } else { 0.0 };
        let line = progress_line(step, total, rate, eta, self.terminal);
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            if step == total {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
    }
}

/// `lowvram: [########------------] 8/20 2.41 it/s ETA 5.0 s` (terminal) or `lowvram: step 8/20 (2.41 it/s, ETA 5.0 s)`.
fn progress_line(step: usize, total: usize, rate: f64, eta_s: f64, bar: bool) -> String {
    const WIDTH: usize = 24;
    if bar {
        let filled = (step * WIDTH).checked_div(total).unwrap_or(WIDTH).min(WIDTH);
        format!(
            "lowvram: [{}{}] {step}/{total} {rate:.2} it/s ETA {eta_s:.1} s",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled)
        )
    } else {
        format!("lowvram: step {step}/{total} ({rate:.2} it/s, ETA {eta_s:.1} s)")
    }
}
