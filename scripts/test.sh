#!/usr/bin/env bash
# The whole test suite: Rust tests, the header check, the C / C++ / C# host programs (C under valgrind), a type
# check of the CUDA build, and a package with both backends (CPU and CUDA library) run on this machine. Installs what
# it needs (mono, valgrind, the CUDA toolkit from PyPI) and fails loudly rather than skipping a language.
# Usage: scripts/test.sh   (set LOWVRAM_SKIP_CUDA_CHECK=1 only for quick local iterations)
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

step "install to a temporary prefix: its CLI draws; examples/generate.c via CMake find_package(lowvram), pkg-config"
prefix="$out/prefix"
rm -rf "$prefix" "$out/cmake-example" "$out/installed_cli.png"
scripts/install.sh --prefix "$prefix" --no-build
"$prefix/bin/lowvram" --help >/dev/null
( cd "$out" && "$prefix/bin/lowvram" generate --prompt "a red circle on a blue background" --out installed_cli.png \
    >/dev/null 2>&1 )
head -c 8 "$out/installed_cli.png" | od -An -tx1 | grep -q "89 50 4e 47 0d 0a 1a 0a" \
    || { echo "FATAL: the installed CLI wrote no PNG" >&2; exit 1; }
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

# --- CUDA: type check, and one package for machines with and without a GPU ----------------------------------------
if [ "${LOWVRAM_SKIP_CUDA_CHECK:-0}" = 1 ]; then
    echo "WARNING: LOWVRAM_SKIP_CUDA_CHECK=1: the CUDA type check and the two-backend package test were NOT run" >&2
else
    # Everything CUDA builds in its own target folder: this package's library has one file name for every feature
    # set, so a CUDA build in target/ would replace the CPU one's files. The check and the library share the
    # build-script outputs there (candle's nvcc step runs once).
    cuda_target="${CARGO_TARGET_DIR:-$root/target}/cuda"
    step "cargo check --release --features cuda --all-targets (CUDA compiler from PyPI, no GPU needed)"
    eval "$(scripts/cuda/setup.sh)"
    CARGO_TARGET_DIR="$cuda_target" cargo check --release --locked --features cuda --all-targets

    step "one package: liblowvram.so + liblowvram_cuda.so (the CUDA build) installed, run on this CPU-only machine"
    pkg="$out/prefix-cuda"
    rm -rf "$pkg" "$out/backend"
    mkdir -p "$out/backend"
    scripts/install.sh --prefix "$pkg" --with-cuda
    [ -f "$pkg/lib/liblowvram_cuda.so" ] || { echo "FATAL: liblowvram_cuda.so was not installed" >&2; exit 1; }
    [ -x "$pkg/libexec/lowvram/lowvram-cuda" ] || { echo "FATAL: lowvram-cuda was not installed" >&2; exit 1; }
    if ldd "$pkg/lib/liblowvram.so" | grep -E 'libcuda|libcudart|libcublas|libcurand'; then
        echo "FATAL: liblowvram.so needs a CUDA library (above): hosts without a GPU could not load it" >&2; exit 1
    fi
    readelf -d "$pkg/lib/liblowvram_cuda.so" | grep -q 'NEEDED.*\[libcublas' \
        || { echo "FATAL: liblowvram_cuda.so does not link cuBLAS: not a CUDA build" >&2; exit 1; }
    gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -g -I "$pkg/include" tests/c/test_backend.c \
        -o "$out/backend/test_backend" -L "$pkg/lib" -llowvram -Wl,-rpath,"$pkg/lib"
    gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -I "$pkg/include" examples/generate.c -o "$out/backend/generate" \
        -L "$pkg/lib" -llowvram -Wl,-rpath,"$pkg/lib"
    # the machine's own driver state decides: without one, the CPU runs everything and the CUDA build is never loaded
    ( unset LOWVRAM_BACKEND LOWVRAM_BACKEND_LIBRARY
      if [ -e /dev/nvidiactl ]; then
          echo "NOTE: this machine has an NVIDIA device: the CPU-only run is skipped" >&2; exit 0
      fi
      "$out/backend/test_backend" cpu "no NVIDIA driver" "+$pkg/lib/liblowvram.so" -liblowvram_cuda.so
      "$out/backend/generate" tests/fixtures/tiny-sd-random "$out/backend/cpu.png" >/dev/null )

    step "the forwarding path: LOWVRAM_BACKEND=library with a copy of the CPU library as the backend"
    cp "$pkg/lib/liblowvram.so" "$out/backend/liblowvram_copy.so"
    ( export LOWVRAM_BACKEND=library LOWVRAM_BACKEND_LIBRARY="$out/backend/liblowvram_copy.so"
      "$out/backend/test_backend" library "$out/backend/liblowvram_copy.so" +liblowvram_copy.so -liblowvram_cuda.so
      "$out/backend/generate" tests/fixtures/tiny-sd-random "$out/backend/library.png" >/dev/null
      # handles made in the backend, used and freed through this library: nothing leaks across the boundary
      valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
          --show-leak-kinds=definite,indirect --suppressions=tests/c/valgrind.supp \
          "$out/backend/test_backend" library liblowvram_copy.so +liblowvram_copy.so >/dev/null )
    if [ -f "$out/backend/cpu.png" ]; then
        cmp "$out/backend/cpu.png" "$out/backend/library.png" \
            || { echo "FATAL: the image made through the backend differs from the direct one" >&2; exit 1; }
    fi

    step "the driver branch, with a stand-in driver (tests/c/fake_libcuda.c: one device, no GPU behind it)"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$out/backend/libcuda.so.1" tests/c/fake_libcuda.c
    ( unset LOWVRAM_BACKEND LOWVRAM_BACKEND_LIBRARY
      export LD_LIBRARY_PATH="$out/backend"
      # the real CUDA build cannot load against the stand-in (it lacks the driver's API): the CPU runs, saying why
      "$out/backend/test_backend" cpu "cannot use $pkg/lib/liblowvram_cuda.so" -liblowvram_cuda.so
      # a backend that loads is forwarded to: the package's layout, with a CPU copy in the CUDA build's place
      mkdir -p "$out/backend/pkg/lib" && cp "$pkg/lib/liblowvram.so" "$out/backend/pkg/lib/"
      cp "$pkg/lib/liblowvram.so" "$out/backend/pkg/lib/liblowvram_cuda.so"
      gcc -std=c11 -Wall -Wextra -Wpedantic -Werror -I "$pkg/include" tests/c/test_backend.c \
          -o "$out/backend/test_backend_pkg" -L "$out/backend/pkg/lib" -llowvram -Wl,-rpath,"$out/backend/pkg/lib"
      "$out/backend/test_backend_pkg" cuda "$out/backend/pkg/lib/liblowvram_cuda.so, driver 13.0, 1 device" \
          +pkg/lib/liblowvram_cuda.so )
fi

step "all tests passed"
