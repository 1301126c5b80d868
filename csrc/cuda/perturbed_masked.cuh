// CUDA kernels for ntkfast::philox_normal, ntkfast::perturbed_masked and
// ntkfast::perturbed_masked_backward: the host-side interface.
//
// Pure CUDA, no ATen (like topk_mask.cuh): raw device pointers, sizes and a cudaStream_t, so the
// kernels compile with nvcc alone. The torch glue (perturbed_masked_cuda.cpp) checks the
// arguments, makes the inputs contiguous and allocates the outputs. Every launch is asynchronous
// and reads the seed and offset from `philox` (device memory, int64 [2] = seed bits, offset), so
// the calls can be captured in a CUDA graph and the numbers changed between replays by writing to
// that tensor. Each function returns the launch's error (cudaGetLastError).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ntkfast {
namespace gpu {

enum class PhiloxDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// out[i] = normal number offset + i, i < n.
cudaError_t philox_normal_launch(void* out, int64_t n, PhiloxDtype dtype, const int64_t* philox, cudaStream_t stream);

// weight: [numel], mask: [mask_numel] (numel a multiple of it), out: [2 * numel] (clean, noisy).
cudaError_t perturbed_masked_launch(const void* weight, const void* mask, void* out, int64_t numel,
                                    int64_t mask_numel, double epsilon, PhiloxDtype dtype, const int64_t* philox,
                                    cudaStream_t stream);

// grad: [2 * numel]; grad_weight: [numel] or nullptr (not wanted); grad_mask: [mask_numel] or
// nullptr. mask_numel >= 1.
cudaError_t perturbed_masked_backward_launch(const void* grad, const void* weight, const void* mask,
                                             void* grad_weight, void* grad_mask, int64_t numel, int64_t mask_numel,
                                             double epsilon, PhiloxDtype dtype, const int64_t* philox,
                                             cudaStream_t stream);

}  // namespace gpu
}  // namespace ntkfast
