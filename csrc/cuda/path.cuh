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

cudaError_t path_score_launch(const void* weight, const void* mask, const void* a, const void* b, void* out,
                              const PathScoreGeometry& geo, int weight_power, PathDtype dtype, cudaStream_t stream);

}  // namespace gpu
}  // namespace ntkfast
