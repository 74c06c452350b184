#!/usr/bin/env python3
"""Scheduler parity fixtures for lowvram's sampling module (tests/sampling_parity.rs).

Runs diffusers' schedulers exactly as StableDiffusionPipeline drives them (classifier-free guidance,
scale_model_input, step), with a deterministic fake UNet in place of the real one:

    eps(x, t) = 0.9 * x + 0.1 * tanh(x) + (0.01 * t / 1000) * F[:batch]

where x is the (concatenated, scaled) model input and F a fixed tensor. The Rust test runs the same fake model
through lowvram::sampling::denoise and compares timesteps, sigmas, init_noise_sigma and the final latents.

Euler ancestral's per-step noise is taken from a fixed tensor (`step_noise`) by patching diffusers' noise draw,
as DECISIONS.md (Sampling) prescribes.

Pinned: torch 2.15.0, diffusers 0.42.1. Run: /root/fixenv/bin/python scripts/make_scheduler_fixtures.py
Writes tests/fixtures/schedulers/{fixtures.safetensors, fixtures.json}.
"""
import json
import os
import sys

import numpy as np
import torch
import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod
from safetensors.torch import save_file

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "schedulers")

# The scheduler_config.json shipped with SD 1.5 (PNDMScheduler's), verbatim.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    # As shipped: no timestep_spacing key, so each scheduler takes its own default
    # (Euler/EulerA/DPM: linspace, DDIM: leading).
    "sd15": SD15,
    "sd15_leading": dict(SD15, timestep_spacing="leading"),
    # SD 2.x 768-v style.
    "sd2v_trailing": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    },
    # Linear betas with every other key at the scheduler's default (DDIM: clip_sample and set_alpha_to_one true).
    "linear_linspace": {"beta_schedule": "linear", "timestep_spacing": "linspace"},
}
SCHEDULERS = {
    # name: (class, karras, our kind string)
    "euler": (EulerDiscreteScheduler, False, "euler"),
    "euler_karras": (EulerDiscreteScheduler, True, "euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, False, "euler_a"),
    "ddim": (DDIMScheduler, False, "ddim"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, False, "dpmpp_2m"),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, True, "dpmpp_2m"),
}
STEPS = [8, 20]
TABLE_STEPS = list(range(1, 51)) + [75, 100, 150, 333]
SHAPE = (1, 4, 8, 8)  # batch 1, SD latent channels, 64x64 image

g = torch.Generator().manual_seed(1234)
INIT_NOISE = torch.randn(SHAPE, generator=g, dtype=torch.float32)
STEP_NOISE = torch.randn((max(STEPS),) + SHAPE, generator=g, dtype=torch.float32)
FIXED = torch.randn((2 * SHAPE[0],) + SHAPE[1:], generator=g, dtype=torch.float32)


def fake_model(x, t):
    tt = float(t)
    # Close to the ideal noise prediction for x0 ≈ 0 (the scaled input), so the latents shrink to O(1) as real
    # sampling does and an absolute tolerance on them means something.
    return 0.9 * x + 0.1 * torch.tanh(x) + (0.01 * tt / 1000.0) * FIXED[: x.shape[0]]


class NoiseFeed:
    """Replaces randn_tensor in the euler-ancestral module: step i gets STEP_NOISE[i]."""

    def __init__(self):
        self.i = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        n = STEP_NOISE[self.i].to(dtype=dtype)
        assert tuple(n.shape) == tuple(shape), (n.shape, shape)
        self.i += 1
        return n


def run(cls, karras, cfg, steps, guidance):
    kwargs = {"use_karras_sigmas": True} if karras else {}
    sched = cls.from_config(cfg, **kwargs)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    sigmas = sched.sigmas.clone() if hasattr(sched, "sigmas") and cls is not DDIMScheduler else None
    ins = sched.init_noise_sigma
    ins = float(ins)
    feed = NoiseFeed()
    orig = ea_mod.randn_tensor
    ea_mod.randn_tensor = feed
    try:
        # StableDiffusionPipeline.__call__, steps 5-7 (prepare_latents, denoising loop).
        latents = INIT_NOISE.clone() * sched.init_noise_sigma
        cfg_on = guidance > 1.0
        extra = {"eta": 0.0} if cls is DDIMScheduler else {}
        for t in sched.timesteps:
            inp = torch.cat([latents] * 2) if cfg_on else latents
            inp = sched.scale_model_input(inp, t)
            noise_pred = fake_model(inp, t)
            if cfg_on:
                u, c = noise_pred.chunk(2)
                noise_pred = u + guidance * (c - u)
            latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    finally:
        ea_mod.randn_tensor = orig
    if cls is EulerAncestralDiscreteScheduler:
        assert feed.i == steps
    return timesteps, sigmas, ins, latents, sched


def main():
    os.makedirs(OUT, exist_ok=True)
    tensors = {
        "init_noise": INIT_NOISE.contiguous(),
        "step_noise": STEP_NOISE.contiguous(),
        "fixed": FIXED.contiguous(),
    }
    runs = []
    for cname, cfg in CONFIGS.items():
        for sname, (cls, karras, kind) in SCHEDULERS.items():
            for steps in STEPS:
                for guidance in ([7.5, 1.0] if steps == 8 else [7.5]):
                    name = f"{cname}/{sname}/{steps}/g{guidance}"
                    ts, sg, ins, lat, sched = run(cls, karras, cfg, steps, guidance)
                    tensors[name + "/timesteps"] = ts.to(torch.float64).contiguous()
                    if sg is not None:
                        tensors[name + "/sigmas"] = sg.to(torch.float32).contiguous()
                    tensors[name + "/latents"] = lat.to(torch.float32).contiguous()
                    runs.append(
                        {
                            "name": name,
                            "config": cname,
                            "kind": kind,
                            "karras": karras,
                            "steps": steps,
                            "guidance": guidance,
                            "init_noise_sigma": ins,
                            "timestep_spacing": sched.config.timestep_spacing,
                            "timestep_dtype": str(ts.dtype),
                        }
                    )
        # Exact training schedule, for the bit-level check of betas/alphas_cumprod.
        s = EulerDiscreteScheduler.from_config(cfg)
        tensors[f"{cname}/alphas_cumprod"] = s.alphas_cumprod.to(torch.float32).contiguous()
    # Schedules only (no loop) for many step counts: catches rounding / arange-length quirks.
    tables = []
    for cname in ["sd15", "sd15_leading", "sd2v_trailing", "linear_linspace"]:
        cfg = CONFIGS[cname]
        for sname in ["euler", "euler_karras", "ddim", "dpmpp_2m", "dpmpp_2m_karras"]:
            cls, karras, kind = SCHEDULERS[sname]
            lens, ts_all, sg_all = [], [], []
            for n in TABLE_STEPS:
                sched = cls.from_config(cfg, **({"use_karras_sigmas": True} if karras else {}))
                sched.set_timesteps(n)
                ts = sched.timesteps.to(torch.float64)
                lens.append(len(ts))
                ts_all.append(ts)
                if cls is not DDIMScheduler:
                    sg_all.append(sched.sigmas.to(torch.float32))
            key = f"table/{cname}/{sname}"
            tensors[key + "/lengths"] = torch.tensor(lens, dtype=torch.int64)
            tensors[key + "/timesteps"] = torch.cat(ts_all).contiguous()
            if sg_all:
                tensors[key + "/sigmas"] = torch.cat(sg_all).contiguous()
            tables.append({"key": key, "config": cname, "kind": kind, "karras": karras})
    save_file(tensors, os.path.join(OUT, "fixtures.safetensors"))
    meta = {
        "generated_by": "scripts/make_scheduler_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fake_model": "eps = 0.9*x + 0.1*tanh(x) + (0.01*t/1000)*fixed[:batch]",
        "configs": CONFIGS,
        "runs": runs,
        "table_steps": TABLE_STEPS,
        "tables": tables,
    }
    with open(os.path.join(OUT, "fixtures.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {len(runs)} runs to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
