// Argument checks shared by the CPU kernel and the CUDA glue of philox_normal, perturbed_masked and
// perturbed_masked_backward, so that both accept the same inputs and word their errors alike.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace ntkfast {

// philox: int64 [2] holding (seed as an int64 bit pattern, offset), where the work happens. Its
// values are not read here: on CUDA that would cost a host sync (and break graph capture).
inline void check_philox(const char* op, const at::Tensor& philox, const at::Device& device) {
  TORCH_CHECK_VALUE(philox.scalar_type() == at::kLong, op, ": philox must be an int64 tensor, got ",
                    philox.scalar_type());
  TORCH_CHECK_VALUE(philox.dim() == 1 && philox.size(0) == 2, op, ": philox must have shape [2] (seed, offset), got ",
                    philox.sizes());
  TORCH_CHECK_VALUE(philox.device() == device, op, ": philox is on ", philox.device(), " but the work is on ", device);
}

inline void check_floating(const char* op, at::ScalarType dtype, const char* what) {
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                    ": ", what, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

struct PerturbedSizes {
  int64_t numel;       // of weight
  int64_t mask_numel;  // weight is mask broadcast over numel / mask_numel leading draws
};

// weight: [*lead, *mask.shape]; mask of weight's dtype and device; epsilon finite.
inline PerturbedSizes check_perturbed(const char* op, const at::Tensor& weight, const at::Tensor& mask,
                                      double epsilon, const at::Tensor& philox) {
  check_floating(op, weight.scalar_type(), "weight");
  TORCH_CHECK_VALUE(mask.scalar_type() == weight.scalar_type(), op, ": mask has dtype ", mask.scalar_type(),
                    " but weight has ", weight.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == weight.device(), op, ": mask is on ", mask.device(), " but weight is on ",
                    weight.device());
  const int64_t lead = weight.dim() - mask.dim();
  TORCH_CHECK_VALUE(lead >= 0 && weight.sizes().slice(lead).equals(mask.sizes()), op, ": mask has shape ",
                    mask.sizes(), " but must equal the trailing dimensions of weight's shape ", weight.sizes());
  TORCH_CHECK_VALUE(std::isfinite(epsilon), op, ": epsilon must be finite, got ", epsilon);
  check_philox(op, philox, weight.device());
  return {weight.numel(), mask.numel()};
}

// [2, *weight.shape]
inline std::vector<int64_t> perturbed_out_shape(const at::Tensor& weight) {
  std::vector<int64_t> shape{2};
  shape.insert(shape.end(), weight.sizes().begin(), weight.sizes().end());
  return shape;
}

inline PerturbedSizes check_perturbed_backward(const char* op, const at::Tensor& grad, const at::Tensor& weight,
                                               const at::Tensor& mask, double epsilon, const at::Tensor& philox) {
  const PerturbedSizes sz = check_perturbed(op, weight, mask, epsilon, philox);
  TORCH_CHECK_VALUE(grad.scalar_type() == weight.scalar_type(), op, ": grad has dtype ", grad.scalar_type(),
                    " but weight has ", weight.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == weight.device(), op, ": grad is on ", grad.device(), " but weight is on ",
                    weight.device());
  TORCH_CHECK_VALUE(grad.sizes().equals(perturbed_out_shape(weight)), op, ": grad has shape ", grad.sizes(),
                    " but must be [2, *weight.shape] = ", at::IntArrayRef(perturbed_out_shape(weight)));
  return sz;
}

inline void check_size(const char* op, at::IntArrayRef size) {
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK_VALUE(size[i] >= 0, op, ": size[", i, "] must be >= 0, got ", size[i]);
  }
}

}  // namespace ntkfast
