//! Target `yaml`: the YAML configuration reader (`Config::apply_yaml`, all-or-nothing) and, for what it accepts,
//! the cache sizing a context is created with (`ModelCache::new`), the path `lowvram_context_new` takes.

use lowvram::config::{Config, KEYS};
use lowvram::memory::ModelCache;

use crate::engine::{feature, havoc, interesting_decimal, Outcome, Rng, Target};

pub struct Yaml;

const VALUES: &[&str] = &[
    "true",
    "false",
    "yes",
    "no",
    "on",
    "off",
    "~",
    "null",
    "auto",
    "0",
    "1",
    "-1",
    "0.5",
    "1e300",
    "-1e300",
    ".nan",
    ".inf",
    "-.inf",
    "4",
    "24",
    "1024",
    "pool",
    "pool_keep",
    "backend:cudaMallocAsync",
    "high",
    "normal",
    "low",
    "none",
    "cpu",
    "cuda",
    "cuda:0",
    "cuda:99",
    "cuda:-1",
    "emulated:64MiB",
    "emulated:0",
    "emulated:1",
    "emulated:1GiB",
    "emulated:18446744073709551615",
    "emulated:16EiB",
    "emulated:1.5GiB",
    "emulated:-1MiB",
    "emulated:",
    "Shared",
    "CPU",
    "Async",
    "Queue",
    "fp32",
    "fp16",
    "bf16",
    "f64",
    "\"\"",
    "[]",
    "{}",
    "[1, 2]",
    "{a: 1}",
    "!!binary aGk=",
    "&a 1",
    "*a",
    "'quoted'",
    "\"\\u0000\"",
    "|\n  block",
    ">\n  folded",
];
const DICT: &[&str] = &[
    ": ",
    "\n",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "&a ",
    "*a",
    "!!str ",
    "!!int ",
    "---\n",
    "...\n",
    "# c\n",
    "<<: ",
    "? ",
    "'",
    "\"",
    "\t",
    "%YAML 1.2\n",
];

fn generate(rng: &mut Rng) -> Vec<u8> {
    let mut s = String::new();
    for _ in 0..1 + rng.below(4) {
        let key = if rng.one_in(12) {
            "unknown_key"
        } else {
            rng.pick(KEYS).0
        };
        let value = if rng.one_in(3) {
            interesting_decimal(rng)
        } else {
            rng.pick(VALUES).to_string()
        };
        s.push_str(&format!("{key}: {value}\n"));
    }
    s.into_bytes()
}

impl Target for Yaml {
    fn name(&self) -> &'static str {
        "yaml"
    }
    fn seeds(&mut self) -> Vec<Vec<u8>> {
        let mut seeds = vec![
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/small-working-memory.yaml"
            ))
            .unwrap(),
            b"device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.001\n".to_vec(),
            b"device: emulated:64MiB\nvram_state: low\nkeep_ram_copy_of_weights: false\n".to_vec(),
            b"max_cache_ram_gb: auto\nmax_cache_vram_gb: null\nstorage_dtype: fp16\ncompute_dtype: bf16\n".to_vec(),
            b"forge_inference_memory: 1024\nforge_async_loading: Queue\npin_memory: true\n".to_vec(),
            b"a: &x [*x]\n".to_vec(),
            b"".to_vec(),
        ];
        for (k, v) in KEYS {
            seeds.push(format!("{k}: {}\n", v.split('|').next().unwrap_or("1")).into_bytes());
        }
        seeds
    }
    fn mutate(&mut self, input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
        match rng.below(4) {
            0 => *input = generate(rng),
            1 => input.extend_from_slice(&generate(rng)),
            _ => havoc(input, corpus, DICT, rng, 16 << 10),
        }
    }
    fn run(&mut self, input: &[u8], _avoid_known: bool) -> Outcome {
        let Ok(text) = std::str::from_utf8(input) else {
            return Outcome::Seen("not utf-8".into());
        };
        let mut config = Config::default();
        let before = config.clone();
        match config.apply_yaml(text) {
            Err(e) => {
                if config != before {
                    return Outcome::Finding(format!("apply_yaml failed ({e}) but changed the configuration"));
                }
                Outcome::Seen(feature("yaml", &e.to_string()))
            }
            Ok(()) => match ModelCache::new(config) {
                Ok(_) => Outcome::Seen("ok".into()),
                Err(e) => Outcome::Seen(feature("cache", &e.to_string())),
            },
        }
    }
}
