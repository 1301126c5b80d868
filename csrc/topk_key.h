// Order-preserving maps from IEEE floats to unsigned integers, shared by the CPU and CUDA top-k
// kernels: a > b as floats (with -0.0 == +0.0) iff key(a) > key(b). NaN is checked separately.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NTKFAST_HD __host__ __device__ __forceinline__
#else
#define NTKFAST_HD inline
#endif

namespace ntkfast {

template <typename T>
struct FloatKey;

template <>
struct FloatKey<float> {
  using key_t = uint32_t;
  static constexpr int kBits = 32;
  NTKFAST_HD static key_t of(float x) {
    uint32_t b;
#if defined(__CUDA_ARCH__)
    b = __float_as_uint(x);
#else
    std::memcpy(&b, &x, sizeof(b));
#endif
    if (b == 0x80000000u) b = 0u;  // -0.0 ties with +0.0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
};

template <>
struct FloatKey<double> {
  using key_t = uint64_t;
  static constexpr int kBits = 64;
  NTKFAST_HD static key_t of(double x) {
    uint64_t b;
#if defined(__CUDA_ARCH__)
    b = static_cast<uint64_t>(__double_as_longlong(x));
#else
    std::memcpy(&b, &x, sizeof(b));
#endif
    const uint64_t sign = 0x8000000000000000ull;
    if (b == sign) b = 0ull;
    return (b & sign) ? ~b : (b | sign);
  }
};

}  // namespace ntkfast
