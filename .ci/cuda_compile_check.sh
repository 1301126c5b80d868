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
  echo "cuda_compile_check: SKIPPED -- nvcc not found (not on PATH, no CUDACXX, CUDA_HOME or /usr/local/cuda);" \
       "the CUDA kernels were not compiled" >&2
  exit 0
fi

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
    -DNTKFAST_CUDA_CHECK_ONLY=ON \
    -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES="$archs" \
    -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" --target cuda_compile_check --parallel "$(nproc 2>/dev/null || echo 2)"
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
      -I csrc "${gencode[@]}" -c "$src" -o "$obj"
  done
fi

echo "cuda_compile_check: OK in $(($(date +%s) - start)) s"
