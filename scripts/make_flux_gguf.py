#!/usr/bin/env python3
"""Write a random-weight FLUX.1-dev-architecture transformer as a city96-style GGUF (BFL names), for issue 16 item 7.

    /work/venv/bin/python scripts/make_flux_gguf.py --out /data/flux1-dev-random-Q4_0.gguf            # real size
    /work/venv/bin/python scripts/make_flux_gguf.py --out /tmp/flux-small.gguf --double 1 --single 1    # check

Layout (ComfyUI-GGUF `tools/convert.py` + `llama-quantize` conventions; ../shared/MODELS.md §1.5, §4.1):
  * `general.architecture = "flux"`, `general.quantization_version = 2`, `general.file_type` (2 = Q4_0, 7 = Q8_0);
  * BFL tensor names without prefix (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, ...),
    torch shapes [out, in] (GGUF stores the dims reversed, ne0 = in);
  * 1-D tensors and tensors of ≤ 1024 elements (biases, q/k norm scales) in F32; `img_in.weight` in F16; every other
    weight in the chosen type (Q4_0 by default, `--type q8_0`).
The weights are random: each quantised block is drawn directly (a float16 scale with random quants, so a weight has
std ≈ 1/sqrt(fan_in)); F16/F32 tensors are N(0, 1/fan_in) weights, N(0, 0.02) biases and U[0.5, 1.5] norm scales.
Every tensor has its own seeded generator: the file is deterministic for a seed.

Streamed: the header is written first, then one tensor at a time (peak RSS ≈ the largest tensor's stored bytes plus
numpy temporaries, < 0.5 GB), never the 12 B parameters at once (the machine has 24 GiB).

Sizes (dev: 19 double + 38 single blocks, 11,901,408,320 parameters; schnell has no `guidance_in`):
  * Q4_0: ~6.71 GB file (needs ~6.8 GB free disk), a few minutes (random bytes + disk write);
  * Q8_0: ~12.65 GB file (~12.8 GB free disk);
  * `--double 1 --single 1` (reduced, for checking): ~0.30 GB Q4_0 / ~0.56 GB Q8_0, seconds.
It also writes `<out>.diffusers/transformer/config.json` (diffusers `FluxTransformer2DModel` config of the same
depth) for `scripts/bench_flux_diffusers.py`, since `from_single_file` needs a config and the hub is not reachable.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import gguf

D = 3072  # hidden = 24 heads × 128
HEAD = 128
MLP = 4 * D
CTX = 4096  # T5-XXL width
POOLED = 768  # CLIP-L pooled
IN = 64  # 16 latent channels × 2×2 patch
FREQ = 256  # timestep embedding width

QTYPES = {
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, 2),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, 7),
}


def tensors(double, single, guidance):
    """(name, shape, kind) of every tensor, BFL names, torch shapes. kind: weight | bias | scale."""
    out = []

    def linear(name, o, i, bias=True):
        out.append((f"{name}.weight", (o, i), "weight"))
        if bias:
            out.append((f"{name}.bias", (o,), "bias"))

    linear("img_in", D, IN)
    linear("txt_in", D, CTX)
    for emb, width in [("time_in", FREQ), ("vector_in", POOLED)] + ([("guidance_in", FREQ)] if guidance else []):
        linear(f"{emb}.in_layer", D, width)
        linear(f"{emb}.out_layer", D, D)
    for n in range(double):
        for s in ["img", "txt"]:
            p = f"double_blocks.{n}"
            linear(f"{p}.{s}_mod.lin", 6 * D, D)
            linear(f"{p}.{s}_attn.qkv", 3 * D, D)
            out.append((f"{p}.{s}_attn.norm.query_norm.scale", (HEAD,), "scale"))
            out.append((f"{p}.{s}_attn.norm.key_norm.scale", (HEAD,), "scale"))
            linear(f"{p}.{s}_attn.proj", D, D)
            linear(f"{p}.{s}_mlp.0", MLP, D)
            linear(f"{p}.{s}_mlp.2", D, MLP)
    for n in range(single):
        p = f"single_blocks.{n}"
        linear(f"{p}.linear1", 3 * D + MLP, D)
        linear(f"{p}.linear2", D, D + MLP)
        out.append((f"{p}.norm.query_norm.scale", (HEAD,), "scale"))
        out.append((f"{p}.norm.key_norm.scale", (HEAD,), "scale"))
        linear(f"{p}.modulation.lin", 3 * D, D)
    linear("final_layer.linear", IN, D)
    linear("final_layer.adaLN_modulation.1", 2 * D, D)
    return out


def storage(name, shape, qtype):
    """city96's choice: 1-D and ≤ 1024-element tensors F32, img_in F16, the rest quantised."""
    if len(shape) == 1 or math.prod(shape) <= 1024:
        return gguf.GGMLQuantizationType.F32
    if name == "img_in.weight":
        return gguf.GGMLQuantizationType.F16
    return qtype


def random_blocks(rng, rows, cols, qtype, std):
    """Random quantised rows: per 32-weight block a float16 scale `d` and random quants, weight = d·q."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * (cols // block)
    raw = np.empty((nb, type_size), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        # q = nibble − 8 uniform on [−8, 7]: std √((16² − 1)/12) ≈ 4.61.
        raw[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
        qstd = math.sqrt((16**2 - 1) / 12)
    elif qtype == gguf.GGMLQuantizationType.Q8_0:
        raw[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
        qstd = math.sqrt((255**2 - 1) / 12)
    else:
        raise SystemExit(f"unsupported type {qtype}")
    d = (std / qstd) * rng.uniform(0.75, 1.25, size=nb)
    raw[:, :2] = d.astype("<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, (cols // block) * type_size)


def draw(rng, shape, kind, dtype):
    if kind == "scale":
        x = rng.uniform(0.5, 1.5, size=shape)
    elif kind == "bias":
        x = rng.standard_normal(size=shape, dtype=np.float32) * 0.02
    else:
        x = rng.standard_normal(size=shape, dtype=np.float32) / math.sqrt(shape[-1])
    return x.astype(dtype)


def diffusers_config(double, single, guidance):
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": HEAD,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": guidance,
        "in_channels": IN,
        "joint_attention_dim": CTX,
        "num_attention_heads": D // HEAD,
        "num_layers": double,
        "num_single_layers": single,
        "patch_size": 1,
        "pooled_projection_dim": POOLED,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--type", choices=sorted(QTYPES), default="q4_0")
    ap.add_argument("--double", type=int, default=19, help="double-stream blocks (dev: 19)")
    ap.add_argument("--single", type=int, default=38, help="single-stream blocks (dev: 38)")
    ap.add_argument("--schnell", action="store_true", help="no guidance_in (FLUX.1 schnell)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    qtype, file_type = QTYPES[a.type]
    guidance = not a.schnell
    specs = tensors(a.double, a.single, guidance)
    params = sum(math.prod(s) for _, s, _ in specs)
    if (a.double, a.single, guidance) == (19, 38, True):
        assert params == 11_901_408_320, params  # published FLUX.1-dev parameter count

    a.out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(a.out), "flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(file_type)
    plan = []
    for name, shape, kind in specs:
        st = storage(name, shape, qtype)
        if st in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if st == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[st]
            byte_shape = (shape[0], shape[1] // block * type_size)
            nbytes = math.prod(byte_shape)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=st)
        plan.append((name, shape, kind, st, nbytes))
    total = sum(p[4] for p in plan)
    print(f"{a.out}: {len(plan)} tensors, {params:,} parameters, {total / 1e9:.3f} GB of tensor data ({a.type})")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    done = 0
    for i, (name, shape, kind, st, nbytes) in enumerate(plan):
        rng = np.random.default_rng([a.seed, i])
        if st == gguf.GGMLQuantizationType.F32:
            data = draw(rng, shape, kind, np.float32)
        elif st == gguf.GGMLQuantizationType.F16:
            data = draw(rng, shape, kind, np.float16)
        else:
            data = random_blocks(rng, shape[0], shape[1], st, 1.0 / math.sqrt(shape[1]))
        assert data.nbytes == nbytes, name
        w.write_tensor_data(data)
        done += nbytes
        if i % 50 == 0 or i == len(plan) - 1:
            print(f"  {done / 1e9:7.3f} / {total / 1e9:.3f} GB", flush=True)
        del data
    w.close()
    cfg_dir = a.out.with_name(a.out.name + ".diffusers") / "transformer"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(diffusers_config(a.double, a.single, guidance), indent=1) + "\n")
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.3f} GB) and {cfg_dir / 'config.json'}")


if __name__ == "__main__":
    sys.exit(main())
