//! The `lowvram` command line as scripts drive it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn lowvram() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lowvram"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowvram-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `lowvram ARGS`, then `FLAG DIR/NAME` for each file (outputs, or inputs an earlier run wrote there).
fn lowvram_to(dir: &Path, args: &[&str], files: &[(&str, &str)]) -> Command {
    let mut cmd = lowvram();
    cmd.args(args);
    for (flag, name) in files {
        cmd.arg(flag).arg(dir.join(name));
    }
    cmd
}

/// The same on the random tiny SD model (`--model tests/fixtures/tiny-sd-random`).
fn on_tiny_random(dir: &Path, args: &[&str], files: &[(&str, &str)]) -> Command {
    let mut cmd = lowvram_to(dir, args, files);
    cmd.arg("--model").arg(repo().join("tests/fixtures/tiny-sd-random"));
    cmd
}

/// Runs it and asserts that it succeeded, showing its stderr otherwise.
fn succeeds(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", err_text(&out));
    out
}

fn err_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[cfg_attr(feature = "cuda", allow(dead_code))] // its users are CPU-build tests
fn out_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn load(path: impl AsRef<Path>) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_err(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn generate_with_inputs_matches_diffusers_and_reports_json() {
    let dir = out_dir("gen");
    let inputs = repo().join("tests/fixtures/tiny-sd/sample_dpmpp_2m_karras.safetensors");
    let outputs =
        [("--out", "img.png"), ("--latents-out", "latents.safetensors"), ("--image-raw-out", "image.safetensors")];
    let out = succeeds(
        on_tiny_random(
            &dir,
            &["generate", "--scheduler", "dpmpp_2m", "--karras", "--steps", "8", "--guidance", "7.5"],
            &outputs,
        )
        .args(["--device", "emulated:64MiB", "--vram-budget", "1MiB", "--json"])
        .arg("--config")
        .arg(repo().join("tests/data/small-working-memory.yaml"))
        .arg("--inputs")
        .arg(&inputs),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let model_bytes = report["model_bytes"].as_u64().unwrap();
    let streamed = report["bytes_streamed"].as_u64().unwrap();
    assert!(streamed > 0 && report["resident_bytes"].as_u64().unwrap() <= 1 << 20, "{report}");
    assert!(report["peak_device_bytes"].as_u64().unwrap() <= 64 << 20);
    assert_eq!(report["timings_ms"]["steps"].as_array().unwrap().len(), 8);
    assert!(model_bytes > 2_000_000);

    let reference = load(&inputs);
    let got = load(dir.join("latents.safetensors"));
    let image = load(dir.join("image.safetensors"));
    assert!(max_abs_err(&got["latents"], &reference["latents"]) <= 1e-3);
    assert!(max_abs_err(&image["image"], &reference["image"]) <= 1e-3);
    let png = std::fs::read(dir.join("img.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // decode the saved latents again with the decode command: same image
    let files =
        [("--latents", "latents.safetensors"), ("--out", "decoded.png"), ("--image-raw-out", "decoded.safetensors")];
    succeeds(&mut on_tiny_random(&dir, &["decode"], &files));
    let decoded = load(dir.join("decoded.safetensors"));
    assert_eq!(max_abs_err(&decoded["image"], &image["image"]), 0.0);
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let cases: [(&[&str], &str); 5] = [
        (&["generate", "--out", "x.png", "--scheduler", "heun"], "accepted: euler, euler_a, ddim, dpmpp_2m"),
        (&["generate", "--out", "x.png", "--device", "tpu:0"], "device"),
        (&["generate", "--out", "x.png", "--vram-budget", "lots"], "--vram-budget lots"),
        // The built-in model's VAE downscales by 4 (SD's by 8): the size must be a multiple of that.
        (&["generate", "--out", "x.png", "--width", "102"], "positive multiples of 4"),
        (&["generate", "--out", "x.png", "--model", "/nonexistent"], "/nonexistent"),
    ];
    for (args, needle) in cases {
        let out = lowvram().args(args).output().unwrap();
        let stderr = err_text(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(needle), "{args:?}: stderr lacks {needle:?}: {stderr}");
    }
    let out = lowvram().args(["generate"]).output().unwrap();
    assert!(!out.status.success() && err_text(&out).contains("--out"));
}

#[test]
fn system_stats_json_has_the_documented_shape() {
    let out = succeeds(lowvram().args(["system-stats", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ram"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(v["ram"]["free_bytes"].as_u64().is_some());
    assert!(v["devices"].is_array());
    let available = v["cuda"]["available"].as_bool().unwrap();
    assert!(available || !v["cuda"]["reason"].as_str().unwrap().is_empty());
    if !available {
        assert_eq!(v["devices"].as_array().unwrap().len(), 0);
    }
    let kind = v["backend"]["kind"].as_str().unwrap();
    assert!(kind == "cpu" || kind == "cuda", "{v}");
    assert!(!v["backend"]["reason"].as_str().unwrap().is_empty(), "{v}");
    if !available && std::env::var_os("LOWVRAM_BACKEND").is_none() && cfg!(not(feature = "cuda")) {
        // No driver: the CPU runs it, and the driver probe's reason is why.
        assert_eq!(kind, "cpu");
        assert_eq!(v["backend"]["reason"], v["cuda"]["reason"]);
    }
}

/// `LOWVRAM_BACKEND=cpu` keeps the CLI on the CPU and says so; `--device cuda` then fails with that reason.
#[test]
#[cfg(not(feature = "cuda"))] // the CUDA build of the CLI runs its own work
fn the_backend_and_its_reason_are_printed_and_explain_device_cuda() {
    let stdout = out_text(&succeeds(lowvram().env("LOWVRAM_BACKEND", "cpu").arg("system-stats")));
    assert_eq!(stdout.lines().next(), Some("backend: cpu — LOWVRAM_BACKEND=cpu"), "{stdout}");
    let out = lowvram().env("LOWVRAM_BACKEND", "bogus").arg("system-stats").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("backend: cpu — LOWVRAM_BACKEND=bogus is not one of auto, cpu, cuda, library"),
        "{stdout}"
    );

    let dir = out_dir("device-cuda");
    let args = ["generate", "--steps", "1", "--device", "cuda", "--width", "64", "--height", "64"];
    let out = on_tiny_random(&dir, &args, &[("--out", "img.png")]).env("LOWVRAM_BACKEND", "cpu").output().unwrap();
    let stderr = err_text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("device cuda:0: this build has no CUDA support"), "{stderr}");
    assert!(stderr.contains("backend cpu — LOWVRAM_BACKEND=cpu"), "{stderr}");
}

/// A stand-in NVIDIA driver reporting one device (tests/c/fake_libcuda.c), in a folder for LD_LIBRARY_PATH.
#[cfg(not(feature = "cuda"))]
fn fake_driver(dir: &std::path::Path) -> PathBuf {
    let lib_dir = dir.join("fake-driver");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(lib_dir.join("libcuda.so.1"))
        .arg(repo().join("tests/c/fake_libcuda.c"))
        .status()
        .expect("gcc runs");
    assert!(status.success());
    lib_dir
}

/// With a driver that reports a device, the CPU build of the CLI re-executes `lowvram-cuda` from beside it or from
/// `../libexec/lowvram/`, with the same arguments and `LOWVRAM_BACKEND=cpu` (so a child never re-executes); without
/// one installed it runs on the CPU and says where it looked.
#[test]
#[cfg(not(feature = "cuda"))] // the CUDA build of the CLI runs its own work
fn with_a_driver_the_cli_re_executes_lowvram_cuda() {
    let dir = out_dir("reexec");
    let driver = fake_driver(&dir);
    let bin = dir.join("bin");
    let libexec = dir.join("libexec/lowvram");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&libexec).unwrap();
    let cli = bin.join("lowvram");
    std::fs::copy(env!("CARGO_BIN_EXE_lowvram"), &cli).unwrap();
    // The copied CLI with the stand-in driver; LOWVRAM_BACKEND as the caller leaves it (unset unless set).
    let cli_with_driver = || {
        let mut cmd = Command::new(&cli);
        cmd.env("LD_LIBRARY_PATH", &driver).env_remove("LOWVRAM_BACKEND");
        cmd
    };
    let run = |args: &[&str]| out_text(&succeeds(cli_with_driver().args(args)));

    let stdout = run(&["system-stats"]);
    let expected = format!("lowvram-cuda not found in {}, {}", bin.display(), bin.join("../libexec/lowvram").display());
    assert_eq!(stdout.lines().next(), Some(format!("backend: cpu — {expected}").as_str()), "{stdout}");
    assert!(stdout.contains("cuda:0 fake driver (tests/c/fake_libcuda.c)"), "{stdout}");

    // A stand-in for the CUDA build of the CLI that shows how it was started.
    let write_child = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, "#!/bin/sh\necho \"child $0 [$*] LOWVRAM_BACKEND=$LOWVRAM_BACKEND\"\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_child(&libexec.join("lowvram-cuda"));
    let stdout = run(&["system-stats", "--json"]);
    assert_eq!(
        stdout.trim(),
        format!(
            "child {} [system-stats --json] LOWVRAM_BACKEND=cpu",
            bin.join("../libexec/lowvram/lowvram-cuda").display()
        )
    );
    write_child(&bin.join("lowvram-cuda"));
    let stdout = run(&["generate", "--out", "x.png"]);
    assert_eq!(
        stdout.trim(),
        format!("child {} [generate --out x.png] LOWVRAM_BACKEND=cpu", bin.join("lowvram-cuda").display())
    );

    // LOWVRAM_BACKEND=cpu (what the child gets) never re-executes.
    let out = succeeds(cli_with_driver().env("LOWVRAM_BACKEND", "cpu").arg("system-stats"));
    assert!(out_text(&out).starts_with("backend: cpu — LOWVRAM_BACKEND=cpu"));
}

/// Progress on a non-terminal stderr (a log file, CI): one complete line per step, never `\r`-joined.
#[test]
fn progress_is_one_line_per_step_when_stderr_is_not_a_terminal() {
    let dir = out_dir("progress");
    let args = ["generate", "--steps", "5", "--device", "cpu", "--width", "64", "--height", "64"];
    let stderr = err_text(&succeeds(&mut on_tiny_random(&dir, &args, &[("--out", "img.png")])));
    assert!(!stderr.contains('\r'), "{stderr:?}");
    let steps: Vec<&str> = stderr.lines().filter(|l| l.starts_with("lowvram: step ")).collect();
    assert_eq!(steps.len(), 5, "{stderr}");
    for (i, line) in steps.iter().enumerate() {
        assert!(line.starts_with(&format!("lowvram: step {}/5 (", i + 1)) && line.contains("it/s, ETA"), "{line}");
    }
}

/// The README's main job, with the model built into the binary (the trained `models/tiny-sd`): the picture shows a
/// red shape on a blue background, and its size is the UNet's sample size times the VAE's downscale (4 here, not 8).
#[test]
fn main_job_draws_a_red_shape_on_a_blue_background() {
    let dir = out_dir("main-job");
    let args = ["generate", "--prompt", "a red circle on a blue background"];
    succeeds(&mut lowvram_to(&dir, &args, &[("--out", "image.png"), ("--image-raw-out", "image.safetensors")]));
    let raw = load(dir.join("image.safetensors"));
    let image = &raw["image"];
    assert_eq!(image.dims(), [1, 3, 64, 64]);
    // RGB in 0..=255 at (y, x), as the PNG holds it.
    let v = image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rgb = |y: usize, x: usize| -> [f32; 3] {
        std::array::from_fn(|c| ((v[(c * 64 + y) * 64 + x].clamp(-1.0, 1.0) + 1.0) * 127.5).round())
    };
    let is_red = |p: [f32; 3]| p[0] > 150.0 && p[1] < 90.0 && p[2] < 90.0;
    let is_blue = |p: [f32; 3]| p[2] > 150.0 && p[0] < 90.0 && p[1] < 130.0;
    let border: Vec<[f32; 3]> = (0..64).flat_map(|i| [rgb(0, i), rgb(63, i), rgb(i, 0), rgb(i, 63)]).collect();
    let blue = border.iter().filter(|&&p| is_blue(p)).count();
    assert!(blue * 10 >= border.len() * 9, "{blue}/{} border pixels are blue", border.len());
    // The shape: a red region of at least a circle of radius 7 (the training shapes have radius 9 to 13), in the
    // centre, where a prompt without a position word puts it (the nearest other position is 16 pixels away).
    let red: Vec<(usize, usize)> =
        (0..64).flat_map(|y| (0..64).map(move |x| (y, x))).filter(|&(y, x)| is_red(rgb(y, x))).collect();
    assert!(red.len() >= 150, "{}/4096 pixels are red", red.len());
    let n = red.len() as f32;
    let cy = red.iter().map(|p| p.0 as f32 + 0.5).sum::<f32>() / n;
    let cx = red.iter().map(|p| p.1 as f32 + 0.5).sum::<f32>() / n;
    assert!((cx - 32.0).abs() < 8.0 && (cy - 32.0).abs() < 8.0, "the red shape's centre is at ({cx}, {cy})");
}

/// The built-in model's default guidance is 2, not SD's 7.5 (which pinches its squares: BENCHMARKS.md, "Trained tiny
/// model"); a `--model` folder keeps 7.5, and `--guidance` overrides either.
#[test]
fn built_in_model_defaults_to_guidance_2() {
    let dir = out_dir("guidance");
    let model = repo().join("models/tiny-sd");
    let image = |name: &str, extra: &[&str]| -> Vec<u8> {
        let raw = dir.join(format!("{name}.safetensors"));
        let out = lowvram()
            .args(["generate", "--prompt", "a white square on a red background", "--steps", "8"])
            .args(extra)
            .arg("--out")
            .arg(dir.join(format!("{name}.png")))
            .arg("--image-raw-out")
            .arg(&raw)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(raw).unwrap()
    };
    let default = image("default", &[]);
    assert_eq!(default, image("g2", &["--guidance", "2"]));
    let strong = image("g7.5", &["--guidance", "7.5"]);
    assert_ne!(default, strong, "guidance 7.5 drew the same picture as the default");
    assert_eq!(strong, image("folder", &["--model", model.to_str().unwrap()]));
}
