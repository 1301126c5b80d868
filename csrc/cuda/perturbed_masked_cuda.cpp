// Torch glue for the CUDA kernels of ntkfast::philox_normal, ntkfast::perturbed_masked and
// ntkfast::perturbed_masked_backward (perturbed_masked.cu). Same checks and messages as the CPU
// kernel (csrc/perturbed_masked_prepare.h), except that the offset's sign is not checked: that
// would need its value on the host, i.e. a sync, and the op must stay capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "perturbed_masked.cuh"
#include "../perturbed_masked_prepare.h"

namespace ntkfast {
namespace {

gpu::PhiloxDtype kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return gpu::PhiloxDtype::kFloat16;
    case at::kBFloat16: return gpu::PhiloxDtype::kBFloat16;
    case at::kFloat: return gpu::PhiloxDtype::kFloat32;
    default: return gpu::PhiloxDtype::kFloat64;  // the only other dtype the checks let through
  }
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

at::Tensor philox_normal_cuda(const at::Tensor& philox, at::IntArrayRef size, at::ScalarType dtype) {
  const char* op = "philox_normal";
  check_floating(op, dtype, "dtype");
  check_size(op, size);
  check_philox(op, philox, philox.device());
  const c10::cuda::CUDAGuard guard(philox.device());
  at::Tensor out = at::empty(size, philox.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor ph = philox.contiguous();
  C10_CUDA_CHECK(gpu::philox_normal_launch(out.data_ptr(), out.numel(), kernel_dtype(dtype), ph.data_ptr<int64_t>(),
                                           current_stream(philox.device())));
  return out;
}

at::Tensor perturbed_masked_cuda(const at::Tensor& weight, const at::Tensor& mask, double epsilon,
                                 const at::Tensor& philox) {
  const char* op = "perturbed_masked";
  const PerturbedSizes sz = check_perturbed(op, weight, mask, epsilon, philox);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty(perturbed_out_shape(weight), weight.options());
  if (sz.numel == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  const at::Tensor ph = philox.contiguous();
  C10_CUDA_CHECK(gpu::perturbed_masked_launch(w.data_ptr(), m.data_ptr(), out.data_ptr(), sz.numel, sz.mask_numel,
                                              epsilon, kernel_dtype(weight.scalar_type()), ph.data_ptr<int64_t>(),
                                              current_stream(weight.device())));
  return out;
}

std::tuple<at::Tensor, at::Tensor> perturbed_masked_backward_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                                                  const at::Tensor& mask, double epsilon,
                                                                  const at::Tensor& philox,
                                                                  std::array<bool, 2> output_mask) {
  const char* op = "perturbed_masked_backward";
  const PerturbedSizes sz = check_perturbed_backward(op, grad, weight, mask, epsilon, philox);
  const c10::cuda::CUDAGuard guard(weight.device());
  const bool need_w = output_mask[0];
  const bool need_m = output_mask[1];
  at::Tensor grad_weight = at::empty(need_w ? weight.sizes() : at::IntArrayRef{0}, weight.options());
  at::Tensor grad_mask = at::empty(need_m ? mask.sizes() : at::IntArrayRef{0}, mask.options());
  if (sz.mask_numel == 0 || !(need_w || need_m)) return {grad_weight, grad_mask};
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  const at::Tensor ph = philox.contiguous();
  C10_CUDA_CHECK(gpu::perturbed_masked_backward_launch(
      g.data_ptr(), w.data_ptr(), m.data_ptr(), need_w ? grad_weight.data_ptr() : nullptr,
      need_m ? grad_mask.data_ptr() : nullptr, sz.numel, sz.mask_numel, epsilon, kernel_dtype(weight.scalar_type()),
      ph.data_ptr<int64_t>(), current_stream(weight.device())));
  return {grad_weight, grad_mask};
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) {
  m.impl("philox_normal", &ntkfast::philox_normal_cuda);
  m.impl("perturbed_masked", &ntkfast::perturbed_masked_cuda);
  m.impl("perturbed_masked_backward", &ntkfast::perturbed_masked_backward_cuda);
}
