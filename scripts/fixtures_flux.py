#!/usr/bin/env python3
"""Build the tiny FLUX.1 transformers (dev and schnell) and diffusers reference outputs for tests/flux.rs.

How to run (from the repository root; CPU only; no network access needed):

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt \
        && .venv/bin/python scripts/fixtures_flux.py

What it writes under tests/fixtures/tiny-flux/ (tests/fixtures/README.md describes every tensor):

    {dev,schnell}/transformer/{config.json, diffusion_pytorch_model.safetensors}
        diffusers `FluxTransformer2DModel` folders: 2 double and 2 single blocks, 2 heads x 16 (hidden 32),
        axes_dims_rope [4, 6, 6], joint_attention_dim 32, pooled_projection_dim 32, in_channels 64 (16 latent
        channels in 2x2 patches); dev with guidance_embeds. Weights stored in bf16 (as BFL ships FLUX).
    dev/flux1-dev-tiny.safetensors          the same dev weights as a BFL single file (no prefix)
    schnell/flux1-schnell-tiny.safetensors  the same schnell weights as a Comfy-style BFL single file (every key
        under `model.diffusion_model.`)
    {dev,schnell}/forward.safetensors       one transformer call: unpacked latents [2, 16, 12, 8] (6x4 patches,
        non-square), T5-like states [2, 7, 32] (L_txt != L_img), CLIP-like pooled [2, 32], timestep 0.7 (the model
        sees t/1000 as the pipeline passes it), per-row guidance [3.5, 5.0] (dev), and the output unpacked to
        [2, 16, 12, 8]; also the packed hidden_states, img_ids and txt_ids diffusers was given.

The BFL file is the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (../shared/MODELS.md
§1.5); the script checks it by running that very function (its hard-coded 3072 hidden width replaced by the tiny
one) on the BFL file and comparing every tensor with the folder's, bit for bit.

Float32 on CPU, deterministic algorithms, one thread; every random tensor comes from its own seeded generator, so
two runs write byte-identical files. Every parameter is re-drawn (diffusers zero-initialises some) and then rounded
to bf16; the references are computed in f32 from those rounded weights.
"""

import inspect
import json
import math
import os
import shutil
import sys
from pathlib import Path

import fixture_env  # noqa: E402,F401  (deterministic single-threaded CPU torch; before torch)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import diffusers  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny-flux"
EXPECTED_TORCH = "2.15.0"
EXPECTED_DIFFUSERS = "0.42.1"

HEADS = 2
HEAD_DIM = 16
INNER = HEADS * HEAD_DIM
CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=HEAD_DIM,
    num_attention_heads=HEADS,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
LATENT = (2, 16, 12, 8)  # [B, C, h, w]: 6 x 4 patches
TXT_LEN = 7
TIMESTEP = 700.0  # the scheduler's timestep; diffusers' pipeline passes timestep / 1000
GUIDANCE = [3.5, 5.0]


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, seed):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32)


def stats(t):
    t = t.detach().float()
    std = t.std().item() if t.numel() > 1 else 0.0
    return f"min {t.min().item():+.4f} max {t.max().item():+.4f} mean {t.mean().item():+.4f} std {std:.4f}"


META = {"generated_by": f"scripts/fixtures_flux.py; torch {torch.__version__.split('+')[0]}; diffusers {diffusers.__version__}"}


def save_tensors(path, tensors, dtype=torch.float32):
    out = {}
    for k, v in tensors.items():
        v = v.detach().to(dtype).contiguous().clone()
        if not torch.isfinite(v.float()).all():
            raise SystemExit(f"{path.name}:{k}: non-finite values")
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=META)
    print(f"  wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")
    return out


def reinit_(model, seed):
    """Re-draw every parameter: RMSNorm scales U[0.5, 1.5], biases N(0, 0.1), linear weights N(0, 1/fan_in), then
    round everything to bf16 (the stored dtype) so f32 references use exactly the stored values."""
    g = gen(seed)
    covered = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.RMSNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            elif isinstance(mod, nn.Linear):
                std = 1.0 / math.sqrt(mod.weight.shape[1])
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            else:
                if any(True for _ in mod.parameters(recurse=False)):
                    raise SystemExit(f"reinit: unhandled module with parameters: {name} ({type(mod).__name__})")
                continue
            for p in mod.parameters(recurse=False):
                covered.add(id(p))
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise SystemExit(f"reinit: parameters not re-drawn: {missing}")


def to_bfl(sd, n_double, n_single):
    """diffusers names -> BFL names (the inverse of MODELS.md §1.5): q/k/v rows concatenated, norm_out halves
    swapped back to (shift, scale)."""
    sd = dict(sd)
    out = {}

    def take(name):
        return sd.pop(name)

    for bfl, dif in [("time_in", "time_text_embed.timestep_embedder"), ("vector_in", "time_text_embed.text_embedder"),
                     ("guidance_in", "time_text_embed.guidance_embedder")]:
        if f"{dif}.linear_1.weight" not in sd:
            continue
        for a, b in [("in_layer", "linear_1"), ("out_layer", "linear_2")]:
            for p in ["weight", "bias"]:
                out[f"{bfl}.{a}.{p}"] = take(f"{dif}.{b}.{p}")
    for p in ["weight", "bias"]:
        out[f"txt_in.{p}"] = take(f"context_embedder.{p}")
        out[f"img_in.{p}"] = take(f"x_embedder.{p}")
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ["weight", "bias"]:
            out[f"{b}img_mod.lin.{p}"] = take(f"{d}norm1.linear.{p}")
            out[f"{b}txt_mod.lin.{p}"] = take(f"{d}norm1_context.linear.{p}")
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([take(f"{d}attn.to_{x}.{p}") for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([take(f"{d}attn.add_{x}_proj.{p}") for x in "qkv"])
            out[f"{b}img_attn.proj.{p}"] = take(f"{d}attn.to_out.0.{p}")
            out[f"{b}txt_attn.proj.{p}"] = take(f"{d}attn.to_add_out.{p}")
            out[f"{b}img_mlp.0.{p}"] = take(f"{d}ff.net.0.proj.{p}")
            out[f"{b}img_mlp.2.{p}"] = take(f"{d}ff.net.2.{p}")
            out[f"{b}txt_mlp.0.{p}"] = take(f"{d}ff_context.net.0.proj.{p}")
            out[f"{b}txt_mlp.2.{p}"] = take(f"{d}ff_context.net.2.{p}")
        out[f"{b}img_attn.norm.query_norm.scale"] = take(f"{d}attn.norm_q.weight")
        out[f"{b}img_attn.norm.key_norm.scale"] = take(f"{d}attn.norm_k.weight")
        out[f"{b}txt_attn.norm.query_norm.scale"] = take(f"{d}attn.norm_added_q.weight")
        out[f"{b}txt_attn.norm.key_norm.scale"] = take(f"{d}attn.norm_added_k.weight")
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ["weight", "bias"]:
            out[f"{b}modulation.lin.{p}"] = take(f"{d}norm.linear.{p}")
            out[f"{b}linear1.{p}"] = torch.cat([take(f"{d}attn.to_{x}.{p}") for x in "qkv"] + [take(f"{d}proj_mlp.{p}")])
            out[f"{b}linear2.{p}"] = take(f"{d}proj_out.{p}")
        out[f"{b}norm.query_norm.scale"] = take(f"{d}attn.norm_q.weight")
        out[f"{b}norm.key_norm.scale"] = take(f"{d}attn.norm_k.weight")
    for p in ["weight", "bias"]:
        out[f"final_layer.linear.{p}"] = take(f"proj_out.{p}")
        scale, shift = take(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    if sd:
        raise SystemExit(f"to_bfl: unmapped diffusers keys {sorted(sd)}")
    return out


def diffusers_converter():
    """diffusers' own BFL -> diffusers conversion, with its hard-coded FLUX.1 hidden width (3072) set to ours."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        raise SystemExit("diffusers' FLUX converter changed: cannot check the BFL mapping against it")
    src = src.replace("inner_dim = 3072", f"inner_dim = {INNER}")
    scope = dict(single_file_utils.__dict__)
    exec(src, scope)  # noqa: S102 - diffusers' own source, one constant changed
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def pack(latents):
    """[B, C, h, w] -> [B, h/2 * w/2, 4C] (diffusers' FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, h, w):
    """The inverse of pack (FluxPipeline._unpack_latents at the latent size)."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def build(name, guidance, seed):
    print(f"{name}:")
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance).eval()
    reinit_(model, seed + 1)
    folder = OUT / name / "transformer"
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    print(f"  wrote {folder.relative_to(ROOT)} ({(folder / 'diffusion_pytorch_model.safetensors').stat().st_size} bytes)")

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = to_bfl(sd, CONFIG["num_layers"], CONFIG["num_single_layers"])
    prefix = "" if guidance else "model.diffusion_model."
    single = OUT / name / f"flux1-{name}-tiny.safetensors"
    save_tensors(single, {prefix + k: v for k, v in bfl.items()}, torch.bfloat16)

    # The BFL file read back through diffusers' own converter gives the folder's tensors exactly.
    stored = load_file(str(single))
    converted = diffusers_converter()(dict(stored))
    folder_sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if sorted(converted) != sorted(folder_sd):
        raise SystemExit(f"{name}: converted keys differ: {sorted(set(converted) ^ set(folder_sd))}")
    for k, v in converted.items():
        if not torch.equal(v, folder_sd[k]):
            raise SystemExit(f"{name}: {k} differs between the BFL file (converted by diffusers) and the folder")
    print(f"  BFL file = folder under diffusers' converter ({len(converted)} tensors)")

    # One forward, as FluxPipeline calls the transformer.
    b, c, h, w = LATENT
    base = 4000 if guidance else 5000
    latents = randn(LATENT, base)
    txt = randn((b, TXT_LEN, CONFIG["joint_attention_dim"]), base + 1)
    pooled = randn((b, CONFIG["pooled_projection_dim"]), base + 2)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(TXT_LEN, 3)
    hidden = pack(latents)
    timestep = torch.full((b,), TIMESTEP / 1000.0)
    g = torch.tensor(GUIDANCE) if guidance else None
    with torch.no_grad():
        out = model(hidden_states=hidden, encoder_hidden_states=txt, pooled_projections=pooled, timestep=timestep,
                    img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]
        # float64 floor: how far f32 itself is from the exact result.
        m64 = FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance).double().eval()
        m64.load_state_dict({k: v.double() for k, v in sd.items()})
        out64 = m64(hidden_states=hidden.double(), encoder_hidden_states=txt.double(),
                    pooled_projections=pooled.double(), timestep=timestep.double(), img_ids=img_ids.double(),
                    txt_ids=txt_ids.double(), guidance=None if g is None else g.double(), return_dict=False)[0]
    floor = ((out.double() - out64).abs().max() / out64.abs().max()).item()
    print(f"  f32 vs f64 relative floor {floor:.2e}")
    if not torch.equal(unpack(pack(latents), h, w), latents):
        raise SystemExit("pack/unpack do not invert")
    tensors = {
        "latents": latents,
        "encoder_hidden_states": txt,
        "pooled_projections": pooled,
        "timestep": torch.tensor([TIMESTEP]),
        "hidden_states": hidden,
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "out_packed": out,
        "out": unpack(out, h, w),
    }
    if guidance:
        tensors["guidance"] = torch.tensor(GUIDANCE)
    save_tensors(OUT / name / "forward.safetensors", tensors)
    for k in ["out"]:
        print(f"    {k:24s} {list(tensors[k].shape)} {stats(tensors[k])}")


def main():
    tv, dv = torch.__version__.split("+")[0], diffusers.__version__
    if (tv, dv) != (EXPECTED_TORCH, EXPECTED_DIFFUSERS):
        print(f"warning: torch {tv} / diffusers {dv}, fixtures were made with {EXPECTED_TORCH} / {EXPECTED_DIFFUSERS}",
              file=sys.stderr)
    build("dev", True, 100)
    build("schnell", False, 200)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/fixtures/tiny-flux: {total} bytes")
    if total > 2 << 20:
        raise SystemExit("tiny-flux fixtures exceed 2 MiB")


if __name__ == "__main__":
    main()
