#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/: small GGUF and fp8 safetensors files with their f32 references.

- types.gguf: one tensor of every supported GGML type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 quantised by
  gguf-py; Q2_K..Q6_K as valid random blocks with finite fp16 scales, which gguf-py cannot quantise), each in its own
  block `transformer_blocks.N` beside an F32 bias, under City96's `model.diffusion_model.` prefix, with
  `general.architecture = flux`. Row counts are odd, some tensors span several rows of blocks, two are large enough
  (> 64 Ki elements) to be split over threads. One more Q8_0 tensor is stored as (9, 32) with City96's
  `comfy.gguf.orig_shape` metadata giving its [8, 4, 3, 3] shape.
- types_ref.safetensors: gguf-py 0.19.0's `gguf.quants.dequantize` of every tensor, f32, under the stripped names.
- unsupported.gguf: an IQ4_XS tensor (must be refused by name).
- fp8.safetensors / fp8_ref.safetensors: every byte value as F8_E4M3 and F8_E5M2 tensors, and their torch f32 casts.
- flux1-dev-tiny-{Q8_0,Q4_0,Q4_K}.gguf: the tiny FLUX.1-dev BFL file of tests/fixtures/tiny-flux as City96-style GGUFs.
- flux1-dev-tiny-fp8_{e4m3fn,e5m2}.safetensors: the same with its 2-D weights cast to fp8 (1-D tensors bf16).

Deterministic (seeded); no downloads. Environment: scripts/requirements-fixtures.txt (gguf==0.19.0).
"""
import os

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, dequantize
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")
rng = np.random.default_rng(16)

# (type, shape row-major) - rows are multiples of the block size; odd row counts.
CASES = [
    (T.F32, (3, 40)),
    (T.F16, (5, 24)),
    (T.BF16, (7, 16)),
    (T.Q8_0, (70, 1024)),  # > 64 Ki elements: the parallel path
    (T.Q4_0, (5, 96)),
    (T.Q4_1, (3, 64)),
    (T.Q5_0, (7, 32)),
    (T.Q5_1, (5, 160)),
    (T.Q2_K, (3, 512)),
    (T.Q3_K, (5, 256)),
    (T.Q4_K, (33, 2048)),  # > 64 Ki elements
    (T.Q5_K, (3, 768)),
    (T.Q6_K, (5, 256)),
]


def random_f16_scales(n):
    # finite, moderate fp16 scales (both signs for d-type fields would be legal; keep positive like real files)
    return rng.uniform(1e-3, 5e-2, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def k_blocks(qtype, n):
    """n random but valid blocks of a K type, laid out as ggml-common.h does."""
    r = lambda k: rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    if qtype == T.Q2_K:  # scales[16], qs[64], d, dmin
        return np.concatenate([r(16), r(64), random_f16_scales(n), random_f16_scales(n)], axis=1)
    if qtype == T.Q3_K:  # hmask[32], qs[64], scales[12], d
        return np.concatenate([r(32), r(64), r(12), random_f16_scales(n)], axis=1)
    if qtype == T.Q4_K:  # d, dmin, scales[12], qs[128]
        return np.concatenate([random_f16_scales(n), random_f16_scales(n), r(12), r(128)], axis=1)
    if qtype == T.Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
        return np.concatenate([random_f16_scales(n), random_f16_scales(n), r(12), r(32), r(128)], axis=1)
    if qtype == T.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        return np.concatenate([r(128), r(64), r(16), random_f16_scales(n)], axis=1)
    raise ValueError(qtype)


def stored(qtype, shape):
    """(raw array to write, f32 reference) for one case."""
    x = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        return x, x
    if qtype == T.F16:
        h = x.astype(np.float16)
        return h, dequantize(h, T.F16)
    if qtype in (T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        q = quantize(x, qtype)
        return q, dequantize(q, qtype).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    q = k_blocks(qtype, rows * cols // block).reshape(rows, cols // block * size)
    return q, dequantize(q, qtype).reshape(shape)


def main():
    os.makedirs(OUT, exist_ok=True)
    w = gguf.GGUFWriter(os.path.join(OUT, "types.gguf"), "flux")
    w.add_string("comfy.note", "lowvram GGUF type fixture")
    refs = {}
    for i, (qtype, shape) in enumerate(CASES):
        raw, ref = stored(qtype, shape)
        name = f"transformer_blocks.{i}.{qtype.name.lower()}.weight"
        bias = f"transformer_blocks.{i}.{qtype.name.lower()}.bias"
        w.add_tensor("model.diffusion_model." + name, raw, raw_dtype=qtype)
        b = rng.standard_normal(shape[0]).astype(np.float32)
        w.add_tensor("model.diffusion_model." + bias, b)
        refs[name] = np.ascontiguousarray(ref.astype(np.float32))
        refs[bias] = b
    # City96's SD-style reshape: a [8, 4, 3, 3] conv weight stored as 9 rows of one Q8_0 block each, its shape in
    # `comfy.gguf.orig_shape.<stored name>`.
    conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    q = quantize(conv.reshape(9, 32), T.Q8_0)
    name = f"transformer_blocks.{len(CASES)}.conv.weight"
    w.add_tensor("model.diffusion_model." + name, q, raw_dtype=T.Q8_0)
    w.add_array("comfy.gguf.orig_shape.model.diffusion_model." + name, [8, 4, 3, 3])
    refs[name] = np.ascontiguousarray(dequantize(q, T.Q8_0).reshape(8, 4, 3, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_np(refs, os.path.join(OUT, "types_ref.safetensors"))

    u = gguf.GGUFWriter(os.path.join(OUT, "unsupported.gguf"), "flux")
    block, size = gguf.GGML_QUANT_SIZES[T.IQ4_XS]
    u.add_tensor("blocks.0.iq.weight", rng.integers(0, 256, size=(2, size), dtype=np.uint8), raw_dtype=T.IQ4_XS)
    u.add_tensor("blocks.0.ok.weight", rng.standard_normal((2, 8)).astype(np.float32))
    u.write_header_to_file()
    u.write_kv_data_to_file()
    u.write_tensors_to_file()
    u.close()

    every = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    fp8 = {
        "transformer_blocks.0.e4m3.weight": every.clone().view(torch.float8_e4m3fn),
        "transformer_blocks.0.e4m3.bias": torch.linspace(-1, 1, 8, dtype=torch.float32),
        "transformer_blocks.1.e5m2.weight": every.clone().view(torch.float8_e5m2),
        "transformer_blocks.1.e5m2.bias": torch.linspace(-2, 2, 8, dtype=torch.float32),
    }
    save_torch(fp8, os.path.join(OUT, "fp8.safetensors"))
    save_torch({k: v.to(torch.float32).contiguous() for k, v in fp8.items()}, os.path.join(OUT, "fp8_ref.safetensors"))


def flux_conversions():
    """The tiny FLUX.1-dev BFL file (tests/fixtures/tiny-flux, written by scripts/fixtures_flux.py) as City96-style
    GGUF files: Q8_0, Q4_0 and Q4_K. City96's rules (tools/convert.py + lcpp.patch): 1-D tensors and tensors of at
    most 1024 elements F32; others in the type, falling back to F16 where a row is not whole blocks (K types on rows
    that are not a multiple of 256, as FLUX's img_in). The Q4_0 file keeps Comfy's `model.diffusion_model.` prefix."""
    from safetensors.torch import load_file

    src = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-flux", "dev", "flux1-dev-tiny.safetensors")
    weights = {k: v.to(torch.float32).numpy() for k, v in sorted(load_file(src).items())}
    for qtype, prefix in [(T.Q8_0, ""), (T.Q4_0, "model.diffusion_model."), (T.Q4_K, "")]:
        w = gguf.GGUFWriter(os.path.join(OUT, f"flux1-dev-tiny-{qtype.name}.gguf"), "flux")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for name, x in weights.items():
            if x.ndim == 1 or x.size <= 1024:
                w.add_tensor(prefix + name, x.astype(np.float32))
            elif x.shape[-1] % block == 0:
                w.add_tensor(prefix + name, quantize(x, qtype) if qtype != T.Q4_K else k_quantize(x), raw_dtype=qtype)
            else:
                w.add_tensor(prefix + name, x.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    # fp8 single files as ComfyUI/Forge users download them: 2-D weights in fp8, 1-D tensors (norms, biases) bf16.
    # e4m3fn under Comfy's prefix (read through the single-file mapping), e5m2 bare (read whole).
    raw = load_file(src)
    for dtype, tag, prefix in [(torch.float8_e4m3fn, "fp8_e4m3fn", "model.diffusion_model."), (torch.float8_e5m2, "fp8_e5m2", "")]:
        out = {prefix + k: (v.to(dtype) if v.dim() == 2 else v).contiguous() for k, v in sorted(raw.items())}
        save_torch(out, os.path.join(OUT, f"flux1-dev-tiny-{tag}.safetensors"))


def k_quantize(x):
    """Q4_K blocks for x (gguf-py cannot quantise K types): per 32-element sub-block a 6-bit scale and min against
    fp16 super-block factors, rounded to nearest - a valid encoding close to x (the tests compare against the
    dequantised values, not against x)."""
    rows = x.reshape(-1, 256).astype(np.float64)
    n = rows.shape[0]
    sub = rows.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    hi = sub.max(axis=-1)
    scale = (hi - lo) / 15.0
    dmax = scale.max(axis=-1, keepdims=True) / 63.0
    mmax = (-lo).max(axis=-1, keepdims=True) / 63.0
    d = np.where(dmax == 0, 1.0, dmax).astype(np.float16)
    dmin = np.where(mmax == 0, 1.0, mmax).astype(np.float16)
    sc = np.clip(np.rint(scale / d.astype(np.float64)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / dmin.astype(np.float64)), 0, 63).astype(np.uint8)
    eff_d = d.astype(np.float64) * sc
    eff_m = dmin.astype(np.float64) * mn
    q = np.clip(np.rint((sub + eff_m[..., None]) / np.where(eff_d == 0, 1.0, eff_d)[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = np.zeros((n, 4, 32), dtype=np.uint8)
    for j in range(4):
        qs[:, j] = q[:, 2 * j] | (q[:, 2 * j + 1] << 4)
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs.reshape(n, 128)], axis=1)
    out = blocks.reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)
    # the encoding must decode (gguf-py) to values near x
    back = dequantize(out, T.Q4_K).reshape(x.shape)
    assert np.abs(back - x).max() <= 0.5 * np.abs(x).max(), "Q4_K packing"
    return out


if __name__ == "__main__":
    main()
    flux_conversions()
