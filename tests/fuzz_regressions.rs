//! Regression tests for what the fuzzer (tests/fuzz, RELIABILITY.md) found: each is the smallest input of one
//! finding, through the public C API as a host would call it. Each runs in its own process (the test re-runs
//! itself), with its address space capped and a time limit, so an abort or a hang fails this one test instead of
//! taking the suite — or a shared machine's memory — down.
//!
//! Every finding of the harness is fixed (the host contract's bounds and checks) and its test runs; a new finding
//! whose fix belongs to another change is `#[ignore]`d with where the fix goes; un-ignore the test and
//! delete the matching predicate in tests/fuzz/known.rs when it lands.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use lowvram::ffi::context::*;
use lowvram::ffi::error::lowvram_last_error_message;
use lowvram::ffi::model::*;
use lowvram::ffi::run::*;
use lowvram::ffi::status::lowvram_status;
use lowvram::ffi::tensor::*;
use serde_json::Value;

const CHILD_ENV: &str = "LOWVRAM_FUZZ_REGRESSION_CHILD";

/// Run `body` in a child process of this test binary: at most 4 GiB of address space, 60 s.
fn isolated(test: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        let cap = 4u64 << 30;
        let lim = libc::rlimit {
            rlim_cur: cap,
            rlim_max: cap,
        };
        unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
        body();
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{test}: still running after 60 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let text: String = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(12)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(status.success(), "{test} failed in its own process ({status}):\n{text}");
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(lowvram_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of tests/fixtures/tiny-sd-random (unet, vae, scheduler) in a fresh folder, with one component's config edited.
fn pipeline(test: &str, component: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lowvram-fuzz-regression-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for c in ["unet", "vae", "scheduler"] {
        std::fs::create_dir_all(dir.join(c)).unwrap();
        for f in std::fs::read_dir(repo().join("tests/fixtures/tiny-sd-random").join(c)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(c).join(f.file_name().unwrap())).unwrap();
        }
    }
    let file = if component == "scheduler" {
        "scheduler/scheduler_config.json".to_string()
    } else {
        format!("{component}/config.json")
    };
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(&file)).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(dir.join(&file), serde_json::to_string(&v).unwrap()).unwrap();
    dir
}

fn context() -> *mut lowvram_context {
    let mut p: lowvram_context_params = unsafe { std::mem::zeroed() };
    let mut ctx = null_mut();
    unsafe {
        assert_eq!(
            lowvram_context_params_init(&mut p, std::mem::size_of::<lowvram_context_params>()),
            lowvram_status::Ok
        );
        p.device = c"cpu".as_ptr();
        assert_eq!(
            lowvram_context_new(&p, &mut ctx),
            lowvram_status::Ok,
            "{}",
            last_error()
        );
    }
    ctx
}

fn load(ctx: *mut lowvram_context, dir: &Path) -> (lowvram_status, *mut lowvram_model) {
    let path = CString::new(dir.to_str().unwrap()).unwrap();
    let mut m = null_mut();
    let s = unsafe { lowvram_model_load(ctx, path.as_ptr(), &mut m) };
    (s, m)
}

fn zeros(shape: &[i64]) -> *mut lowvram_tensor {
    let n: i64 = shape.iter().product();
    let data = vec![0f32; n as usize];
    let mut t = null_mut();
    let s = unsafe {
        lowvram_tensor_from_host(
            0,
            shape.as_ptr(),
            shape.len(),
            data.as_ptr().cast(),
            data.len() * 4,
            &mut t,
        )
    };
    assert_eq!(s, lowvram_status::Ok, "{}", last_error());
    t
}

/// One denoise call on the tiny UNet with `edit` applied to default params; returns its status.
fn denoise(
    ctx: *mut lowvram_context,
    unet: *mut lowvram_model,
    edit: impl FnOnce(&mut lowvram_denoise_params),
) -> lowvram_status {
    unsafe {
        let mut p: lowvram_denoise_params = std::mem::zeroed();
        lowvram_denoise_params_init(&mut p, std::mem::size_of::<lowvram_denoise_params>());
        p.steps = 1;
        p.latent_width = 8;
        p.latent_height = 8;
        edit(&mut p);
        let cond = zeros(&[1, 77, 32]);
        let mut out = null_mut();
        let s = lowvram_denoise(ctx, unet, &p, cond, null(), null(), null_mut(), &mut out);
        lowvram_tensor_free(out);
        lowvram_tensor_free(cond);
        s
    }
}

/// Loading `component` with `key` set to `value` must fail with FORMAT naming the key: no panic, abort or hang.
fn hostile_config_is_a_format_error(test: &str, component: &'static str, key: &'static str, value: Value) {
    isolated(test, || {
        let dir = pipeline(test, component, |v| {
            v[key] = value;
        });
        let ctx = context();
        let (s, m) = load(ctx, &dir.join(component));
        let msg = last_error();
        unsafe {
            lowvram_model_free(m);
            lowvram_context_free(ctx);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(s, lowvram_status::Format, "{component} {key}: {msg}");
        assert!(msg.contains(key), "the message should name {key}: {msg}");
    });
}

// --- config.json: found by config_json and model_load ---------------------------------------------------------

#[test]
fn unet_norm_num_groups_zero_is_format_not_panic() {
    // was: PANIC "attempt to calculate the remainder with a divisor of zero" (src/models/unet/config.rs:206)
    hostile_config_is_a_format_error(
        "unet_norm_num_groups_zero_is_format_not_panic",
        "unet",
        "norm_num_groups",
        0.into(),
    );
}

#[test]
fn vae_norm_num_groups_zero_is_format_not_panic() {
    // was: PANIC "attempt to calculate the remainder with a divisor of zero" (src/models/vae/config.rs:92)
    hostile_config_is_a_format_error(
        "vae_norm_num_groups_zero_is_format_not_panic",
        "vae",
        "norm_num_groups",
        0.into(),
    );
}

#[test]
fn unet_layers_per_block_2_pow_32_plus_1_is_format_not_a_hang() {
    // was: UNet2DConditionModel::new looping over 4294967297 resnets (> 10 s, then an allocation abort)
    hostile_config_is_a_format_error(
        "unet_layers_per_block_2_pow_32_plus_1_is_format_not_a_hang",
        "unet",
        "layers_per_block",
        4294967297u64.into(),
    );
}

#[test]
fn vae_layers_per_block_2_pow_53_is_format_not_an_abort() {
    // was: SIGABRT "memory allocation of ... bytes failed" in AutoencoderKL::new
    hostile_config_is_a_format_error(
        "vae_layers_per_block_2_pow_53_is_format_not_an_abort",
        "vae",
        "layers_per_block",
        9007199254740994u64.into(),
    );
}

/// A scheduler_config.json beside the UNet with `num_train_timesteps = n`: the load or the first denoise fails
/// cleanly (not PANIC, not an abort).
fn hostile_train_timesteps(test: &str, n: u64) {
    isolated(test, || {
        let dir = pipeline(test, "scheduler", |v| {
            v["num_train_timesteps"] = n.into();
        });
        let ctx = context();
        let (s, m) = load(ctx, &dir.join("unet"));
        let s = if s == lowvram_status::Ok {
            denoise(ctx, m, |_| {})
        } else {
            s
        };
        let msg = last_error();
        unsafe {
            lowvram_model_free(m);
            lowvram_context_free(ctx);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(s, lowvram_status::Format | lowvram_status::InvalidArgument),
            "{s:?}: {msg}"
        );
        assert!(
            msg.contains("num_train_timesteps"),
            "the message should name num_train_timesteps: {msg}"
        );
    });
}

#[test]
fn scheduler_num_train_timesteps_2_pow_32_is_rejected_not_an_abort() {
    // was: SIGABRT at the first denoise (a 2^32-entry schedule)
    hostile_train_timesteps(
        "scheduler_num_train_timesteps_2_pow_32_is_rejected_not_an_abort",
        1 << 32,
    );
}

#[test]
fn scheduler_num_train_timesteps_2_pow_62_is_rejected_not_a_panic() {
    // was: PANIC "capacity overflow" at the first denoise
    hostile_train_timesteps(
        "scheduler_num_train_timesteps_2_pow_62_is_rejected_not_a_panic",
        (1 << 62) + 1,
    );
}

// --- the C API: found by c_api and model_load ----------------------------------------------------------------

/// A denoise with absurd sizes is refused with a status (sizes checked before any allocation), not an abort.
fn absurd_denoise(test: &str, edit: impl FnOnce(&mut lowvram_denoise_params)) {
    isolated(test, || {
        let ctx = context();
        let (s, unet) = load(ctx, &repo().join("tests/fixtures/tiny-sd-random/unet"));
        assert_eq!(s, lowvram_status::Ok, "{}", last_error());
        let s = denoise(ctx, unet, edit);
        let msg = last_error();
        unsafe {
            lowvram_model_free(unet);
            lowvram_context_free(ctx);
        }
        assert!(
            matches!(
                s,
                lowvram_status::InvalidArgument
                    | lowvram_status::OutOfHostMemory
                    | lowvram_status::OutOfDeviceMemory
                    | lowvram_status::BudgetTooSmall
                    | lowvram_status::Unsupported
            ),
            "{s:?}: {msg}"
        );
    });
}

#[test]
fn latent_1_by_1979711488_with_1979711488_steps_is_refused_not_an_abort() {
    // was: SIGABRT "memory allocation of 31675383808 bytes failed"
    absurd_denoise(
        "latent_1_by_1979711488_with_1979711488_steps_is_refused_not_an_abort",
        |p| {
            p.scheduler = lowvram_scheduler::EulerA as u32;
            p.steps = 1979711488;
            p.guidance = 0.0;
            p.latent_width = 1;
            p.latent_height = 1979711488;
        },
    );
}

#[test]
fn latent_4278124032_by_7_with_unsupported_karras_is_refused_not_an_abort() {
    // was: SIGABRT "memory allocation of 479149891584 bytes failed" before the Karras/euler_a check
    absurd_denoise(
        "latent_4278124032_by_7_with_unsupported_karras_is_refused_not_an_abort",
        |p| {
            p.scheduler = lowvram_scheduler::EulerA as u32;
            p.karras = true;
            p.latent_width = 4278124032;
            p.latent_height = 7;
        },
    );
}

#[test]
fn steps_1873097778_on_an_8_by_8_latent_is_refused_not_an_abort() {
    // was: SIGABRT "memory allocation of 14984782224 bytes failed" (per-step buffers sized from steps)
    absurd_denoise("steps_1873097778_on_an_8_by_8_latent_is_refused_not_an_abort", |p| {
        p.scheduler = lowvram_scheduler::Ddim as u32;
        p.steps = 1873097778;
    });
}

#[test]
fn a_model_used_with_another_context_is_invalid_argument() {
    // was: OK — the run placed context A's weights on context B's device (found by c_api with --include-known)
    isolated("a_model_used_with_another_context_is_invalid_argument", || {
        let (a, b) = (context(), context());
        let (s, unet) = load(a, &repo().join("tests/fixtures/tiny-sd-random/unet"));
        assert_eq!(s, lowvram_status::Ok, "{}", last_error());
        let s = denoise(b, unet, |_| {});
        let msg = last_error();
        unsafe {
            lowvram_model_free(unet);
            lowvram_context_free(a);
            lowvram_context_free(b);
        }
        assert_eq!(s, lowvram_status::InvalidArgument, "{msg}");
    });
}

#[test]
fn a_vae_missing_a_tensor_fails_to_load_not_at_the_first_decode() {
    // was: lowvram_model_load OK, then lowvram_vae_decode FORMAT "missing tensor decoder.conv_out.bias"
    let test = "a_vae_missing_a_tensor_fails_to_load_not_at_the_first_decode";
    isolated(test, || {
        let dir = pipeline(test, "vae", |_| {});
        let file = dir.join("vae/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let t = header
            .remove("decoder.conv_out.bias")
            .expect("the tiny VAE has decoder.conv_out.bias");
        header.insert("decoder.conv_out.bias_renamed".into(), t);
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&file, out).unwrap();
        let ctx = context();
        let (s, m) = load(ctx, &dir.join("vae"));
        let msg = last_error();
        unsafe {
            lowvram_model_free(m);
            lowvram_context_free(ctx);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(s, lowvram_status::Format, "{msg}");
        assert!(
            msg.contains("decoder.conv_out.bias"),
            "the message should name the missing tensor: {msg}"
        );
    });
}

/// What held (safetensors: 0 findings), pinned by one input of that class: a header whose offsets point far past
/// the data is FORMAT at load.
#[test]
fn a_safetensors_offset_past_the_data_is_format() {
    let test = "a_safetensors_offset_past_the_data_is_format";
    isolated(test, || {
        let dir = pipeline(test, "vae", |_| {});
        let file = dir.join("vae/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        header["decoder.conv_out.bias"]["data_offsets"] = serde_json::json!([u64::MAX - 8, u64::MAX]);
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&file, out).unwrap();
        let ctx = context();
        let (s, m) = load(ctx, &dir.join("vae"));
        let msg = last_error();
        unsafe {
            lowvram_model_free(m);
            lowvram_context_free(ctx);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(s, lowvram_status::Format, "{msg}");
    });
}
