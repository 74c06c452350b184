//! Target `config_json`: the config.json readers (UNet, VAE, scheduler) on one text, and the architectures and
//! schedulers built from what they accept — where a hostile count would allocate or loop.

use lowvram::models::{AutoencoderKL, UNet2DConditionModel, UNetConfig, VaeConfig};
use lowvram::sampling::{make_scheduler, SchedulerConfig, SchedulerKind};
use serde_json::Value;

use crate::engine::{feature, havoc, mutate_json, Outcome, Rng, Target};
use crate::known;

pub struct ConfigJson;

/// Keys and string values of diffusers' UNet, VAE and scheduler configs, for the mutators.
pub const KEYS: &[&str] = &[
    "_class_name",
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "use_linear_projection",
    "upcast_attention",
    "norm_num_groups",
    "norm_eps",
    "flip_sin_to_cos",
    "freq_shift",
    "downsample_padding",
    "mid_block_scale_factor",
    "sample_size",
    "latent_channels",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "force_upcast",
    "act_fn",
    "time_embedding_type",
    "addition_embed_type",
    "class_embed_type",
    "transformer_layers_per_block",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "use_karras_sigmas",
    "trained_betas",
    "clip_sample",
    "thresholding",
    "algorithm_type",
    "solver_order",
    "lower_order_final",
    "final_sigmas_type",
    "lambda_min_clipped",
    "interpolation_type",
    "rescale_betas_zero_snr",
    "resnet_time_scale_shift",
    "only_cross_attention",
    "dual_cross_attention",
    "mid_block_type",
    "center_input_sample",
];
pub const STRINGS: &[&str] = &[
    "UNet2DConditionModel",
    "AutoencoderKL",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
    "CrossAttnUpBlock2D",
    "UpBlock2D",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "UNetMidBlock2DCrossAttn",
    "silu",
    "swish",
    "gelu",
    "positional",
    "fourier",
    "default",
    "scale_shift",
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "epsilon",
    "v_prediction",
    "sample",
    "leading",
    "trailing",
    "linspace",
    "dpmsolver++",
    "sde-dpmsolver++",
    "zero",
    "sigma_min",
    "",
    "\u{0}",
    "\u{fffd}",
    "text_time",
];

pub fn seeds() -> Vec<Vec<u8>> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut out: Vec<Vec<u8>> = [
        "tests/fixtures/tiny-sd-random/unet/config.json",
        "tests/fixtures/tiny-sd-random/vae/config.json",
        "tests/fixtures/tiny-sd-random/scheduler/scheduler_config.json",
        "tests/fixtures/tiny-sd2/model/unet/config.json",
        "tests/fixtures/tiny-sd2/model/vae/config.json",
        "tests/fixtures/tiny-sd2/model/scheduler/scheduler_config.json",
    ]
    .iter()
    .map(|p| std::fs::read(format!("{root}/{p}")).unwrap_or_else(|e| panic!("seed {p}: {e}")))
    .collect();
    out.push(b"{}".to_vec());
    out.push(br#"{"_class_name":"UNet2DConditionModel","cross_attention_dim":768,"attention_head_dim":8}"#.to_vec());
    out
}

/// JSON-aware edits most of the time (they keep the document parseable and reach the checks behind the
/// parser), raw byte edits otherwise (the tokenizer's own paths).
pub fn mutate_config(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng, max_number: Option<u64>) {
    if !rng.one_in(4) {
        if let Ok(mut v) = serde_json::from_slice::<Value>(input) {
            for _ in 0..1 + rng.below(3) {
                mutate_json(&mut v, KEYS, STRINGS, rng, max_number);
            }
            *input = if rng.one_in(2) {
                serde_json::to_vec(&v)
            } else {
                serde_json::to_vec_pretty(&v)
            }
            .unwrap();
            return;
        }
    }
    havoc(
        input,
        corpus,
        &[
            r#""layers_per_block": "#,
            r#""block_out_channels": ["#,
            "null",
            "true",
            "-1",
            "1e309",
            "]",
            "}",
            "\"NaN\"",
            "Infinity",
        ],
        rng,
        64 << 10,
    );
}

impl Target for ConfigJson {
    fn name(&self) -> &'static str {
        "config_json"
    }
    fn seeds(&mut self) -> Vec<Vec<u8>> {
        seeds()
    }
    fn mutate(&mut self, input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
        mutate_config(input, corpus, rng, None)
    }
    fn run(&mut self, input: &[u8], avoid_known: bool) -> Outcome {
        let Ok(text) = std::str::from_utf8(input) else {
            return Outcome::Seen("not utf-8".into());
        };
        if avoid_known && known::config_json_is_hostile(input) {
            return Outcome::Seen("hostile-skipped".into());
        }
        let mut seen = String::new();
        match UNetConfig::from_json(text) {
            Ok(c) => {
                if avoid_known && known::unet_config_is_hostile(&c) {
                    seen.push_str("unet:hostile-skipped");
                } else {
                    match UNet2DConditionModel::new(c) {
                        Ok(_) => seen.push_str("unet:ok"),
                        Err(e) => seen.push_str(&feature("unet-new", &e.to_string())),
                    }
                }
            }
            Err(e) => seen.push_str(&feature("unet", &e.to_string())),
        }
        match VaeConfig::from_json(text) {
            Ok(c) => {
                if avoid_known && known::vae_config_is_hostile(&c) {
                    seen.push_str("|vae:hostile-skipped");
                } else {
                    match AutoencoderKL::new(c) {
                        Ok(_) => seen.push_str("|vae:ok"),
                        Err(e) => seen.push_str(&feature("|vae-new", &e.to_string())),
                    }
                }
            }
            Err(e) => seen.push_str(&feature("|vae", &e.to_string())),
        }
        match SchedulerConfig::from_json_str(text) {
            Ok(c) => {
                if avoid_known && known::scheduler_config_is_hostile(&c) {
                    seen.push_str("|sched:hostile-skipped");
                } else {
                    // Every sampler, with and without Karras sigmas, at a few step counts (as a denoise call would).
                    let steps = 1 + (input.len() % 30);
                    for (kind, _) in SchedulerKind::ALL {
                        for karras in [false, true] {
                            match make_scheduler(kind, &c, steps, karras) {
                                Ok(_) => seen.push_str("|ok"),
                                Err(e) => seen.push_str(&feature("|sched", &e.to_string())),
                            }
                        }
                    }
                }
            }
            Err(e) => seen.push_str(&feature("|sched", &e.to_string())),
        }
        Outcome::Seen(seen)
    }
}
