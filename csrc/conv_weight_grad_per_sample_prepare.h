// Argument checks and sizes shared by the CPU kernel and the CUDA glue of
// ntkfast::conv_weight_grad_per_sample, so that both accept the same inputs and word their errors
// alike (ValueError naming the argument, like the Python wrapper).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace ntkfast {

struct ConvWgradGeometry {
  int64_t N, C, H, W;    // input [N, C, H, W]
  int64_t K, O, Ho, Wo;  // grad_output [N, K, O, Ho, Wo]
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups;
  int64_t Cg, Og;  // channels per group, in and out
  int64_t L;       // Ho * Wo: the positions each entry sums over
  int64_t M;       // K * Og: output rows of one (sample, group), row m = (k, o within the group)
  int64_t J;       // Cg * kh * kw: output columns, column j = (c, r, s)
};

inline void check_pair(const char* op, at::IntArrayRef v, const char* name, int64_t lowest) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have 2 entries (height, width), got ", v);
  TORCH_CHECK_VALUE(v[0] >= lowest && v[1] >= lowest, op, ": ", name, " must be >= ", lowest, ", got ", v);
  // far beyond any image; keeps every product of sizes in int64 and every tile offset in int32
  TORCH_CHECK_VALUE(v[0] < (int64_t{1} << 30) && v[1] < (int64_t{1} << 30), op, ": ", name, " is too large: ", v);
}

// input [N, C, H, W], grad_output [N, K, O, Ho, Wo] with (Ho, Wo) the convolution's output size.
inline ConvWgradGeometry check_conv_wgrad(const char* op, const at::Tensor& input, const at::Tensor& grad_output,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, " computes in float32 or float64 only, got ",
                    dtype, " inputs (the dtype of input, which grad_output must share)");
  TORCH_CHECK_VALUE(grad_output.scalar_type() == dtype, op, ": grad_output has dtype ", grad_output.scalar_type(),
                    " but input has ", dtype);
  TORCH_CHECK_VALUE(grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.dim() == 5, op, ": grad_output must be [N, K, O, Ho, Wo], got shape ",
                    grad_output.sizes());
  check_pair(op, kernel_size, "kernel_size", 1);
  check_pair(op, stride, "stride", 1);
  check_pair(op, padding, "padding", 0);
  check_pair(op, dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);

  ConvWgradGeometry g{};
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.K = grad_output.size(1);
  g.O = grad_output.size(2);
  g.Ho = grad_output.size(3);
  g.Wo = grad_output.size(4);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  TORCH_CHECK_VALUE(grad_output.size(0) == g.N, op, ": grad_output has ", grad_output.size(0),
                    " samples but input has ", g.N);
  TORCH_CHECK_VALUE(g.K >= 1, op, ": grad_output must have at least one cotangent per sample (K = size(1)), got ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(g.C >= groups && g.C % groups == 0, op, ": input's channel count ", g.C,
                    " must be a positive multiple of groups = ", groups);
  TORCH_CHECK_VALUE(g.O >= groups && g.O % groups == 0, op, ": grad_output's channel count O = ", g.O,
                    " must be a positive multiple of groups = ", groups);
  const int64_t ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1);
  const int64_t wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1);
  TORCH_CHECK_VALUE(ho >= 0 && wo >= 0, op, ": the input (", g.H, " x ", g.W, ", padded by ", padding,
                    ") is smaller than the dilated kernel_size ", kernel_size, " (dilation ", dilation, ")");
  TORCH_CHECK_VALUE(g.Ho == ho / g.sh + 1 && g.Wo == wo / g.sw + 1, op, ": grad_output's spatial size ", g.Ho,
                    " x ", g.Wo, " must be the convolution's output size ", ho / g.sh + 1, " x ", wo / g.sw + 1);
  g.Cg = g.C / groups;
  g.Og = g.O / groups;
  g.L = g.Ho * g.Wo;
  g.M = g.K * g.Og;
  g.J = g.Cg * g.kh * g.kw;
  return g;
}

// [N, K, O, C / groups, kh, kw]
inline std::vector<int64_t> conv_wgrad_out_shape(const ConvWgradGeometry& g) {
  return {g.N, g.K, g.O, g.Cg, g.kh, g.kw};
}

}  // namespace ntkfast
