// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) and the
// Box-Muller transform that turns its words into normal numbers. Shared by the CPU kernels, the
// CUDA kernels (no ATen here: the .cu files include it) and mirrored word for word by the
// pure-PyTorch reference in ntkfast/_ops.py, so all three draw the same Philox words. The normals
// agree to the last unit or two: the device's logf/sinf/cosf are not glibc's, so a GPU result is
// compared with the CPU's to a tolerance, never bit for bit.
//
// The stream: normal number j (a 64-bit index) of seed s is lane j % 4 of the block with counter
// (lo(j / 4), hi(j / 4), 0, 0) and key (lo(s), hi(s)). Lanes 0 and 1 come from words (x0, x1),
// lanes 2 and 3 from (x2, x3): u = (x + 0.5) * 2^-32, r = sqrt(-2 ln u_even),
// (r cos(2 pi u_odd), r sin(2 pi u_odd)). Computed in float for float/half/bfloat16 outputs and in
// double for double outputs; the uniforms come from the same words either way.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define NTKFAST_PHILOX_HD __host__ __device__ __forceinline__
#else
#define NTKFAST_PHILOX_HD inline
#endif

namespace ntkfast {

struct PhiloxWords {
  uint32_t w[4];
};

// Random123's constants: round multipliers and the Weyl sequence the key is bumped by.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Plain 64-bit products rather than __umulhi: the same code then runs in constant evaluation (the
// known-answer checks below), on the host and on the device, where it is one mul.wide.u32.
NTKFAST_PHILOX_HD constexpr PhiloxWords philox4x32_round(PhiloxWords c, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c.w[0];
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c.w[2];
  return PhiloxWords{{static_cast<uint32_t>(p1 >> 32) ^ c.w[1] ^ k0, static_cast<uint32_t>(p1),
                      static_cast<uint32_t>(p0 >> 32) ^ c.w[3] ^ k1, static_cast<uint32_t>(p0)}};
}

NTKFAST_PHILOX_HD constexpr PhiloxWords philox4x32_10(PhiloxWords counter, uint32_t k0, uint32_t k1) {
  PhiloxWords c = philox4x32_round(counter, k0, k1);
  for (int r = 1; r < 10; ++r) {
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
    c = philox4x32_round(c, k0, k1);
  }
  return c;
}

constexpr bool philox_known_answer(PhiloxWords counter, uint32_t k0, uint32_t k1, PhiloxWords want) {
  const PhiloxWords got = philox4x32_10(counter, k0, k1);
  return got.w[0] == want.w[0] && got.w[1] == want.w[1] && got.w[2] == want.w[2] && got.w[3] == want.w[3];
}

// Random123's known-answer vectors, checked wherever this header is compiled.
static_assert(philox_known_answer(PhiloxWords{{0u, 0u, 0u, 0u}}, 0u, 0u,
                                  PhiloxWords{{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}),
              "Philox4x32-10 known-answer vector (zeros)");
static_assert(philox_known_answer(PhiloxWords{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu,
                                  0xffffffffu, PhiloxWords{{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}),
              "Philox4x32-10 known-answer vector (all ones)");
static_assert(philox_known_answer(PhiloxWords{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u,
                                  0x299f31d0u, PhiloxWords{{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}),
              "Philox4x32-10 known-answer vector (pi)");

// The words of stream block b of seed s.
NTKFAST_PHILOX_HD PhiloxWords philox_block(uint64_t seed, uint64_t block) {
  return philox4x32_10(PhiloxWords{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

NTKFAST_PHILOX_HD float philox_log(float x) { return logf(x); }
NTKFAST_PHILOX_HD double philox_log(double x) { return log(x); }
NTKFAST_PHILOX_HD float philox_sqrt(float x) { return sqrtf(x); }
NTKFAST_PHILOX_HD double philox_sqrt(double x) { return sqrt(x); }
NTKFAST_PHILOX_HD float philox_cos(float x) { return cosf(x); }
NTKFAST_PHILOX_HD double philox_cos(double x) { return cos(x); }
NTKFAST_PHILOX_HD float philox_sin(float x) { return sinf(x); }
NTKFAST_PHILOX_HD double philox_sin(double x) { return sin(x); }

// In (0, 1] (in float the top words round up to 1, whose log is 0: never -inf).
template <typename T>
NTKFAST_PHILOX_HD T philox_uniform(uint32_t x) {
  return (static_cast<T>(x) + static_cast<T>(0.5)) * static_cast<T>(2.3283064365386962890625e-10);  // 2^-32
}

// Two normal numbers from a pair of words (Box-Muller). One rounding per operation, in this order:
// the reference repeats them with tensor ops.
template <typename T>
NTKFAST_PHILOX_HD void philox_box_muller(uint32_t x_even, uint32_t x_odd, T* z_even, T* z_odd) {
  const T u0 = philox_uniform<T>(x_even);
  const T u1 = philox_uniform<T>(x_odd);
  const T r = philox_sqrt(static_cast<T>(-2.0) * philox_log(u0));
  const T theta = static_cast<T>(6.283185307179586476925286766559) * u1;
  *z_even = r * philox_cos(theta);
  *z_odd = r * philox_sin(theta);
}

}  // namespace ntkfast
