#!/usr/bin/env bash
# The whole test suite: Rust tests, the header check, the C / C++ / C# host programs (C under valgrind), and a type
# check of the CUDA build. Installs what it needs (mono, valgrind, CUDA compiler headers) and fails loudly rather than
# skipping a language. Usage: scripts/test.sh   (set LOWVRAM_SKIP_CUDA_CHECK=1 only for quick local iterations)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)
step() { printf '\n==> %s (%ds)\n' "$*" $(( $(date +%s) - start )); }

# --- tools -------------------------------------------------------------------------------------------------------
need_apt=()
command -v mcs >/dev/null || need_apt+=(mono-mcs)
command -v mono >/dev/null || need_apt+=(mono-runtime)
[ -e /usr/lib/mono/4.5/System.Core.dll ] || need_apt+=(libmono-system-core4.0-cil)
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v g++ >/dev/null || need_apt+=(g++)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
if [ ${#need_apt[@]} -gt 0 ]; then
    step "installing ${need_apt[*]}"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -q || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need_apt[@]}"
fi
for tool in mcs mono valgrind gcc g++ cmake pkg-config; do
    command -v "$tool" >/dev/null || { echo "FATAL: $tool is required and could not be installed" >&2; exit 1; }
done

# --- Rust ----------------------------------------------------------------------------------------------------------
step "cargo build --release"
cargo build --release --locked
step "cargo test --release (unit, integration, header check, parity)"
cargo test --release --locked

lib_dir="${CARGO_TARGET_DIR:-$root/target}/release"  # honour CARGO_TARGET_DIR, as cargo does
[ -f "$lib_dir/liblowvram.so" ] || { echo "FATAL: liblowvram.so was not built" >&2; exit 1; }
out="$root/target/host-tests"
mkdir -p "$out"
export LOWVRAM_REPO="$root"

# --- C -------------------------------------------------------------------------------------------------------------
step "C host test (gcc -std=c11 -Wall -Wextra -Wpedantic -Werror)"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -g -I include tests/c/test_api.c -o "$out/test_api_c" \
    -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
"$out/test_api_c"
step "C host test under valgrind"
valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect --suppressions=tests/c/valgrind.supp "$out/test_api_c"

step "C pipeline host test: prompt -> image against diffusers, host conditioning, errors, free order"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -g -I include tests/c/test_pipeline.c -o "$out/test_pipeline_c" \
    -L "$lib_dir" -llowvram -lm -Wl,-rpath,"$lib_dir"
"$out/test_pipeline_c"
step "C pipeline host test under valgrind"
valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect --suppressions=tests/c/valgrind.supp "$out/test_pipeline_c"

step "C host contract test: ownership, per-call cancel from other threads, ABI growth, hostile inputs"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -g -pthread -I include tests/c/test_contract.c -o "$out/test_contract_c" \
    -L "$lib_dir" -llowvram -lm -Wl,-rpath,"$lib_dir"
"$out/test_contract_c"
step "C host built against the frozen v0.1 header runs against this library"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -g -I tests/c tests/c/test_frozen_abi.c -o "$out/test_frozen_abi_c" \
    -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
"$out/test_frozen_abi_c"
step "C thread stress test (watchdog: alarm)"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -g -pthread -I include tests/c/test_stress.c -o "$out/test_stress_c" \
    -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
"$out/test_stress_c"
step "the v0.1 host under valgrind"
valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect --suppressions=tests/c/valgrind.supp "$out/test_frozen_abi_c"

step "C example: examples/generate.c end to end on the random tiny model (zero conditioning, 77x32)"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -I include examples/generate.c -o "$out/generate_example" \
    -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
rm -f "$out/example.png"
"$out/generate_example" tests/fixtures/tiny-sd-random "$out/example.png"
head -c 8 "$out/example.png" | od -An -tx1 | grep -q "89 50 4e 47 0d 0a 1a 0a" || { echo "FATAL: the example wrote no PNG" >&2; exit 1; }

step "C example: examples/prompt.c draws a prompt with the trained models/tiny-sd"
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -I include examples/prompt.c -o "$out/prompt_example" \
    -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
rm -f "$out/prompt.png"
"$out/prompt_example" models/tiny-sd "a red circle on a blue background" "$out/prompt.png"
head -c 8 "$out/prompt.png" | od -An -tx1 | grep -q "89 50 4e 47 0d 0a 1a 0a" || { echo "FATAL: the prompt example wrote no PNG" >&2; exit 1; }

step "C++ and C# examples: examples/prompt.cpp and examples/Prompt.cs draw the same prompt through their bindings"
g++ -std=c++17 -Wall -Wextra -Wpedantic -Werror -I include -I bindings/cpp examples/prompt.cpp -o "$out/prompt_cpp" \
    -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
rm -f "$out/prompt_cpp.png"
"$out/prompt_cpp" models/tiny-sd "a red circle on a blue background" "$out/prompt_cpp.png"
mcs -nologo -warnaserror -unsafe -out:"$out/Prompt.exe" bindings/csharp/LowVram.cs examples/Prompt.cs
rm -f "$out/prompt_cs.png"
LD_LIBRARY_PATH="$lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" mono "$out/Prompt.exe" models/tiny-sd \
    "a red circle on a blue background" "$out/prompt_cs.png"
# The same call through three languages: the same picture, byte for byte.
for png in "$out/prompt_cpp.png" "$out/prompt_cs.png"; do
    cmp -s "$out/prompt.png" "$png" || { echo "FATAL: $png differs from the C example's picture" >&2; exit 1; }
done

step "install to a temporary prefix; examples/generate.c via CMake find_package(lowvram) and via pkg-config"
prefix="$out/prefix"
rm -rf "$prefix" "$out/cmake-example"
scripts/install.sh --prefix "$prefix" --no-build
cmake -S examples -B "$out/cmake-example" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$out/cmake-example"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
# shellcheck disable=SC2046  # pkg-config's output is a list of flags
gcc -std=c11 -Wall -Wextra -Wpedantic -Werror examples/generate.c -o "$out/generate_pkgconfig" \
    $(pkg-config --cflags --libs lowvram) -Wl,-rpath,"$(pkg-config --variable=libdir lowvram)"
# shellcheck disable=SC2046
echo '#include <lowvram.hpp>' | g++ -std=c++17 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -x c++ - \
    $(pkg-config --cflags lowvram)
unset PKG_CONFIG_PATH
for exe in "$out/cmake-example/generate" "$out/generate_pkgconfig"; do
    # each must load the installed library, not the build tree's
    [[ "$(ldd "$exe")" == *"$prefix/lib/liblowvram.so"* ]] || { echo "FATAL: $exe does not load $prefix/lib" >&2; exit 1; }
    rm -f "$out/installed.png"
    "$exe" tests/fixtures/tiny-sd-random "$out/installed.png" >/dev/null
    head -c 8 "$out/installed.png" | od -An -tx1 | grep -q "89 50 4e 47 0d 0a 1a 0a" \
        || { echo "FATAL: $exe wrote no PNG" >&2; exit 1; }
done

# --- C++ -----------------------------------------------------------------------------------------------------------
step "C++ host test (g++ -std=c++17 -Wall -Wextra -Wpedantic -Werror)"
g++ -std=c++17 -Wall -Wextra -Wpedantic -Werror -g -pthread -I include -I bindings/cpp tests/cpp/test_api.cpp \
    -o "$out/test_api_cpp" -L "$lib_dir" -llowvram -Wl,-rpath,"$lib_dir"
"$out/test_api_cpp"

# --- C# ------------------------------------------------------------------------------------------------------------
step "C# host test (mono-mcs + mono)"
mcs -nologo -warnaserror -unsafe -out:"$out/TestApi.exe" bindings/csharp/LowVram.cs tests/csharp/TestApi.cs
LD_LIBRARY_PATH="$lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" mono --debug "$out/TestApi.exe"

# --- CUDA type check -----------------------------------------------------------------------------------------------
if [ "${LOWVRAM_SKIP_CUDA_CHECK:-0}" = 1 ]; then
    echo "WARNING: LOWVRAM_SKIP_CUDA_CHECK=1: the CUDA type check was NOT run" >&2
else
    step "cargo check --release --features cuda --all-targets (CUDA compiler from PyPI, no GPU needed)"
    eval "$(scripts/cuda/setup.sh --no-libs)"
    cargo check --release --locked --features cuda --all-targets
fi

step "all tests passed"
