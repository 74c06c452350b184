//! Per-op microbenchmarks at Stable Diffusion 1.5's shapes: lowvram's hot ops (`lowvram::ops`) — attention, conv2d,
//! group norm (+SiLU), layer norm, GEGLU, linear — the same cases as `scripts/bench/torch_ops.py`, so
//! `scripts/bench/compare_ops.sh` can put both side by side in one run.
//!
//! ```text
//! cargo bench --bench ops -- [--threads N] [--repeats R] [--warmup W] [--only PREFIX,PREFIX] [--json]
//!                             [--device cpu|cuda:N] [--dtype f32|f16|bf16]
//! ```
//!
//! Each case: `--warmup` runs (default 1), then `--repeats` timed runs (default 5): median/min/max ms. f32 on the CPU
//! by default; on a GPU (`--device cuda:0`, a `--features cuda` build) each timed call ends with a device
//! synchronise, and memory is the high-water mark of lowvram's own CUDA pool (`device::pool_peak_bytes`) instead.
//! Beside each op, interleaved run by run, the candle composition it replaced (`ops::*_reference`,
//! `ops::attention_with_budget`): the before/after of the own kernels in one run.
//! Memory: a counting global allocator measures, per case, the peak of heap bytes allocated during one call beyond
//! what was live before it (the output included), i.e. the op's transient memory + its output; printed beside the
//! op's own working-memory estimate (`ops::*_scratch_bytes`) + output where the op has one.
//!
//! Cargo.toml needs `[[bench]] name = "ops"`, `harness = false`. `cargo bench` passes `--bench`; it is ignored.

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use lowvram::ops;
use lowvram::ops::OpTarget;

#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Op = Box<dyn Fn() -> lowvram::Result<Tensor>>;

/// One benchmark case: a name shared with torch_ops.py, what it is, the op, and its estimate (transient + output).
struct Case {
    name: String,
    what: String,
    op: Op,
    /// The candle composition the op used before its own kernel (`ops::*_reference`), timed beside it.
    composition: Op,
    estimate: Option<u64>,
}

/// Where the cases run: inputs are made on the CPU in f32 and moved there once.
#[derive(Clone)]
struct Target {
    device: Device,
    dtype: DType,
}

static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();

fn target() -> &'static Target {
    TARGET.get_or_init(|| Target {
        device: Device::Cpu,
        dtype: DType::F32,
    })
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let t = randn_cpu(shape, seed);
    let tg = target();
    t.to_device(&tg.device)
        .and_then(|t| t.to_dtype(tg.dtype))
        .expect("moving a case's input")
}

fn randn_cpu(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic inputs; values do not change the timings.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape")
}

fn bytes(shape: &[usize]) -> u64 {
    (target().dtype.size_in_bytes() * shape.iter().product::<usize>()) as u64
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let op_target = OpTarget::new(&target().device, target().dtype);
    // Attention: q, k, v as [B, N, H·D] (what the linear projections produce).
    for &(name, b, n, nk, h, d) in &[
        ("attn_self_64x64_h8_d40", 2, 4096, 4096, 8, 40),
        ("attn_self_32x32_h8_d80", 2, 1024, 1024, 8, 80),
        ("attn_self_16x16_h8_d160", 2, 256, 256, 8, 160),
        ("attn_cross_64x64_h8_d40", 2, 4096, 77, 8, 40),
        ("attn_vae_512px_d512", 1, 4096, 4096, 1, 512),
        ("attn_vae_256px_d512", 1, 1024, 1024, 1, 512),
    ] {
        let q = randn(&[b, n, h * d], 1);
        let k = randn(&[b, nk, h * d], 2);
        let v = randn(&[b, nk, h * d], 3);
        let scale = 1.0 / (d as f64).sqrt();
        let est = ops::attention_scratch_bytes(b, h, n, nk, d, op_target) + bytes(&[b, n, h * d]);
        out.push(Case {
            name: name.into(),
            what: format!(
                "q [{b},{n},{}] k,v [{b},{nk},{}], {h} heads of {d}",
                h * d,
                h * d
            ),
            op: {
                let (q, k, v) = (q.clone(), k.clone(), v.clone());
                Box::new(move || ops::attention(&q, &k, &v, h, scale, false))
            },
            composition: Box::new(move || {
                ops::attention_with_budget(
                    &q,
                    &k,
                    &v,
                    h,
                    scale,
                    false,
                    ops::ATTENTION_SCRATCH_BYTES,
                )
            }),
            estimate: Some(est),
        });
    }
    // Conv2d (+bias): (name, B, Cin, Cout, H, k, stride).
    for &(name, b, cin, cout, hw, k, s) in &[
        ("conv_unet_320_64x64", 2, 320, 320, 64, 3, 1),
        ("conv_unet_640_32x32", 2, 640, 640, 32, 3, 1),
        ("conv_unet_1280_16x16", 2, 1280, 1280, 16, 3, 1),
        ("conv_unet_1280_8x8", 2, 1280, 1280, 8, 3, 1),
        ("conv_unet_320_64x64_s2", 2, 320, 320, 64, 3, 2),
        ("conv_unet_in_4_320_64x64", 2, 4, 320, 64, 3, 1),
        ("conv_unet_1x1_640_1280_16x16", 2, 640, 1280, 16, 1, 1),
        ("conv_vae_512_64x64", 1, 512, 512, 64, 3, 1),
        ("conv_vae_512_128x128", 1, 512, 512, 128, 3, 1),
        ("conv_vae_512_256x256", 1, 512, 512, 256, 3, 1),
        ("conv_vae_256_512x512", 1, 256, 256, 512, 3, 1),
        ("conv_vae_128_512x512", 1, 128, 128, 512, 3, 1),
        ("conv_vae_out_128_3_512x512", 1, 128, 3, 512, 3, 1),
    ] {
        let x = randn(&[b, cin, hw, hw], 4);
        let w = randn(&[cout, cin, k, k], 5);
        let bias = randn(&[cout], 6);
        let pad = k / 2;
        let oh = (hw + 2 * pad - k) / s + 1;
        let est = ops::conv2d_scratch_bytes(b, cin, cout, oh, oh, k, s, pad, op_target)
            + bytes(&[b, cout, oh, oh]);
        out.push(Case {
            name: name.into(),
            what: format!("x [{b},{cin},{hw},{hw}] w [{cout},{cin},{k},{k}] stride {s} pad {pad}"),
            op: {
                let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
                Box::new(move || ops::conv2d(&x, &w, Some(&bias), s, pad))
            },
            composition: Box::new(move || {
                ops::conv2d::conv2d_reference(&x, &w, Some(&bias), s, pad)
            }),
            estimate: Some(est),
        });
    }
    // Group norm, 32 groups, + SiLU (every resnet's norm1/norm2).
    for &(name, b, c, hw) in &[
        ("gn_silu_2x320x64x64", 2, 320, 64),
        ("gn_silu_2x640x32x32", 2, 640, 32),
        ("gn_silu_2x1280x16x16", 2, 1280, 16),
        ("gn_silu_1x512x256x256", 1, 512, 256),
        ("gn_silu_1x128x512x512", 1, 128, 512),
    ] {
        let x = randn(&[b, c, hw, hw], 7);
        let w = randn(&[c], 8);
        let bias = randn(&[c], 9);
        let est =
            ops::group_norm_scratch_bytes(b * c * hw * hw, op_target) + bytes(&[b, c, hw, hw]);
        out.push(Case {
            name: name.into(),
            what: format!("x [{b},{c},{hw},{hw}], 32 groups, eps 1e-5, SiLU"),
            op: {
                let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
                Box::new(move || ops::group_norm(&x, 32, &w, &bias, 1e-5, true))
            },
            composition: Box::new(move || {
                ops::group_norm::group_norm_reference(&x, 32, &w, &bias, 1e-5, true)
            }),
            estimate: Some(est),
        });
    }
    // Transformer pieces at the 64×64 level (4096 tokens, 320 channels, batch 2).
    {
        let x = randn(&[2, 4096, 320], 10);
        let w = randn(&[320], 11);
        let bias = randn(&[320], 12);
        out.push(Case {
            name: "layer_norm_2x4096x320".into(),
            what: "x [2,4096,320], eps 1e-5".into(),
            op: {
                let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
                Box::new(move || ops::layer_norm(&x, &w, &bias, 1e-5))
            },
            composition: Box::new(move || {
                ops::layer_norm::layer_norm_reference(&x, &w, &bias, 1e-5)
            }),
            estimate: None,
        });
    }
    {
        let x = randn(&[2, 4096, 320], 13);
        let w = randn(&[2560, 320], 14);
        let bias = randn(&[2560], 15);
        out.push(Case {
            name: "geglu_2x4096x320_to_1280".into(),
            what: "x [2,4096,320], proj [2560,320] + bias, value·gelu(gate) → [2,4096,1280]".into(),
            op: {
                let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
                Box::new(move || ops::geglu(&x, &w, Some(&bias)))
            },
            composition: Box::new(move || ops::geglu::geglu_reference(&x, &w, Some(&bias))),
            estimate: None,
        });
    }
    for &(name, rows, inp, outf) in &[
        ("linear_8192x320_to_320", 8192, 320, 320),
        ("linear_154x768_to_320", 154, 768, 320),
    ] {
        let x = randn(&[rows, inp], 16);
        let w = randn(&[outf, inp], 17);
        let bias = randn(&[outf], 18);
        out.push(Case {
            name: name.into(),
            what: format!("x [{rows},{inp}] w [{outf},{inp}] + bias"),
            op: {
                let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
                Box::new(move || ops::linear(&x, &w, Some(&bias)))
            },
            composition: Box::new(move || ops::linear::linear_reference(&x, &w, Some(&bias))),
            estimate: None,
        });
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> BoxResult<()> {
    let mut threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (mut repeats, mut warmup, mut json_out) = (5usize, 1usize, false);
    let mut only: Vec<String> = Vec::new();
    let (mut device_name, mut dtype_name) = ("cpu".to_string(), "f32".to_string());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--threads" => threads = val().parse()?,
            "--repeats" | "-r" => repeats = val().parse()?,
            "--warmup" => warmup = val().parse()?,
            "--only" => {
                only = val()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "--json" => json_out = true,
            "--device" => device_name = val(),
            "--dtype" => dtype_name = val(),
            "--bench" => {}
            other => {
                eprintln!(
                    "usage: cargo bench --bench ops -- [--threads N] [--repeats R] [--warmup W] [--only PREFIX,..] [--json] \
                     [--device cpu|cuda:N] [--dtype f32|f16|bf16]"
                );
                return Err(format!("unknown argument {other}").into());
            }
        }
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    // On a GPU the device is a lowvram allocator's, with its memory pool current for the whole run: the ops'
    // allocations come from that pool, whose high-water mark measures them (the default pool is left alone).
    let alloc = match device_name.as_str() {
        "cpu" => None,
        d => match d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Some(lowvram::device::DeviceAllocator::new(&lowvram::device::DeviceSpec::Cuda(n))?),
            None => return Err(format!("--device {d}: expected cpu or cuda:N").into()),
        },
    };
    let _route = alloc.as_ref().map(|a| a.route_pool()).transpose()?;
    let device = alloc.as_ref().map_or(Device::Cpu, |a| a.device().clone());
    let dtype = match dtype_name.as_str() {
        "f32" | "fp32" => DType::F32,
        "f16" | "fp16" => DType::F16,
        "bf16" => DType::BF16,
        d => return Err(format!("--dtype {d}: expected f32, f16 or bf16").into()),
    };
    let gpu = device.is_cuda();
    let _ = TARGET.set(Target {
        device: device.clone(),
        dtype,
    });
    let sync = |y: Tensor| -> lowvram::Result<Tensor> {
        y.device().synchronize()?;
        Ok(y)
    };
    let mut results = serde_json::Map::new();
    for case in cases() {
        if !only.is_empty() && !only.iter().any(|p| case.name.starts_with(p.as_str())) {
            continue;
        }
        for _ in 0..warmup {
            drop(sync((case.op)()?)?);
        }
        // Memory: one call, peak live bytes above the level before it (host heap; on a GPU the CUDA pool's).
        let (y, peak) = if gpu {
            let a = alloc.as_ref().expect("a GPU run has an allocator");
            lowvram::device::pool_peak_reset(a)?;
            let before = lowvram::device::pool_peak_bytes(a)?.map_or(0, |(used, _)| used);
            let y = sync((case.op)()?)?;
            let high = lowvram::device::pool_peak_bytes(a)?.map_or(0, |(_, high)| high);
            (y, high.saturating_sub(before))
        } else {
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let y = (case.op)()?;
            (
                y,
                PEAK.load(Ordering::Relaxed).saturating_sub(before) as u64,
            )
        };
        let out_bytes = (y.elem_count() * y.dtype().size_in_bytes()) as u64;
        drop(y);
        // Kernel and composition interleaved, so drift on the machine falls on both.
        for _ in 0..warmup {
            drop(sync((case.composition)()?)?);
        }
        let mut runs = Vec::with_capacity(repeats);
        let mut comp_runs = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let t = Instant::now();
            let y = sync((case.op)()?)?;
            runs.push(t.elapsed().as_secs_f64() * 1e3);
            drop(y);
            let t = Instant::now();
            let y = sync((case.composition)()?)?;
            comp_runs.push(t.elapsed().as_secs_f64() * 1e3);
            drop(y);
        }
        let comp_med = median(&mut comp_runs.clone());
        let runs_sorted = {
            let mut r = runs.clone();
            r.sort_by(|a, b| a.total_cmp(b));
            r
        };
        let med = median(&mut runs.clone());
        let line = format!(
            "{:<30} {:>10.2} ms  (min {:.2}, max {:.2})  composition {:>10.2} ms  peak {:>8.1} MiB (output {:.1}){}",
            case.name,
            med,
            runs_sorted[0],
            runs_sorted[runs_sorted.len() - 1],
            comp_med,
            peak as f64 / 1048576.0,
            out_bytes as f64 / 1048576.0,
            case.estimate.map(|e| format!("  estimate {:.1} MiB", e as f64 / 1048576.0)).unwrap_or_default()
        );
        if json_out {
            eprintln!("{line}")
        } else {
            println!("{line}")
        }
        results.insert(
            case.name.clone(),
            json!({
                "what": case.what,
                "median_ms": med,
                "runs_ms": runs,
                "composition_median_ms": comp_med,
                "composition_runs_ms": comp_runs,
                "peak_bytes": peak,
                "output_bytes": out_bytes,
                "estimate_bytes": case.estimate,
            }),
        );
    }
    if json_out {
        let v: Value = json!({"impl": "lowvram", "lowvram": lowvram::VERSION, "threads": threads, "repeats": repeats,
                              "warmup": warmup, "dtype": dtype_name, "device": device_name,
                              "cases": results});
        println!("{v}");
    }
    Ok(())
}
