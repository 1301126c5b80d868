// Argument checks and conversions shared by the CPU kernel and the CUDA glue of nm_mask, so the two
// accept the same inputs and word their errors alike (ntkfast/ops/nm_mask.py relies on the text: it
// puts the weight's name after "scores").
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "topk_prepare.h"  // kNanHint: one wording of the NaN error for every selection op

namespace ntkfast {

struct NmPrepared {
  at::Tensor x;     // contiguous scores, float64 if given float64, else float32
  at::Tensor keep;  // contiguous, or undefined: every entry may be kept
  at::Tensor out;   // bool, contiguous, shaped like the scores
};

inline NmPrepared nm_prepare(const at::Tensor& scores, int64_t n, int64_t m, const std::optional<at::Tensor>& keep,
                             c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(m >= 1, "nm_mask: m must be >= 1, got ", m);
  TORCH_CHECK_VALUE(n >= 1 && n <= m, "nm_mask: n must lie in [1, m=", m, "], got ", n);
  const auto dt = scores.scalar_type();
  TORCH_CHECK_VALUE(at::isFloatingType(dt), "nm_mask: scores must be a floating tensor, got ", dt);
  TORCH_CHECK_VALUE(scores.device().type() == device_type, "nm_mask: scores is on ", scores.device(), ", expected ",
                    c10::DeviceTypeName(device_type, /*lower_case=*/true));
  TORCH_CHECK_VALUE(scores.dim() >= 1, "nm_mask: scores must have a dimension for the groups to run along, got a "
                    "0-d tensor");
  TORCH_CHECK_VALUE(scores.size(-1) % m == 0, "nm_mask: the last dimension of scores (", scores.size(-1),
                    ") is not a multiple of m=", m);
  NmPrepared pr;
  if (keep.has_value()) {
    const at::Tensor& kp = *keep;
    TORCH_CHECK_VALUE(kp.scalar_type() == at::kBool, "nm_mask: keep must be bool, got ", kp.scalar_type());
    TORCH_CHECK_VALUE(kp.sizes() == scores.sizes(), "nm_mask: keep has shape ", kp.sizes(), " but scores has shape ",
                      scores.sizes());
    TORCH_CHECK_VALUE(kp.device() == scores.device(), "nm_mask: keep is on ", kp.device(), " but scores is on ",
                      scores.device());
    pr.keep = kp.contiguous();
  }
  // float16 and bfloat16 widen exactly to float32, so their order (and ties) is unchanged
  pr.x = scores.to(dt == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  pr.out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  return pr;
}

}  // namespace ntkfast
