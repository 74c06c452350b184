#!/usr/bin/env bash
# Per-op microbenchmarks, lowvram (benches/ops.rs) vs PyTorch (scripts/bench/torch_ops.py), same cases, same
# threads, in one run: K rounds (default 2) alternating which side goes first; prints medians over all timed runs and
# the ratios, with lowvram's measured peak transient memory beside its estimate.
#
#   scripts/bench/compare_ops.sh [--threads N] [--repeats R] [--rounds K] [--only PREFIX,PREFIX] [--out DIR]
#
# Environment: PYTHON (default: python3) must have torch; CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=$(nproc); repeats=5; rounds=2; only=""; out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads=$2; shift 2 ;;
        --repeats|-r) repeats=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
"$python" -c 'import torch' 2>/dev/null || { echo "FATAL: $python lacks torch (set PYTHON=/path/to/venv/bin/python)" >&2; exit 1; }
out=${out:-target/bench-ops/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
cargo bench --bench ops --no-run
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "lowvram: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
    echo "command: scripts/bench/compare_ops.sh --threads $threads --repeats $repeats --rounds $rounds${only:+ --only $only}"
} > "$out/machine.txt"
cat "$out/machine.txt" >&2
args=(--threads "$threads" --repeats "$repeats" --json)
[ -z "$only" ] || args+=(--only "$only")
run_torch() { echo "==> round $1: PyTorch" >&2; "$python" scripts/bench/torch_ops.py "${args[@]}" > "$out/torch-$1.json"; }
run_lowvram() { echo "==> round $1: lowvram" >&2; cargo bench -q --bench ops -- "${args[@]}" > "$out/lowvram-$1.json"; }
for ((i = 1; i <= rounds; i++)); do
    if (( i % 2 == 1 )); then run_torch "$i"; run_lowvram "$i"; else run_lowvram "$i"; run_torch "$i"; fi
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
"$python" - "$out" <<'PY' | tee "$out/table.txt"
import glob, json, os, statistics, sys
d = sys.argv[1]
def load(p):
    return [json.loads(open(f).read().strip().splitlines()[-1]) for f in sorted(glob.glob(os.path.join(d, p)))]
t, l = load("torch-*.json"), load("lowvram-*.json")
def pooled(rs, name, key="runs_ms"):
    runs = [x for r in rs for x in r["cases"].get(name, {}).get(key, [])]
    return statistics.median(runs) if runs else None
names = list(l[0]["cases"]) if l else list(t[0]["cases"])
hdr = ["case", "PyTorch ms", "lowvram ms", "lowvram/PyTorch"]
ref = any("composition_runs_ms" in c for r in l for c in r["cases"].values())
if ref:
    hdr += ["composition ms", "lowvram/composition"]
hdr += ["peak MiB (incl. output)", "estimate MiB"]
rows = []
for n in names:
    tp, lp = pooled(t, n), pooled(l, n)
    c = l[0]["cases"].get(n, {}) if l else {}
    row = [n, f"{tp:.2f}" if tp else "—", f"{lp:.2f}" if lp else "—", f"{lp / tp:.2f}×" if tp and lp else "—"]
    if ref:
        cp = pooled(l, n, "composition_runs_ms")
        row += [f"{cp:.2f}" if cp else "—", f"{lp / cp:.2f}×" if cp and lp else "—"]
    mib = lambda b: "—" if b is None else f"{b / 2**20:.1f}"
    row += [mib(max((r["cases"].get(n, {}).get("peak_bytes", 0) for r in l), default=None)), mib(c.get("estimate_bytes"))]
    rows.append(row)
w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
fmt = lambda cells: "| " + " | ".join(str(x).ljust(k) for x, k in zip(cells, w)) + " |"
print(f"threads {l[0]['threads'] if l else t[0]['threads']}, rounds {len(t)}+{len(l)}, ms = median of all timed runs")
print(fmt(hdr)); print("|" + "|".join("-" * (k + 2) for k in w) + "|")
for r in rows: print(fmt(r))
PY
echo "results: $out" >&2
