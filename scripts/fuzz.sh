#!/usr/bin/env bash
# Fuzz every target (tests/fuzz: safetensors, config_json, yaml, model_load, c_api) for SECONDS each, and print
# the executions, crashes, hangs and findings per target (also written to target/fuzz/summary.txt; crash and
# finding inputs are saved beside it). Runs on stable Rust; see RELIABILITY.md.
#
# Usage: scripts/fuzz.sh SECONDS [--target NAME[,NAME]] [--avoid-known] [--leak-rounds N] [--seed N] [--out DIR]
#   --avoid-known     do not generate the inputs of findings in tests/fuzz/known.rs (all fixed now: the default
#                     generates them)
#   --leak-rounds N   afterwards replay up to 256 corpus inputs N times and report RSS (must stay flat)
# Replay one saved input:  scripts/fuzz.sh replay NAME FILE     (LOWVRAM_FUZZ_TRACE=1 traces c_api's calls)
# Runs at low priority (nice ${FUZZ_NICE:-15}); exits non-zero when anything was found.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 1 ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
bin=$(cargo test --release --locked --test fuzz --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "fuzz.sh: could not build the fuzz harness (cargo test --release --test fuzz --no-run)" >&2; exit 1; }

if [ "$1" = replay ]; then
    [ $# -eq 3 ] || { echo "usage: scripts/fuzz.sh replay NAME FILE" >&2; exit 2; }
    exec "$bin" --target "$2" --replay "$3"
fi
seconds="$1"; shift
[[ "$seconds" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "fuzz.sh: SECONDS must be a number, got '$seconds'" >&2; exit 2; }
exec nice -n "${FUZZ_NICE:-15}" "$bin" --seconds "$seconds" "$@"
