// CUDA kernel for ntkfast::nm_mask: the host-side interface.
//
// Pure CUDA, no ATen (raw device pointers, sizes and a cudaStream_t), so that nm_mask.cu compiles
// with nvcc alone, as .ci/cuda_compile_check.sh does without a GPU or a CUDA build of PyTorch. The
// torch glue (nm_mask_cuda.cpp) checks and converts the arguments, allocates, and raises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ntkfast {
namespace gpu {

enum class NmDtype : int { kFloat32 = 0, kFloat64 = 1 };

// Launches the selection on `stream`; does not wait. scores (float or double, per dtype), keep
// (nullptr: every entry may be kept) and out hold numel entries, contiguous, on the current device;
// numel is a multiple of m, 1 <= n <= m. Every out entry is written. *nan_flag (device memory, zeroed
// by the caller) becomes nonzero if a keepable entry is NaN; out is then meaningless.
cudaError_t nm_mask_launch(NmDtype dtype, const void* scores, const bool* keep, bool* out, int64_t numel, int64_t n,
                           int64_t m, int32_t* nan_flag, cudaStream_t stream);

}  // namespace gpu
}  // namespace ntkfast
