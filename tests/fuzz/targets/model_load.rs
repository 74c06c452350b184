//! Target `model_load`: a whole component folder as a host's model picker would hand it over — config.json, the
//! scheduler config beside a UNet, and the safetensors file with an edited header — through
//! `lowvram_model_load`, then the smallest run of what loaded (one denoise step on an 8×8 latent, or a 1×1
//! decode), where a count the load let through would allocate.
//!
//! Input: `kind \0 config.json \0 scheduler_config.json \0 safetensors header` (an empty header = the
//! original weights file).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use lowvram::ffi::context::*;
use lowvram::ffi::model::*;
use lowvram::ffi::run::*;
use lowvram::ffi::status::lowvram_status;
use lowvram::ffi::tensor::*;
use lowvram::models::{UNetConfig, VaeConfig};
use lowvram::sampling::SchedulerConfig;
use serde_json::Value;

use crate::engine::{feature, havoc, mutate_json, Outcome, Rng, Target};
use crate::known;
use crate::targets::config_json::{KEYS, STRINGS};

pub struct ModelLoad {
    dir: PathBuf,
    /// (header, data) of the shipped weights: [unet, vae]
    weights: [(Vec<u8>, Vec<u8>); 2],
}

const COMPONENTS: [&str; 2] = ["unet", "vae"];

fn split_safetensors(file: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (file[8..8 + n].to_vec(), file[8 + n..].to_vec())
}

impl ModelLoad {
    pub fn new(scratch: &Path) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd-random");
        let dir = scratch.join("pipeline");
        for c in ["unet", "vae", "scheduler"] {
            std::fs::create_dir_all(dir.join(c)).unwrap();
        }
        let read = |p: &str| split_safetensors(&std::fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}")));
        Self {
            dir,
            weights: [
                read("unet/diffusion_pytorch_model.fp16.safetensors"),
                read("vae/diffusion_pytorch_model.safetensors"),
            ],
        }
    }
}

fn sections(input: &[u8]) -> (usize, &[u8], &[u8], &[u8]) {
    let mut it = input.splitn(4, |&b| b == 0);
    let kind = it.next().and_then(|k| k.first()).map_or(0, |&k| (k % 2) as usize);
    (
        kind,
        it.next().unwrap_or(b""),
        it.next().unwrap_or(b""),
        it.next().unwrap_or(b""),
    )
}

fn join(kind: usize, parts: [&[u8]; 3]) -> Vec<u8> {
    let mut out = vec![kind as u8];
    for p in parts {
        out.push(0);
        out.extend_from_slice(p);
    }
    out
}

/// The tensor names of a header, for renames.
fn names(header: &[u8]) -> Vec<String> {
    match serde_json::from_slice::<Value>(header) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

impl Target for ModelLoad {
    fn name(&self) -> &'static str {
        "model_load"
    }
    fn seeds(&mut self) -> Vec<Vec<u8>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd-random");
        let read = |p: &str| std::fs::read(root.join(p)).unwrap();
        let sched = read("scheduler/scheduler_config.json");
        vec![
            join(0, [&read("unet/config.json"), &sched, b""]),
            join(1, [&read("vae/config.json"), b"", b""]),
            join(0, [&read("unet/config.json"), &sched, &self.weights[0].0]),
            join(1, [&read("vae/config.json"), b"", &self.weights[1].0]),
        ]
    }
    fn mutate(&mut self, input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
        let (kind, config, sched, header) = sections(input);
        let mut parts = [config.to_vec(), sched.to_vec(), header.to_vec()];
        let i = *rng.pick(&[0usize, 0, 0, 1, 2, 2]);
        if i == 2 && parts[2].is_empty() {
            parts[2] = self.weights[kind].0.clone();
        }
        match serde_json::from_slice::<Value>(&parts[i]) {
            Ok(mut v) if !rng.one_in(8) => {
                if i == 2 && rng.one_in(3) {
                    // rename, drop or duplicate one tensor (the header stays consistent with the data)
                    if let Value::Object(m) = &mut v {
                        let ns = names(&parts[2]);
                        if !ns.is_empty() {
                            let n = rng.pick(&ns).clone();
                            let t = m.remove(&n).unwrap();
                            match rng.below(3) {
                                0 => {}
                                1 => {
                                    m.insert(format!("{n}x"), t);
                                }
                                _ => {
                                    m.insert(n.clone(), t.clone());
                                    m.insert(rng.pick(&ns).replace("weight", "bias"), t);
                                }
                            }
                        }
                    }
                } else {
                    mutate_json(&mut v, KEYS, STRINGS, rng, None);
                }
                parts[i] = serde_json::to_vec(&v).unwrap();
            }
            _ => havoc(&mut parts[i], corpus, &[], rng, 64 << 10),
        }
        let kind = if rng.one_in(32) { 1 - kind } else { kind };
        *input = join(kind, [&parts[0], &parts[1], &parts[2]]);
    }
    fn run(&mut self, input: &[u8], avoid_known: bool) -> Outcome {
        let (kind, config, sched, header) = sections(input);
        if avoid_known && (known::config_json_is_hostile(config) || known::config_json_is_hostile(sched)) {
            return Outcome::Seen("hostile-skipped".into());
        }
        if avoid_known {
            let text = String::from_utf8_lossy(config);
            let hostile = match kind {
                0 => UNetConfig::from_json(&text).is_ok_and(|c| known::unet_config_is_hostile(&c)),
                _ => VaeConfig::from_json(&text).is_ok_and(|c| known::vae_config_is_hostile(&c)),
            } || SchedulerConfig::from_json_str(&String::from_utf8_lossy(sched))
                .is_ok_and(|c| known::scheduler_config_is_hostile(&c));
            if hostile {
                return Outcome::Seen("hostile-skipped".into());
            }
        }
        let comp = self.dir.join(COMPONENTS[kind]);
        std::fs::write(comp.join("config.json"), config).unwrap();
        let sched_path = self.dir.join("scheduler/scheduler_config.json");
        if sched.is_empty() {
            let _ = std::fs::remove_file(&sched_path);
        } else {
            std::fs::write(&sched_path, sched).unwrap();
        }
        let (h, data) = &self.weights[kind];
        let h = if header.is_empty() { h.as_slice() } else { header };
        let mut file = (h.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(h);
        file.extend_from_slice(data);
        std::fs::write(comp.join("diffusion_pytorch_model.safetensors"), file).unwrap();

        let mut seen = String::new();
        let mut finding = None;
        unsafe {
            let mut p: lowvram_context_params = std::mem::zeroed();
            lowvram_context_params_init(&mut p, std::mem::size_of::<lowvram_context_params>());
            p.device = c"cpu".as_ptr();
            let mut ctx = null_mut();
            assert_eq!(lowvram_context_new(&p, &mut ctx), lowvram_status::Ok);
            let path = CString::new(comp.as_os_str().as_encoded_bytes()).unwrap();
            let mut model = null_mut();
            let s = lowvram_model_load(ctx, path.as_ptr(), &mut model);
            seen.push_str(&feature(&format!("load:{s:?}"), &last_error()));
            if s == lowvram_status::Panic {
                finding = Some(format!("lowvram_model_load returned PANIC: {}", last_error()));
            }
            if s == lowvram_status::Ok {
                let cfg: Value = serde_json::from_slice(config).unwrap_or(Value::Null);
                let dim = |k: &str, d: i64| {
                    cfg.get(k)
                        .and_then(|v| v.as_i64().or_else(|| v.get(0).and_then(Value::as_i64)))
                        .unwrap_or(d)
                };
                let mut out = null_mut();
                let (s, call) = if kind == 0 {
                    let shape = [1i64, 77, dim("cross_attention_dim", 32).clamp(1, 4096)];
                    let cond = zeros(&shape);
                    let mut dp: lowvram_denoise_params = std::mem::zeroed();
                    lowvram_denoise_params_init(&mut dp, std::mem::size_of::<lowvram_denoise_params>());
                    dp.steps = 1;
                    dp.latent_width = 8;
                    dp.latent_height = 8;
                    let s = lowvram_denoise(ctx, model, &dp, cond, null(), null(), null_mut(), &mut out);
                    lowvram_tensor_free(cond);
                    (s, "denoise")
                } else {
                    let latents = zeros(&[1, dim("latent_channels", 4).clamp(1, 4096), 1, 1]);
                    let s = lowvram_vae_decode(ctx, model, null(), latents, null_mut(), &mut out);
                    lowvram_tensor_free(latents);
                    (s, "decode")
                };
                seen.push_str(&feature(&format!("|{call}:{s:?}"), &last_error()));
                if s == lowvram_status::Panic {
                    finding = Some(format!("{call} of a loaded model returned PANIC: {}", last_error()));
                } else if s == lowvram_status::Format && !avoid_known {
                    // issue 14: a load that validates should leave nothing for the first run to find
                    finding = Some(format!(
                        "the model loaded, then its first {call} failed: {}",
                        last_error()
                    ));
                }
                lowvram_tensor_free(out);
                lowvram_model_free(model);
            }
            lowvram_context_free(ctx);
        }
        match finding {
            Some(f) => Outcome::Finding(f),
            None => Outcome::Seen(seen),
        }
    }
}

fn last_error() -> String {
    unsafe { std::ffi::CStr::from_ptr(lowvram::ffi::error::lowvram_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

unsafe fn zeros(shape: &[i64]) -> *mut lowvram_tensor {
    let n: i64 = shape.iter().product();
    let data = vec![0f32; n as usize];
    let mut t = null_mut();
    let s = lowvram_tensor_from_host(
        0,
        shape.as_ptr(),
        shape.len(),
        data.as_ptr().cast(),
        data.len() * 4,
        &mut t,
    );
    assert_eq!(s, lowvram_status::Ok, "zeros {shape:?}");
    t
}
