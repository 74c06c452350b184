//! Generators of the inputs behind the harness's findings (each has a regression test in
//! tests/fuzz_regressions.rs). All of them are fixed, so by default the targets generate these hostile inputs too;
//! while a finding is open, `--avoid-known` steers clear of its predicate so a run measures everything else.

use lowvram::models::{UNetConfig, VaeConfig};
use lowvram::sampling::SchedulerConfig;

/// Counts in a config.json beyond this are "hostile" (issue 14: `layers_per_block: 4294967295` aborts or hangs
/// the load, `downsample_padding: 65535` / `in_channels: 4294967296` abort the first run). Fixed when every count
/// has a bound checked before allocation (regressions `hostile_*`).
pub const HOSTILE_COUNT: usize = 1 << 12;

/// The keys of counts and sizes in UNet, VAE and scheduler configs.
const COUNT_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "norm_num_groups",
    "downsample_padding",
    "latent_channels",
    "sample_size",
    "transformer_layers_per_block",
    "solver_order",
    "steps_offset",
];

/// The same, read from the JSON before any reader sees it, plus the values the readers themselves trip on:
/// `norm_num_groups: 0` panics (division by zero) in `UNetConfig::from_json` and `VaeConfig::from_json`
/// (regression `norm_num_groups_zero_*`), and numbers ≥ 2^63 come back as PANIC (issue 14).
pub fn config_json_is_hostile(text: &[u8]) -> bool {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(text) else {
        return false;
    };
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        match v {
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_f64()).collect(),
            other => other.as_f64().into_iter().collect(),
        }
    };
    m.iter().any(|(k, v)| {
        let ns = numbers(v);
        ns.iter().any(|&n| n.abs() >= 9.2e18)
            || (k == "norm_num_groups" && ns.iter().any(|&n| n == 0.0))
            || (COUNT_KEYS.contains(&k.as_str()) && ns.iter().any(|&n| n > HOSTILE_COUNT as f64))
            || (k == "num_train_timesteps" && ns.iter().any(|&n| n > (1 << 20) as f64))
            || (k == "block_out_channels" && matches!(v, serde_json::Value::Array(a) if a.len() > 16))
    })
}

pub fn unet_config_is_hostile(c: &UNetConfig) -> bool {
    let counts = [
        c.in_channels,
        c.out_channels,
        c.cross_attention_dim,
        c.norm_num_groups,
        c.downsample_padding,
    ];
    counts
        .iter()
        .chain(&c.block_out_channels)
        .chain(&c.layers_per_block)
        .chain(&c.attention_heads)
        .any(|&n| n > HOSTILE_COUNT)
        || c.block_out_channels.len() > 16
}

pub fn vae_config_is_hostile(c: &VaeConfig) -> bool {
    let counts = [
        c.in_channels,
        c.out_channels,
        c.layers_per_block,
        c.latent_channels,
        c.norm_num_groups,
    ];
    counts.iter().chain(&c.block_out_channels).any(|&n| n > HOSTILE_COUNT) || c.block_out_channels.len() > 16
}

/// `num_train_timesteps: 4294967295` aborts (issue 14).
pub fn scheduler_config_is_hostile(c: &SchedulerConfig) -> bool {
    c.num_train_timesteps.is_some_and(|n| n > 1 << 20)
}

/// Denoise sizes that allocate before any check (issue 14: latent 65535² → 68 GB of noise; steps = UINT32_MAX →
/// 34 GB of step timings): SIGABRT. Fixed when sizes are checked before allocation (regressions `absurd_*`).
pub fn denoise_size_is_hostile(steps: u32, latent_w: u32, latent_h: u32) -> bool {
    steps > 10_000 || (latent_w as u64) * (latent_h as u64) > 1 << 16
}

/// Guidance so large the latents overflow to NaN while the call returns OK (issue 14, "absurd values").
pub fn guidance_is_hostile(g: f32) -> bool {
    !g.is_finite() || g.abs() > 1e6
}

/// A `struct_size` that ends inside a pointer field of `lowvram_denoise_params` (issue 14: the library calls a
/// half-copied `progress` address: SIGSEGV). Fixed when params are read field by field (regression
/// `struct_size_splitting_the_progress_pointer`).
pub fn struct_size_splits_a_field(size: u32, fields: &[(usize, usize)]) -> bool {
    fields
        .iter()
        .any(|&(off, len)| (size as usize) > off && (size as usize) < off + len)
}

/// Bool fields read by their low bit (issue 14: 0x02 acts as false). Hosts must pass 0 or 1 until fixed
/// (regression `bool_fields_read_as_bytes`).
pub fn bool_byte_is_hostile(b: u8) -> bool {
    b > 1
}
