#!/usr/bin/env bash
# Compiles every csrc/**/*.cu with nvcc (CMake target cuda_compile_check, architectures 80;90 unless
# NTKFAST_CUDA_ARCHS says otherwise), without a GPU and without Torch: the .cu files are pure CUDA.
# Exits non-zero on any compile error; prints why and exits 0 when there is no nvcc to check with.
#   NTKFAST_CUDA_ARCHS="80;90"   architectures (CMake's CUDA_ARCHITECTURES syntax)
#   CUDACXX / CUDA_HOME          where nvcc is, if not on PATH or in /usr/local/cuda
set -euo pipefail
cd "$(dirname "$0")/.."

archs=${NTKFAST_CUDA_ARCHS:-"80;90"}
build=build/cuda-check

nvcc=${CUDACXX:-}
if [ -z "$nvcc" ]; then
  nvcc=$(command -v nvcc 2>/dev/null || true)
fi
if [ -z "$nvcc" ]; then
  for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then
      nvcc=$root/bin/nvcc
      break
    fi
  done
fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  if [ "${NTKFAST_REQUIRE_NVCC:-0}" = 1 ]; then
    echo "cuda_compile_check: FAILED -- nvcc not found and NTKFAST_REQUIRE_NVCC=1" >&2
    exit 1
  fi
  echo "cuda_compile_check: SKIPPED -- nvcc not found (not on PATH, no CUDACXX, CUDA_HOME or /usr/local/cuda);" \
       "the CUDA kernels were not compiled" >&2
  exit 0
fi

# ptxas_report LOG ARCH: one line per kernel compiled for sm_ARCH -- registers, shared memory,
# stack frame and spill bytes -- from ptxas's -v output (demangled with c++filt where present)
ptxas_report() {
  echo "cuda_compile_check: ptxas report for sm_$2 (registers, spills) --"
  local report
  report=$(awk -v arch="sm_$2" '
    /Compiling entry function/ { fn = $0; sub(/.*function .?/, "", fn); sub(/.? for .*/, "", fn); want = index($0, arch) > 0 }
    want && /bytes stack frame/ { frame = $0; sub(/.*ptxas info *: */, "", frame) }
    want && /Used [0-9]+ registers/ { use = $0; sub(/.*Used /, "", use); print "  " fn "\t" frame "; used " use; want = 0 }
  ' "$1" | { command -v c++filt >/dev/null && c++filt || cat; } | sed 's/(anonymous namespace):://g' | sort -u)
  printf '%s\n' "$report"
  echo "cuda_compile_check: $(printf '%s\n' "$report" | grep -c -E ' [1-9][0-9]* bytes spill stores' || true) of" \
       "$(printf '%s\n' "$report" | grep -c . || true) sm_$2 kernels spill registers"
}

mapfile -t sources < <(find csrc -name '*.cu' | sort)
echo "cuda_compile_check: $("$nvcc" --version | tail -n 1)"
echo "cuda_compile_check: ${#sources[@]} file(s) for sm ${archs//;/, sm }: ${sources[*]:-none}"
start=$(date +%s)

if command -v cmake >/dev/null 2>&1; then
  generator=()
  if command -v ninja >/dev/null 2>&1 && [ ! -f "$build/CMakeCache.txt" ]; then
    generator=(-G Ninja)
  fi
  cmake -S . -B "$build" "${generator[@]}" \
    -DNTKFAST_CUDA_CHECK_ONLY=ON -DNTKFAST_PTXAS_VERBOSE=ON \
    -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES="$archs" \
    -DCMAKE_BUILD_TYPE=Release >/dev/null
  # rebuild every object, so that ptxas's report is complete even on a reused build folder
  cmake --build "$build" --target cuda_compile_check --parallel "$(nproc 2>/dev/null || echo 2)" --clean-first \
    2>&1 | tee "$build/ptxas.log"
  [ "${PIPESTATUS[0]}" = 0 ] || exit 1
  ptxas_report "$build/ptxas.log" "${archs##*;}"
else
  # No CMake: the same compile, by hand.
  echo "cuda_compile_check: cmake not found, calling nvcc directly" >&2
  gencode=()
  IFS=';' read -ra arch_list <<<"$archs"
  for a in "${arch_list[@]}"; do
    gencode+=("-gencode=arch=compute_${a},code=sm_${a}")
  done
  mkdir -p "$build"
  for src in "${sources[@]}"; do
    obj="$build/$(echo "$src" | tr '/' '_').o"
    "$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo --Werror=all-warnings -Xcompiler -fPIC \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Xptxas=-v -I csrc "${gencode[@]}" -c "$src" -o "$obj" 2>&1 | tee -a "$build/ptxas.log"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
  done
  ptxas_report "$build/ptxas.log" "${archs##*;}"
fi

# The torch-facing glue (csrc/cuda/*.cpp) needs a CUDA build of PyTorch to compile for real; against
# the headers of whatever torch is installed it can at least be syntax-checked. CPU-only wheels lack
# one generated header (c10/cuda/impl/cuda_cmake_macros.h), stood in for by a one-line stub.
glue=$(find csrc/cuda -name '*.cpp' | sort)
if [ -n "$glue" ] && incs=$(${PYTHON:-python3} -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))" 2>/dev/null); then
  stub=$build/stub/c10/cuda/impl
  mkdir -p "$stub"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$stub/cuda_cmake_macros.h"
  cuda_inc=/usr/local/cuda/include
  for d in "$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include" "${CUDA_HOME:-/nonexistent}/include" \
           "${CUDA_PATH:-/nonexistent}/include" /usr/local/cuda/include; do
    if [ -f "$d/cuda_runtime.h" ]; then cuda_inc=$d; break; fi
  done
  for src in $glue; do
    # shellcheck disable=SC2086
    ${CXX:-g++} -std=c++17 -fsyntax-only -DNTKFAST_WITH_CUDA=1 -I csrc -I "$build/stub" -I "$cuda_inc" $incs "$src"
  done
  echo "cuda_compile_check: glue syntax-checked against torch's headers: $glue"
else
  echo "cuda_compile_check: glue not checked (no torch importable)" >&2
fi

echo "cuda_compile_check: OK in $(($(date +%s) - start)) s"
