//! The CUDA kernels (`kernels/*.cu`) run on the CPU: `kernels/emu/run_tests.sh` compiles each kernel source with g++
//! against the emulator header (`kernels/emu/cuda_emu.hpp`: each CUDA thread a fiber, a block's fibers taking turns at
//! barriers and warp operations in a fixed order, shared memory poisoned with NaN, deadlocks reported, the WMMA subset
//! on exact f16/bf16 inputs) and checks every kernel, dtype and head size against a double-precision reference, tails
//! and strided inputs included, and that launch preconditions trap. This proves the kernels' indexing, masking,
//! synchronisation and numerics on every build, GPU or not; speed, and anything the emulator cannot see (e.g.
//! bank conflicts, the real WMMA fragment layout), is checked on a GPU by `tests/gpu.rs`.
//!
//! Needs g++ (C++20) — `scripts/test.sh` installs it; without it this test fails, it does not skip.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_on_the_cpu_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernels-emu");
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new("bash")
        .arg(root.join("kernels/emu/run_tests.sh"))
        .current_dir(root)
        .env("TMPDIR", &tmp)
        .output()
        .expect("running kernels/emu/run_tests.sh (needs bash and g++)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "the emulated CUDA kernel tests failed ({}):\n{text}",
        out.status
    );
    for kernel in ["group_norm", "attention", "conv2d", "dequant"] {
        assert!(
            text.contains(kernel),
            "no result for the {kernel} kernel in:\n{text}"
        );
    }
}
