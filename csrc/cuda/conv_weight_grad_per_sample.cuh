// CUDA kernel for ntkfast::conv_weight_grad_per_sample: the host-side interface.
//
// Pure CUDA, no ATen (like perturbed_masked.cuh): raw device pointers, sizes and a cudaStream_t,
// so the kernel compiles with nvcc alone. The torch glue (conv_weight_grad_per_sample_cuda.cpp)
// checks the arguments, makes the inputs contiguous, allocates the output and the workspace.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ntkfast {
namespace gpu {

enum class ConvWgradDtype : int { kFloat32 = 0, kFloat64 = 1 };

// input [N, C, H, W], grad_output [N, K, O, Ho, Wo], out [N, K, O, C / groups, kh, kw], all
// contiguous; (Ho, Wo) the convolution's output size (the glue has checked every size).
struct ConvWgradShape {
  int64_t N, C, H, W;
  int64_t K, O, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t groups;
};

// Bytes of device workspace conv_wgrad_launch needs: 0, unless there are too few output tiles to
// fill the device (few samples, small layers), in which case the positions are split into parts
// summed by a second kernel, and each part needs its own copy of the output. sm_count: the
// device's multiprocessors.
size_t conv_wgrad_workspace_bytes(const ConvWgradShape& s, ConvWgradDtype dtype, int sm_count);

// out = the per-sample weight gradients. workspace: at least conv_wgrad_workspace_bytes(s, dtype,
// sm_count) bytes (nullptr when that is 0). Asynchronous; returns the launches' error.
cudaError_t conv_wgrad_launch(const void* input, const void* grad_output, void* out, void* workspace,
                              const ConvWgradShape& s, ConvWgradDtype dtype, int sm_count, cudaStream_t stream);

}  // namespace gpu
}  // namespace ntkfast
