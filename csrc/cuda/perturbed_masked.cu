// CUDA kernels for ntkfast::philox_normal, ntkfast::perturbed_masked and
// ntkfast::perturbed_masked_backward (interface: perturbed_masked.cuh; the stream: ../philox.h).
//
// Every thread owns four consecutive elements (of the output, or of the mask in the backward) and
// computes the normal numbers j0 .. j0 + 3 they need. When j0 is not a multiple of 4 those span
// two Philox blocks; the phase j0 % 4 is the same for every thread of a launch (or of one draw of
// the backward), so a switch on it picks code where every lane index is a constant and only the
// Box-Muller pairs actually used are computed.
//
// The arithmetic matches the CPU kernel and the reference operation for operation: in float for
// half/bfloat16/float and double for double, rounded to the tensor dtype where the reference
// computes in that dtype, and with explicitly rounded multiplies and adds, since nvcc would
// otherwise contract w + eps * xi into one fma with a single rounding.
//
// Pruned entries: under a zero mask entry both outputs and grad_weight are exactly 0 (selects, so a
// NaN or infinite weight there changes nothing); grad_mask stays the product's derivative, which at
// a pruned entry depends on its weight (what un-pruning it would change).
//
// The backward parallelises over mask entries and loops over the leading draws inside a thread,
// so grad_mask is summed in a fixed order (draw 0, 1, ...) without atomics: deterministic, and the
// same order as the CPU kernel.
#include "perturbed_masked.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../philox.h"

namespace ntkfast {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // larger inputs are covered by grid-stride loops

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

template <typename T>
__device__ __forceinline__ typename Acc<T>::type round_to(typename Acc<T>::type x) {
  return to_acc(from_acc<T>(x));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// z[q] = normal number j0 + q, for j0 % 4 == S: lanes S..3 of j0's block, then lanes 0..S-1 of the
// next block.
template <int S, typename A>
__device__ __forceinline__ void normals4_phase(uint64_t seed, uint64_t j0, A (&z)[4]) {
  const uint64_t block = j0 >> 2;
  A lo[4] = {};
  A hi[4] = {};
  const PhiloxWords x = philox_block(seed, block);
  if constexpr (S < 2) philox_box_muller(x.w[0], x.w[1], &lo[0], &lo[1]);
  philox_box_muller(x.w[2], x.w[3], &lo[2], &lo[3]);
  if constexpr (S > 0) {
    const PhiloxWords y = philox_block(seed, block + 1);
    philox_box_muller(y.w[0], y.w[1], &hi[0], &hi[1]);
    if constexpr (S > 2) philox_box_muller(y.w[2], y.w[3], &hi[2], &hi[3]);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) z[q] = S + q < 4 ? lo[(S + q) & 3] : hi[(S + q) & 3];
}

// Callers keep j0 % 4 uniform across the launch, so this switch never diverges.
template <typename A>
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t j0, A (&z)[4]) {
  switch (static_cast<int>(j0 & 3)) {
    case 0: normals4_phase<0>(seed, j0, z); break;
    case 1: normals4_phase<1>(seed, j0, z); break;
    case 2: normals4_phase<2>(seed, j0, z); break;
    default: normals4_phase<3>(seed, j0, z); break;
  }
}

__device__ __forceinline__ int64_t first_group() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t group_stride() { return int64_t{gridDim.x} * blockDim.x; }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    philox_normal_kernel(T* __restrict__ out, int64_t n, const int64_t* __restrict__ philox) {
  using A = typename Acc<T>::type;
  const uint64_t seed = static_cast<uint64_t>(philox[0]);
  const uint64_t offset = static_cast<uint64_t>(philox[1]);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = first_group(); g < groups; g += group_stride()) {
    const int64_t i0 = 4 * g;
    A z[4];
    normals4(seed, offset + static_cast<uint64_t>(i0), z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (i0 + q < n) out[i0 + q] = from_acc<T>(z[q]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    perturbed_masked_kernel(const T* __restrict__ weight, const T* __restrict__ mask, T* __restrict__ out, int64_t n,
                            int64_t mask_numel, typename Acc<T>::type eps, const int64_t* __restrict__ philox) {
  using A = typename Acc<T>::type;
  const uint64_t seed = static_cast<uint64_t>(philox[0]);
  const uint64_t offset = static_cast<uint64_t>(philox[1]);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = first_group(); g < groups; g += group_stride()) {
    const int64_t i0 = 4 * g;
    A z[4];
    normals4(seed, offset + static_cast<uint64_t>(i0), z);
    int64_t k = mask_numel == n ? i0 : i0 % mask_numel;  // a 64-bit division only with leading draws
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + q;
      if (i < n) {
        const A w = to_acc(weight[i]);
        const A m = to_acc(mask[k]);
        const A xi = round_to<T>(z[q]);
        const A shifted = round_to<T>(add_rn(w, round_to<T>(mul_rn(eps, xi))));
        // selects, not products: a weight under a zero mask entry gives exactly 0 whatever it holds
        const bool kept = m != A(0);
        out[i] = from_acc<T>(kept ? mul_rn(w, m) : A(0));
        out[n + i] = from_acc<T>(kept ? mul_rn(shifted, m) : A(0));
      }
      if (++k == mask_numel) k = 0;
    }
  }
}

// grad_weight / grad_mask: nullptr when not wanted.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    perturbed_masked_backward_kernel(const T* __restrict__ grad, const T* __restrict__ weight,
                                     const T* __restrict__ mask, T* __restrict__ grad_weight,
                                     T* __restrict__ grad_mask, int64_t n, int64_t mask_numel,
                                     typename Acc<T>::type eps, const int64_t* __restrict__ philox) {
  using A = typename Acc<T>::type;
  const uint64_t seed = static_cast<uint64_t>(philox[0]);
  const uint64_t offset = static_cast<uint64_t>(philox[1]);
  const int64_t draws = n / mask_numel;
  const int64_t groups = (mask_numel + 3) / 4;
  for (int64_t g = first_group(); g < groups; g += group_stride()) {
    const int64_t k0 = 4 * g;
    A m[4];
    A sum[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      m[q] = k0 + q < mask_numel ? to_acc(mask[k0 + q]) : A(0);
      sum[q] = A(0);
    }
    for (int64_t p = 0; p < draws; ++p) {
      const int64_t i0 = p * mask_numel + k0;
      A z[4] = {};
      if (grad_mask != nullptr) normals4(seed, offset + static_cast<uint64_t>(i0), z);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (k0 + q >= mask_numel) continue;
        const int64_t i = i0 + q;
        const A g0 = to_acc(grad[i]);
        const A g1 = to_acc(grad[n + i]);
        // exactly 0 under a zero mask entry (the output there is a constant), whatever grad holds
        if (grad_weight != nullptr) {
          grad_weight[i] = from_acc<T>(m[q] != A(0) ? mul_rn(round_to<T>(add_rn(g0, g1)), m[q]) : A(0));
        }
        if (grad_mask != nullptr) {
          const A w = to_acc(weight[i]);
          const A xi = round_to<T>(z[q]);
          const A shifted = round_to<T>(add_rn(w, round_to<T>(mul_rn(eps, xi))));
          sum[q] = add_rn(sum[q], add_rn(mul_rn(g0, w), mul_rn(g1, shifted)));
        }
      }
    }
    if (grad_mask != nullptr) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (k0 + q < mask_numel) grad_mask[k0 + q] = from_acc<T>(sum[q]);
      }
    }
  }
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(PhiloxDtype dtype, F&& f) {
  switch (dtype) {
    case PhiloxDtype::kFloat16: return f(Tag<__half>{});
    case PhiloxDtype::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case PhiloxDtype::kFloat32: return f(Tag<float>{});
    case PhiloxDtype::kFloat64: return f(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

unsigned grid_for(int64_t groups) {
  return static_cast<unsigned>(std::min(std::max<int64_t>((groups + kThreads - 1) / kThreads, 1), kMaxBlocks));
}

}  // namespace

cudaError_t philox_normal_launch(void* out, int64_t n, PhiloxDtype dtype, const int64_t* philox, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    philox_normal_kernel<T><<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(static_cast<T*>(out), n, philox);
    return cudaGetLastError();
  });
}

cudaError_t perturbed_masked_launch(const void* weight, const void* mask, void* out, int64_t numel,
                                    int64_t mask_numel, double epsilon, PhiloxDtype dtype, const int64_t* philox,
                                    cudaStream_t stream) {
  if (numel < 0 || mask_numel < 0 || (numel > 0 && (mask_numel == 0 || numel % mask_numel != 0))) {
    return cudaErrorInvalidValue;
  }
  if (numel == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    perturbed_masked_kernel<T><<<grid_for((numel + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(weight), static_cast<const T*>(mask), static_cast<T*>(out), numel, mask_numel,
        static_cast<A>(epsilon), philox);
    return cudaGetLastError();
  });
}

cudaError_t perturbed_masked_backward_launch(const void* grad, const void* weight, const void* mask,
                                             void* grad_weight, void* grad_mask, int64_t numel, int64_t mask_numel,
                                             double epsilon, PhiloxDtype dtype, const int64_t* philox,
                                             cudaStream_t stream) {
  if (numel < 0 || mask_numel < 1 || numel % mask_numel != 0) return cudaErrorInvalidValue;
  if (grad_weight == nullptr && grad_mask == nullptr) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    perturbed_masked_backward_kernel<T><<<grid_for((mask_numel + 3) / 4), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(weight), static_cast<const T*>(mask),
        static_cast<T*>(grad_weight), static_cast<T*>(grad_mask), numel, mask_numel, static_cast<A>(epsilon),
        philox);
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace ntkfast
