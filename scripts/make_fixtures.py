#!/usr/bin/env python3
"""Build the tiny SD-style models shipped with lowvram and the diffusers reference outputs.

How to run (from the repository root; CPU only; the script itself needs no network access):

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt \
        && .venv/bin/python scripts/make_fixtures.py

What it writes (see tests/fixtures/README.md for every tensor's name, shape and meaning):

    tests/fixtures/tiny-sd-random/   SD1.x-style pipeline folder (diffusers layout) with random weights
                                     test model; unet/ also carries a fp16 variant file.
    tests/fixtures/tiny-sd/*.safetensors   references computed with diffusers for tests/fixtures/tiny-sd-random
    tests/fixtures/tiny-sd2/model/   SD2.x-style pipeline folder (linear projections, upcast attention,
                                     per-block head counts, v-prediction, trailing spacing)
    tests/fixtures/tiny-sd2/*.safetensors  references for that model

Everything is float32 on CPU with deterministic algorithms and one thread, and every random tensor is drawn
from its own seeded generator, so running the script twice gives byte-identical files.

The models are built from configs (never downloaded) and every parameter is re-drawn with a fixed seed
so that no layer is zero or identity-like: a wrong port cannot pass by accident.
"""

import copy
import math
import os
import shutil
import sys
from pathlib import Path

# Bit-reproducibility on CPU: one thread, MKL's conditional-numerical-reproducibility mode, aten's portable
# (non-SIMD-dispatched) kernels and no oneDNN, so that the last bits depend as little as possible on the CPU model
# and thread count. Must be set before torch (and MKL) load.
import fixture_env  # noqa: E402,F401  (deterministic single-threaded CPU torch; before torch)

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.manual_seed(0)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_TORCH = "2.15.0"
EXPECTED_DIFFUSERS = "0.42.1"

NUM_STEPS = 8
GUIDANCE = 7.5
TEXT_LEN = 77
# Extra gain on attention to_q/to_k weights. With plain N(0, 1/fan_in) weights the softmax is already clearly
# non-uniform (mean max-probability ~0.15 where uniform would be 1/16..1/77). Larger gains make the untrained
# model chaotic under 7.5x guidance: with 3.0, float32 rounding grew to a 2e-3 relative difference in one UNet
# call and to O(1) differences over 8 sampling steps (no port could match that); with 1.25 the SD2 euler_a
# reference was still 1.5e-4 away from float64. With 1.0 every reference is within ~2e-5 of float64.
QK_GAIN = 1.0

# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------

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
    scaling_factor=0.18215,
)

SD1_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=8,
    norm_eps=1e-5,
    cross_attention_dim=32,
    attention_head_dim=8,  # diffusers' SD1.x naming: this is the number of heads
    use_linear_projection=False,
    upcast_attention=False,
)

SD2_UNET_CONFIG = dict(
    SD1_UNET_CONFIG,
    # 40 (tiny-sd: 32): a second context width; the SD 2 text encoder of the single-file fixture is this wide.
    cross_attention_dim=40,
    # 16 channels in every block (head dims 8, 4 and 2 in the mid block): keeps this UNet and the single-file
    # sd2.safetensors that embeds it small.
    block_out_channels=(16, 16, 16),
    # One resnet per down block (two per up block) instead of SD's two: covers a second layer count and
    # keeps the committed files small.
    layers_per_block=1,
    # Per-block head counts (diffusers' SD2 naming: the list holds head counts). The last entry is used by the
    # mid block only (block 2 is a DownBlock2D); up blocks use the list reversed.
    attention_head_dim=[2, 4, 8],
    use_linear_projection=True,
    upcast_attention=True,
)

# SD 1.5's own scheduler_config.json, with timestep_spacing and prediction_type written out explicitly.
SD1_SCHEDULER = dict(
    _class_name="PNDMScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

# SD 2.1's scheduler_config.json (DDIMScheduler, v-prediction), with trailing timestep spacing.
SD2_SCHEDULER = dict(
    _class_name="DDIMScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    timestep_spacing="trailing",
)

# name -> (scheduler class, overrides passed to from_config)
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
}

# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, seed):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32)


def stats(t):
    t = t.detach().float()
    std = t.std().item() if t.numel() > 1 else 0.0
    return f"min {t.min().item():+.4f} max {t.max().item():+.4f} mean {t.mean().item():+.4f} std {std:.4f}"


def check_finite(name, t):
    if not torch.isfinite(t).all():
        raise SystemExit(f"{name}: non-finite values")


def save_tensors(path, tensors):
    out = {}
    for k, v in tensors.items():
        v = v.detach().to(torch.float32).contiguous()
        check_finite(f"{path.name}:{k}", v)
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes the metadata map in hash order, which changes from run to run
    # when there are several keys.
    meta = f"scripts/make_fixtures.py; torch {torch.__version__.split('+')[0]}; diffusers {diffusers.__version__}"
    save_file(out, str(path), metadata={"generated_by": meta})
    print(f"  wrote {path.relative_to(ROOT)}")
    for k, v in out.items():
        print(f"    {k:30s} {str(list(v.shape)):18s} {stats(v)}")


def reinit_(model, seed):
    """Re-draw every parameter: norms' weights U[0.5, 1.5], every bias N(0, 0.1), conv/linear weights
    N(0, 1/fan_in) (to_q/to_k times QK_GAIN). Fails if any parameter is not covered."""
    g = gen(seed)
    covered = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                if mod.weight is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                std = 1.0 / math.sqrt(fan_in)
                if name.endswith(".to_q") or name.endswith(".to_k"):
                    std *= QK_GAIN
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


def attention_sharpness(model, run):
    """Mean over attention modules of the mean max softmax probability (1/N would be uniform)."""
    from diffusers.models.attention_processor import Attention

    records = []

    def hook(mod, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        if x.ndim == 4:  # VAE mid-block attention: the processor applies group_norm itself
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
            if mod.group_norm is not None:
                x = mod.group_norm(x.transpose(1, 2)).transpose(1, 2)
        ctx = x if ctx is None else ctx
        q, k = mod.to_q(x), mod.to_k(ctx)
        b, n, d = q.shape
        hd = d // mod.heads
        q = q.view(b, n, mod.heads, hd).transpose(1, 2)
        k = k.view(b, -1, mod.heads, hd).transpose(1, 2)
        p = torch.softmax((q @ k.transpose(-1, -2)) * mod.scale, dim=-1)
        records.append((p.max(dim=-1).values.mean().item(), 1.0 / p.shape[-1]))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return records


def dir_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------------------------


def build_model(model_dir, unet_config, scheduler_dict, unet_seed, vae_seed, fp16_variant):
    torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(**unet_config)
    reinit_(unet, unet_seed)
    torch.manual_seed(vae_seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    reinit_(vae, vae_seed)
    unet.eval()
    vae.eval()
    # from_config keeps keys that belong to compatible schedulers (clip_sample for PNDM), exactly as loading
    # SD's own scheduler_config.json does.
    cls = getattr(diffusers, scheduler_dict["_class_name"])
    scheduler = cls.from_config(scheduler_dict)

    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    if fp16_variant:
        copy.deepcopy(unet).half().save_pretrained(str(model_dir / "unet"), safe_serialization=True, variant="fp16")

    # Load back exactly as a user would (local folder), and use the loaded objects from here on.
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
        image_encoder=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for n, p in unet.state_dict().items():
        assert torch.equal(p, pipe.unet.state_dict()[n]), n
    for n, p in vae.state_dict().items():
        assert torch.equal(p, pipe.vae.state_dict()[n]), n
    if fp16_variant:
        u16 = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet", variant="fp16")
        for n, p in unet.state_dict().items():
            assert torch.equal(p.half(), u16.state_dict()[n]), n
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    print(f"  {model_dir.relative_to(ROOT)}: unet {n_unet} params, vae {n_vae} params, {dir_size(model_dir)} bytes")
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------------


FLOORS = []  # (file, tensor, relative difference float32 vs float64)


def floor(path, key, out32, out64):
    """Record how far diffusers' float32 result is from the same computation in float64 (max abs difference over
    max abs value): the precision floor a correct float32 port can be expected to reach."""
    r = ((out32.double() - out64.double()).abs().max() / out64.double().abs().max()).item()
    FLOORS.append((str(path.relative_to(ROOT)), key, r))


def unet_refs(pipe, pipe64, out_dir, seed):
    unet, unet64 = pipe.unet, pipe64.unet
    d = unet.config.cross_attention_dim
    with torch.no_grad():
        for fname, shape, s in [("unet_forward.safetensors", (2, 4, 8, 8), seed),
                                ("unet_forward_nonsquare.safetensors", (1, 4, 8, 12), seed + 2),
                                # 6x10 is not divisible by 4 (2 downsamplers): diffusers forwards upsample_size
                                ("unet_forward_oddsize.safetensors", (1, 4, 6, 10), seed + 4)]:
            sample = randn(shape, s)
            ehs = randn((shape[0], TEXT_LEN, d), s + 1)
            t = torch.tensor([421.0], dtype=torch.float32)
            out = unet(sample, t, encoder_hidden_states=ehs).sample
            save_tensors(out_dir / fname, {"sample": sample, "timestep": t, "encoder_hidden_states": ehs, "out": out})
            out64 = unet64(sample.double(), t.double(), encoder_hidden_states=ehs.double()).sample
            floor(out_dir / fname, "out", out, out64)

        # Sanity: the output must depend clearly on timestep and conditioning.
        sample = randn((2, 4, 8, 8), seed)
        ehs = randn((2, TEXT_LEN, d), seed + 1)
        t = torch.tensor([421.0], dtype=torch.float32)
        out = unet(sample, t, encoder_hidden_states=ehs).sample

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        out_t21 = unet(sample, torch.tensor([21.0]), encoder_hidden_states=ehs).sample
        out_t981 = unet(sample, torch.tensor([981.0]), encoder_hidden_states=ehs).sample
        out_c = unet(sample, t, encoder_hidden_states=ehs.flip(0)).sample
        print(f"    rel diff (L2) of out: t=421 vs t=21: {rel(out_t21, out):.3f}, vs t=981: {rel(out_t981, out):.3f}, "
              f"swapped conditioning: {rel(out_c, out):.3f}")
        sharp = attention_sharpness(unet, lambda: unet(sample, t, encoder_hidden_states=ehs))
        print("    attention mean max-prob per module (uniform would be 1/N): "
              + ", ".join(f"{m:.2f}(1/{round(1 / u)})" for m, u in sharp))


def vae_refs(pipe, pipe64, out_dir, seed, large_hw):
    vae, vae64 = pipe.vae, pipe64.vae
    sf = vae.config.scaling_factor
    assert not vae.use_tiling and not vae.use_slicing
    with torch.no_grad():
        for fname, hw, s in [("vae_decode.safetensors", (8, 8), seed),
                             ("vae_decode_large.safetensors", large_hw, seed + 2)]:
            z = randn((1, 4) + hw, s) / sf
            image = vae.decode(z).sample
            save_tensors(out_dir / fname, {"latents": z, "image": image})
            floor(out_dir / fname, "image", image, vae64.decode(z.double()).sample)

        x = torch.rand((1, 3, 64, 64), generator=gen(seed + 1), dtype=torch.float32) * 2.0 - 1.0
        dist = vae.encode(x).latent_dist
        fname = "vae_encode.safetensors"
        save_tensors(out_dir / fname, {"image": x, "mean": dist.mean, "logvar": dist.logvar})
        dist64 = vae64.encode(x.double()).latent_dist
        floor(out_dir / fname, "mean", dist.mean, dist64.mean)
        floor(out_dir / fname, "logvar", dist.logvar, dist64.logvar)

        sharp = attention_sharpness(vae, lambda: vae.decode(z))
        print("    vae attention mean max-prob: " + ", ".join(f"{m:.3f}(1/{round(1 / u)})" for m, u in sharp))


class StepNoise:
    """Replacement for the randn_tensor that scheduling_euler_ancestral_discrete imported: returns step_noise[i]
    on the i-th call."""

    def __init__(self, step_noise):
        self.step_noise = step_noise
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None, **kwargs):
        noise = self.step_noise[self.calls]
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        self.calls += 1
        return noise.clone().to(dtype=dtype or noise.dtype)


class patched_step_noise:
    """Context manager: euler_a's noise draws return step_noise[i] at call i."""

    def __init__(self, step_noise):
        self.patch = StepNoise(step_noise)

    def __enter__(self):
        self.original = euler_a_module.randn_tensor
        euler_a_module.randn_tensor = self.patch
        return self.patch

    def __exit__(self, *exc):
        euler_a_module.randn_tensor = self.original
        return False


def make_scheduler(base_config, name):
    cls, overrides = SAMPLERS[name]
    # As pipelines do: XScheduler.from_config(pipe.scheduler.config, **overrides), the config being the one
    # loaded from the model's scheduler/scheduler_config.json.
    return cls.from_config(base_config, **overrides)


def sample_loop(unet, scheduler, init_noise, cond, uncond):
    """The denoising loop of StableDiffusionPipeline.__call__, written out (guidance 7.5, no rescale, eta 0)."""
    scheduler.set_timesteps(NUM_STEPS, device="cpu")
    timesteps = scheduler.timesteps
    latents = init_noise * scheduler.init_noise_sigma
    prompt_embeds = torch.cat([uncond, cond])
    extra = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
    step_latents = []
    with torch.no_grad():
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2)
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            step_latents.append(latents)
    return timesteps, latents, torch.stack(step_latents)


def sampling_refs(pipe, pipe64, out_dir, seed):
    d = pipe.unet.config.cross_attention_dim
    sf = pipe.vae.config.scaling_factor
    base_config = pipe.scheduler.config
    base_scheduler = pipe.scheduler
    init_noise = randn((1, 4, 8, 8), seed)
    cond = randn((1, TEXT_LEN, d), seed + 1)
    uncond = randn((1, TEXT_LEN, d), seed + 2)
    step_noise = randn((NUM_STEPS, 1, 4, 8, 8), seed + 3)
    for name in SAMPLERS:
        scheduler = make_scheduler(base_config, name)
        with patched_step_noise(step_noise) as patch:
            timesteps, latents, step_latents = sample_loop(pipe.unet, scheduler, init_noise, cond, uncond)
        expected_calls = NUM_STEPS if name == "euler_a" else 0
        assert patch.calls == expected_calls, f"{name} drew noise {patch.calls} times, expected {expected_calls}"
        assert len(timesteps) == NUM_STEPS

        # Cross-check the written-out loop against diffusers' own pipeline, bit for bit.
        pipe.scheduler = make_scheduler(base_config, name)
        with patched_step_noise(step_noise) as patch:
            ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=init_noise.clone(),
                       num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE, output_type="latent").images
        pipe.scheduler = base_scheduler
        assert patch.calls == expected_calls
        assert torch.equal(ref, latents), f"{name}: pipeline and written-out loop differ"

        with torch.no_grad():
            image = pipe.vae.decode(latents / sf).sample
        tensors = {
            "sampling.init_noise": init_noise,
            "sampling.cond_embeddings": cond,
            "sampling.uncond_embeddings": uncond,
            "sampling.step_noise": step_noise,
            "timesteps": timesteps.to(torch.float32),
            "latents": latents,
            "image": image,
            "debug.step_latents": step_latents,
            "debug.init_noise_sigma": torch.tensor([float(scheduler.init_noise_sigma)]),
        }
        if hasattr(scheduler, "sigmas"):
            tensors["debug.sigmas"] = scheduler.sigmas.to(torch.float32)
        print(f"  {name}: timesteps {timesteps.tolist()} ({timesteps.dtype}), "
              f"init_noise_sigma {float(scheduler.init_noise_sigma):.6f}"
              + (f", sigmas {[round(x, 5) for x in scheduler.sigmas.tolist()]}" if hasattr(scheduler, "sigmas") else ""))
        fname = f"sample_{name}.safetensors"
        save_tensors(out_dir / fname, tensors)

        # Precision floor: the same loop with the float64 UNet and VAE (the schedulers keep their float32 sigma
        # tables and upcast to float32 internally, so this measures how the trajectory amplifies rounding).
        with patched_step_noise(step_noise.double()):
            _, latents64, _ = sample_loop(pipe64.unet, make_scheduler(base_config, name), init_noise.double(),
                                          cond.double(), uncond.double())
        with torch.no_grad():
            image64 = pipe64.vae.decode(latents64.double() / sf).sample
        floor(out_dir / fname, "latents", latents, latents64)
        floor(out_dir / fname, "image", image, image64)


# --------------------------------------------------------------------------------------------------------------------


def main():
    tv = torch.__version__.split("+")[0]
    if tv != EXPECTED_TORCH or diffusers.__version__ != EXPECTED_DIFFUSERS:
        print(f"warning: expected torch {EXPECTED_TORCH} / diffusers {EXPECTED_DIFFUSERS}, "
              f"have {tv} / {diffusers.__version__}", file=sys.stderr)

    variants = [
        # (model dir, refs dir, unet config, scheduler config, seed base, write fp16 variant,
        #  latent size of the large decode: square for tiny-sd, non-square for tiny-sd2; large enough that 8-latent
        #  tiles save working memory, small enough to keep the reference images under 0.5 MB)
        (ROOT / "tests" / "fixtures" / "tiny-sd-random", ROOT / "tests" / "fixtures" / "tiny-sd", SD1_UNET_CONFIG,
         SD1_SCHEDULER, 1000,
         True, (24, 24)),
        (ROOT / "tests" / "fixtures" / "tiny-sd2" / "model", ROOT / "tests" / "fixtures" / "tiny-sd2",
         SD2_UNET_CONFIG, SD2_SCHEDULER, 2000, False, (16, 24)),
    ]
    for model_dir, refs_dir, unet_cfg, sched_cfg, seed, fp16, large_hw in variants:
        print(f"== {model_dir.relative_to(ROOT)}")
        for f in refs_dir.glob("*.safetensors"):
            f.unlink()
        pipe = build_model(model_dir, unet_cfg, sched_cfg, seed + 1, seed + 2, fp16)
        pipe64 = copy.copy(pipe)
        pipe64.unet = copy.deepcopy(pipe.unet).double()
        pipe64.vae = copy.deepcopy(pipe.vae).double()
        unet_refs(pipe, pipe64, refs_dir, seed + 10)
        vae_refs(pipe, pipe64, refs_dir, seed + 20, large_hw)
        sampling_refs(pipe, pipe64, refs_dir, seed + 30)

    print("== sizes (bytes)")
    total = 0
    for d in [ROOT / "tests" / "fixtures" / "tiny-sd-random", ROOT / "tests" / "fixtures"]:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                total += f.stat().st_size
                print(f"  {f.stat().st_size:9d}  {f.relative_to(ROOT)}")
    print(f"  {total:9d}  total")

    print("== precision floor: max|f32 - f64| / max|f64| of each reference output")
    for f, k, r in FLOORS:
        print(f"  {r:.1e}  {f} {k}")


if __name__ == "__main__":
    main()
