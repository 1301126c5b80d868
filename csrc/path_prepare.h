// Argument checks of path_chain and path_score shared by the CPU kernels and the CUDA glue, so that
// both accept the same inputs and word their errors alike (ValueErrors naming the argument).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace ntkfast {

inline void check_path_power(const char* op, const char* name, int64_t power, int64_t lo) {
  TORCH_CHECK_VALUE(power >= lo && power <= 2, op, ": ", name, " must be ", lo == 0 ? "0, 1 or 2" : "1 or 2",
                    ", got ", power);
}

inline void check_path_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                    " but must have ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but must be on ",
                    like.device());
}

// weights[l] [O_l, C_l], C_l = O_{l-1}; input [N, C_0]; masks empty or one per layer; biases one
// entry per layer. Returns the layer sizes (O_l) for the caller's allocations.
inline std::vector<int64_t> check_path_chain(const char* op, at::TensorList weights, at::TensorList masks,
                                             const std::vector<std::optional<at::Tensor>>& biases,
                                             const at::Tensor& input, int64_t power) {
  check_path_power(op, "power", power, 1);
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights must hold at least one layer");
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                    " computes in float32 or float64 only, got ", input.scalar_type(),
                    " (input's dtype, which the weights, masks and biases must share)");
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": input must have shape [N, C_0], got ", input.sizes());
  const size_t L = weights.size();
  TORCH_CHECK_VALUE(masks.empty() || masks.size() == L, op, ": masks must be empty or hold one mask per layer (",
                    L, "), got ", masks.size());
  TORCH_CHECK_VALUE(biases.size() == L, op, ": biases must hold one entry (a tensor or None) per layer (", L,
                    "), got ", biases.size());
  std::vector<int64_t> outs(L);
  int64_t c = input.size(1);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_path_float(op, ("weights[" + std::to_string(l) + "]").c_str(), w, input);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == c, op, ": weights[", l, "] must have shape [O, ", c,
                      "] (its input width), got ", w.sizes());
    if (!masks.empty()) {
      check_path_float(op, ("masks[" + std::to_string(l) + "]").c_str(), masks[l], input);
      TORCH_CHECK_VALUE(masks[l].sizes().equals(w.sizes()), op, ": masks[", l, "] has shape ", masks[l].sizes(),
                        " but weights[", l, "] has ", w.sizes());
    }
    if (biases[l].has_value()) {
      const at::Tensor& b = *biases[l];
      check_path_float(op, ("biases[" + std::to_string(l) + "]").c_str(), b, input);
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, ": biases[", l, "] must have shape [",
                        w.size(0), "], got ", b.sizes());
    }
    outs[l] = w.size(0);
    c = w.size(0);
  }
  return outs;
}

// A convolution's geometry, as 2-d (a 1-d convolution is one of height 1), or a dense layer.
struct PathScoreShape {
  bool dense;
  int64_t n, o, c, cg, groups;
  int64_t h, w, ho, wo, kh, kw;
  int64_t sh, sw, ph, pw, dh, dw;
};

inline PathScoreShape check_path_score(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                       const at::Tensor& a, const at::Tensor& b, int64_t weight_power,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups) {
  check_path_power(op, "weight_power", weight_power, 0);
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
                    " computes in float32 or float64 only, got ", weight.scalar_type(),
                    " (weight's dtype, which mask, a and b must share)");
  check_path_float(op, "a", a, weight);
  check_path_float(op, "b", b, weight);
  if (mask.has_value()) {
    check_path_float(op, "mask", *mask, weight);
    TORCH_CHECK_VALUE(mask->sizes().equals(weight.sizes()), op, ": mask has shape ", mask->sizes(),
                      " but weight has ", weight.sizes());
  }
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);
  PathScoreShape s{};
  s.groups = groups;
  s.o = weight.size(0);
  if (weight.dim() == 2) {
    TORCH_CHECK_VALUE(groups == 1, op, ": a dense weight [O, C] needs groups = 1, got ", groups);
    s.dense = true;
    s.c = s.cg = weight.size(1);
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == s.c, op, ": a must have shape [N, ", s.c, "], got ", a.sizes());
    s.n = a.size(0);
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == s.n && b.size(1) == s.o, op, ": b must have shape [", s.n, ", ",
                      s.o, "], got ", b.sizes());
    s.h = s.w = s.ho = s.wo = s.kh = s.kw = s.sh = s.sw = s.dh = s.dw = 1;
    return s;
  }
  TORCH_CHECK_VALUE(weight.dim() == 3 || weight.dim() == 4, op,
                    ": weight must be dense [O, C] or a 1-d / 2-d convolution's [O, C / groups, *kernel], got ",
                    weight.sizes());
  const int64_t sd = weight.dim() - 2;  // spatial dimensions
  const std::pair<const char*, at::IntArrayRef> geo[] = {{"stride", stride}, {"padding", padding},
                                                          {"dilation", dilation}};
  for (const auto& [name, v] : geo) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(v.size()) == sd, op, ": ", name, " must have ", sd,
                      " entries for a weight of shape ", weight.sizes(), ", got ", v);
  }
  s.dense = false;
  s.cg = weight.size(1);
  s.c = s.cg * groups;
  TORCH_CHECK_VALUE(s.o % groups == 0, op, ": weight has ", s.o, " output channels, not divisible by groups = ",
                    groups);
  TORCH_CHECK_VALUE(a.dim() == weight.dim() && a.size(1) == s.c, op, ": a must have shape [N, ", s.c,
                    sd == 2 ? ", H, W]" : ", L]", ", got ", a.sizes());
  s.n = a.size(0);
  TORCH_CHECK_VALUE(b.dim() == weight.dim() && b.size(0) == s.n && b.size(1) == s.o, op, ": b must have shape [", s.n,
                    ", ", s.o, sd == 2 ? ", Ho, Wo]" : ", Lo]", ", got ", b.sizes());
  auto at_or_1 = [&](at::IntArrayRef v, int64_t i) { return sd == 2 ? v[i] : (i == 0 ? 1 : v[0]); };
  auto pad_at = [&](int64_t i) { return sd == 2 ? padding[i] : (i == 0 ? 0 : padding[0]); };
  s.kh = sd == 2 ? weight.size(2) : 1;
  s.kw = weight.size(weight.dim() - 1);
  s.h = sd == 2 ? a.size(2) : 1;
  s.w = a.size(a.dim() - 1);
  s.ho = sd == 2 ? b.size(2) : 1;
  s.wo = b.size(b.dim() - 1);
  s.sh = at_or_1(stride, 0);
  s.sw = at_or_1(stride, 1);
  s.dh = at_or_1(dilation, 0);
  s.dw = at_or_1(dilation, 1);
  s.ph = pad_at(0);
  s.pw = pad_at(1);
  TORCH_CHECK_VALUE(s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && s.ph >= 0 && s.pw >= 0, op,
                    ": stride and dilation must be >= 1 and padding >= 0, got stride ", stride, ", padding ",
                    padding, ", dilation ", dilation);
  // before the output size below, which would be negative (C++ division truncates towards zero)
  TORCH_CHECK_VALUE(s.h + 2 * s.ph >= s.dh * (s.kh - 1) + 1 && s.w + 2 * s.pw >= s.dw * (s.kw - 1) + 1, op,
                    ": a's spatial size ", sd == 2 ? at::IntArrayRef({s.h, s.w}) : at::IntArrayRef({s.w}),
                    ", padded by ", padding, ", is smaller than the weight's dilated kernel ",
                    sd == 2 ? at::IntArrayRef({s.dh * (s.kh - 1) + 1, s.dw * (s.kw - 1) + 1})
                            : at::IntArrayRef({s.dw * (s.kw - 1) + 1}),
                    " (weight of shape ", weight.sizes(), ", a of shape ", a.sizes(), ")");
  const int64_t eho = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  const int64_t ewo = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  TORCH_CHECK_VALUE(s.ho == eho && s.wo == ewo, op, ": b's spatial size must be the convolution's output size ",
                    sd == 2 ? at::IntArrayRef({eho, ewo}) : at::IntArrayRef({ewo}), ", got b of shape ", b.sizes());
  return s;
}

}  // namespace ntkfast
