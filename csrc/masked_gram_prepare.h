// Argument checks of masked_gram shared by the CPU kernel and the CUDA glue, so that both accept the
// same inputs and word their errors alike (as ValueErrors naming the argument).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <vector>

namespace ntkfast {

enum class GramMode : int { kFull = 0, kTrace = 1, kDiagonal = 2, kDiagonalTrace = 3 };

inline GramMode parse_gram_mode(const char* op, c10::string_view mode) {
  if (mode == "full") return GramMode::kFull;
  if (mode == "trace") return GramMode::kTrace;
  if (mode == "diagonal") return GramMode::kDiagonal;
  if (mode == "diagonal_trace") return GramMode::kDiagonalTrace;
  TORCH_CHECK_VALUE(false, op, ": mode must be one of 'full', 'trace', 'diagonal', 'diagonal_trace', got '",
                    std::string(mode.data(), mode.size()), "'");
}

inline bool gram_is_diagonal(GramMode m) { return m == GramMode::kDiagonal || m == GramMode::kDiagonalTrace; }

struct GramSizes {
  int64_t n1, n2, c, k, o;
  GramMode mode;
};

// a1 [N1, C], b1 [N1, K, O], a2 [N2, C], b2 [N2, K, O], mask [O, C]: one floating dtype (float32
// or float64), one device; the diagonal modes pair sample i with sample i, so they need N1 == N2.
inline GramSizes check_masked_gram(const char* op, const at::Tensor& a1, const at::Tensor& b1, const at::Tensor& a2,
                                   const at::Tensor& b2, const at::Tensor& mask, c10::string_view mode_name) {
  const GramMode mode = parse_gram_mode(op, mode_name);
  // named by the dtype, which a caller several layers up (an NTK of a float16 model) can act on
  TORCH_CHECK_VALUE(a1.scalar_type() == at::kFloat || a1.scalar_type() == at::kDouble, op,
                    " computes in float32 or float64 only, got ", a1.scalar_type(),
                    " inputs (the dtype of a1, which b1, a2, b2 and mask must share)");
  const std::pair<const char*, const at::Tensor*> others[] = {{"b1", &b1}, {"a2", &a2}, {"b2", &b2}, {"mask", &mask}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->scalar_type() == a1.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                      " but a1 has ", a1.scalar_type());
    TORCH_CHECK_VALUE(t->device() == a1.device(), op, ": ", name, " is on ", t->device(), " but a1 is on ",
                      a1.device());
  }
  TORCH_CHECK_VALUE(a1.dim() == 2, op, ": a1 must have shape [N1, C], got ", a1.sizes());
  TORCH_CHECK_VALUE(a2.dim() == 2, op, ": a2 must have shape [N2, C], got ", a2.sizes());
  TORCH_CHECK_VALUE(b1.dim() == 3, op, ": b1 must have shape [N1, K, O], got ", b1.sizes());
  TORCH_CHECK_VALUE(b2.dim() == 3, op, ": b2 must have shape [N2, K, O], got ", b2.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 2, op, ": mask must have shape [O, C], got ", mask.sizes());
  const int64_t n1 = a1.size(0), c = a1.size(1), n2 = a2.size(0), k = b1.size(1), o = b1.size(2);
  TORCH_CHECK_VALUE(b1.size(0) == n1, op, ": b1 has ", b1.size(0), " samples (shape ", b1.sizes(), ") but a1 has ", n1);
  TORCH_CHECK_VALUE(a2.size(1) == c, op, ": a2 has ", a2.size(1), " features (shape ", a2.sizes(), ") but a1 has ", c);
  TORCH_CHECK_VALUE(b2.size(0) == n2, op, ": b2 has ", b2.size(0), " samples (shape ", b2.sizes(), ") but a2 has ", n2);
  TORCH_CHECK_VALUE(b2.size(1) == k && b2.size(2) == o, op, ": b2 has shape ", b2.sizes(),
                    " but must be [N2, K, O] = [", n2, ", ", k, ", ", o, "] to match b1 ", b1.sizes());
  TORCH_CHECK_VALUE(mask.size(0) == o && mask.size(1) == c, op, ": mask has shape ", mask.sizes(),
                    " but must be [O, C] = [", o, ", ", c, "]");
  TORCH_CHECK_VALUE(!gram_is_diagonal(mode) || n1 == n2, op, ": mode '",
                    std::string(mode_name.data(), mode_name.size()),
                    "' pairs each sample with itself and needs as many samples in a2 as in a1, got N1 = ", n1,
                    " and N2 = ", n2);
  return {n1, n2, c, k, o, mode};
}

// full: [N1, N2, K, K]; trace: [N1, N2]; diagonal: [N1, K, K]; diagonal_trace: [N1].
inline std::vector<int64_t> gram_out_shape(const GramSizes& s) {
  switch (s.mode) {
    case GramMode::kFull: return {s.n1, s.n2, s.k, s.k};
    case GramMode::kTrace: return {s.n1, s.n2};
    case GramMode::kDiagonal: return {s.n1, s.k, s.k};
    case GramMode::kDiagonalTrace: return {s.n1};
  }
  return {};
}

// a1 and a2 (and b1 and b2) are views of the same memory: the output is symmetric,
// out[i, j, k, l] = out[j, i, l, k], and the kernels compute one half of it.
inline bool gram_same_view(const at::Tensor& x, const at::Tensor& y) {
  return x.data_ptr() == y.data_ptr() && x.sizes().equals(y.sizes()) && x.strides().equals(y.strides());
}

}  // namespace ntkfast
