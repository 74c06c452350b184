#!/usr/bin/env bash
# lowvram vs PyTorch/diffusers on CPU, f32, the SD 1.5 UNet step and VAE decode, plus lowvram's UNet budget sweep.
#
#   scripts/bench/compare.sh [--threads N] [--repeats R] [--rounds K] [--model DIR] [--only W,W]
#                            [--budgets 100,50,25,10] [--out DIR] [--before CHECKOUT] [--weights fp32|fp16]
#
# 1. makes the random-weight SD 1.5 model (scripts/bench/make_sd15_random.py) if DIR has none;
# 2. builds the benchmark (`cargo bench --bench sd --no-run`, the bench profile);
# 3. runs K rounds (default 2), each one PyTorch process and one lowvram process with the same threads, alternating
#    which goes first, so that drift on the machine (thermal, other load) falls on both;
# 4. prints the table: each figure, the ratio lowvram/PyTorch beside the goal (<= 0.80x), and the sweep ratios vs
#    100 % resident beside the goal (25 % <= 1.10x). Raw JSON and the table are kept in --out.
# --weights fp16: both sides load the fp16 file users download (PyTorch into f32; lowvram with LOWVRAM_BENCH_ARGS,
#    e.g. "--dtype auto" for the default configuration: fp16 storage, f32 compute). Default fp32: the f32 file.
# --before CHECKOUT: a second checkout of lowvram (an earlier commit, e.g. `git worktree add ../before <rev>`) whose
#    benchmark runs in the same rounds (fully resident only), so the table shows before/after in one run
#    (its own target dir: BEFORE_TARGET_DIR, default CHECKOUT/target).
#
# Environment: PYTHON (default: python3) must have torch and diffusers; CARGO_TARGET_DIR is honoured;
# LOWVRAM_BENCH_ARGS adds arguments to the lowvram side (e.g. "--config 'keep_ram_copy_of_weights: false'").
# Run it on an otherwise idle machine; numbers from a shared or busy machine are smoke tests only.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

threads=$(nproc)
repeats=3
rounds=2
model="target/sd15-random"
only="unet_step_32,unet_step_64,vae_decode_256,vae_decode_512"
budgets="100,50,25,10"
out=""
before=""
weights=fp32
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads=$2; shift 2 ;;
        --repeats|-r) repeats=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --budgets) budgets=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --before) before=$2; shift 2 ;;
        --weights) weights=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
extra=()
if [ -n "${LOWVRAM_BENCH_ARGS:-}" ]; then eval "extra=($LOWVRAM_BENCH_ARGS)"; fi
out=${out:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
log() { printf '==> %s\n' "$*" >&2; }

"$python" -c 'import torch, diffusers' 2>/dev/null || {
    echo "FATAL: $python lacks torch or diffusers (set PYTHON=/path/to/venv/bin/python)" >&2; exit 1; }

if [ ! -f "$model/model_index.json" ]; then
    log "making the random SD 1.5 model in $model"
    "$python" scripts/bench/make_sd15_random.py "$model"
fi

log "building the lowvram benchmark (bench profile)"
cargo bench --bench sd --no-run
if [ -n "$before" ]; then
    before=$(cd "$before" && pwd)
    before_target=${BEFORE_TARGET_DIR:-$before/target}
    log "building the 'before' benchmark in $before ($(git -C "$before" rev-parse --short HEAD))"
    (cd "$before" && CARGO_TARGET_DIR=$before_target cargo bench --bench sd --no-run)
fi

# Same threads everywhere: torch.set_num_threads (and the OpenMP/MKL pools), rayon/candle via --threads.
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "mem: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "lowvram: $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo '+dirty')"
    echo "LOWVRAM_BENCH_ARGS: ${LOWVRAM_BENCH_ARGS:-}"
    [ -z "$before" ] || echo "before: $(git -C "$before" rev-parse --short HEAD) ($before)"
    echo "command: scripts/bench/compare.sh --threads $threads --repeats $repeats --rounds $rounds --model $model --only $only --budgets $budgets --weights $weights"
} > "$out/machine.txt"
cat "$out/machine.txt" >&2

run_torch() {
    log "round $1: PyTorch"
    "$python" scripts/bench/torch_bench.py --model "$model" --threads "$threads" --repeats "$repeats" \
        --only "$only" --weights "$weights" --json > "$out/torch-$1.json" 2> >(grep -v -i 'warn' >&2)
}
run_lowvram() {
    log "round $1: lowvram"
    cargo bench -q --bench sd -- --model "$model" --threads "$threads" --repeats "$repeats" --only "$only" \
        --budgets "$budgets" --weights "$weights" ${extra[@]+"${extra[@]}"} --json > "$out/lowvram-$1.json"
}
run_before() {
    [ -n "$before" ] || return 0
    log "round $1: lowvram before ($(git -C "$before" rev-parse --short HEAD))"
    # Absolute model path: the before checkout runs from its own folder. Fully resident only: the sweep is 'after's.
    (cd "$before" && CARGO_TARGET_DIR=$before_target cargo bench -q --bench sd -- --model "$model_abs" \
        --threads "$threads" --repeats "$repeats" --only "$only" --budgets 100 ${extra[@]+"${extra[@]}"} --json) \
        > "$out/before-$1.json"
}
model_abs=$(cd "$model" && pwd)
for ((i = 1; i <= rounds; i++)); do
    if (( i % 2 == 1 )); then run_torch "$i"; run_before "$i"; run_lowvram "$i"
    else run_lowvram "$i"; run_before "$i"; run_torch "$i"; fi
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"

echo
"$python" scripts/bench/summarize.py "$out" | tee "$out/table.txt"
echo
echo "results: $out (machine.txt, torch-*.json, lowvram-*.json, before-*.json, summary.json, table.txt)"
