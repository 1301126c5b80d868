// Torch glue for the CUDA kernels of ntkfast::path_chain and ntkfast::path_score (path.cu): the
// CPU kernels' checks (csrc/path_prepare.h), contiguous inputs, the outputs, one call each.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "path.cuh"
#include "../path_prepare.h"

namespace ntkfast {
namespace {

gpu::PathDtype path_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? gpu::PathDtype::kFloat64 : gpu::PathDtype::kFloat32;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> path_chain_cuda(
    at::TensorList weights, at::TensorList masks, const std::vector<std::optional<at::Tensor>>& biases,
    const at::Tensor& input, int64_t power) {
  const std::vector<int64_t> outs = check_path_chain("path_chain", weights, masks, biases, input, power);
  const c10::cuda::CUDAGuard guard(input.device());
  const size_t L = weights.size();
  for (size_t k = 0; k < L; ++k) {  // step k: forward of layer k, backward of layer L - 1 - k; before any allocation
    const int64_t blocks = gpu::path_chain_step_blocks(input.size(0), weights[k].size(0), weights[L - 1 - k].size(1));
    TORCH_CHECK_VALUE(blocks <= gpu::kPathMaxGridX, "path_chain: input has ", input.size(0), " rows and weights[", k,
                      "] ", weights[k].size(0), " outputs: ", blocks, " blocks in one launch, more than the CUDA "
                      "kernel's ", gpu::kPathMaxGridX, "; split the input's rows into smaller batches");
  }
  std::vector<at::Tensor> keep;  // contiguous copies, alive until the launches are queued
  std::vector<at::Tensor> fwd(L), bwd(L);
  std::vector<gpu::PathChainLayer> layers(L);
  for (size_t l = 0; l < L; ++l) {
    keep.push_back(weights[l].contiguous());
    layers[l].weight = keep.back().data_ptr();
    layers[l].mask = nullptr;
    if (!masks.empty()) {
      keep.push_back(masks[l].contiguous());
      layers[l].mask = keep.back().data_ptr();
    }
    layers[l].bias = nullptr;
    if (biases[l].has_value()) {
      keep.push_back(biases[l]->contiguous());
      layers[l].bias = keep.back().data_ptr();
    }
    fwd[l] = at::empty({input.size(0), outs[l]}, input.options());
    bwd[l] = at::empty({weights[l].size(1)}, input.options());
    layers[l].forward_out = fwd[l].data_ptr();
    layers[l].backward_out = bwd[l].data_ptr();
    layers[l].o = weights[l].size(0);
    layers[l].c = weights[l].size(1);
  }
  const at::Tensor x = input.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  C10_CUDA_CHECK(gpu::path_chain_launch(layers.data(), static_cast<int64_t>(L), x.data_ptr(), x.size(0),
                                        static_cast<int>(power), path_dtype(x), stream));
  return {fwd, bwd};
}

at::Tensor path_score_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& mask, const at::Tensor& a,
                           const at::Tensor& b, int64_t weight_power, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  const PathScoreShape s = check_path_score("path_score", weight, mask, a, b, weight_power, stride, padding, dilation,
                                            groups);
  TORCH_CHECK_VALUE(s.dense || weight.numel() <= gpu::kPathMaxGridX, "path_score: weight has ", weight.numel(),
                    " entries, more than the ", gpu::kPathMaxGridX,
                    " a convolution's score handles on CUDA (one block per entry)");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  gpu::PathScoreGeometry geo{s.dense, s.n, s.o, s.c, s.cg, s.groups, s.h, s.w, s.ho, s.wo,
                             s.kh, s.kw, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  C10_CUDA_CHECK(gpu::path_score_launch(w.data_ptr(), m.defined() ? m.data_ptr() : nullptr, ac.data_ptr(),
                                        bc.data_ptr(), out.data_ptr(), geo, static_cast<int>(weight_power),
                                        path_dtype(w), stream));
  return out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) {
  m.impl("path_chain", &ntkfast::path_chain_cuda);
  m.impl("path_score", &ntkfast::path_score_cuda);
}
