// CUDA kernels for ntkfast::path_chain and ntkfast::path_score: the host-side interface.
//
// Pure CUDA, no ATen (like masked_gram.cuh): raw device pointers, sizes and a cudaStream_t, so the
// kernels compile with nvcc alone. The torch glue (path_cuda.cpp) checks the arguments, makes the
// inputs contiguous and allocates the outputs. Launches are asynchronous; each function returns the
// first launch error (cudaGetLastError).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ntkfast {
namespace gpu {

enum class PathDtype : int { kFloat32 = 0, kFloat64 = 1 };

// Launch geometry, shared with the glue so that it can refuse too large an input with a ValueError
// before any launch (rather than a CUDA error after one).
constexpr int kPathChainThreads = 256;                  // threads per block of a chain step
constexpr int kPathChainRowsPerBlock = kPathChainThreads / 32;  // one warp per forward output row
constexpr int64_t kPathMaxGridX = (int64_t{1} << 31) - 1;

// Blocks of chain step k: the forward rows of layer k ([n, fw_o], a warp each) and the backward
// columns of layer L - 1 - k (bw_c, a thread each), in one launch.
inline int64_t path_chain_step_blocks(int64_t n, int64_t fw_o, int64_t bw_c) {
  return (n * fw_o + kPathChainRowsPerBlock - 1) / kPathChainRowsPerBlock +
         (bw_c + kPathChainThreads - 1) / kPathChainThreads;
}

// One dense layer of the chain: weight and mask [o, c] (mask nullptr: none), bias [o] or nullptr;
// forward_out [n, o] receives a_l, backward_out [c] receives b_{l-1}.
struct PathChainLayer {
  const void* weight;
  const void* mask;
  const void* bias;
  void* forward_out;
  void* backward_out;
  int64_t o;
  int64_t c;
};

// layers: a host array of num_layers entries; input [n, c_0] on the device. Launch k (k = 0 ..
// L - 1) computes the forward of layer k and the backward of layer L - 1 - k: L launches in all.
cudaError_t path_chain_launch(const PathChainLayer* layers, int64_t num_layers, const void* input, int64_t n,
                              int power, PathDtype dtype, cudaStream_t stream);

// The score of one layer: out = |weight|^weight_power * mask * G (mask nullptr: ones), G the dense
// outer product sum_n b[n, o] a[n, c] (dense = true; a [n, c], b [n, o]) or the convolution's
// weight gradient (a [n, c, h, w], b [n, o, ho, wo], weight [o, c / groups, kh, kw]).
struct PathScoreGeometry {
  bool dense;
  int64_t n, o, c, cg, groups;
  int64_t h, w, ho, wo, kh, kw;
  int64_t sh, sw, ph, pw, dh, dw;
};

// A convolution's score takes one block per weight entry: at most kPathMaxGridX entries. A dense
// score has no limit (grid-stride).
cudaError_t path_score_launch(const void* weight, const void* mask, const void* a, const void* b, void* out,
                              const PathScoreGeometry& geo, int weight_power, PathDtype dtype, cudaStream_t stream);

}  // namespace gpu
}  // namespace ntkfast
