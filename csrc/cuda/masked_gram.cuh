// CUDA kernels for ntkfast::masked_gram: the host-side interface.
//
// Pure CUDA, no ATen (like perturbed_masked.cuh): raw device pointers, sizes and a cudaStream_t, so
// the kernels compile with nvcc alone. The torch glue (masked_gram_cuda.cpp) checks the arguments,
// makes the inputs contiguous and allocates the output and the workspace. Launches are
// asynchronous; the function returns the first launch error (cudaGetLastError).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ntkfast {
namespace gpu {

enum class GramDtype : int { kFloat32 = 0, kFloat64 = 1 };
// the same codes as ntkfast::GramMode (csrc/masked_gram_prepare.h)
enum class GramModeCode : int { kFull = 0, kTrace = 1, kDiagonal = 2, kDiagonalTrace = 3 };

// a1 [N1, C], b1 [N1, K, O], a2 [N2, C], b2 [N2, K, O], mask [O, C], all contiguous, of one dtype;
// out: [N1, N2, K, K] (full), [N1, N2] (trace), [N1, K, K] (diagonal), [N1] (diagonal_trace; the
// diagonal modes need N1 == N2). workspace: workspace_rows * O values (workspace_rows >= 1); the
// pairs (i, j) (or the samples i, in the diagonal modes) are processed workspace_rows at a time,
// P[i, j, :] of each held there between the two kernels of a chunk. live_c [C] / live_o [O]: whether
// column c / row o of the mask has a nonzero entry (device memory); what a dead column or row reads
// of a1, a2 / b1, b2 is never multiplied in, so NaN and infinities there contribute nothing.
cudaError_t masked_gram_launch(const void* a1, const void* b1, const void* a2, const void* b2, const void* mask,
                               const bool* live_c, const bool* live_o, void* out, void* workspace,
                               int64_t workspace_rows, int64_t n1, int64_t n2, int64_t c, int64_t k, int64_t o,
                               GramModeCode mode, GramDtype dtype, cudaStream_t stream);

}  // namespace gpu
}  // namespace ntkfast
