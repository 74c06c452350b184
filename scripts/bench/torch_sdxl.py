#!/usr/bin/env python3
"""PyTorch side of the SDXL benchmark: the workloads lowvram's CLI runs, with diffusers/transformers on the CPU.

    scripts/bench/torch_sdxl.py --model DIR --inputs COND.safetensors --work unet_step,vae_decode,encode
        [--size 64] [--threads 2] [--repeats 1] [--warmup 1] [--prompt TEXT]

DIR is the folder scripts/bench/make_sdxl_random.py writes (fp16 files). Models are loaded from the fp16 files in
float32 (`from_pretrained(..., torch_dtype=torch.float32)`), as a CPU user would, with diffusers' default attention
processor. Workloads:

* `unet_step`: one classifier-free-guidance step = one UNet forward at batch 2 (uncond + cond), sample
  `[2,4,S,S]` (the init noise of COND.safetensors, repeated), timestep 999 (the first Euler step of 1), with the
  conditioning `lowvram encode` wrote to COND.safetensors (embeddings, pooled, time_ids).
* `vae_decode`: decode of `[1,4,S,S]` latents divided by scaling_factor (S=64: 512 px; S=128: 1024 px, untiled).
* `encode`: CLIP-L + bigG encode of --prompt (what SDXL's pipeline feeds the UNet: hidden_states[-2] of both,
  bigG's text_embeds). The negative is not encoded: SDXL's `force_zeros_for_empty_prompt` makes it zeros, in
  diffusers' pipeline as in lowvram's.

Prints one JSON object: per workload median/min/max ms of --repeats runs after --warmup, and peak RSS (VmHWM, reset
per workload through /proc/self/clear_refs) and the process's ru_maxrss.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time


def vmhwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1000)
    return {"median_ms": statistics.median(runs), "min_ms": min(runs), "max_ms": max(runs), "runs_ms": runs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs")
    ap.add_argument("--work", default="unet_step,vae_decode,encode")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse on the moon, highly detailed")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "threads": args.threads, "load_ms": {}}
    d = args.model
    for work in args.work.split(","):
        reset_hwm()
        t0 = time.perf_counter()
        if work == "unet_step":
            from safetensors.torch import load_file

            unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), torch_dtype=torch.float32).eval()
            out["load_ms"][work] = (time.perf_counter() - t0) * 1000
            c = load_file(args.inputs)
            ehs = torch.cat([c["sampling.uncond_embeddings"], c["sampling.cond_embeddings"]]).float()
            pooled = torch.cat([c["sampling.uncond_pooled"], c["sampling.cond_pooled"]]).float()
            tids = c["sampling.time_ids"].float()
            tids = torch.cat([tids, tids]) if tids.shape[0] == 1 else tids
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, args.size, args.size, generator=g).repeat(2, 1, 1, 1)

            def fn():
                with torch.inference_mode():
                    unet(x, torch.tensor(999.0), encoder_hidden_states=ehs,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample.sum().item()
        elif work == "vae_decode":
            vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(d, "vae"), torch_dtype=torch.float32).eval()
            out["load_ms"][work] = (time.perf_counter() - t0) * 1000
            z = torch.randn(1, 4, args.size, args.size, generator=torch.Generator().manual_seed(1))

            def fn():
                with torch.inference_mode():
                    vae.decode(z / vae.config.scaling_factor).sample.sum().item()
        elif work == "encode":
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

            tok1 = CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer"))
            tok2 = CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer_2"))
            te1 = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), dtype=torch.float32).eval()
            te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(d, "text_encoder_2"), dtype=torch.float32).eval()
            out["load_ms"][work] = (time.perf_counter() - t0) * 1000
            prompts = [args.prompt]

            def fn():
                with torch.inference_mode():
                    for p in prompts:
                        i1 = tok1(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                        i2 = tok2(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                        h1 = te1(i1, output_hidden_states=True).hidden_states[-2]
                        o2 = te2(i2, output_hidden_states=True)
                        torch.cat([h1, o2.hidden_states[-2]], -1).sum().item()
                        o2.text_embeds.sum().item()
        else:
            print(f"unknown workload {work}", file=sys.stderr)
            return 2
        res = timed(fn, args.warmup, args.repeats)
        res["peak_rss_bytes"] = vmhwm()
        out[work] = res
        print(f"{work}: {res}", file=sys.stderr, flush=True)
    out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
