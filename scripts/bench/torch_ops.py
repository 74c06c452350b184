#!/usr/bin/env python3
"""PyTorch's side of the per-op microbenchmarks: the same cases (names, shapes) as `benches/ops.rs`, f32 on the CPU.

    scripts/bench/torch_ops.py [--threads N] [--repeats R] [--warmup W] [--only PREFIX,PREFIX] [--json]
                               [--device cpu|cuda:N] [--dtype f32|f16|bf16]

On a GPU every timed call ends with torch.cuda.synchronize(), and each case also reports its peak memory: the
high-water mark of torch's CUDA allocator above what was allocated before the call (the output included).

Each op is written as diffusers runs it: attention takes q, k, v as [B, N, H*D], views them as [B, H, N, D]
(view + transpose, no copy), calls scaled_dot_product_attention and merges the heads back (transpose + reshape);
conv2d with bias; group_norm then silu; layer_norm; GEGLU = linear to 2*inner, chunk, value * gelu(gate) (exact erf);
linear with bias. Under torch.inference_mode(), torch.set_num_threads(N).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def cases(device="cpu", dtype=torch.float32):
    out = []
    g = torch.Generator().manual_seed(0)

    def rn(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)

    for name, b, n, nk, h, d in [
        ("attn_self_64x64_h8_d40", 2, 4096, 4096, 8, 40),
        ("attn_self_32x32_h8_d80", 2, 1024, 1024, 8, 80),
        ("attn_self_16x16_h8_d160", 2, 256, 256, 8, 160),
        ("attn_cross_64x64_h8_d40", 2, 4096, 77, 8, 40),
        ("attn_vae_512px_d512", 1, 4096, 4096, 1, 512),
        ("attn_vae_256px_d512", 1, 1024, 1024, 1, 512),
    ]:
        q, k, v = rn(b, n, h * d), rn(b, nk, h * d), rn(b, nk, h * d)

        def attn(q=q, k=k, v=v, b=b, h=h, d=d):
            sp = lambda t: t.view(b, -1, h, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(sp(q), sp(k), sp(v))
            return o.transpose(1, 2).reshape(b, -1, h * d)

        out.append((name, attn))
    for name, b, cin, cout, hw, k, s in [
        ("conv_unet_320_64x64", 2, 320, 320, 64, 3, 1),
        ("conv_unet_640_32x32", 2, 640, 640, 32, 3, 1),
        ("conv_unet_1280_16x16", 2, 1280, 1280, 16, 3, 1),
        ("conv_unet_1280_8x8", 2, 1280, 1280, 8, 3, 1),
        ("conv_unet_320_64x64_s2", 2, 320, 320, 64, 3, 2),
        ("conv_unet_in_4_320_64x64", 2, 4, 320, 64, 3, 1),
        ("conv_unet_1x1_640_1280_16x16", 2, 640, 1280, 16, 1, 1),
        ("conv_vae_512_64x64", 1, 512, 512, 64, 3, 1),
        ("conv_vae_512_128x128", 1, 512, 512, 128, 3, 1),
        ("conv_vae_512_256x256", 1, 512, 512, 256, 3, 1),
        ("conv_vae_256_512x512", 1, 256, 256, 512, 3, 1),
        ("conv_vae_128_512x512", 1, 128, 128, 512, 3, 1),
        ("conv_vae_out_128_3_512x512", 1, 128, 3, 512, 3, 1),
    ]:
        x, w, bias = rn(b, cin, hw, hw), rn(cout, cin, k, k), rn(cout)
        out.append((name, lambda x=x, w=w, bias=bias, s=s, k=k: F.conv2d(x, w, bias, stride=s, padding=k // 2)))
    for name, b, c, hw in [
        ("gn_silu_2x320x64x64", 2, 320, 64),
        ("gn_silu_2x640x32x32", 2, 640, 32),
        ("gn_silu_2x1280x16x16", 2, 1280, 16),
        ("gn_silu_1x512x256x256", 1, 512, 256),
        ("gn_silu_1x128x512x512", 1, 128, 512),
    ]:
        x, w, bias = rn(b, c, hw, hw), rn(c), rn(c)
        out.append((name, lambda x=x, w=w, bias=bias: F.silu(F.group_norm(x, 32, w, bias, 1e-5))))
    x, w, bias = rn(2, 4096, 320), rn(320), rn(320)
    out.append(("layer_norm_2x4096x320", lambda x=x, w=w, bias=bias: F.layer_norm(x, (320,), w, bias, 1e-5)))
    x, w, bias = rn(2, 4096, 320), rn(2560, 320), rn(2560)

    def geglu(x=x, w=w, bias=bias):
        hidden, gate = F.linear(x, w, bias).chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    out.append(("geglu_2x4096x320_to_1280", geglu))
    for name, rows, inp, outf in [("linear_8192x320_to_320", 8192, 320, 320), ("linear_154x768_to_320", 154, 768, 320)]:
        x, w, bias = rn(rows, inp), rn(outf, inp), rn(outf)
        out.append((name, lambda x=x, w=w, bias=bias: F.linear(x, w, bias)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", "-r", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "fp32", "f16", "fp16", "bf16"])
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "fp32": torch.float32, "f16": torch.float16, "fp16": torch.float16,
             "bf16": torch.bfloat16}[a.dtype]
    gpu = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.set_num_threads(a.threads)
    only = [p for p in a.only.split(",") if p]
    results = {}
    log = sys.stderr if a.json else sys.stdout
    with torch.inference_mode():
        for name, fn in cases(a.device, dtype):
            if only and not any(name.startswith(p) for p in only):
                continue
            for _ in range(a.warmup):
                fn()
            sync()
            peak = None
            if gpu:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                y = fn()
                sync()
                peak = torch.cuda.max_memory_allocated() - before
                del y
            runs = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                fn()
                sync()
                runs.append((time.perf_counter() - t) * 1e3)
            med = statistics.median(runs)
            mem = f"  peak {peak / 2**20:.1f} MiB" if peak is not None else ""
            print(f"{name:<30} {med:>10.2f} ms  (min {min(runs):.2f}, max {max(runs):.2f}){mem}", file=log)
            results[name] = {"median_ms": med, "runs_ms": runs, "peak_bytes": peak}
    if a.json:
        print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": a.threads, "repeats": a.repeats,
                          "warmup": a.warmup, "dtype": a.dtype, "device": a.device, "cases": results}))


if __name__ == "__main__":
    main()
