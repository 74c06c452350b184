#!/usr/bin/env python3
"""PyTorch/diffusers baseline for lowvram's benchmarks: the SD 1.5 UNet step and VAE decode on CPU, f32.

    scripts/bench/torch_bench.py --model DIR [--threads N] [--repeats R] [--only W,W] [--json]

DIR is a diffusers pipeline folder (scripts/bench/make_sd15_random.py writes one); its f32 weight files are used, or
with --weights fp16 its fp16 files (variant="fp16", the file users download), loaded into f32 as PyTorch users on a
CPU do.
Workloads (the same ones benches/sd.rs runs through lowvram):

    unet_step_32   one classifier-free-guidance UNet step: one forward at batch 2 (cond + uncond),
                   sample [2,4,32,32], encoder_hidden_states [2,77,768], timestep 500      (256 px image)
    unet_step_64   the same at [2,4,64,64]                                                  (512 px image)
    vae_decode_256 VAE decode of [1,4,32,32] latents (divided by scaling_factor, as pipelines do)
    vae_decode_512 VAE decode of [1,4,64,64]

Each: 1 warm-up run, then R timed runs (default 3) under torch.inference_mode; reports median/min/max ms and every
run. Memory: the process's peak RSS (resource.getrusage ru_maxrss / VmHWM, kept across the resets) and, per workload, the peak resident set while
it ran (VmHWM from /proc/self/status after resetting it through /proc/self/clear_refs, where the kernel allows).
Prints a readable summary, or with --json one JSON object on stdout.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

WORKLOADS = ("unet_step_32", "unet_step_64", "vae_decode_256", "vae_decode_512")


def read_status_kib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_PEAK_KIB = [0]  # the process peak across resets (the reset also resets getrusage's ru_maxrss)


def reset_hwm():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted. The peak so far is kept first."""
    _PEAK_KIB[0] = max(_PEAK_KIB[0], read_status_kib("VmHWM") or 0,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="diffusers pipeline folder (unet/, vae/)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--repeats", "-r", type=int, default=3, help="timed runs per workload after 1 warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated subset of " + ", ".join(WORKLOADS))
    ap.add_argument("--device", default="cpu", help="cpu (the baseline), or cuda for a side-by-side GPU run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=("fp32", "fp16"), default="fp32",
                    help="which weight file to load (always computed in f32)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in wanted if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import torch
    torch.set_num_threads(args.threads)
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print

    out = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "dtype": "f32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "model": os.path.abspath(args.model),
        "started_unix": time.time(),
        "workloads": {},
    }
    hwm_resettable = reset_hwm()
    out["rss_after_import_bytes"] = (read_status_kib("VmRSS") or 0) * 1024

    def timed(name, fn, extra):
        for _ in range(args.warmup):
            fn()
        sync()
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            runs.append((time.perf_counter() - t0) * 1000.0)
        hwm = read_status_kib("VmHWM") if hwm_resettable else None
        res = {
            "median_ms": round(statistics.median(runs), 3),
            "min_ms": round(min(runs), 3),
            "max_ms": round(max(runs), 3),
            "runs_ms": [round(r, 3) for r in runs],
            "peak_rss_bytes": hwm * 1024 if hwm is not None else None,
        }
        res.update(extra)
        out["workloads"][name] = res
        log(f"{name:15s} median {res['median_ms']:10.1f} ms  min {res['min_ms']:10.1f}  max {res['max_ms']:10.1f}"
            + (f"  peak RSS {hwm / 1024:.0f} MiB" if hwm is not None else ""))

    variant = "fp16" if args.weights == "fp16" else None
    out["weights"] = args.weights
    gen = torch.Generator().manual_seed(args.seed)
    unet_names = [w for w in wanted if w.startswith("unet")]
    vae_names = [w for w in wanted if w.startswith("vae")]

    if unet_names:
        reset_hwm()
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet"), torch_dtype=torch.float32,
                                                    variant=variant)
        unet = unet.to(dev).eval()
        out["unet_load_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        out["unet_weight_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
        procs = {type(p).__name__ for p in unet.attn_processors.values()}
        out["unet_attention_processor"] = sorted(procs)
        ehs = torch.randn(2, 77, 768, generator=gen).to(dev)
        t = torch.tensor(500, device=dev)
        for name in unet_names:
            hw = int(name.rsplit("_", 1)[1])
            sample = torch.randn(2, 4, hw, hw, generator=gen).to(dev)
            reset_hwm()
            with torch.inference_mode():
                timed(name, lambda: unet(sample, t, encoder_hidden_states=ehs).sample,
                      {"sample_shape": [2, 4, hw, hw], "ehs_shape": [2, 77, 768], "timestep": 500})
        del unet

    if vae_names:
        reset_hwm()
        t0 = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae"), torch_dtype=torch.float32, variant=variant)
        vae = vae.to(dev).eval()
        out["vae_load_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        out["vae_weight_bytes"] = sum(p.numel() * p.element_size() for p in vae.parameters())
        sf = vae.config.scaling_factor
        for name in vae_names:
            px = int(name.rsplit("_", 1)[1])
            z = torch.randn(1, 4, px // 8, px // 8, generator=gen).to(dev)
            reset_hwm()
            with torch.inference_mode():
                timed(name, lambda: vae.decode(z / sf).sample, {"latent_shape": [1, 4, px // 8, px // 8]})
        del vae

    reset_hwm()  # folds the last stretch into the process peak
    out["peak_rss_bytes"] = _PEAK_KIB[0] * 1024  # max of getrusage ru_maxrss (KiB on Linux) and VmHWM, over resets
    out["per_workload_rss"] = "VmHWM after /proc/self/clear_refs" if hwm_resettable else "unavailable"
    if args.json:
        print(json.dumps(out))
    else:
        print(f"peak RSS (getrusage) {out['peak_rss_bytes'] / 2**20:.0f} MiB, threads {out['threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
