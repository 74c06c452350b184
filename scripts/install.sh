#!/usr/bin/env bash
# Install lowvram for C and C++ consumers, and its command line, under a prefix:
#   <prefix>/bin/lowvram                              the CLI (release build)
#   <prefix>/libexec/lowvram/lowvram-cuda             with --with-cuda (built here): the CLI's CUDA build, which
#                                                     bin/lowvram re-executes when the NVIDIA driver reports a device
#   <prefix>/lib/liblowvram.so                        the library (release build)
#   <prefix>/lib/liblowvram_cuda.so                   with --with-cuda: its CUDA build, used at run time when the
#                                                     NVIDIA driver reports a device (see "Backends" in lowvram.h)
#   <prefix>/include/lowvram.h, lowvram.hpp           the C header and the header-only C++17 wrapper
#   <prefix>/lib/pkgconfig/lowvram.pc                 pkg-config --cflags --libs lowvram
#   <prefix>/lib/cmake/lowvram/lowvramConfig*.cmake   find_package(lowvram) → imported target lowvram::lowvram
#
# Usage: scripts/install.sh --prefix DIR [--no-build] [--features LIST] [--with-cuda] [--cuda-lib FILE]
#   --no-build   install the library and CLI already built (else `cargo build --release --lib --bin lowvram`
#                first, which does nothing when they are up to date)
#   --features   cargo features of the build
#   --with-cuda  also install liblowvram_cuda.so and lowvram-cuda: `cargo build --release --features cuda --lib
#                --bin lowvram` with the CUDA toolkit of scripts/cuda/setup.sh (installed if missing), in its own
#                target folder <target>/cuda so the CPU build is untouched (both crate types of this package have one
#                file name for every feature set); the first build there takes ~12 min on 2 cores (candle's nvcc
#                step), later ones seconds
#   --cuda-lib   install FILE as liblowvram_cuda.so (a CUDA build of this version made elsewhere; builds nothing and
#                installs no lowvram-cuda)
# Honours CARGO_TARGET_DIR as cargo does. DESTDIR is prepended to every installed path (for packagers) but not to
# the prefix written into lowvram.pc.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
prefix="" build=1 features="" with_cuda=0 cuda_lib=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage 2; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        --no-build) build=0; shift ;;
        --features) [ $# -ge 2 ] || usage 2; features="$2"; shift 2 ;;
        --features=*) features="${1#--features=}"; shift ;;
        --with-cuda) with_cuda=1; shift ;;
        --cuda-lib) [ $# -ge 2 ] || usage 2; cuda_lib="$2"; with_cuda=1; shift 2 ;;
        --cuda-lib=*) cuda_lib="${1#--cuda-lib=}"; with_cuda=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done
[ -n "$prefix" ] || { echo "install.sh: --prefix DIR is required" >&2; usage 2; }
mkdir -p "${DESTDIR:-}$prefix"
prefix=$(cd "${DESTDIR:-}$prefix" && pwd)  # absolute, as pkg-config needs it
prefix="${prefix#"${DESTDIR:-}"}"

if [ "$build" = 1 ]; then
    cargo build --release --locked --lib --bin lowvram ${features:+--features "$features"}
fi
lib="${CARGO_TARGET_DIR:-$root/target}/release/liblowvram.so"
cli="${CARGO_TARGET_DIR:-$root/target}/release/lowvram"
for f in "$lib" "$cli"; do
    [ -f "$f" ] || { echo "install.sh: $f is missing (build it, or drop --no-build)" >&2; exit 1; }
done
cuda_cli=""
if [ "$with_cuda" = 1 ] && [ -z "$cuda_lib" ]; then
    cuda_target="${CARGO_TARGET_DIR:-$root/target}/cuda"
    if [ "$build" = 1 ]; then
        # a subshell: the toolkit's environment stays out of the rest of the install
        ( eval "$(scripts/cuda/setup.sh)" &&
          CARGO_TARGET_DIR="$cuda_target" cargo build --release --locked --lib --bin lowvram --features cuda )
    fi
    cuda_lib="$cuda_target/release/liblowvram.so"
    cuda_cli="$cuda_target/release/lowvram"
fi
if [ -n "$cuda_lib" ]; then
    [ -f "$cuda_lib" ] || { echo "install.sh: $cuda_lib is missing (build it, or drop --no-build)" >&2; exit 1; }
    # the CUDA build links the driver; a CPU build here would only forward to itself
    if ! LC_ALL=C readelf -d "$cuda_lib" | grep -q 'NEEDED.*\[libcuda\.so\.1\]'; then
        echo "install.sh: $cuda_lib is not a CUDA build of lowvram (its NEEDED list lacks libcuda.so.1)" >&2; exit 1
    fi
fi
# the CPU CLI re-executes lowvram-cuda: a CPU build there would only run on the CPU again
if [ -n "$cuda_cli" ]; then
    [ -f "$cuda_cli" ] || { echo "install.sh: $cuda_cli is missing (build it, or drop --no-build)" >&2; exit 1; }
    if ! LC_ALL=C readelf -d "$cuda_cli" | grep -q 'NEEDED.*\[libcuda\.so\.1\]'; then
        echo "install.sh: $cuda_cli is not a CUDA build of the lowvram CLI (its NEEDED list lacks libcuda.so.1)" >&2
        exit 1
    fi
fi

# The version of the package is the crate's; the header's version macros are checked against it by tests/header.rs.
version=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' Cargo.toml | head -n 1)
description=$(sed -n 's/^description = "\([^"]*\)"$/\1/p' Cargo.toml | head -n 1)
major=${version%%.*} rest=${version#*.} minor=${rest%%.*}
[ -n "$version" ] && [ -n "$major" ] && [ -n "$minor" ] || { echo "install.sh: no version in Cargo.toml" >&2; exit 1; }
sizeof_void_p=$(getconf LONG_BIT); sizeof_void_p=$((sizeof_void_p / 8))

dest="${DESTDIR:-}$prefix"
install -d "$dest/bin" "$dest/lib" "$dest/include" "$dest/lib/pkgconfig" "$dest/lib/cmake/lowvram"
install -m 0755 "$cli" "$dest/bin/lowvram"
install -m 0755 "$lib" "$dest/lib/liblowvram.so"
[ -z "$cuda_lib" ] || install -m 0755 "$cuda_lib" "$dest/lib/liblowvram_cuda.so"
if [ -n "$cuda_cli" ]; then
    install -d "$dest/libexec/lowvram"
    install -m 0755 "$cuda_cli" "$dest/libexec/lowvram/lowvram-cuda"
fi
install -m 0644 include/lowvram.h bindings/cpp/lowvram.hpp "$dest/include/"
subst() { sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@VERSION_MAJOR@|$major|g" \
              -e "s|@VERSION_MINOR@|$minor|g" -e "s|@SIZEOF_VOID_P@|$sizeof_void_p|g" \
              -e "s|@DESCRIPTION@|$description|g" "$1"; }
subst cmake/lowvram.pc.in > "$dest/lib/pkgconfig/lowvram.pc"
install -m 0644 cmake/lowvramConfig.cmake "$dest/lib/cmake/lowvram/lowvramConfig.cmake"
subst cmake/lowvramConfigVersion.cmake.in > "$dest/lib/cmake/lowvram/lowvramConfigVersion.cmake"
chmod 0644 "$dest/lib/pkgconfig/lowvram.pc" "$dest/lib/cmake/lowvram/lowvramConfigVersion.cmake"
echo "installed lowvram $version under $dest${cuda_lib:+ (with liblowvram_cuda.so${cuda_cli:+ and lowvram-cuda})}"
