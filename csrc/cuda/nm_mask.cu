// CUDA kernel for ntkfast::nm_mask (interface: nm_mask.cuh): the CPU kernel's rule
// (csrc/cpu/nm_mask_cpu.cpp), one thread per entry.
//
// An entry's rank is the number of keepable entries of its group that beat it: a higher key
// (FloatKey: -0.0 and +0.0 share one), or the same key at a lower index. The entry is kept iff it is
// keepable and its rank is below n, so a group with fewer than n keepable entries keeps them all.
// Each thread reads its group's m scores; the neighbouring threads of a warp read the same ones, so
// those reads come from L1, and the output writes (one byte per thread, consecutive) coalesce. The
// work is m reads per entry: meant for the m of semi-structured sparsity (2 to a few dozen). m = 2,
// 4, 8 and 16 have their own instantiation, so that the group loop unrolls.
#include "nm_mask.cuh"

#include <algorithm>

#include "../topk_key.h"

namespace ntkfast {
namespace gpu {
namespace {

constexpr int kThreads = 256;
// a grid-stride loop takes the rest: more blocks than this would only queue
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// NaN from the bits, not from v != v, so that no math flag can fold the test away.
__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool is_nan(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
}

// kM > 0: m is kM (the loop over the group unrolls); kM == 0: m is m_rt.
template <typename T, int kM>
__global__ void __launch_bounds__(kThreads)
    nm_mask_kernel(const T* __restrict__ x, const bool* __restrict__ keep, bool* __restrict__ out, int64_t numel,
                   int64_t n, int64_t m_rt, int32_t* __restrict__ nan_flag) {
  using key_t = typename FloatKey<T>::key_t;
  const int64_t m = kM > 0 ? kM : m_rt;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < numel; e += stride) {
    const int64_t i = e % m;  // position in the group
    const int64_t base = e - i;
    const T v = x[e];
    const bool alive = keep == nullptr || keep[e];
    if (alive && is_nan(v)) atomicOr(nan_flag, 1);
    const key_t k = FloatKey<T>::of(v);
    int64_t rank = 0;
#pragma unroll
    for (int64_t j = 0; j < (kM > 0 ? kM : m); ++j) {
      const bool other = keep == nullptr || keep[base + j];
      const key_t kj = FloatKey<T>::of(x[base + j]);
      // ties: the lower index wins; j == i never counts (kj > k is false there, and j < i too)
      rank += (other && (kj > k || (kj == k && j < i))) ? 1 : 0;
    }
    out[e] = alive && rank < n;
  }
}

template <typename T>
cudaError_t launch_typed(const T* x, const bool* keep, bool* out, int64_t numel, int64_t n, int64_t m,
                         int32_t* nan_flag, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (m) {
    case 2: nm_mask_kernel<T, 2><<<grid, kThreads, 0, stream>>>(x, keep, out, numel, n, m, nan_flag); break;
    case 4: nm_mask_kernel<T, 4><<<grid, kThreads, 0, stream>>>(x, keep, out, numel, n, m, nan_flag); break;
    case 8: nm_mask_kernel<T, 8><<<grid, kThreads, 0, stream>>>(x, keep, out, numel, n, m, nan_flag); break;
    case 16: nm_mask_kernel<T, 16><<<grid, kThreads, 0, stream>>>(x, keep, out, numel, n, m, nan_flag); break;
    default: nm_mask_kernel<T, 0><<<grid, kThreads, 0, stream>>>(x, keep, out, numel, n, m, nan_flag);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t nm_mask_launch(NmDtype dtype, const void* scores, const bool* keep, bool* out, int64_t numel, int64_t n,
                           int64_t m, int32_t* nan_flag, cudaStream_t stream) {
  if (numel < 0 || m < 1 || n < 1 || n > m || numel % m != 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  if (dtype == NmDtype::kFloat64) {
    return launch_typed(static_cast<const double*>(scores), keep, out, numel, n, m, nan_flag, stream);
  }
  return launch_typed(static_cast<const float*>(scores), keep, out, numel, n, m, nan_flag, stream);
}

}  // namespace gpu
}  // namespace ntkfast
