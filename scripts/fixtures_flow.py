#!/usr/bin/env python3
"""Fixtures for tests/flow_match.rs: FlowMatchEulerDiscreteScheduler as FluxPipeline drives it, and a tiny FLUX-style
16-channel VAE (folder and BFL `ae.safetensors` layout).

Run from the repository root (CPU, float32, no network; pins in scripts/requirements-fixtures.txt):

    /work/venv/bin/python scripts/fixtures_flow.py

Writes tests/fixtures/flow/:

    schedules.json          for each run (config × steps × latent size): the timesteps and sigmas diffusers'
                            scheduler holds after FluxPipeline's `retrieve_timesteps(sigmas=np.linspace(1, 1/N, N),
                            mu=calculate_shift(image_seq_len, ...))`; the configs verbatim.
    loops.safetensors       `fixed` [1,16,8,12], `init` [1,16,8,12]; per loop `NAME/sample.i`, `NAME/v.i` (the
                            scheduler's inputs at step i; its output is `sample.{i+1}`) and `NAME/final`, for a fake velocity model
                            v = 0.9·x + 0.1·tanh(x) + (t/1000)·fixed driven through FluxPipeline's loop (no CFG).
    unet_flow.safetensors   the random tiny SD UNet (tests/fixtures/tiny-sd-random/unet) driven by the FLUX.1-dev scheduler for 3
                            steps on a non-square 12×8 latent (image_seq_len 24): `init` [1,4,12,8], `cond`
                            [1,77,32], `final` [1,4,12,8]. Exercises Context::denoise_conditioned end to end.
    vae/                    a tiny AutoencoderKL (16 latent channels, no quant convs, block_out_channels (32, 32),
                            norm_num_groups 32, scaling_factor 0.3611, shift_factor 0.1159), weights stored as F16
    ae.safetensors          the same weights under BFL/LDM names (`encoder.down.0.block.0…`, attention as 1×1 convs)
    vae_ref.safetensors     `latents` [1,16,6,10] (as a pipeline returns them), `image` = vae.decode(latents/0.3611
                            + 0.1159) [1,3,12,20]; `pixels` [1,3,12,20] in [-1,1] and `encoded` = (mean − 0.1159)·0.3611.

Deterministic: one thread, portable kernels, a seeded generator per tensor.
"""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import fixture_env  # noqa: E402,F401  (deterministic single-threaded CPU torch; before torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import diffusers  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert np.__version__ == "2.4.6", np.__version__

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "flow"
META = {"generated_by": f"scripts/fixtures_flow.py; torch {torch.__version__.split('+')[0]}; diffusers {diffusers.__version__}"}

BASE = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
}
CONFIGS = {
    # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (diffusers 0.30 era).
    "dev": dict(BASE, shift=3.0, use_dynamic_shifting=True),
    # FLUX.1-schnell: no shift (BFL's get_schedule(shift=False)).
    "schnell": dict(BASE, shift=1.0, use_dynamic_shifting=False),
    # A static shift (SD3-style).
    "static3": dict(BASE, shift=3.0, use_dynamic_shifting=False),
    # The linear time shift, other seq-len bounds and shifts.
    "linear": dict(BASE, shift=3.0, use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.3,
                   max_shift=1.4, base_image_seq_len=128, max_image_seq_len=2048),
    # What save_config writes for dev: every key with its default.
    "dev_saved": None,
}
CONFIGS["dev_saved"] = {k: v for k, v in dict(FlowMatchEulerDiscreteScheduler(**{
    k: v for k, v in CONFIGS["dev"].items() if not k.startswith("_")}).config).items() if not k.startswith("_")}
CONFIGS["dev_saved"]["_class_name"] = "FlowMatchEulerDiscreteScheduler"


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_scheduler(cfg):
    return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in cfg.items()})


def flux_set_timesteps(sched, steps, latent_h, latent_w):
    """FluxPipeline.__call__ step 5, verbatim."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    image_seq_len = (latent_h // 2) * (latent_w // 2)
    mu = calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    timesteps, n = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    assert n == steps
    return timesteps, mu


def schedules():
    runs = []
    sizes = [(128, 128), (8, 12), (32, 32), (64, 96), (200, 200), (2, 2)]
    for name, cfg in CONFIGS.items():
        for steps in [1, 2, 4, 28, 50]:
            for (h, w) in sizes:
                sched = make_scheduler(cfg)
                ts, mu = flux_set_timesteps(sched, steps, h, w)
                assert ts.dtype == torch.float32 and sched.sigmas.dtype == torch.float32
                runs.append({
                    "config": name,
                    "steps": steps,
                    "latent_size": [h, w],
                    "mu": mu,
                    "timesteps": [float(x) for x in ts.tolist()],
                    "sigmas": [float(x) for x in sched.sigmas.tolist()],
                })
    return {"configs": CONFIGS, "runs": runs}


def fake_v(x, t, fixed):
    return 0.9 * x + 0.1 * torch.tanh(x) + (t / 1000.0) * fixed


def loops():
    out = {}
    fixed = torch.randn((1, 16, 8, 12), generator=gen(1))
    init = torch.randn((1, 16, 8, 12), generator=gen(2))
    out["fixed"], out["init"] = fixed, init
    meta = []
    for name, steps in [("dev", 4), ("schnell", 4), ("static3", 3), ("linear", 5)]:
        sched = make_scheduler(CONFIGS[name])
        ts, _ = flux_set_timesteps(sched, steps, 8, 12)
        latents = init.clone()  # FluxPipeline: prepare_latents does not scale the noise
        for i, t in enumerate(ts):
            v = fake_v(latents, t.item(), fixed)
            out[f"{name}/sample.{i}"] = latents.clone()
            out[f"{name}/v.{i}"] = v.clone()
            latents = sched.step(v, t, latents, return_dict=False)[0]
        out[f"{name}/final"] = latents.clone()
        meta.append({"name": name, "steps": steps})
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "loops.safetensors"), metadata=META)
    return meta


def unet_flow():
    unet = UNet2DConditionModel.from_pretrained(str(ROOT / "tests" / "fixtures" / "tiny-sd-random" / "unet")).eval()
    sched = make_scheduler(CONFIGS["dev"])
    init = torch.randn((1, 4, 12, 8), generator=gen(3))
    cond = torch.randn((1, 77, 32), generator=gen(4))
    ts, mu = flux_set_timesteps(sched, 3, 12, 8)
    latents = init.clone()
    with torch.no_grad():
        for t in ts:
            out = unet(latents, t.expand(latents.shape[0]), encoder_hidden_states=cond).sample
            latents = sched.step(out, t, latents, return_dict=False)[0]
    save_file({"init": init, "cond": cond, "final": latents.contiguous(), "timesteps": ts.clone()},
              str(OUT / "unet_flow.safetensors"), metadata=META)
    print(f"unet_flow: timesteps {ts.tolist()} mu {mu}")


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 32], layers_per_block=1, act_fn="silu", latent_channels=16, norm_num_groups=32,
    sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    force_upcast=True, mid_block_add_attention=True,
)


def reinit_f16_(model, seed):
    """Re-draw every parameter (norm weights U[0.5, 1.5], biases N(0, 0.1), weights N(0, 1/fan_in)), rounded to
    float16 so the F16 files hold exactly the weights the float32 reference uses."""
    g = gen(seed)
    covered = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                std = 1.0 / math.sqrt(mod.weight[0].numel())
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            else:
                if any(True for _ in mod.parameters(recurse=False)):
                    raise SystemExit(f"reinit: unhandled module {name}")
                continue
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            for p in mod.parameters(recurse=False):
                p.copy_(p.half().float())
                covered.add(id(p))
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert not missing, missing


def to_bfl(sd, levels):
    """diffusers AutoencoderKL names → BFL/LDM `ae.safetensors` names (the inverse of convert_ldm_vae_checkpoint)."""
    out = {}
    for k, v in sd.items():
        n = k
        n = n.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = n.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            rest = parts[3:]
            if rest[0] == "resnets":
                n = f"encoder.down.{i}.block.{rest[1]}." + ".".join(rest[2:])
            else:  # downsamplers.0.conv.*
                n = f"encoder.down.{i}.downsample." + ".".join(rest[2:])
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            rest = parts[3:]
            if rest[0] == "resnets":
                n = f"decoder.up.{i}.block.{rest[1]}." + ".".join(rest[2:])
            else:
                n = f"decoder.up.{i}.upsample." + ".".join(rest[2:])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                n = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:
                sub = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
                leaf = parts[-1]
                n = f"{parts[0]}.mid.attn_1.{sub}.{leaf}"
                if sub != "norm" and leaf == "weight":
                    v = v.reshape(*v.shape, 1, 1)
        out[n] = v.contiguous()
    return out


def vae():
    vae_dir = OUT / "vae"
    if vae_dir.exists():
        shutil.rmtree(vae_dir)
    model = AutoencoderKL(**VAE_CONFIG).eval()
    reinit_f16_(model, 10)
    model.save_pretrained(str(vae_dir), safe_serialization=True)
    # Store F16 (exact: the weights were rounded to float16).
    wf = vae_dir / "diffusion_pytorch_model.safetensors"
    sd = {k: v.half().contiguous() for k, v in load_file(str(wf)).items()}
    save_file(sd, str(wf), metadata=META)
    bfl = to_bfl(sd, len(VAE_CONFIG["block_out_channels"]))
    save_file(bfl, str(OUT / "ae.safetensors"), metadata=META)
    # Independent check of the BFL file: diffusers' own LDM converter gives back the folder's tensors.
    back = convert_ldm_vae_checkpoint({k: v.float() for k, v in bfl.items()}, dict(model.config))
    assert sorted(back) == sorted(sd), set(back) ^ set(sd)
    for k in sd:
        assert torch.equal(back[k].reshape(sd[k].shape), sd[k].float()), k

    latents = torch.randn((1, 16, 6, 10), generator=gen(11))
    pixels = torch.rand((1, 3, 12, 20), generator=gen(12)) * 2 - 1
    with torch.no_grad():
        z = latents / model.config.scaling_factor + model.config.shift_factor  # FluxPipeline's decode
        image = model.decode(z, return_dict=False)[0]
        mean = model.encode(pixels).latent_dist.mean
        encoded = (mean - model.config.shift_factor) * model.config.scaling_factor  # FluxImg2ImgPipeline
    save_file({"latents": latents, "image": image.contiguous(), "pixels": pixels, "encoded": encoded.contiguous()},
              str(OUT / "vae_ref.safetensors"), metadata=META)
    print(f"vae: {sum(p.numel() for p in model.parameters())} params; image range {image.min():.3f}..{image.max():.3f}")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    s = schedules()
    s["loops"] = loops()
    (OUT / "schedules.json").write_text(json.dumps(s, indent=1, sort_keys=True) + "\n")
    unet_flow()
    vae()
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(ROOT)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
