//! The `lowvram` command line: generate images, decode latents, and report memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use lowvram::api::{
    write_pngs, ComponentPaths, Context, ContextOptions, DenoiseOptions, Model, Pipeline, PromptOptions, RunReport, Tiling,
};
use lowvram::models::conditioning::{COND_EMBEDDINGS, COND_POOLED};
use lowvram::models::{Conditioning, Family};
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
    /// Encode a prompt into the conditioning tensors generate feeds the denoiser (a safetensors file).
    Encode(EncodeArgs),
    /// Host RAM, CUDA devices, and the backend running this program and why (never fails for lack of a GPU).
    SystemStats {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Where and how to run: shared by generate and decode.
#[derive(Args)]
struct RunArgs {
    /// Pipeline folder in diffusers layout (unet/ or transformer/, vae/, scheduler/, text_encoder/, tokenizer/, ...)
    /// or a single-file checkpoint (SD 1.x/2.x/SDXL, a FLUX.1 BFL or Comfy file, a FLUX transformer .gguf).
    /// Default: the tiny model built into lowvram.
    #[arg(long)]
    model: Option<PathBuf>,
    /// VAE component folder (config.json + weights) or file (FLUX.1's ae.safetensors), overriding the pipeline's
    /// vae/.
    #[arg(long, value_name = "PATH")]
    vae: Option<PathBuf>,
    /// Text encoder component folder (its tokenizer folder beside it), overriding the pipeline's text_encoder/.
    #[arg(long, value_name = "PATH")]
    text_encoder: Option<PathBuf>,
    /// Second text encoder (SDXL's OpenCLIP bigG, FLUX's T5), overriding the pipeline's text_encoder_2/: a folder, or for
    /// FLUX a T5 file (a T5 GGUF, or a t5xxl_*.safetensors with its tokenizer.json in a NAME/ folder beside it).
    #[arg(long, value_name = "PATH")]
    text_encoder_2: Option<PathBuf>,
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

/// The prompt, shared by generate and encode.
#[derive(Args)]
struct PromptArgs {
    /// What to draw (encoded by the pipeline's text encoders).
    #[arg(long)]
    prompt: Option<String>,
    /// What not to draw (the unconditional half of classifier-free guidance).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Layers to skip from the end of the text encoder (diffusers' clip_skip).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
}

#[derive(Args)]
struct EncodeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Image width and height in pixels (SDXL's size conditioning). Default: the UNet's sample_size × 8.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Output safetensors: sampling.cond_embeddings, sampling.uncond_embeddings (and the _pooled pair and
    /// sampling.time_ids where the family takes them), exactly as generate feeds them to the denoiser.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// euler | euler_a | ddim | dpmpp_2m | flow_euler. Default: flow_euler for FLUX, euler otherwise.
    #[arg(long)]
    scheduler: Option<String>,
    /// Karras sigma schedule (euler, dpmpp_2m).
    #[arg(long)]
    karras: bool,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale (SD); for FLUX.1 dev the distilled guidance the model takes as an input (no
    /// second forward), ignored by FLUX.1 schnell. Default: 3.5 for FLUX, 2 for the built-in tiny model, 7.5
    /// otherwise.
    #[arg(long)]
    guidance: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels (multiple of 8; FLUX: of 16). Default: the UNet's sample_size × 8 (FLUX: 1024).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (multiple of 8; FLUX: of 16). Default: the UNet's sample_size × 8 (FLUX: 1024).
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// safetensors with any of sampling.init_noise [B,C,h,w], sampling.step_noise [steps,B,C,h,w], and the
    /// conditioning (sampling.cond_embeddings / sampling.uncond_embeddings [B,S,D]; SDXL: sampling.cond_pooled /
    /// sampling.uncond_pooled [B,P], sampling.time_ids [B,6]); given conditioning replaces the prompt's. FLUX:
    /// sampling.init_noise is the unpacked latent [B,16,h,w], sampling.cond_embeddings the T5 states [B,S,4096],
    /// sampling.cond_pooled CLIP-L's pooled vector [B,768]; when both are given the prompt is not encoded.
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
    lowvram::backend::record(choose_backend());
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
        Command::Encode(args) => encode(args),
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

fn components(run: &RunArgs) -> ComponentPaths {
    ComponentPaths {
        vae: run.vae.clone(),
        text_encoder: run.text_encoder.clone(),
        text_encoder_2: run.text_encoder_2.clone(),
    }
}

/// Pixels per latent along each side: the VAE's downscale (8 for SD and FLUX; the trained tiny model's VAE uses 4).
fn vae_downscale(pipeline: &Pipeline) -> Result<usize> {
    Ok(pipeline.vae().as_vae()?.config().downscale())
}

/// The image size: `--width`/`--height`, else the UNet's sample size times the VAE's downscale (FLUX: 1024,
/// FluxPipeline's default). FLUX packs 2×2 latent pixels into a token: its sizes are multiples of twice the
/// downscale (16 px).
fn image_size(pipeline: &Pipeline, width: Option<usize>, height: Option<usize>) -> Result<(usize, usize)> {
    let f = vae_downscale(pipeline)?;
    let (default_px, multiple) = match pipeline.family() {
        Family::Flux => (1024, 2 * f),
        _ => (pipeline.denoiser().as_unet()?.0.config().sample_size.unwrap_or(64) * f, f),
    };
    let (w, h) = (width.unwrap_or(default_px), height.unwrap_or(default_px));
    if w % multiple != 0 || h % multiple != 0 || w == 0 || h == 0 {
        return Err(Error::invalid(format!(
            "--width {w} --height {h}: both must be positive multiples of {multiple} for {}",
            pipeline.family()
        )));
    }
    Ok((h, w))
}

/// The conditioning: the prompt's (when the pipeline has text encoders or a prompt is given), else zero text
/// embeddings (a pipeline without text encoders and no prompt: the tiny model's old behaviour); tensors from
/// `--inputs` replace what they name.
fn conditioning(
    ctx: &Context,
    pipeline: &Pipeline,
    prompt: &PromptArgs,
    options: &PromptOptions,
    inputs: &mut HashMap<String, Tensor>,
) -> Result<Conditioning> {
    let given: Vec<String> = inputs.keys().filter(|k| k.starts_with("sampling.")).cloned().collect();
    // FLUX's conditioning given whole (T5 states and CLIP pooled): nothing to encode.
    let flux_given = pipeline.family() == Family::Flux
        && [COND_EMBEDDINGS, COND_POOLED].iter().all(|n| given.iter().any(|k| k == n));
    let mut cond = if flux_given {
        Conditioning::new()
    } else if prompt.prompt.is_some() || pipeline.has_text_encoders() {
        let text = prompt.prompt.as_deref().unwrap_or("");
        pipeline.encode_prompt(ctx, text, prompt.negative_prompt.as_deref(), options)?
    } else if given.iter().any(|k| k == COND_EMBEDDINGS) {
        Conditioning::new()
    } else {
        let (unet, _) = pipeline.denoiser().as_unet()?;
        let mut c = Conditioning::new();
        let zeros = Tensor::zeros((options.batch, 77, unet.config().cross_attention_dim), DType::F32, &Device::Cpu)?;
        c.insert(COND_EMBEDDINGS, zeros);
        c
    };
    for name in given {
        if let Some(t) = inputs.remove(&name) {
            cond.insert(name, t);
        }
    }
    Ok(cond)
}

fn generate(args: GenerateArgs) -> Result<()> {
    if let Some(s) = &args.scheduler {
        SchedulerKind::from_str(s)?;
    }
    if args.batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    let dir = pipeline_dir(&args.run)?;
    let ctx = context(&args.run)?;
    let pipeline = Pipeline::load(&ctx, &dir, &components(&args.run))?;
    let flux = pipeline.family() == Family::Flux;
    let scheduler = match &args.scheduler {
        Some(s) => SchedulerKind::from_str(s)?,
        None if flux => SchedulerKind::FlowEuler,
        None => SchedulerKind::Euler,
    };
    let default_guidance = if flux {
        3.5
    } else if args.run.model.is_none() {
        embedded::GUIDANCE
    } else {
        7.5
    };
    let guidance = args.guidance.unwrap_or(default_guidance);

    let mut inputs = match &args.inputs {
        Some(path) => read_tensors(path)?,
        None => HashMap::new(),
    };
    let init_noise = inputs.remove("sampling.init_noise");
    let step_noise = inputs.remove("sampling.step_noise");
    let f = vae_downscale(&pipeline)?;
    let (batch, latent_size) = match &init_noise {
        Some(n) => {
            let (b, _, h, w) = n.dims4()?;
            (b, (h, w))
        }
        None => {
            let (h, w) = image_size(&pipeline, args.width, args.height)?;
            (args.batch, (h / f, w / f))
        }
    };
    let prompt_options = PromptOptions {
        batch,
        image_size: (latent_size.0 * f, latent_size.1 * f),
        clip_skip: args.prompt.clip_skip,
    };
    let cond = conditioning(&ctx, &pipeline, &args.prompt, &prompt_options, &mut inputs)?;
    let options = DenoiseOptions {
        scheduler,
        karras: args.karras,
        steps: args.steps,
        guidance,
        seed: args.seed,
        latent_size,
    };
    let mut bar = StepProgress::new(!args.run.json);
    let mut progress = |step: usize, total: usize| {
        bar.step(step, total);
        true
    };
    let (latents, denoise_report) =
        pipeline.denoise(&ctx, &cond, &options, init_noise.as_ref(), step_noise.as_ref(), &mut progress)?;
    if let Some(path) = &args.latents_out {
        save(path, "latents", &latents)?;
    }
    let (image, decode_report) = pipeline.decode(&ctx, &latents, Tiling::Auto)?;
    let models = [pipeline.denoiser().as_ref(), pipeline.vae().as_ref()];
    finish(&ctx, &models, &image, &args.out, args.image_raw_out.as_deref(), args.run.json, Some(denoise_report), decode_report)
}

fn encode(args: EncodeArgs) -> Result<()> {
    let dir = pipeline_dir(&args.run)?;
    let ctx = context(&args.run)?;
    let pipeline = Pipeline::load(&ctx, &dir, &components(&args.run))?;
    if !pipeline.has_text_encoders() {
        return Err(Error::invalid(format!("{}: this pipeline has no text encoder: pass --text-encoder", dir.display())));
    }
    let options = PromptOptions {
        batch: args.batch,
        image_size: image_size(&pipeline, args.width, args.height)?,
        clip_skip: args.prompt.clip_skip,
    };
    let cond = conditioning(&ctx, &pipeline, &args.prompt, &options, &mut HashMap::new())?;
    let mut map = HashMap::new();
    for (name, t) in cond.iter() {
        map.insert(name.to_string(), t.to_dtype(DType::F32)?.contiguous()?);
    }
    candle_core::safetensors::save(&map, &args.out)
        .map_err(|e| Error::io(&args.out, std::io::Error::other(e.to_string())))?;
    if args.run.json {
        let names: Vec<&String> = map.keys().collect();
        println!("{}", json!({ "out": args.out, "tensors": names, "cache": ctx.stats() }));
    } else {
        eprintln!("lowvram: wrote {}", args.out.display());
    }
    Ok(())
}

fn decode(args: DecodeArgs) -> Result<()> {
    let dir = pipeline_dir(&args.run)?;
    let ctx = context(&args.run)?;
    let vae = ctx.load_model(&args.run.vae.clone().unwrap_or_else(|| dir.join("vae")))?;
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

/// This program's backend: the CPU build re-executes the CUDA build of the CLI, `lowvram-cuda`, installed beside it
/// or in `../libexec/lowvram/`, when the CUDA driver reports a device (`lowvram::backend` has the rules); it returns
/// only when it runs on the CPU itself, with the reason.
#[cfg(not(feature = "cuda"))]
fn choose_backend() -> lowvram::backend::Choice {
    use lowvram::backend::{locate, Choice, Mode, Search, ENV_BACKEND};
    use std::os::unix::process::CommandExt;
    let mode = match Mode::from_env() {
        Ok(m) => m,
        Err(reason) => return Choice::cpu(reason),
    };
    let own = std::env::current_exe().ok();
    let dir = own.as_ref().and_then(|p| p.parent()).map(Path::to_path_buf).unwrap_or_default();
    let search = Search {
        file_name: "lowvram-cuda",
        override_var: None,
        dirs: vec![dir.clone(), dir.join("../libexec/lowvram")],
        own: own.clone(),
    };
    match locate(mode, &search, lowvram::system::cuda_driver) {
        Err(reason) => Choice::cpu(reason),
        Ok(target) => {
            // The child never re-executes (a CPU build installed as lowvram-cuda would loop).
            let err = std::process::Command::new(&target.path)
                .args(std::env::args_os().skip(1))
                .env(ENV_BACKEND, "cpu")
                .exec();
            Choice::cpu(format!("cannot run {}: {err}", target.path.display()))
        }
    }
}

/// The CUDA build of the CLI runs its own work.
#[cfg(feature = "cuda")]
fn choose_backend() -> lowvram::backend::Choice {
    let exe = std::env::current_exe().map_or_else(|_| "lowvram-cuda".into(), |p| p.display().to_string());
    let driver = match lowvram::system::cuda_driver() {
        Ok(d) => format!("driver {}, {} device{}", d.version, d.devices, if d.devices == 1 { "" } else { "s" }),
        Err(reason) => reason,
    };
    lowvram::backend::Choice {
        kind: lowvram::backend::BackendKind::Cuda,
        path: std::env::current_exe().ok(),
        reason: format!("{exe} (the CUDA build), {driver}"),
    }
}

fn system_stats(json: bool) {
    let stats = lowvram::system::system_stats();
    let backend = lowvram::backend::current().expect("main records the backend");
    if json {
        let mut v = serde_json::to_value(&stats).expect("stats serialise");
        v["backend"] = serde_json::to_value(backend).expect("backend serialises");
        println!("{v}");
        return;
    }
    println!("backend: {backend}");
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
