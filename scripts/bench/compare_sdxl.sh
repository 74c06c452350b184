#!/usr/bin/env bash
# SDXL base (random fp16 weights) on the CPU: lowvram's CLI vs diffusers/transformers, one run, side by side.
#
#   PYTHON=/work/venv/bin/python scripts/bench/compare_sdxl.sh [--model DIR] [--threads 2] [--size 64]
#       [--budgets 100,50,25,10] [--steps unet,encode,vae,sweep,small] [--out DIR]
#
# DIR: the folder scripts/bench/make_sdxl_random.py writes (default /work/sdxl-random). Every lowvram run is the
# release CLI (`target/release/lowvram`) with `keep_ram_copy_of_weights: false`, RAYON_NUM_THREADS = --threads; every
# PyTorch run scripts/bench/torch_sdxl.py with the same thread count. Each run is its own process under
# /usr/bin/time -v (peak RSS = "Maximum resident set size"). Results (JSON, time -v logs, latents) go to
# target/bench/sdxl-<UTC timestamp>/; scripts/bench/summarize_sdxl.py prints the tables from them.
#
# Steps:
#   encode  lowvram encode (CLIP-L + bigG, the prompt; SDXL zeros the empty negative) -> cond.safetensors; transformers the same
#   unet    lowvram generate --steps 1 (CFG, batch 2) on a view of DIR without text encoders, conditioning from
#           cond.safetensors, default device (cpu): step ms, then the 512 px decode; diffusers UNet forward (batch 2)
#   vae     diffusers VAE decode at --size*8 px (lowvram's figure is the decode of the unet step's run)
#   sweep   the unet run on emulated:64GiB with --vram-budget = P % of the UNet's f32 bytes, P in --budgets;
#           latents compared bit for bit with the resident (cpu) run
#   small   the whole pipeline (prompt -> encoders -> UNet -> VAE, 1 step) on emulated:2GiB, with the default
#           device_working_mem_gb and then with 1 GiB
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=/work/sdxl-random
THREADS=2
SIZE=64
BUDGETS=100,50,25,10
STEPS=encode,unet,vae,sweep,small
OUT=target/bench/sdxl-$(date -u +%Y%m%dT%H%M%SZ)
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --budgets) BUDGETS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
has() { [[ ",$STEPS," == *",$1,"* ]]; }
LV=target/release/lowvram
[ -x "$LV" ] || cargo build --release --locked --bin lowvram
mkdir -p "$OUT"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
PX=$((SIZE * 8))
PROMPT="a photograph of an astronaut riding a horse on the moon, highly detailed"
printf 'keep_ram_copy_of_weights: false\n' > "$OUT/lowvram.yaml"
{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo +dirty)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"; echo "mem: $(free -g | awk '/Mem/{print $2}') GiB"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"; echo "command: $0 --model $MODEL --threads $THREADS --size $SIZE --budgets $BUDGETS --steps $STEPS"
} > "$OUT/machine.txt"

# A view of the pipeline without text encoders: the UNet runs load only the UNet and the VAE.
VIEW=$OUT/view
mkdir -p "$VIEW"
for c in unet vae scheduler model_index.json; do ln -sfn "$(readlink -f "$MODEL/$c")" "$VIEW/$c"; done

timed() { # NAME CMD...: run under time -v, stdout to NAME.json, time log to NAME.time
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/commands.txt" >&2
  /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err" || { echo "FAILED: $name (see $OUT/$name.err)" >&2; return 0; }
  grep -E "Elapsed|Maximum resident" "$OUT/$name.time" >&2
}

if has encode || [ ! -f "$OUT/cond.safetensors" ]; then
  timed lowvram_encode "$LV" encode --model "$MODEL" --config "$OUT/lowvram.yaml" --prompt "$PROMPT" \
    --width "$PX" --height "$PX" --out "$OUT/cond.safetensors" --json
fi
if has encode; then
  timed torch_encode "$PYTHON" scripts/bench/torch_sdxl.py --warmup 0 --model "$MODEL" --work encode --threads "$THREADS" --prompt "$PROMPT"
fi
if has unet; then
  timed lowvram_unet_cpu "$LV" generate --model "$VIEW" --config "$OUT/lowvram.yaml" --inputs "$OUT/cond.safetensors" \
    --steps 1 --width "$PX" --height "$PX" --out "$OUT/unet_cpu.png" --latents-out "$OUT/latents_cpu.safetensors" --json
  timed torch_unet "$PYTHON" scripts/bench/torch_sdxl.py --warmup 0 --model "$MODEL" --inputs "$OUT/cond.safetensors" --work unet_step \
    --size "$SIZE" --threads "$THREADS"
fi
if has vae; then
  timed torch_vae "$PYTHON" scripts/bench/torch_sdxl.py --warmup 0 --model "$MODEL" --work vae_decode --size "$SIZE" --threads "$THREADS"
fi
if has sweep; then
  UNET_F32=$("$PYTHON" -c "import json,sys; h=open(sys.argv[1],'rb'); n=int.from_bytes(h.read(8),'little'); \
    d=json.loads(h.read(n)); import math; print(sum(4*math.prod(v['shape']) for k,v in d.items() if k!='__metadata__'))" \
    "$MODEL/unet/diffusion_pytorch_model.fp16.safetensors")
  echo "unet_f32_bytes: $UNET_F32" >> "$OUT/machine.txt"
  for p in ${BUDGETS//,/ }; do
    b=$((UNET_F32 * p / 100))
    [ "$p" -ge 100 ] && b=$((UNET_F32 + 64 * 1024 * 1024))
    timed "lowvram_unet_b$p" "$LV" generate --model "$VIEW" --config "$OUT/lowvram.yaml" --inputs "$OUT/cond.safetensors" \
      --device emulated:64GiB --vram-budget "$b" --steps 1 --width "$PX" --height "$PX" --out "$OUT/unet_b$p.png" \
      --latents-out "$OUT/latents_b$p.safetensors" --json
  done
fi
if has small; then
  # First with the configuration as is (the default device_working_mem_gb, 3 GiB, exceeds a 2 GiB device), then
  # with 1 GiB of working memory.
  timed lowvram_pipeline_2gib_default "$LV" generate --model "$MODEL" --config "$OUT/lowvram.yaml" --prompt "$PROMPT" \
    --device emulated:2GiB --steps 1 --width "$PX" --height "$PX" --out "$OUT/pipeline_2gib_default.png" --json
  printf 'keep_ram_copy_of_weights: false\ndevice_working_mem_gb: 1\n' > "$OUT/lowvram_2gib.yaml"
  timed lowvram_pipeline_2gib "$LV" generate --model "$MODEL" --config "$OUT/lowvram_2gib.yaml" --prompt "$PROMPT" \
    --device emulated:2GiB --steps 1 --width "$PX" --height "$PX" --out "$OUT/pipeline_2gib.png" \
    --latents-out "$OUT/latents_2gib.safetensors" --json
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
echo "$OUT"
