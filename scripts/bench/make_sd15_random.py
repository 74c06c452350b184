#!/usr/bin/env python3
"""Write a Stable Diffusion 1.5-architecture pipeline folder with seeded random weights, for benchmarks.

    scripts/bench/make_sd15_random.py [OUT_DIR] [--seed N] [--force]

OUT_DIR (default target/sd15-random, ignored by git; never commit weights) gets the diffusers layout:

    OUT_DIR/model_index.json
    OUT_DIR/scheduler/scheduler_config.json           SD 1.5's PNDM config
    OUT_DIR/unet/config.json                          SD 1.5's UNet2DConditionModel config
    OUT_DIR/unet/diffusion_pytorch_model.safetensors       f32
    OUT_DIR/unet/diffusion_pytorch_model.fp16.safetensors  fp16 (variant="fp16")
    OUT_DIR/vae/...                                   the same for AutoencoderKL

The architectures are exactly SD 1.5's (runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json, written
out below; no hub access is needed). Weights are random but seeded, and scaled so activations stay finite in f32 and
fp16: every conv/linear weight ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights 1 and biases 0. The script
runs a small forward through both models and refuses to write if any output is non-finite or if an activation would
overflow fp16. Speed does not depend on the values, so the timings of this model are those of the real one.

Prints parameter counts (expected: UNet 859,520,964; VAE 83,653,863 of which decoder + post_quant_conv ~49.5 M) and
the file sizes. Needs torch and diffusers (the fixture venv: torch 2.15.0, diffusers 0.42.1).
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch

# runwayml/stable-diffusion-v1-5, unet/config.json (diffusers' key names; values as published).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# runwayml/stable-diffusion-v1-5, vae/config.json (+ scaling_factor, which later diffusers versions write out).
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# Known parameter counts of the published checkpoints, to check the architectures against.
EXPECTED_UNET_PARAMS = 859_520_964
EXPECTED_VAE_PARAMS = 83_653_863


def init_random_(model, seed):
    """Seeded N(0, 1/fan_in) weights for conv/linear layers, small random biases, identity norms.

    One generator walks the named parameters in a fixed order, so the same seed gives the same weights on any
    machine and thread count."""
    gen = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for _mod_name, mod in model.named_modules():
            if isinstance(mod, norm_types):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
                continue
            for p_name, p in mod.named_parameters(recurse=False):
                if p_name == "weight" and p.dim() >= 2:
                    fan_in = p[0].numel()  # in_features, or in_channels/groups * kh * kw
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
                elif p_name == "bias" or p.dim() == 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel())))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


class ActivationWatch:
    """Largest |activation| seen in any submodule output during a forward (to show fp16 would not overflow)."""

    def __init__(self, model):
        self.max_abs = 0.0
        self.where = ""
        self.handles = [m.register_forward_hook(self.hook(n)) for n, m in model.named_modules() if n]

    def hook(self, name):
        def fn(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                v = float(t.detach().abs().max())
                if not math.isfinite(v) or v > self.max_abs:
                    self.max_abs, self.where = v, name
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def check_unet(unet, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    ehs = torch.randn(2, 77, 768, generator=gen)
    watch = ActivationWatch(unet)
    with torch.inference_mode():
        out = unet(x, torch.tensor(999), encoder_hidden_states=ehs).sample
    watch.close()
    return out, watch


def check_vae(vae, seed):
    gen = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(1, 4, 16, 16, generator=gen)
    watch = ActivationWatch(vae.decoder)
    with torch.inference_mode():
        out = vae.decode(z / vae.config.scaling_factor).sample
    watch.close()
    return out, watch


def file_sizes(folder):
    return {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="target/sd15-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT_DIR")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    import diffusers

    out = os.path.abspath(args.out_dir)
    if os.path.exists(os.path.join(out, "model_index.json")) and not args.force:
        print(f"{out} already holds a model (use --force to rewrite)", file=sys.stderr)
        return 0
    if os.path.exists(out):
        for sub in ("unet", "vae", "scheduler"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)

    report = {"out_dir": out, "seed": args.seed, "torch": torch.__version__, "diffusers": diffusers.__version__}
    fp16_max = torch.finfo(torch.float16).max

    for name, cls, config, expected, check in (
        ("unet", UNet2DConditionModel, SD15_UNET_CONFIG, EXPECTED_UNET_PARAMS, check_unet),
        ("vae", AutoencoderKL, SD15_VAE_CONFIG, EXPECTED_VAE_PARAMS, check_vae),
    ):
        model = cls(**config).eval()
        init_random_(model, args.seed + (0 if name == "unet" else 1000))
        count = n_params(model)
        info = {"params": count, "expected_params": expected}
        if name == "vae":
            info["decoder_params"] = n_params(model.decoder) + n_params(model.post_quant_conv)
            info["encoder_params"] = n_params(model.encoder) + n_params(model.quant_conv)
        if count != expected:
            print(f"FATAL: {name} has {count:,} parameters, SD 1.5's has {expected:,}", file=sys.stderr)
            return 1
        result, watch = check(model, args.seed)
        info["check_out_abs_max"] = float(result.abs().max())
        info["check_out_std"] = float(result.std())
        info["check_activation_abs_max"] = watch.max_abs
        info["check_activation_abs_max_at"] = watch.where
        if not torch.isfinite(result).all() or not math.isfinite(watch.max_abs) or watch.max_abs > fp16_max / 16:
            print(f"FATAL: {name} activations not safely finite: {info}", file=sys.stderr)
            return 1
        folder = os.path.join(out, name)
        model.save_pretrained(folder, safe_serialization=True)
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
        del model
        info["files"] = file_sizes(folder)
        report[name] = info
        print(f"{name}: {count:,} parameters (SD 1.5: {expected:,})", flush=True)
        if name == "vae":
            print(f"  decoder + post_quant_conv {info['decoder_params']:,}, "
                  f"encoder + quant_conv {info['encoder_params']:,}")
        print(f"  check forward: |out| max {info['check_out_abs_max']:.3g}, out std {info['check_out_std']:.3g}, "
              f"largest activation {watch.max_abs:.3g} at {watch.where}")
        for f, size in info["files"].items():
            print(f"  {name}/{f}: {size:,} bytes ({human(size)})")

    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    sched = dict(SD15_SCHEDULER_CONFIG, _diffusers_version=diffusers.__version__)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2, sort_keys=True)
        f.write("\n")
    # Text encoder, tokenizer and safety checker are not part of this benchmark model: listed as null, which
    # diffusers accepts (the pipeline then needs them passed explicitly, or prompt_embeds).
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write("Random-weight SD 1.5 architecture for benchmarks, written by scripts/bench/make_sd15_random.py "
                f"(seed {args.seed}). Not a usable image model.\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
