#!/usr/bin/env python3
"""Print the SDXL tables (markdown) from a scripts/bench/compare_sdxl.sh result folder.

    scripts/bench/summarize_sdxl.py target/bench/sdxl-<timestamp>

Reads NAME.json (the process's stdout), NAME.time (/usr/bin/time -v) and the latents files; writes table.md and
summary.json beside them and prints the tables.
"""
import json
import sys
from pathlib import Path

MIB = 1 << 20


def load(d, name):
    try:
        return json.loads((d / f"{name}.json").read_text().strip().splitlines()[-1])
    except (OSError, IndexError, json.JSONDecodeError):
        return None


def time_v(d, name):
    """(wall seconds, peak RSS bytes) from /usr/bin/time -v."""
    try:
        text = (d / f"{name}.time").read_text()
    except OSError:
        return None, None
    wall = rss = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Elapsed (wall clock)"):
            parts = line.rsplit(" ", 1)[1].split(":")
            wall = sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))
        elif line.startswith("Maximum resident set size"):
            rss = int(line.rsplit(" ", 1)[1]) * 1024
    return wall, rss


def latents_bytes(path):
    """The raw data bytes of a safetensors file's tensors (the header may order keys differently)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n:]


def fmt(x, nd=1):
    return "—" if x is None else f"{x:,.{nd}f}"


def main():
    d = Path(sys.argv[1])
    rows, out = [], {}
    lines = [f"Result folder `{d}`.", "", "```", (d / "machine.txt").read_text().strip(), "```", ""]

    # Text encoding: lowvram_encode (writes the conditioning, first) and, when present, lowvram_encode2 (a rerun
    # after the transformers process, both with the files in the page cache).
    te = load(d, "torch_encode")
    tw, tr = time_v(d, "torch_encode")
    if te:
        t_call, t_load = te["encode"]["median_ms"], te["load_ms"]["encode"]
        lines += ["| text encoding (CLIP-L + bigG, one prompt; negative = zeros) | process wall s | transformers: from_pretrained + first call s | peak RSS MiB |",
                  "|---|---|---|---|",
                  f"| transformers | {fmt(tw)} | {fmt((t_load + t_call) / 1000)} ({fmt(t_load / 1000)} + {fmt(t_call / 1000)}) | {fmt(tr and tr / MIB, 0)} |"]
        out["encode"] = {"torch_wall_s": tw, "torch_rss": tr, "torch_load_ms": t_load, "torch_call_ms": t_call}
        for name in ("lowvram_encode", "lowvram_encode2"):
            lw, lr = time_v(d, name)
            if lw:
                lines.append(f"| lowvram CLI `encode` ({name}) | {fmt(lw)} ({fmt(lw / tw, 2)}×) | ≤ {fmt(lw)} (≤ {fmt(lw * 1000 / (t_load + t_call), 2)}×) | {fmt(lr / MIB, 0)} ({fmt(lr / tr, 2)}×) |")
                out["encode"][name] = {"wall_s": lw, "rss": lr}
        lines.append("")

    # UNet step + VAE decode, default configuration.
    lu, tu, tv = load(d, "lowvram_unet_cpu"), load(d, "torch_unet"), load(d, "torch_vae")
    if lu or tu:
        l_step = lu and lu["timings_ms"]["steps"][0]
        l_dec = lu and lu["timings_ms"]["decode"]
        t_step = tu and tu["unet_step"]["median_ms"]
        t_dec = tv and tv["vae_decode"]["median_ms"]
        luw, lur = time_v(d, "lowvram_unet_cpu")
        tuw, tur = time_v(d, "torch_unet")
        tvw, tvr = time_v(d, "torch_vae")
        lines += ["| workload (first call in a fresh process) | lowvram ms | PyTorch ms | lowvram / PyTorch | lowvram process peak RSS MiB | PyTorch process peak RSS MiB |",
                  "|---|---|---|---|---|---|",
                  f"| UNet step, CFG batch 2 | {fmt(l_step)} | {fmt(t_step)} | **{fmt(l_step / t_step if l_step and t_step else None, 2)}×** | {fmt(lur and lur / MIB, 0)} (UNet + VAE run) | {fmt(tur and tur / MIB, 0)} (UNet) |",
                  f"| VAE decode | {fmt(l_dec)} | {fmt(t_dec)} | **{fmt(l_dec / t_dec if l_dec and t_dec else None, 2)}×** | (same process) | {fmt(tvr and tvr / MIB, 0)} (VAE) |",
                  f"| process wall s | {fmt(luw)} (load + step + decode + PNG) | {fmt(tuw)} + {fmt(tvw)} (UNet; VAE) | | | |", ""]
        out["unet"] = {"lowvram_step_ms": l_step, "torch_step_ms": t_step, "lowvram_decode_ms": l_dec,
                       "torch_decode_ms": t_dec, "lowvram_rss": lur, "torch_unet_rss": tur, "torch_vae_rss": tvr,
                       "lowvram_peak_device_bytes": lu and lu["peak_device_bytes"]}

    # Budget sweep.
    ref = latents_bytes(d / "latents_cpu.safetensors")
    sweep = sorted((p for p in d.glob("lowvram_unet_b*.json")), key=lambda p: -int(p.stem.split("_b")[1]))
    if sweep:
        base = None
        unet_f32 = next((int(line.split()[1]) for line in (d / "machine.txt").read_text().splitlines()
                         if line.startswith("unet_f32_bytes:")), None)
        lines += ["| budget (% of UNet f32) | max_cache_vram | resident MiB | streamed/step MiB (fp16 file bytes) | = (UNet f32 − resident) / 2 | peak device MiB (denoise) | refused | step ms | vs 100 % | latents = cpu run | process peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in sweep:
            pct = int(p.stem.split("_b")[1])
            j = load(d, p.stem)
            _, rss = time_v(d, p.stem)
            if not j:
                lines.append(f"| {pct} % | FAILED: see {p.stem}.err | | | | | | | | | |")
                continue
            dn = j["denoise"]
            step = dn["step_ms"][0]
            if pct >= 100:
                base = step
            same = latents_bytes(d / f"latents_b{pct}.safetensors")
            ident = None if ref is None or same is None else same == ref
            budget = unet_f32 and (unet_f32 + 64 * MIB if pct >= 100 else unet_f32 * pct // 100) / (1 << 30)
            lines.append(f"| {pct} % | {fmt(budget, 2) + ' GiB' if budget else '—'} | {fmt(dn['resident_bytes'] / MIB, 0)} | "
                         f"{fmt(dn['bytes_streamed'] / MIB, 0)} | {'yes' if unet_f32 and 2 * dn['bytes_streamed'] == unet_f32 - dn['resident_bytes'] else 'NO'} | {fmt(dn['peak_device_bytes'] / MIB, 0)} | {dn['refused_allocations']} | "
                         f"{fmt(step)} | {fmt(step / base if base else None, 2)}× | {'yes' if ident else ('NO' if ident is False else '—')} | "
                         f"{fmt(rss and rss / MIB, 0)} |")
            out[f"sweep_{pct}"] = {"step_ms": step, "denoise": dn, "latents_identical": ident, "rss": rss}
        lines.append("")

    # Whole pipeline on emulated:2GiB.
    if (d / "lowvram_pipeline_2gib_default.err").exists():
        j = load(d, "lowvram_pipeline_2gib_default")
        err = (d / "lowvram_pipeline_2gib_default.err").read_text().strip().splitlines()[-1:]
        lines += [f"Whole pipeline on `emulated:2GiB`, configuration as is: {'ran' if j else f'FAILED: {err}'}.", ""]
    ls = load(d, "lowvram_pipeline_2gib")
    if (d / "lowvram_pipeline_2gib.time").exists():
        w, rss = time_v(d, "lowvram_pipeline_2gib")
        if ls:
            ident = latents_bytes(d / "latents_2gib.safetensors")
            ident = None if ident is None or ref is None else ident == ref
            lines += [f"Whole pipeline on `emulated:2GiB` (prompt → CLIP-L + bigG → UNet 1 step → VAE): ran, "
                      f"peak device {fmt(ls['peak_device_bytes'] / MIB, 0)} MiB, refused "
                      f"{ls['denoise']['refused_allocations'] + ls['decode']['refused_allocations']}, step "
                      f"{fmt(ls['timings_ms']['steps'][0])} ms, decode {fmt(ls['timings_ms']['decode'])} ms "
                      f"(tile {ls['decode'].get('tile_latent')}), bytes streamed {fmt(ls['bytes_streamed'] / MIB, 0)} MiB, "
                      f"process wall {fmt(w)} s, peak RSS {fmt(rss and rss / MIB, 0)} MiB; latents = cpu run (with "
                      f"encode's conditioning): {ident}.", ""]
            out["pipeline_2gib"] = ls
        else:
            err = (d / "lowvram_pipeline_2gib.err").read_text().strip().splitlines()[-1:]
            lines += [f"Whole pipeline on `emulated:2GiB`: FAILED: {err}", ""]
    text = "\n".join(lines)
    (d / "table.md").write_text(text + "\n")
    (d / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
