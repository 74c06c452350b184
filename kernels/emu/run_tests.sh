#!/usr/bin/env bash
# Build and run every kernels/emu/test_*.cpp against the CPU emulator (kernels/emu/cuda_emu.hpp); one summary line
# per test; exit status non-zero if any build or test fails.
#   kernels/emu/run_tests.sh            # all tests
#   kernels/emu/run_tests.sh emu gn     # only tests whose name contains one of the words
# Flags: the contract's g++ line plus -Wno-unknown-pragmas (g++ 12 warns on `#pragma unroll` and a header cannot
# silence it). Extra flags: LV_EMU_CXXFLAGS. Binaries and logs go to ${TMPDIR:-/tmp}/lowvram-emu-tests.
set -u
cd "$(dirname "$0")/../.." || exit 2
out="${TMPDIR:-/tmp}/lowvram-emu-tests"
mkdir -p "$out"
CXX="${CXX:-g++}"
flags=(-std=c++20 -O2 -pthread -DLOWVRAM_EMU -Ikernels -Wall -Wextra -Werror -Wno-unknown-pragmas)
# shellcheck disable=SC2206
extra=(${LV_EMU_CXXFLAGS:-})
fail=0
start_all=$(date +%s.%N)
shopt -s nullglob
tests=(kernels/emu/test_*.cpp)
if [ ${#tests[@]} -eq 0 ]; then echo "no kernels/emu/test_*.cpp found"; exit 1; fi
for src in "${tests[@]}"; do
  name=$(basename "$src" .cpp)
  if [ $# -gt 0 ]; then
    keep=0
    for w in "$@"; do [[ "$name" == *"$w"* ]] && keep=1; done
    [ $keep = 1 ] || continue
  fi
  bin="$out/$name"
  t0=$(date +%s.%N)
  if ! "$CXX" "${flags[@]}" "${extra[@]}" "$src" -o "$bin" >"$out/$name.build.log" 2>&1; then
    echo "FAIL  $name: build failed ($out/$name.build.log):"
    sed -n '1,30p' "$out/$name.build.log"
    fail=1
    continue
  fi
  t1=$(date +%s.%N)
  "$bin" >"$out/$name.log" 2>&1
  rc=$?
  t2=$(date +%s.%N)
  times=$(awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "build %.1f s, run %.1f s", b - a, c - b }')
  if [ $rc -eq 0 ]; then
    echo "ok    $name ($times): $(tail -n 1 "$out/$name.log")"
  else
    echo "FAIL  $name (exit $rc, $times), last lines of $out/$name.log:"
    tail -n 25 "$out/$name.log"
    fail=1
  fi
done
total=$(awk -v a="$start_all" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
if [ $fail -eq 0 ]; then echo "all emulator tests passed (${total} s)"; else echo "emulator tests FAILED (${total} s)"; fi
exit $fail
