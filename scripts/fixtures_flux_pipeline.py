#!/usr/bin/env python3
"""Tiny FLUX.1 pipelines (dev and schnell) end to end: diffusers' FluxPipeline references for tests/flux_pipeline.rs.

How to run (from the repository root; CPU only; no network access needed):

    .venv/bin/python scripts/fixtures_flux_pipeline.py     # after fixtures_flux.py, fixtures_flow.py, the prompt fixtures

What it writes under tests/fixtures/flux-pipeline/{dev,schnell}/ (tests/fixtures/README.md describes every tensor):

    model_index.json, scheduler/scheduler_config.json   a diffusers FluxPipeline folder; its components are
        relative symbolic links to the fixtures that already hold them (nothing is stored twice):
        transformer -> ../../tiny-flux/<variant>/transformer  (2 double + 2 single blocks, hidden 32)
        vae         -> ../../flow/vae                        (16 channels, shift_factor 0.1159, no quant convs)
        text_encoder, tokenizer -> ../../prompt/sd1/...       (a tiny CLIP-L: hidden 32 = pooled_projection_dim)
        text_encoder_2, tokenizer_2 -> ../../t5/...           (the tiny T5 of fixtures_t5.py: d_model 32)
    ../flux1-<variant>-tiny.safetensors -> ../tiny-flux/<variant>/flux1-<variant>-tiny.safetensors (BFL single files:
        dev's keys bare, schnell's Comfy-style), and ../flux1-<variant>-tiny -> <variant>: the diffusers config folder
        beside the file (diffusers' `config=`), which the tiny file needs since its 16-wide heads are not FLUX.1's
        (the rotary axes cannot be told from shapes).
    ../flux1-dev-tiny-{Q8_0,Q4_0,Q4_K}.gguf -> ../gguf/... (scripts/fixtures_gguf.py's City96-style conversions of
        the dev file) and ../flux1-dev-tiny-<type> -> dev, their config folders.
    reference.safetensors
        init_noise [1, 16, 12, 8]  the unpacked initial latent (non-square), given to diffusers packed (`latents=`)
        prompt_embeds [1, 7, 32]   T5-like states given to the pipeline (`prompt_embeds=`)
        pooled [1, 32]             CLIP's pooler_output for PROMPT, as FluxPipeline._get_clip_prompt_embeds gives it
        latents [1, 16, 12, 8]     the pipeline's final latents, unpacked (before the VAE's scaling and shift)
        image [1, 3, 24, 16]       vae.decode(latents / scaling_factor + shift_factor): raw, unclamped
        from the prompt (with the tiny T5, tests/fixtures/t5, written by scripts/fixtures_t5.py):
        t5_states [1, 48, 32]      FluxPipeline._get_t5_prompt_embeds(PROMPT, max_sequence_length=48: the tokenizer
                                   folder's model_max_length)
        prompt_latents, prompt_image  the same run from PROMPT instead of the given embeddings
    dev: 3 steps, guidance 3.5 (dynamic shift from the image length); schnell: 2 steps, unshifted.

The scheduler configs are the FLUX.1 hub configs (dev: use_dynamic_shifting, shift 3; schnell: shift 1). The same
scheduler is what lowvram uses for a single transformer file, so the references also hold for the BFL files
tiny-flux/dev/flux1-dev-tiny.safetensors and tiny-flux/schnell/flux1-schnell-tiny.safetensors with --vae
flow/ae.safetensors.

Float32 on CPU, deterministic algorithms, one thread, seeded generators: two runs write byte-identical files.
"""

import json
import os
import shutil
from pathlib import Path

import fixture_env  # noqa: E402,F401  (deterministic single-threaded CPU torch; before torch)

import torch  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "flux-pipeline"
EXPECTED = {"torch": "2.15.0", "diffusers": "0.42.1", "transformers": "5.23.0"}

PROMPT = "a photo of a cat"
LATENT = (1, 16, 12, 8)  # [B, C, h, w]: 6 x 4 tokens
TXT_LEN = 7
VARIANTS = {
    # variant: (steps, guidance, scheduler config)
    "dev": (3, 3.5, dict(shift=3.0, use_dynamic_shifting=True)),
    "schnell": (2, 0.0, dict(shift=1.0, use_dynamic_shifting=False)),
}
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_K")
LINKS = {
    "transformer": "../../tiny-flux/{v}/transformer",
    "vae": "../../flow/vae",
    "text_encoder": "../../prompt/sd1/text_encoder",
    "tokenizer": "../../prompt/sd1/tokenizer",
    "text_encoder_2": "../../t5/text_encoder_2",
    "tokenizer_2": "../../t5/tokenizer_2",
}


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def write_folder(variant, shift):
    d = OUT / variant
    if d.exists():
        shutil.rmtree(d)
    (d / "scheduler").mkdir(parents=True)
    for name, target in LINKS.items():
        os.symlink(target.format(v=variant), d / name)
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, **shift
    )
    sched.save_config(d / "scheduler")
    single = OUT / f"flux1-{variant}-tiny.safetensors"
    links = [(single, f"../tiny-flux/{variant}/{single.name}"), (OUT / single.stem, variant)]
    if variant == "dev":  # scripts/fixtures_gguf.py's conversions of the dev file, with the same config folder
        for q in GGUF_TYPES:
            name = f"flux1-dev-tiny-{q}"
            links += [(OUT / f"{name}.gguf", f"../gguf/{name}.gguf"), (OUT / name, variant)]
    for link, target in links:
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link)
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return d, sched


@torch.no_grad()
def reference(variant, seed):
    steps, guidance, shift = VARIANTS[variant]
    d, sched = write_folder(variant, shift)
    pipe = FluxPipeline(
        scheduler=sched,
        vae=AutoencoderKL.from_pretrained(FIX / "flow" / "vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(FIX / "prompt" / "sd1" / "text_encoder", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(FIX / "prompt" / "sd1" / "tokenizer"),
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=FluxTransformer2DModel.from_pretrained(
            FIX / "tiny-flux" / variant / "transformer", torch_dtype=torch.float32
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    b, c, h, w = LATENT
    height, width = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
    init_noise = randn(LATENT, seed)
    packed = FluxPipeline._pack_latents(init_noise, b, c, h, w)
    pooled = pipe._get_clip_prompt_embeds(prompt=PROMPT, num_images_per_prompt=1, device="cpu")
    prompt_embeds = randn((b, TXT_LEN, 32), seed + 1)
    out = pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=packed,
        output_type="latent",
    ).images
    latents = FluxPipeline._unpack_latents(out, height, width, pipe.vae_scale_factor)
    cfg = pipe.vae.config
    image = pipe.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    t5_dir = FIX / "t5"
    pipe.text_encoder_2 = T5EncoderModel.from_pretrained(t5_dir / "text_encoder_2", torch_dtype=torch.float32)
    pipe.tokenizer_2 = T5TokenizerFast.from_pretrained(t5_dir / "tokenizer_2")
    max_len = pipe.tokenizer_2.model_max_length
    assert max_len == 48, max_len
    t5_states = pipe._get_t5_prompt_embeds(prompt=PROMPT, max_sequence_length=max_len, device="cpu")
    out = pipe(
        prompt=PROMPT,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=packed,
        max_sequence_length=max_len,
        output_type="latent",
    ).images
    prompt_latents = FluxPipeline._unpack_latents(out, height, width, pipe.vae_scale_factor)
    prompt_image = pipe.vae.decode(prompt_latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    tensors = {
        "t5_states": t5_states,
        "prompt_latents": prompt_latents,
        "prompt_image": prompt_image,
        "init_noise": init_noise,
        "prompt_embeds": prompt_embeds,
        "pooled": pooled,
        "latents": latents,
        "image": image,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, d / "reference.safetensors")
    print(variant, {k: tuple(v.shape) for k, v in tensors.items()}, "max |latents|", latents.abs().max().item())


def main():
    for mod, want in [(torch, EXPECTED["torch"]), (diffusers, EXPECTED["diffusers"]), (transformers, EXPECTED["transformers"])]:
        if not mod.__version__.startswith(want):
            raise SystemExit(f"{mod.__name__} {mod.__version__}: this script pins {want}")
    for i, variant in enumerate(VARIANTS):
        reference(variant, 100 + 10 * i)


if __name__ == "__main__":
    main()
