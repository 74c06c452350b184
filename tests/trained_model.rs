//! The trained tiny model (scripts/train_tiny.py) draws what held-out prompts say, through the public Rust API.
//!
//! Pictures are judged, not compared: measured properties of each generated image (background colour from the
//! border, shape colour and position from the foreground mask, rough form from the mask's bounding-box fill ratio)
//! must match the prompt in ≥ 90 % of seeded generations — at the default configuration, on an `emulated:` device
//! that streams most of the UNet, and with fp16 weight storage. The prompts are colour/shape/background triples held
//! out of training, encoded by the pipeline's own tokenizer and text encoder; they and their expected properties
//! come from `scripts/judge.py --write-fixture` (the same rules as this file's `measure`).

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use lowvram::api::{ComponentPaths, Context, ContextOptions, DenoiseOptions, Pipeline, PromptOptions, Tiling};
use lowvram::models::conditioning::{COND_EMBEDDINGS, UNCOND_EMBEDDINGS};
use lowvram::models::Conditioning;
use lowvram::sampling::SchedulerKind;
use serde_json::Value;

const MODEL: &str = "models/tiny-sd";
const FIXTURE: &str = "tests/fixtures/tiny-sd-trained";
/// Generations judged per configuration: every case of the fixture (10 held-out triples x 5 seeds).
const CASES: usize = 50;
/// The CLI's defaults for the built-in model: 20 Euler steps at guidance 2 (at SD's 7.5 the extrapolation away from
/// the unconditional, rounder prediction pinches the squares' sides: 39-45/50 shapes against 49-50/50 at 2,
/// BENCHMARKS.md, "Trained tiny model").
const STEPS: usize = 20;
const GUIDANCE: f64 = 2.0;
/// Picture side in pixels (the latents are this / the VAE's downscale).
const SIZE: usize = 64;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn context(device: &str, yaml: &str) -> Context {
    Context::new(ContextOptions { device: Some(device.into()), config_yaml: Some(yaml.into()), ..Default::default() })
        .expect("context")
}

/// What the judge expects of one generation, and the palette it names colours with.
struct Case {
    prompt: String,
    colour: String,
    shape: String,
    bg: String,
    pos: String,
}

struct Judge {
    colours: Vec<(String, [f32; 3])>,
    positions: Vec<(String, [f32; 2])>,
    forms: Vec<(String, f32)>,
}

fn load_fixture() -> (Judge, Vec<Case>) {
    let dir = repo().join(FIXTURE);
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let named = |key: &str| meta[key].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v)).collect::<Vec<_>>();
    let judge = Judge {
        colours: named("colours").into_iter().map(|(k, v)| (k, floats(v).try_into().unwrap())).collect(),
        positions: named("positions").into_iter().map(|(k, v)| (k, floats(v).try_into().unwrap())).collect(),
        forms: named("forms").into_iter().map(|(k, v)| (k, v.as_f64().unwrap() as f32)).collect(),
    };
    let text = |c: &Value, k: &str| c[k].as_str().unwrap().to_string();
    let cases = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: text(c, "prompt"),
            colour: text(c, "colour"),
            shape: text(c, "shape"),
            bg: text(c, "bg"),
            pos: text(c, "pos"),
        })
        .collect();
    (judge, cases)
}

/// Measured properties of one picture.
#[derive(Debug)]
struct Measured {
    bg: String,
    colour: Option<String>,
    shape: Option<String>,
    pos: Option<String>,
    fill: f32,
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_rgb(pixels: &[[f32; 3]]) -> [f32; 3] {
    std::array::from_fn(|c| median(pixels.iter().map(|p| p[c]).collect()))
}

impl Judge {
    fn colour_name(&self, rgb: [f32; 3]) -> String {
        let d = |c: &[f32; 3]| (0..3).map(|i| (c[i] - rgb[i]).powi(2)).sum::<f32>();
        self.colours.iter().min_by(|a, b| d(&a.1).total_cmp(&d(&b.1))).unwrap().0.clone()
    }

    /// `img`: `[H][W]` RGB in 0..=255 (as a PNG would hold it).
    fn measure(&self, img: &[Vec<[f32; 3]>]) -> Measured {
        let (h, w) = (img.len(), img[0].len());
        // The border: two rows at the top and bottom, two columns at each side (as scripts/judge.py).
        let mut border = Vec::new();
        for y in [0, 1, h - 2, h - 1] {
            border.extend_from_slice(&img[y]);
        }
        for x in [0, 1, w - 2, w - 1] {
            border.extend((0..h).map(|y| img[y][x]));
        }
        let bg_rgb = median_rgb(&border);
        let mask: Vec<Vec<bool>> = img
            .iter()
            .map(|row| {
                row.iter().map(|p| (0..3).map(|i| (p[i] - bg_rgb[i]).powi(2)).sum::<f32>().sqrt() > 80.0).collect()
            })
            .collect();
        let mut m = Measured { bg: self.colour_name(bg_rgb), colour: None, shape: None, pos: None, fill: 0.0 };
        let on: Vec<(usize, usize)> =
            (0..h).flat_map(|y| (0..w).map(move |x| (y, x))).filter(|&(y, x)| mask[y][x]).collect();
        if on.len() < 40 {
            return m;
        }
        m.colour = Some(self.colour_name(median_rgb(&on.iter().map(|&(y, x)| img[y][x]).collect::<Vec<_>>())));
        let n = on.len() as f32;
        let cx = on.iter().map(|p| p.1 as f32).sum::<f32>() / n + 0.5;
        let cy = on.iter().map(|p| p.0 as f32).sum::<f32>() / n + 0.5;
        let d = |p: &[f32; 2]| (p[0] - cx).powi(2) + (p[1] - cy).powi(2);
        m.pos = Some(self.positions.iter().min_by(|a, b| d(&a.1).total_cmp(&d(&b.1))).unwrap().0.clone());
        // The bounding box of rows/columns holding at least two mask pixels (a stray pixel does not widen it).
        let rows: Vec<usize> = (0..h).filter(|&y| mask[y].iter().filter(|&&b| b).count() >= 2).collect();
        let cols: Vec<usize> = (0..w).filter(|&x| (0..h).filter(|&y| mask[y][x]).count() >= 2).collect();
        if let (Some(r0), Some(r1), Some(c0), Some(c1)) = (rows.first(), rows.last(), cols.first(), cols.last()) {
            m.fill = n / ((r1 - r0 + 1) * (c1 - c0 + 1)) as f32;
            let f = m.fill;
            m.shape =
                Some(self.forms.iter().min_by(|a, b| (a.1 - f).abs().total_cmp(&(b.1 - f).abs())).unwrap().0.clone());
        }
        m
    }
}

/// `[B, 3, H, W]` ≈ [-1, 1] → per image `[H][W]` RGB rounded to 0..=255, as diffusers' postprocess.
fn to_pixels(images: &Tensor) -> Vec<Vec<Vec<[f32; 3]>>> {
    let (b, c, h, w) = images.dims4().unwrap();
    assert_eq!(c, 3);
    let x = images.to_dtype(DType::F32).unwrap().clamp(-1f32, 1f32).unwrap();
    let v = ((x + 1.0).unwrap() * 127.5).unwrap().round().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let at = |i: usize, k: usize, y: usize, x: usize| v[((i * 3 + k) * h + y) * w + x];
    (0..b)
        .map(|i| (0..h).map(|y| (0..w).map(|x| [at(i, 0, y, x), at(i, 1, y, x), at(i, 2, y, x)]).collect()).collect())
        .collect()
}

struct Score {
    n: usize,
    colour: usize,
    shape: usize,
    position: usize,
    all: usize,
    latents: Tensor,
}

/// Encode the first `CASES` held-out prompts with the pipeline's own tokenizer and text encoder, draw them (one
/// batch, seed 0) with `scheduler` on `device` with `yaml`, and judge the pictures.
fn generate_and_judge(name: &str, scheduler: SchedulerKind, device: &str, yaml: &str) -> Score {
    let (judge, cases) = load_fixture();
    let n = CASES.min(cases.len());
    let ctx = context(device, yaml);
    let pipeline = Pipeline::load(&ctx, &repo().join(MODEL), &ComponentPaths::default()).unwrap();
    let f = pipeline.vae().as_vae().unwrap().config().downscale();
    let prompt_options = PromptOptions { batch: 1, image_size: (SIZE, SIZE), clip_skip: 0 };
    let conds: Vec<Conditioning> =
        cases[..n].iter().map(|c| pipeline.encode_prompt(&ctx, &c.prompt, None, &prompt_options).unwrap()).collect();
    let mut cond = Conditioning::new();
    for key in [COND_EMBEDDINGS, UNCOND_EMBEDDINGS] {
        let parts: Vec<&Tensor> = conds.iter().map(|c| c.get(key).unwrap()).collect();
        cond.insert(key, Tensor::cat(&parts, 0).unwrap());
    }
    let options = DenoiseOptions {
        scheduler,
        karras: false,
        steps: STEPS,
        guidance: GUIDANCE,
        seed: 0,
        latent_size: (SIZE / f, SIZE / f),
    };
    let (latents, _) = pipeline.denoise(&ctx, &cond, &options, None, None, &mut |_, _| true).unwrap();
    let (images, _) = pipeline.decode(&ctx, &latents, Tiling::Never).unwrap();
    let pixels = to_pixels(&images);
    let mut s = Score { n, colour: 0, shape: 0, position: 0, all: 0, latents };
    for (case, img) in cases.iter().zip(&pixels) {
        let m = judge.measure(img);
        let colour = m.colour.as_deref() == Some(&case.colour) && m.bg == case.bg;
        let shape = m.shape.as_deref() == Some(&case.shape);
        let position = m.pos.as_deref() == Some(&case.pos);
        s.colour += colour as usize;
        s.shape += shape as usize;
        s.position += position as usize;
        s.all += (colour && shape && position) as usize;
        if !(colour && shape && position) {
            println!("{name}: {:?} drew {m:?}", case.prompt);
        }
    }
    println!(
        "{name}: {n} held-out generations, colour {}/{n}, shape {}/{n}, position {}/{n}, all {}/{n}",
        s.colour, s.shape, s.position, s.all
    );
    s
}

/// Issue 17's goal: colour, shape and position right in ≥ 90 % of the generations.
fn assert_goal(name: &str, s: &Score) {
    let (n, need) = (s.n, (s.n * 9).div_ceil(10));
    assert!(s.colour >= need, "{name}: colours right in {}/{n} (need {need})", s.colour);
    assert!(s.shape >= need, "{name}: shapes right in {}/{n} (need {need})", s.shape);
    assert!(s.position >= need, "{name}: positions right in {}/{n} (need {need})", s.position);
}

/// Default configuration, an `emulated:` device that streams most of the UNet, fp16 weight storage.
#[test]
fn draws_held_out_prompts_at_default_configuration_streamed_and_fp16() {
    let euler = SchedulerKind::Euler;
    let resident = generate_and_judge("cpu", euler, "cpu", "");
    assert_goal("cpu", &resident);
    // Most of the UNet streams through a small cap: partial loading must not change what is drawn (bit for bit).
    let yaml = "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n";
    let streamed = generate_and_judge("emulated", euler, "emulated:64MiB", yaml);
    let diff = (&resident.latents - &streamed.latents).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "streaming changed the latents");
    assert_goal("emulated", &streamed);
    assert_goal("fp16 storage", &generate_and_judge("fp16 storage", euler, "cpu", "storage_dtype: fp16\n"));
}

#[test]
fn every_scheduler_draws_held_out_prompts() {
    // flow_euler integrates a flow-matching model's velocity (FLUX); this model is a v-prediction diffusion model.
    let diffusion = |k: &SchedulerKind| !matches!(k, SchedulerKind::Euler | SchedulerKind::FlowEuler);
    for (kind, name) in SchedulerKind::ALL.into_iter().filter(|(k, _)| diffusion(k)) {
        assert_goal(name, &generate_and_judge(name, kind, "cpu", ""));
    }
}
