#!/usr/bin/env bash
# The GPU checks of issues 5 and 7 in one script: build here (no GPU needed), run on the GPU machine (the device tool).
#
#   scripts/gpu/run.sh pack      # here: CUDA 13.0 compiler from PyPI (scripts/cuda/setup.sh), a release build with
#                                # --features cuda of the GPU test (tests/gpu.rs) and the SD benchmark, gzipped into
#                                # .carry/ with gpu-env.sh and torch_anchor.py; the diffusers wheel into .whl/
#   scripts/gpu/run.sh remote    # there, from the project root, with carry [".carry", ".whl"]: runs the GPU test,
#                                # makes the random SD 1.5 model, runs lowvram's benchmark (fp16, budgets 100/50/25/10,
#                                # each with prefetch off and on: synchronous vs overlapped streaming from pinned RAM,
#                                # with the share of the copy time the copy engine hides per budget)
#                                # and the PyTorch/diffusers baseline (torch_anchor.py); everything lands in $OUT
#
# Device-tool call after `pack` (one command, well under its 10-minute limit):
#   run(command="scripts/gpu/run.sh remote", carry=[".carry", ".whl"])
# Knobs: CUDA_COMPUTE_CAP (default 90 = H100/H200, sm_90a: the carry limit allows one architecture), LOWVRAM_CUDA_ARCHS
# (default 90: the own kernels' machine code),
# LOWVRAM_GPU_BUDGETS (default 100,50,25,10), LOWVRAM_GPU_REPEATS (default 5), SHARED (default ../shared, for
# torch_anchor.py when packing).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
mode=${1:-}

case "$mode" in
pack)
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    # The own kernels' machine code for the H100/H200 only (users' builds embed 75,80,86,89,90; see build.rs).
    export LOWVRAM_CUDA_ARCHS=${LOWVRAM_CUDA_ARCHS:-90}
    eval "$(scripts/cuda/setup.sh)"
    mkdir -p .carry .whl
    rm -f .carry/*.gz
    cp scripts/cuda/gpu-env.sh .carry/
    anchor=${SHARED:-$root/../shared}/cuda/torch_anchor.py
    if [ -f "$anchor" ]; then cp "$anchor" .carry/; else echo "note: $anchor not found; no PyTorch baseline" >&2; fi
    # The test binary and the two benchmarks only: each is ~42 MB (11 MB gzipped) and the carry holds 64 MiB.
    cargo build --release --features cuda --test gpu --bench sd --bench ops --message-format=json |
        python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu", "sd", "ops"):
        print(m["target"]["name"], m["executable"])' |
        while read -r name exe; do gzip -c "$exe" > ".carry/$name.gz"; done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
    ls -la .carry .whl
    du -ch .carry .whl | tail -1
    ;;
remote)
    out=${OUT:-$root/target/gpu-out}
    mkdir -p "$out" /tmp/lowvram-bin
    # shellcheck disable=SC1091
    . .carry/gpu-env.sh
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$out/gpu.txt"
    for f in .carry/*.gz; do n=$(basename "$f" .gz); gunzip -c "$f" > "/tmp/lowvram-bin/$n"; chmod +x "/tmp/lowvram-bin/$n"; done
    rc=0
    echo "==> GPU test (tests/gpu.rs): the pipeline first, in a fresh process (its first denoise is the cold start)"
    LOWVRAM_REPO=$root /tmp/lowvram-bin/gpu --nocapture --test-threads=1 --exact gpu_suite 2>&1 | tee "$out/gpu-test.log" || rc=1
    echo "==> GPU test (tests/gpu.rs): the own kernels against the compositions"
    LOWVRAM_REPO=$root /tmp/lowvram-bin/gpu --nocapture --test-threads=1 --exact gpu_kernels 2>&1 | tee -a "$out/gpu-test.log" || rc=1
    echo "==> GPU test (tests/gpu.rs): stream order and the copy engine (its stream, hand-offs, copy/compute overlap)"
    LOWVRAM_REPO=$root /tmp/lowvram-bin/gpu --nocapture --test-threads=1 --exact gpu_copy_engine 2>&1 | tee -a "$out/gpu-test.log" || rc=1
    echo "==> GPU test (tests/gpu.rs): device OOM -> OUT_OF_DEVICE_MEMORY and recovery, our own pool, reservations"
    LOWVRAM_REPO=$root /tmp/lowvram-bin/gpu --nocapture --test-threads=1 --exact gpu_oom_and_own_pool 2>&1 | tee -a "$out/gpu-test.log" || rc=1
    for dt in f16 f32; do
        echo "==> per-op benchmark, $dt on cuda:0: lowvram (kernel and composition) and PyTorch, one after the other"
        /tmp/lowvram-bin/ops --device cuda:0 --dtype $dt --repeats 20 --warmup 3 --json > "$out/ops-lowvram-$dt.json" \
            2> "$out/ops-lowvram-$dt.log" || { rc=1; tail -5 "$out/ops-lowvram-$dt.log"; }
        python3 scripts/bench/torch_ops.py --device cuda:0 --dtype $dt --repeats 20 --warmup 3 --json \
            > "$out/ops-torch-$dt.json" 2> "$out/ops-torch-$dt.log" || { rc=1; tail -5 "$out/ops-torch-$dt.log"; }
        paste -d'|' "$out/ops-lowvram-$dt.log" "$out/ops-torch-$dt.log" | cut -c1-220
    done
    echo "==> the random SD 1.5 model"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    python3 scripts/bench/make_sd15_random.py /tmp/sd15 2>&1 | tail -3
    echo "==> lowvram benchmark on cuda:0 (fp16)"
    /tmp/lowvram-bin/sd --model /tmp/sd15 --device cuda:0 --dtype fp16 --only unet_step_64,vae_decode_512 \
        --budgets "${LOWVRAM_GPU_BUDGETS:-100,50,25,10}" --prefetch off,on --repeats "${LOWVRAM_GPU_REPEATS:-5}" --json \
        > "$out/lowvram-gpu.json" 2> "$out/lowvram-gpu.log" || { rc=1; tail -20 "$out/lowvram-gpu.log"; }
    tail -20 "$out/lowvram-gpu.log"
    if [ -f .carry/torch_anchor.py ]; then
        echo "==> PyTorch/diffusers baseline (resident, group offloading, bandwidth)"
        python3 .carry/torch_anchor.py > "$out/torch-gpu.json" 2> "$out/torch-gpu.log" || rc=1
        cat "$out/torch-gpu.json"
    fi
    exit $rc
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
