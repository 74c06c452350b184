#!/usr/bin/env python3
"""The diffusers/transformers side of issue 16's real-size benchmark (item 7): one 256×256 FLUX step from a GGUF
transformer, and the T5-XXL encoding from a GGUF encoder, on the CPU with 2 threads. Prints one JSON object.

    # files from scripts/make_flux_gguf.py and scripts/make_t5_gguf.py
    /work/venv/bin/python scripts/bench_flux_diffusers.py --flux /data/flux1-dev-random-Q4_0.gguf --part flux
    /work/venv/bin/python scripts/bench_flux_diffusers.py --t5 /data/t5xxl-random-Q8_0.gguf --part t5

Run each part in its own process (`--part flux`, `--part t5`): peak RSS is per process.

FLUX: `FluxTransformer2DModel.from_single_file(gguf, quantization_config=GGUFQuantizationConfig(compute_dtype),
config=<gguf>.diffusers, subfolder="transformer")` (the config folder make_flux_gguf.py writes; the hub is not
reachable). diffusers keeps the quantised bytes and dequantises each layer's weight to `compute_dtype` in its forward
(the path Forge/ComfyUI-GGUF use too). One step = one transformer forward on a 256×256 image: 16×32×32 latents packed
to 256 tokens of 64, 512 T5 tokens (dev's max_sequence_length; `--txt-len`), pooled CLIP [1, 768], t = 1.0, guidance 3.5
(dev). Inputs are seeded random: the weights are random too. `--steps` forwards are timed separately (the first one
includes one-off costs).

T5: transformers `T5EncoderModel.from_pretrained(dir, gguf_file=name, dtype=...)` — transformers 5.23 keeps GGUF
blocks packed only for the architectures of its new loader (`integrations/gguf`: qwen35, lfm2, ... — not
`t5encoder`, and only with the `kernels` package); T5 goes through the legacy loader, which **dequantises every
tensor at load** (its log warns about packed weights, but the T5 weights end up dense), so the encoder is held in
`--dtype`: ~9.5 GB bf16 / ~19 GB f32 for the real T5-XXL (4.76 B parameters; 24 GiB machine: use
bf16). The prompt is tokenised with the `tokenizer.json` beside the GGUF (`--tokenizer`) and padded to 512 (dev).

Requires accelerate (diffusers' quantised loading needs low_cpu_mem_usage); psutil is not needed.
Real size: the FLUX part needs ~7 GB of RAM plus activations in bf16 (Q4_0 file 6.7 GB, memory-mapped), the T5 part
~10 GB (bf16). Reduced files (`--double 1 --single 1`, `--layers 2`) run in about a minute.
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_flux(a, torch, dtype):
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    cfg = Path(str(a.flux) + ".diffusers")
    t0 = time.perf_counter()
    model = FluxTransformer2DModel.from_single_file(
        str(a.flux),
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        config=str(cfg),
        subfolder="transformer",
        torch_dtype=dtype,
    ).eval()
    load_s = time.perf_counter() - t0
    c = model.config
    g = torch.Generator().manual_seed(0)
    h = w = a.size // 16  # latent 2×2 patches: 256 px → 32×32 latent → 16×16 tokens
    img = torch.randn((1, h * w, c.in_channels), generator=g).to(dtype)
    txt = torch.randn((1, a.txt_len, c.joint_attention_dim), generator=g).to(dtype)
    pooled = torch.randn((1, c.pooled_projection_dim), generator=g).to(dtype)
    img_ids = torch.zeros((h, w, 3))
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3).to(dtype)
    txt_ids = torch.zeros((a.txt_len, 3)).to(dtype)
    t = torch.full((1,), 1.0, dtype=dtype)
    guidance = torch.full((1,), 3.5, dtype=torch.float32) if c.guidance_embeds else None
    step_s = []
    with torch.no_grad():
        for _ in range(a.steps):
            t1 = time.perf_counter()
            out = model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
            step_s.append(time.perf_counter() - t1)
    assert torch.isfinite(out.float()).all(), "non-finite transformer output"
    return {
        "file": str(a.flux),
        "file_bytes": a.flux.stat().st_size,
        "double_blocks": c.num_layers,
        "single_blocks": c.num_single_layers,
        "image_tokens": h * w,
        "text_tokens": a.txt_len,
        "load_s": load_s,
        "step_s": step_s,
    }


def bench_t5(a, torch, dtype):
    from tokenizers import Tokenizer
    from transformers import T5EncoderModel

    tok_path = a.tokenizer or a.t5.with_name(a.t5.stem + ".tokenizer.json")
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(a.prompt).ids[: a.txt_len]
    pad = tok.token_to_id("<pad>")
    ids = ids + [pad] * (a.txt_len - len(ids))
    t0 = time.perf_counter()
    model = T5EncoderModel.from_pretrained(str(a.t5.parent), gguf_file=a.t5.name, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    step_s = []
    with torch.no_grad():
        for _ in range(a.steps):
            t1 = time.perf_counter()
            out = model(input_ids=x).last_hidden_state  # no attention mask: FLUX feeds T5 without one
            step_s.append(time.perf_counter() - t1)
    assert torch.isfinite(out.float()).all(), "non-finite T5 output"
    return {
        "file": str(a.t5),
        "file_bytes": a.t5.stat().st_size,
        "layers": model.config.num_layers,
        "tokens": a.txt_len,
        "load_s": load_s,
        "encode_s": step_s,
        "note": "transformers dequantises the GGUF at load; the encoder runs dense in the compute dtype",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flux", type=Path)
    ap.add_argument("--t5", type=Path)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: <t5 stem>.tokenizer.json beside it)")
    ap.add_argument("--part", choices=["flux", "t5"], required=True)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="compute dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="image edge in pixels (multiple of 16)")
    ap.add_argument("--txt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed forwards")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse on the moon, detailed, 35mm")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if a.part == "flux":
        if not a.flux:
            ap.error("--part flux needs --flux")
        result = bench_flux(a, torch, dtype)
    else:
        if not a.t5:
            ap.error("--part t5 needs --t5")
        result = bench_t5(a, torch, dtype)
    import diffusers
    import transformers

    result.update({
        "part": a.part,
        "compute_dtype": a.dtype,
        "threads": a.threads,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    })
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
