// Torch glue for the CUDA kernel of ntkfast::conv_weight_grad_per_sample
// (conv_weight_grad_per_sample.cu). Same checks and messages as the CPU kernel
// (csrc/conv_weight_grad_per_sample_prepare.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "conv_weight_grad_per_sample.cuh"
#include "../conv_weight_grad_per_sample_prepare.h"

namespace ntkfast {
namespace {

at::Tensor conv_weight_grad_per_sample_cuda(const at::Tensor& input, const at::Tensor& grad_output,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvWgradGeometry g = check_conv_wgrad("conv_weight_grad_per_sample", input, grad_output, kernel_size, stride,
                                               padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(conv_wgrad_out_shape(g), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_output.contiguous();
  const gpu::ConvWgradShape shape{g.N, g.C, g.H, g.W, g.K, g.O, g.Ho, g.Wo, g.kh, g.kw,
                                  g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups};
  const gpu::ConvWgradDtype dtype =
      input.scalar_type() == at::kDouble ? gpu::ConvWgradDtype::kFloat64 : gpu::ConvWgradDtype::kFloat32;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, input.device().index()));
  const size_t bytes = gpu::conv_wgrad_workspace_bytes(shape, dtype, sm_count);
  // from the caching allocator, on this stream, freed when the kernels have been queued
  at::Tensor workspace;
  if (bytes > 0) workspace = at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
  C10_CUDA_CHECK(gpu::conv_wgrad_launch(x.data_ptr(), go.data_ptr(), out.data_ptr(),
                                        bytes > 0 ? workspace.data_ptr() : nullptr, shape, dtype, sm_count,
                                        c10::cuda::getCurrentCUDAStream(input.device().index()).stream()));
  return out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) {
  m.impl("conv_weight_grad_per_sample", &ntkfast::conv_weight_grad_per_sample_cuda);
}
