#!/usr/bin/env python3
"""Write an SDXL base-architecture pipeline folder with seeded random fp16 weights, for benchmarks.

    scripts/bench/make_sdxl_random.py [OUT_DIR] [--seed N] [--force] [--only unet,vae,text_encoder,text_encoder_2]

OUT_DIR (default /work/sdxl-random; keep it OUTSIDE the repository and never commit weights, ~6.9 GB) gets the
diffusers layout of stabilityai/stable-diffusion-xl-base-1.0, with the fp16 files users download:

    OUT_DIR/model_index.json, scheduler/scheduler_config.json (EulerDiscreteScheduler, as shipped)
    OUT_DIR/unet/config.json + diffusion_pytorch_model.fp16.safetensors     2,567,463,684 parameters
    OUT_DIR/vae/config.json + diffusion_pytorch_model.fp16.safetensors      83,653,863
    OUT_DIR/text_encoder/config.json + model.fp16.safetensors               CLIP-L/14 text, 123,060,480
    OUT_DIR/text_encoder_2/config.json + model.fp16.safetensors             OpenCLIP bigG/14 text + projection, 694,659,840
    OUT_DIR/tokenizer/, tokenizer_2/                                        the real CLIP BPE (49408), pad EOS / "!"

Each weight file also gets a link without `.fp16` (diffusion_pytorch_model.safetensors, model.safetensors) to the
same fp16 bytes, so loaders that only look for the plain name (lowvram, `from_pretrained` without `variant`) read the
fp16 file, as they would a single-precision-free download.

The architectures are exactly SDXL base 1.0's: the UNet config is the one lowvram's tests hold
(src/models/unet/config.rs `SDXL_BASE`), the VAE's src/models/vae/config.rs `SDXL_VAE`, the text encoders MODELS.md
§5.1 (CLIP-L: 12 layers × 768, 12 heads, FFN 3072, quick_gelu; bigG: 32 × 1280, 20 heads, FFN 5120, gelu, 1280
projection). Weights are random but seeded: every conv/linear/embedding weight ~ N(0, 1/fan_in), biases
~ N(0, 0.02²), norm weights 1 and biases 0 (as make_sd15_random.py). Speed does not depend on the values.

To keep host RAM low (the benchmark machine is shared), nothing is materialised as a whole model: each model is
built on torch's `meta` device for its parameter names and shapes, and its safetensors file is written tensor by
tensor (one f32 tensor in memory at a time, ≤ 52 MB). No forward check is run (it would need the whole model in
RAM); lowvram's benchmarks compute in f32 on the CPU.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (= src/models/unet/config.rs tests' SDXL_BASE).
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (= src/models/vae/config.rs tests' SDXL_VAE).
SDXL_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# MODELS.md §5.1; the hub's text_encoder/ and text_encoder_2/ config.json values.
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                     layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_BIGG_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}

EXPECTED_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)


def qualified(prefix, mod_name, p_name):
    name = f"{mod_name}.{p_name}" if mod_name else p_name
    return name if name.startswith("text_projection") else prefix + name


def random_tensors(model, seed, prefix=""):
    """(name, fp16 tensor) for every parameter of a meta-device `model`, drawn one at a time in named_modules order
    from one seeded generator: N(0, 1/fan_in) weights, N(0, 0.02²) biases, identity norms."""
    gen = torch.Generator().manual_seed(seed)
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = qualified(prefix, mod_name, p_name)
            if isinstance(mod, NORM_TYPES):
                t = torch.ones(p.shape) if p_name == "weight" else torch.zeros(p.shape)
            elif p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                t = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            else:
                t = torch.randn(p.shape, generator=gen) * 0.02
            yield name, t.to(torch.float16).contiguous()


def write_safetensors_streaming(path, model, seed, prefix=""):
    """A safetensors file written tensor by tensor: the header comes from the meta shapes, then each tensor's bytes."""
    entries, offset = {}, 0
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = qualified(prefix, mod_name, p_name)
            n = p.numel() * 2
            entries[name] = {"dtype": "F16", "shape": list(p.shape), "data_offsets": [offset, offset + n]}
            offset += n
    header = dict(entries, __metadata__={"format": "pt"})
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    count = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, t in random_tensors(model, seed, prefix):
            assert list(t.shape) == entries[name]["shape"], name
            f.write(t.view(torch.uint8).numpy().tobytes())
            count += t.numel()
    os.replace(tmp, path)
    return count, offset


def link_plain(folder, fp16_name, plain_name):
    plain = folder / plain_name
    if plain.exists() or plain.is_symlink():
        plain.unlink()
    os.symlink(fp16_name, plain)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="/work/sdxl-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite components that exist")
    ap.add_argument("--only", default="unet,vae,text_encoder,text_encoder_2")
    args = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(args.out_dir).resolve()
    repo = HERE.parent.parent.resolve()
    if out == repo or repo in out.parents:
        print(f"refusing to write weights inside the repository ({out})", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    report = {"out_dir": str(out), "seed": args.seed, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__}

    for i, name in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
        if name not in only:
            continue
        folder = out / name
        is_diffusers = name in ("unet", "vae")
        fp16_name = "diffusion_pytorch_model.fp16.safetensors" if is_diffusers else "model.fp16.safetensors"
        if (folder / fp16_name).exists() and not args.force:
            print(f"{name}: exists (use --force to rewrite)", flush=True)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with torch.device("meta"):
            if name == "unet":
                model = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            elif name == "vae":
                model = AutoencoderKL(**SDXL_VAE_CONFIG)
            elif name == "text_encoder":
                model = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
            else:
                model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_CONFIG))
        if is_diffusers:
            model.save_config(folder)
            prefix = ""
        else:
            model.config.architectures = [type(model).__name__]
            model.config.dtype = "float16"
            model.config.save_pretrained(folder)
            # transformers 5 names CLIPTextModel's parameters without `text_model.`; the hub's files have it.
            prefix = "text_model." if not any(n.startswith("text_model.") for n, _ in model.named_parameters()) else ""
        params, nbytes = write_safetensors_streaming(folder / fp16_name, model, args.seed + 1000 * i, prefix)
        link_plain(folder, fp16_name, fp16_name.replace(".fp16", ""))
        ok = params == EXPECTED_PARAMS[name]
        report[name] = {"params": params, "expected_params": EXPECTED_PARAMS[name], "bytes": nbytes}
        print(f"{name}: {params:,} parameters (SDXL base: {EXPECTED_PARAMS[name]:,}{'' if ok else ' MISMATCH'}), "
              f"{nbytes:,} bytes fp16", flush=True)
        if not ok:
            return 1
        del model

    from make_text_fixtures import clip_vocab, write_vocab_folder, EOS

    vocab, merges = clip_vocab()
    write_vocab_folder(out / "tokenizer", vocab, merges, EOS)
    write_vocab_folder(out / "tokenizer_2", vocab, merges, "!")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(SDXL_SCHEDULER_CONFIG, _diffusers_version=diffusers.__version__), indent=2, sort_keys=True)
        + "\n")
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "README.txt").write_text("Random-weight SDXL base architecture for benchmarks, written by "
                                    f"scripts/bench/make_sdxl_random.py (seed {args.seed}). Not a usable image model.\n")
    (out / "make_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
