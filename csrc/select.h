// A branch-free select for the CPU kernels' loops over pruned entries (issue 25): a pruned entry
// (zero mask) must give exactly 0 whatever the weight holds there, and weight * 0 is NaN for an
// infinite weight. The natural `keep ? v : 0` is not vectorised by GCC: under its default
// -ftrapping-math it will not turn a conditional that depends on a floating-point comparison into a
// blend ("control flow in loop"). Masking the bits of an unconditionally computed v is the same
// select, and vectorises (a compare, then an and).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace ntkfast {

// v where keep, +0.0 otherwise (v is computed by the caller either way; NaN or inf in it is dropped).
template <typename T>
inline T kept_or_zero(bool keep, T v) {
  static_assert(std::is_floating_point_v<T>, "kept_or_zero selects floats");
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(U) == sizeof(T), "one word per float");
  U bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= U(0) - static_cast<U>(keep);  // all ones where kept, zero where not
  T out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace ntkfast
