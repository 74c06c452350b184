//! Timing of the kernels against the candle compositions they replace (run by hand:
//! `RAYON_NUM_THREADS=2 cargo test --release --lib ops::cpu::timing -- --ignored --nocapture`). Alternatives run
//! interleaved in one process; medians of several repetitions.

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::ops;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Run the closures interleaved `reps` times (after one warm-up each); print their medians in ms, the ratios to the
/// first, and the minima.
fn compare(name: &str, reps: usize, fs: &mut [(&str, &mut dyn FnMut() -> Tensor)]) {
    for (_, f) in fs.iter_mut() {
        drop(f());
    }
    let mut times = vec![Vec::new(); fs.len()];
    for _ in 0..reps {
        for (i, (_, f)) in fs.iter_mut().enumerate() {
            let t = Instant::now();
            let y = f();
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
            drop(y);
        }
    }
    let mins: Vec<f64> = times.iter().map(|t| t.iter().cloned().fold(f64::INFINITY, f64::min)).collect();
    let meds: Vec<f64> = times.into_iter().map(median).collect();
    let cols: Vec<String> = fs
        .iter()
        .zip(meds.iter().zip(&mins))
        .map(|((n, _), (m, lo))| format!("{n} {m:8.3} ms ({:.2}x, min {lo:.3})", m / meds[0]))
        .collect();
    println!("{name:<40} {}", cols.join("  "));
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
#[ignore]
fn timing_table() {
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    println!("rayon threads {}", super::threads());
    for shape in [[2usize, 320, 64, 64], [2, 640, 32, 32], [2, 1280, 16, 16], [1, 512, 256, 256], [1, 128, 512, 512]] {
        let (x, w, b) = (randn(&shape), randn(&shape[1..2]), randn(&shape[1..2]));
        compare(&format!("group_norm+silu {shape:?}"), reps, &mut [
            ("old", &mut || ops::group_norm::group_norm_reference(&x, 32, &w, &b, 1e-6, true).unwrap()),
            ("new", &mut || ops::group_norm(&x, 32, &w, &b, 1e-6, true).unwrap()),
        ]);
        compare(&format!("group_norm {shape:?}"), reps, &mut [
            ("old", &mut || ops::group_norm::group_norm_reference(&x, 32, &w, &b, 1e-6, false).unwrap()),
            ("new", &mut || ops::group_norm(&x, 32, &w, &b, 1e-6, false).unwrap()),
        ]);
    }
    let x = randn(&[2, 4096, 320]);
    let (w, b) = (randn(&[320]), randn(&[320]));
    compare("layer_norm [2,4096,320]", reps, &mut [
        ("old", &mut || ops::layer_norm::layer_norm_reference(&x, &w, &b, 1e-5).unwrap()),
        ("new", &mut || ops::layer_norm(&x, &w, &b, 1e-5).unwrap()),
    ]);
    let (gw, gb) = ((randn(&[2560, 320]) * 0.05).unwrap(), randn(&[2560]));
    compare("geglu [2,4096,320]->2560->1280", reps, &mut [
        ("old", &mut || ops::geglu::geglu_reference(&x, &gw, Some(&gb)).unwrap()),
        ("new", &mut || ops::geglu(&x, &gw, Some(&gb)).unwrap()),
    ]);
    let (lw, lb) = ((randn(&[320, 320]) * 0.05).unwrap(), randn(&[320]));
    let x2 = x.reshape((8192, 320)).unwrap();
    compare("linear [8192,320]->320", reps, &mut [
        ("old", &mut || ops::linear::linear_reference(&x2, &lw, Some(&lb)).unwrap()),
        ("new", &mut || ops::linear(&x2, &lw, Some(&lb)).unwrap()),
        ("nobias", &mut || ops::linear(&x2, &lw, None).unwrap()),
    ]);
    let (x3, lw3) = (randn(&[154, 768]), (randn(&[320, 768]) * 0.05).unwrap());
    compare("linear [154,768]->320", reps, &mut [
        ("old", &mut || ops::linear::linear_reference(&x3, &lw3, Some(&lb)).unwrap()),
        ("new", &mut || ops::linear(&x3, &lw3, Some(&lb)).unwrap()),
        ("nobias", &mut || ops::linear(&x3, &lw3, None).unwrap()),
    ]);
    for shape in [[2usize, 320, 64, 64], [1, 128, 512, 512]] {
        let (a, bb) = (randn(&shape), randn(&shape));
        let bc = randn(&[shape[0], shape[1], 1, 1]);
        let (av, bv) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), bb.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        compare(&format!("add {shape:?}"), reps, &mut [
            ("candle", &mut || (&a + &bb).unwrap()),
            ("own", &mut || t(&shape, super::elementwise::add(&av, &bv))),
        ]);
        compare(&format!("broadcast_add [B,C,1,1] {shape:?}"), reps, &mut [("candle", &mut || a.broadcast_add(&bc).unwrap())]);
        compare(&format!("silu {shape:?}"), reps, &mut [
            ("candle", &mut || a.silu().unwrap()),
            ("own", &mut || t(&shape, super::elementwise::silu_all(&av))),
        ]);
        let half = [shape[0], shape[1], shape[2] / 2, shape[3] / 2];
        let u = randn(&half);
        let uv = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        compare(&format!("upsample_nearest2x {half:?}"), reps, &mut [
            ("candle", &mut || u.upsample_nearest2d(shape[2], shape[3]).unwrap()),
            ("own", &mut || t(&shape, super::elementwise::upsample_nearest2x(&uv, half[0] * half[1], half[2], half[3]))),
        ]);
    }
}


/// Process CPU seconds (user + system) so far: a yardstick that a loaded machine disturbs less than wall time.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The 3×3 convs of the SD 1.5 UNet at 64×64 latents (batch 2) through im2col and through Winograd with several
/// tiles per block: wall and CPU ms, medians, interleaved.
#[test]
#[ignore]
fn winograd_block_sweep() {
    use super::conv2d::{conv2d_tiled, Geom, Tiling};
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let only = std::env::var("ONLY").unwrap_or_default();
    println!("rayon threads {}", super::threads());
    let shapes = [
        (320, 320, 64),
        (640, 320, 64),
        (960, 320, 64),
        (640, 640, 64),
        (640, 640, 32),
        (1280, 640, 32),
        (1920, 640, 32),
        (1280, 1280, 32),
        (1280, 1280, 16),
        (2560, 1280, 16),
        (1280, 1280, 8),
    ];
    for (cin, cout, hw) in shapes {
        if !only.is_empty() && !only.split(',').any(|o| o == format!("{cin}x{cout}@{hw}")) {
            continue;
        }
        let x = randn(&[2, cin, hw, hw]);
        let w = (randn(&[cout, cin, 3, 3]) * 0.02).unwrap();
        let b = randn(&[cout]);
        let g = Geom::new(x.dims4().unwrap(), w.dims4().unwrap(), 1, 1).unwrap();
        let base = Tiling::for_geom(&g);
        let mut variants: Vec<(String, Tiling)> =
            vec![(format!("default(w{})", base.winograd), base), ("im2col".into(), Tiling { winograd: 0, ..base })];
        for t in [48usize, 96, 128, 192, 256] {
            variants.push((format!("w{t}"), Tiling { winograd: t, ..base }));
        }
        let mut wall = vec![Vec::new(); variants.len()];
        let mut cpu = vec![Vec::new(); variants.len()];
        for (_, t) in &variants {
            drop(conv2d_tiled(&x, &w, Some(&b), &g, *t).unwrap());
        }
        for _ in 0..reps {
            for (i, (_, t)) in variants.iter().enumerate() {
                let (c0, t0) = (cpu_seconds(), Instant::now());
                let y = conv2d_tiled(&x, &w, Some(&b), &g, *t).unwrap();
                wall[i].push(t0.elapsed().as_secs_f64() * 1e3);
                cpu[i].push((cpu_seconds() - c0) * 1e3);
                drop(y);
            }
        }
        let cols: Vec<String> = variants
            .iter()
            .zip(wall.into_iter().zip(cpu))
            .map(|((n, _), (w, c))| format!("{n} {:.0}/{:.0}", median(w), median(c)))
            .collect();
        println!("conv {cin}->{cout} @{hw} (wall/cpu ms): {}", cols.join("  "));
    }
}
