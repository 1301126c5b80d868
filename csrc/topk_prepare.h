// Argument checks and conversions shared by the CPU kernel and the CUDA glue of topk_mask, so the
// two accept the same inputs and word their errors alike (the Python wrapper relies on the text).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace ntkfast {

// Appended to "topk_mask: scores[i] contains NaN" by the CPU kernel, the CUDA glue and (in the same
// words) the Python reference: what the user can do about it. A NaN score is refused rather than
// silently dropped or kept: it usually means the scores themselves went wrong (an overflow).
constexpr const char* kNanHint = " where keep allows it: a NaN cannot be ranked (give it keep=False, or a number)";

// float64 if any score is float64, else float32 (float16 and bfloat16 are compared in float32).
inline at::ScalarType topk_common_dtype(at::TensorList scores) {
  bool any_double = false;
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto dt = scores[i].scalar_type();
    TORCH_CHECK_VALUE(at::isFloatingType(dt), "topk_mask: scores[", i, "] must be a floating tensor, got ", dt);
    any_double |= dt == at::kDouble;
  }
  return any_double ? at::kDouble : at::kFloat;
}

struct TopkPrepared {
  std::vector<at::Tensor> x, keep, out;  // contiguous scores in the common dtype, keep, bool outputs
};

// All tensors must lie on one device of type `device_type`.
inline TopkPrepared topk_prepare(at::TensorList scores, const std::optional<at::TensorList>& keep,
                                 c10::DeviceType device_type) {
  TopkPrepared pr;
  const auto dt = topk_common_dtype(scores);
  if (keep.has_value()) {
    TORCH_CHECK_VALUE(keep->size() == scores.size(), "topk_mask: keep has ", keep->size(),
                      " tensors but scores has ", scores.size());
  }
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor& s = scores[i];
    TORCH_CHECK_VALUE(s.device().type() == device_type, "topk_mask: scores[", i, "] is on ", s.device(),
                      ", expected ", c10::DeviceTypeName(device_type, /*lower_case=*/true));
    TORCH_CHECK_VALUE(s.device() == scores[0].device(), "topk_mask: scores[", i, "] is on ", s.device(),
                      " but scores[0] is on ", scores[0].device());
    pr.x.push_back(s.to(dt).contiguous());
    if (keep.has_value()) {
      const at::Tensor& kp = (*keep)[i];
      TORCH_CHECK_VALUE(kp.scalar_type() == at::kBool, "topk_mask: keep[", i, "] must be bool, got ", kp.scalar_type());
      TORCH_CHECK_VALUE(kp.sizes() == s.sizes(), "topk_mask: keep[", i, "] has shape ", kp.sizes(),
                        " but scores[", i, "] has shape ", s.sizes());
      TORCH_CHECK_VALUE(kp.device() == s.device(), "topk_mask: keep[", i, "] is on ", kp.device(),
                        " but scores[", i, "] is on ", s.device());
      pr.keep.push_back(kp.contiguous());
    }
    pr.out.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  }
  return pr;
}

}  // namespace ntkfast
