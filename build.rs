//! Builds the project's own CUDA kernels (`kernels/*.cu`) into fat binaries when the `cuda` feature is on; the
//! default (CPU) build does nothing here and needs no CUDA anywhere.
//!
//! Why fat binaries with machine code (SASS) per GPU generation, not PTX: PTX is compiled by the driver on the first
//! launch in every fresh process/machine (seconds per module), which is the cold start users see on their first image.
//! One SASS per listed architecture + PTX of the newest one (for GPUs newer than the list) avoids that.
//!
//! Knobs (environment, re-read on change):
//! - `LOWVRAM_CUDA_ARCHS`: comma-separated compute capabilities, default `75,80,86,89,90` (Turing → Hopper). CI's
//!   type check and device test builds may narrow it (e.g. `80` or `90`) to save compile time and carried bytes.
//! - `NVCC` (else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`), `NVCC_CCBIN` (host compiler, passed as `-ccbin`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources; each becomes `$OUT_DIR/<name>.fatbin`, embedded by `src/ops/cuda/module.rs`.
const KERNELS: &[&str] = &["attention", "conv2d", "dequant", "group_norm"];
const DEFAULT_ARCHS: &str = "75,80,86,89,90";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LOWVRAM_CUDA_ARCHS");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=NVCC_CCBIN");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    // The CPU build (liblowvram.so) and its backend (liblowvram_cuda.so, or any lowvram library a test names) export
    // the same names in one process: each must bind its own calls to its own definitions, never to the other's.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let archs = archs();
    let nvcc = nvcc();
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    for name in KERNELS {
        let src = PathBuf::from(format!("kernels/{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        compile(&nvcc, &src, &out.join(format!("{name}.fatbin")), &archs);
    }
    println!(
        "cargo:rustc-env=LOWVRAM_CUDA_ARCHS_BUILT={}",
        archs.join(",")
    );
}

fn archs() -> Vec<String> {
    let list = std::env::var("LOWVRAM_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<String> = list
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    for a in &archs {
        if a.len() < 2 || !a.chars().all(|c| c.is_ascii_digit()) {
            panic!("LOWVRAM_CUDA_ARCHS: `{a}` is not a compute capability like 80 or 90 (list: `{list}`)");
        }
    }
    if archs.is_empty() {
        panic!("LOWVRAM_CUDA_ARCHS is empty");
    }
    archs
}

fn nvcc() -> PathBuf {
    if let Some(n) = std::env::var_os("NVCC") {
        return PathBuf::from(n);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, src: &Path, dst: &Path, archs: &[String]) {
    let mut cmd = Command::new(nvcc);
    cmd.args([
        "-std=c++17",
        "-O3",
        "--fatbin",
        "-Ikernels",
        "-Werror",
        "all-warnings",
    ]);
    if let Some(ccbin) = std::env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    for a in archs {
        cmd.arg("-gencode")
            .arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    // PTX of the newest listed architecture, so GPUs newer than the list still run (JIT once per machine).
    let newest = archs
        .iter()
        .max_by_key(|a| a.parse::<u32>().unwrap_or(0))
        .expect("non-empty");
    cmd.arg("-gencode")
        .arg(format!("arch=compute_{newest},code=compute_{newest}"));
    cmd.arg(src).arg("-o").arg(dst);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "running {} failed ({e}): the `cuda` feature needs nvcc 13.0 (scripts/cuda/setup.sh installs it; set NVCC \
             or CUDA_HOME)",
            nvcc.display()
        )
    });
    if !status.success() {
        panic!("nvcc failed on {} ({status})", src.display());
    }
}
