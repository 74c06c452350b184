#!/usr/bin/env python3
"""Pool the JSON outputs of torch_bench.py and `cargo bench --bench sd` and print the comparison table.

    scripts/bench/summarize.py DIR [--markdown]

DIR holds torch-*.json and lowvram-*.json (scripts/bench/compare.sh writes them, one pair per round), and
before-*.json when compare.sh ran with --before (an earlier lowvram commit, shown as its own column). Timed runs are
pooled over rounds: median/min/max of all runs. Ratios are lowvram / PyTorch of the pooled medians; the budget sweep
is compared with lowvram's own 100 %-resident point. Goals (issue 5): UNet step and VAE decode <= 0.8x PyTorch;
25 % budget <= 1.10x fully resident. Writes DIR/summary.json too. Standard library only.
"""
import glob
import json
import os
import statistics
import sys

GOAL_VS_TORCH = 0.80
GOAL_SWEEP = {25: 1.10}
MIB = 2 ** 20


def load(pattern):
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            text = f.read().strip()
        if not text:
            continue
        out.append(json.loads(text.splitlines()[-1]))
    return out


def pooled(runs):
    if not runs:
        return None
    return {"median_ms": statistics.median(runs), "min_ms": min(runs), "max_ms": max(runs), "n": len(runs)}


def pool(results, get):
    runs, extra = [], []
    for r in results:
        w = get(r)
        if w and "runs_ms" in w:
            runs += w["runs_ms"]
            extra.append(w)
    return pooled(runs), extra


def fmt_ms(p):
    if not p:
        return "—"
    return f"{p['median_ms']:.1f} ({p['min_ms']:.1f}–{p['max_ms']:.1f})"


def fmt_mib(b):
    return "—" if b is None else f"{b / MIB:.0f}"


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    d = sys.argv[1]
    torch_r = load(os.path.join(d, "torch-*.json"))
    lv_r = load(os.path.join(d, "lowvram-*.json"))
    before_r = load(os.path.join(d, "before-*.json"))
    if not torch_r and not lv_r:
        print(f"no results in {d}", file=sys.stderr)
        return 1

    names = ["unet_step_32", "unet_step_64", "vae_decode_256", "vae_decode_512"]
    summary = {"rounds": {"pytorch": len(torch_r), "lowvram": len(lv_r), "before": len(before_r)},
               "workloads": {}, "sweep": {}}
    any_r = (torch_r or lv_r)[0]
    threads = {r.get("threads") for r in torch_r + lv_r}
    print(f"CPU: {any_r.get('cpu')}   threads: {', '.join(map(str, sorted(threads)))}   "
          f"rounds: PyTorch {len(torch_r)}, lowvram {len(lv_r)}   (ms: median (min–max) over all timed runs)")
    if torch_r:
        print(f"PyTorch {torch_r[0].get('torch')}, diffusers {torch_r[0].get('diffusers')}, "
              f"attention {','.join(torch_r[0].get('unet_attention_processor', []))}")
    print()
    hdr = ("workload", "PyTorch ms", "lowvram ms", "lowvram/PyTorch", "goal", "met", "PyTorch peak RSS MiB",
           "lowvram peak RSS MiB", "lowvram peak device MiB")
    if before_r:
        hdr = hdr[:3] + ("before ms", "lowvram/before", "before/PyTorch") + hdr[3:]
    rows = []
    for n in names:
        tp, tex = pool(torch_r, lambda r: r.get("workloads", {}).get(n))
        lp, lex = pool(lv_r, lambda r: r.get("workloads", {}).get(n))
        bp, _ = pool(before_r, lambda r: r.get("workloads", {}).get(n))
        if not tp and not lp:
            continue
        ratio = lp["median_ms"] / tp["median_ms"] if tp and lp else None
        t_rss = max((w.get("peak_rss_bytes") or 0 for w in tex), default=None) or None
        l_rss = max((w.get("peak_rss_bytes") or 0 for w in lex), default=None) or None
        l_dev = max((w.get("peak_device_bytes") or 0 for w in lex), default=None) or None
        met = "—" if ratio is None else ("yes" if ratio <= GOAL_VS_TORCH else "NO")
        row = (n, fmt_ms(tp), fmt_ms(lp), "—" if ratio is None else f"{ratio:.2f}×", f"≤ {GOAL_VS_TORCH:.2f}×",
               met, fmt_mib(t_rss), fmt_mib(l_rss), fmt_mib(l_dev))
        if before_r:
            ab = lp["median_ms"] / bp["median_ms"] if lp and bp else None
            bt = bp["median_ms"] / tp["median_ms"] if bp and tp else None
            row = row[:3] + (fmt_ms(bp), "—" if ab is None else f"{ab:.2f}×", "—" if bt is None else f"{bt:.2f}×") + row[3:]
            summary.setdefault("before", {})[n] = {"before": bp, "after_over_before": ab, "before_over_pytorch": bt}
        rows.append(row)
        summary["workloads"][n] = {"pytorch": tp, "lowvram": lp, "ratio": ratio, "goal": GOAL_VS_TORCH,
                                   "pytorch_peak_rss_bytes": t_rss, "lowvram_peak_rss_bytes": l_rss,
                                   "lowvram_peak_device_bytes": l_dev}
    print_table(hdr, rows)

    sweep_names = sorted({k for r in lv_r for k in r.get("sweep", {})})
    if sweep_names:
        print()
        print("UNet budget sweep (lowvram; budget = max_cache_vram_gb as % of the UNet's bytes, which also holds the")
        print("streaming slot, so resident < budget; ratio vs its own 100 % point)")
        hdr = ("workload", "budget", "prefetch", "resident MiB (of model)", "streamed/step MiB", "model−resident MiB",
               "streamed = model−res", "prefetched/step MiB", "peak device MiB", "≤ predicted", "refused", "ms", "vs 100 %",
               "goal", "met")
        rows = []
        for n in sweep_names:
            keys = sorted({(p["budget_pct"], p.get("async_loading", True)) for r in lv_r for p in r["sweep"][n]},
                          key=lambda k: (-k[0], not k[1]))
            base = None
            for pct, pf in keys:
                pts = [p for r in lv_r for p in r["sweep"][n]
                       if p["budget_pct"] == pct and p.get("async_loading", True) == pf]
                pp = pooled([x for p in pts for x in p["runs_ms"]])
                if pct == 100 and base is None:
                    base = pp
                ratio = pp["median_ms"] / base["median_ms"] if base and pp else None
                goal = GOAL_SWEEP.get(pct)
                met = "—" if goal is None or ratio is None else ("yes" if ratio <= goal else "NO")
                p0 = pts[0]
                exact = all(p.get("streamed_equals_model_minus_resident") for p in pts)
                covers = all(p.get("predicted_peak_covers_measured", p.get("predicted_peak_equals_measured")) for p in pts)
                equal = all(p.get("predicted_peak_equals_measured") for p in pts)
                res = p0.get("resident_bytes")
                res_txt = fmt_mib(res) + (f" ({100 * res / p0['model_bytes']:.0f} %)" if res is not None and p0.get("model_bytes") else "")
                pf_step = max((max(p.get("bytes_prefetched_runs") or [0]) for p in pts), default=0)
                rows.append((n, f"{pct} %", "on" if pf else "off", res_txt, fmt_mib(p0.get("bytes_streamed_per_step")),
                             fmt_mib(p0.get("model_minus_resident_bytes")), "yes" if exact else "NO", fmt_mib(pf_step),
                             fmt_mib(max(max(p.get("peak_device_bytes") or 0, p.get("peak_device_bytes_forward") or 0)
                                         for p in pts)),
                             ("yes (=)" if equal else "yes") if covers else "NO",
                             str(sum(p.get("refused_allocations") or 0 for p in pts)), fmt_ms(pp),
                             "—" if ratio is None else f"{ratio:.2f}×", "—" if goal is None else f"≤ {goal:.2f}×", met))
                summary["sweep"].setdefault(n, []).append({
                    "budget_pct": pct, "async_loading": pf, "timing": pp, "ratio_vs_100": ratio, "goal": goal,
                    "resident_bytes": p0.get("resident_bytes"), "bytes_streamed_per_step": p0.get("bytes_streamed_per_step"),
                    "bytes_prefetched_per_step": pf_step,
                    "model_minus_resident_bytes": p0.get("model_minus_resident_bytes"), "streamed_exact": exact})
        print_table(hdr, rows)
    print()
    print(f"peak RSS (whole process): PyTorch {fmt_mib(max((r.get('peak_rss_bytes') or 0 for r in torch_r), default=None))} MiB, "
          f"lowvram {fmt_mib(max((r.get('peak_rss_bytes') or 0 for r in lv_r), default=None))} MiB")
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


def print_table(hdr, rows):
    cols = list(zip(hdr, *rows)) if rows else [(h,) for h in hdr]
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(hdr))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    sys.exit(main())
