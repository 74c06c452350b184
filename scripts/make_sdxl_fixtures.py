#!/usr/bin/env python3
"""Build the tiny SDXL-style pipeline and the diffusers reference outputs for tests/sdxl.rs.

How to run (from the repository root; CPU only; no network access needed):

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt \
        && .venv/bin/python scripts/make_sdxl_fixtures.py

What it writes (tests/fixtures/README.md describes every tensor):

    tests/fixtures/tiny-sdxl/model/{unet,vae,scheduler}   diffusers pipeline folder (StableDiffusionXLPipeline
        without text encoders): UNet with an attention-free first down block, per-block transformer depth [1, 2],
        per-block heads [2, 4], linear projections, cross_attention_dim 64 and addition_embed_type "text_time"
        (pooled 32 + 6 x 8 time embedding); an AutoencoderKL with force_upcast and scaling_factor 0.13025; the
        EulerDiscreteScheduler config SDXL ships (leading spacing, steps_offset 1, scaled_linear 0.00085..0.012).
    tests/fixtures/tiny-sdxl/unet_forward.safetensors     one UNet call with added conditioning (non-default,
        per-row original/crop/target sizes)
    tests/fixtures/tiny-sdxl/sample_{euler,dpmpp_2m}.safetensors   StableDiffusionXLPipeline(prompt_embeds,
        pooled_prompt_embeds, negative_*, latents, guidance 5.0, output_type="latent") on 8x12 latents, with the
        exact embeddings and add_time_ids the pipeline handed to the UNet, and the VAE decode of the result

Float32 on CPU, deterministic algorithms, one thread; every random tensor comes from its own seeded generator, so
two runs write byte-identical files. Every parameter is re-drawn (diffusers zero-initialises some), so no layer is
zero or identity-like and a wrong port cannot pass by accident.
"""

import copy
import math
import os
import shutil
import sys
from pathlib import Path

import fixture_env  # noqa: E402,F401  (deterministic single-threaded CPU torch; before torch)

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.manual_seed(0)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny-sdxl"
MODEL = OUT / "model"
EXPECTED_TORCH = "2.15.0"
EXPECTED_DIFFUSERS = "0.42.1"

NUM_STEPS = 8
GUIDANCE = 5.0
TEXT_LEN = 77
POOLED = 32  # width of the pooled text embedding (SDXL: 1280, OpenCLIP bigG's projection)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
LATENT_HW = (8, 12)  # non-square, so an H/W swap in the time ids or the latents shows

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    # 16/32 channels (head dims 8 and 8) and one resnet per down block (two per up block): keeps the committed
    # file at ~1.5 MB.
    block_out_channels=(16, 32),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),  # diffusers' naming: head counts per block
    use_linear_projection=True,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED,
    norm_num_groups=8,
    norm_eps=1e-5,
    act_fn="silu",
    upcast_attention=False,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.13025,
    force_upcast=True,
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json.
SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)

SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
}


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, seed):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32)


def stats(t):
    t = t.detach().float()
    std = t.std().item() if t.numel() > 1 else 0.0
    return f"min {t.min().item():+.4f} max {t.max().item():+.4f} mean {t.mean().item():+.4f} std {std:.4f}"


def save_tensors(path, tensors):
    out = {}
    for k, v in tensors.items():
        v = v.detach().to(torch.float32).contiguous().clone()
        if not torch.isfinite(v).all():
            raise SystemExit(f"{path.name}:{k}: non-finite values")
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = f"scripts/make_sdxl_fixtures.py; torch {torch.__version__.split('+')[0]}; diffusers {diffusers.__version__}"
    save_file(out, str(path), metadata={"generated_by": meta})
    print(f"  wrote {path.relative_to(ROOT)}")
    for k, v in out.items():
        print(f"    {k:30s} {str(list(v.shape)):18s} {stats(v)}")


def reinit_(model, seed):
    """Re-draw every parameter: norm weights U[0.5, 1.5], biases N(0, 0.1), conv/linear weights N(0, 1/fan_in)."""
    g = gen(seed)
    covered = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                if mod.weight is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                std = 1.0 / math.sqrt(mod.weight[0].numel())
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            else:
                if any(True for _ in mod.parameters(recurse=False)):
                    raise SystemExit(f"reinit: unhandled module with parameters: {name} ({type(mod).__name__})")
                continue
            bias = getattr(mod, "bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
            for p in mod.parameters(recurse=False):
                covered.add(id(p))
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise SystemExit(f"reinit: parameters not re-drawn: {missing}")


FLOORS = []


def floor(name, key, out32, out64):
    r = ((out32.double() - out64.double()).abs().max() / out64.double().abs().max()).item()
    FLOORS.append((name, key, r))


def build():
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    reinit_(unet, 3001)
    vae = AutoencoderKL(**VAE_CONFIG)
    reinit_(vae, 3002)
    unet.eval()
    vae.eval()
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
    if MODEL.exists():
        shutil.rmtree(MODEL)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(str(MODEL), safe_serialization=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(MODEL), text_encoder=None, text_encoder_2=None,
                                                     tokenizer=None, tokenizer_2=None, add_watermarker=False,
                                                     dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for n, p in unet.state_dict().items():
        assert torch.equal(p, pipe.unet.state_dict()[n]), n
    for n, p in vae.state_dict().items():
        assert torch.equal(p, pipe.vae.state_dict()[n]), n
    print(f"  unet {sum(p.numel() for p in unet.parameters())} params, vae {sum(p.numel() for p in vae.parameters())}")
    return pipe


def unet_ref(pipe, unet64):
    unet = pipe.unet
    d = unet.config.cross_attention_dim
    sample = randn((2, 4) + LATENT_HW, 3100)
    ehs = randn((2, TEXT_LEN, d), 3101)
    text_embeds = randn((2, POOLED), 3102)
    # Non-default micro-conditioning, different per row: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
    time_ids = torch.tensor([[1024.0, 768.0, 16.0, 32.0, 832.0, 640.0], [512.0, 896.0, 0.0, 48.0, 64.0, 96.0]])
    t = torch.tensor([537.0])
    with torch.no_grad():
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        out = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        added64 = {k: v.double() for k, v in added.items()}
        out64 = unet64(sample.double(), t.double(), encoder_hidden_states=ehs.double(), added_cond_kwargs=added64).sample
        # The added conditioning must matter: swapping the rows' pooled embeddings / time ids changes the output.
        swap = unet(sample, t, encoder_hidden_states=ehs,
                    added_cond_kwargs={"text_embeds": text_embeds.flip(0), "time_ids": time_ids}).sample
        swap_t = unet(sample, t, encoder_hidden_states=ehs,
                      added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids.flip(0)}).sample
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    print(f"    rel diff (L2) with swapped pooled: {rel(swap, out):.3f}, swapped time ids: {rel(swap_t, out):.3f}")
    path = OUT / "unet_forward.safetensors"
    save_tensors(path, {"sample": sample, "timestep": t, "encoder_hidden_states": ehs, "text_embeds": text_embeds,
                        "time_ids": time_ids, "out": out})
    floor(path.name, "out", out, out64)


class Recorder:
    """Wraps the UNet's forward and records what the pipeline passes it on the first call."""

    def __init__(self, unet):
        self.unet = unet
        self.first = None
        self.calls = 0
        self.original = unet.forward

    def __enter__(self):
        def fwd(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
            if self.first is None:
                self.first = {"encoder_hidden_states": encoder_hidden_states.clone(),
                              "text_embeds": added_cond_kwargs["text_embeds"].clone(),
                              "time_ids": added_cond_kwargs["time_ids"].clone()}
            self.calls += 1
            return self.original(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                                 **kwargs)

        self.unet.forward = fwd
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.original
        return False


def run_pipe(pipe, name, init_noise, cond, uncond, pooled, upooled):
    cls, overrides = SAMPLERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    h, w = LATENT_HW[0] * pipe.vae_scale_factor, LATENT_HW[1] * pipe.vae_scale_factor
    with Recorder(pipe.unet) as rec:
        latents = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                       negative_pooled_prompt_embeds=upooled, latents=init_noise.clone(), height=h, width=w,
                       num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE, output_type="latent").images
    assert rec.calls == NUM_STEPS, rec.calls
    return latents, rec.first, pipe.scheduler, (h, w)


def sampling_refs(pipe, pipe64):
    d = pipe.unet.config.cross_attention_dim
    sf = pipe.vae.config.scaling_factor
    base = pipe.scheduler
    init_noise = randn((1, 4) + LATENT_HW, 3200)
    cond = randn((1, TEXT_LEN, d), 3201)
    uncond = randn((1, TEXT_LEN, d), 3202)
    pooled = randn((1, POOLED), 3203)
    upooled = randn((1, POOLED), 3204)
    for name in SAMPLERS:
        pipe.scheduler = base
        latents, seen, sched, (h, w) = run_pipe(pipe, name, init_noise, cond, uncond, pooled, upooled)
        # The pipeline's add_time_ids: (H, W, 0, 0, H, W) for both halves of the CFG batch, uncond first.
        expect_ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32)
        assert torch.equal(seen["time_ids"], expect_ids), seen["time_ids"]
        assert torch.equal(seen["text_embeds"], torch.cat([upooled, pooled])), "pooled order"
        assert torch.equal(seen["encoder_hidden_states"], torch.cat([uncond, cond])), "embeddings order"
        with torch.no_grad():
            image = pipe.vae.decode(latents / sf).sample
        pipe64.scheduler = base
        latents64, _, _, _ = run_pipe(pipe64, name, init_noise.double(), cond.double(), uncond.double(),
                                      pooled.double(), upooled.double())
        with torch.no_grad():
            image64 = pipe64.vae.decode(latents64.double() / sf).sample
        print(f"  {name}: timesteps {sched.timesteps.tolist()}, init_noise_sigma {float(sched.init_noise_sigma):.6f}")
        path = OUT / f"sample_{name}.safetensors"
        save_tensors(path, {
            "sampling.init_noise": init_noise,
            "sampling.cond_embeddings": cond,
            "sampling.uncond_embeddings": uncond,
            "sampling.cond_pooled": pooled,
            "sampling.uncond_pooled": upooled,
            "sampling.time_ids": seen["time_ids"][1:],
            "debug.unet_time_ids": seen["time_ids"],
            "debug.unet_text_embeds": seen["text_embeds"],
            "timesteps": sched.timesteps.to(torch.float32),
            "latents": latents,
            "image": image,
        })
        floor(path.name, "latents", latents, latents64)
        floor(path.name, "image", image, image64)
    pipe.scheduler = base


def main():
    tv = torch.__version__.split("+")[0]
    if tv != EXPECTED_TORCH or diffusers.__version__ != EXPECTED_DIFFUSERS:
        print(f"warning: expected torch {EXPECTED_TORCH} / diffusers {EXPECTED_DIFFUSERS}, "
              f"have {tv} / {diffusers.__version__}", file=sys.stderr)
    for f in OUT.glob("*.safetensors"):
        f.unlink()
    print(f"== {MODEL.relative_to(ROOT)}")
    pipe = build()
    pipe64 = copy.copy(pipe)
    pipe64.unet = copy.deepcopy(pipe.unet).double()
    pipe64.vae = copy.deepcopy(pipe.vae).double()
    unet_ref(pipe, pipe64.unet)
    sampling_refs(pipe, pipe64)
    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.stat().st_size:9d}  {f.relative_to(ROOT)}")
    print(f"  {total:9d}  total")
    print("== precision floor: max|f32 - f64| / max|f64|")
    for f, k, r in FLOORS:
        print(f"  {r:.1e}  {f} {k}")


if __name__ == "__main__":
    main()
