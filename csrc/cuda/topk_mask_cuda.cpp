// Torch glue for the CUDA kernels of ntkfast::topk_mask and ntkfast::topk_mask_layerwise
// (topk_mask.cu). Checks and converts the arguments exactly as the CPU kernel does
// (csrc/cpu/topk_mask_cpu.cpp: same checks in the same order, same messages, same dtype
// promotion), allocates the outputs and the scratch, and raises the CPU kernel's errors from what
// the single host sync after the first radix pass reports.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "topk_mask.cuh"
#include "../topk_prepare.h"

namespace ntkfast {
namespace {

using Prepared = TopkPrepared;

Prepared prepare(at::TensorList scores, const std::optional<at::TensorList>& keep) {
  return topk_prepare(scores, keep, at::kCUDA);
}

// Runs the selection on the current stream of the scores' device. ks: one k (all tensors
// together) or one per tensor (layerwise), already checked to be >= 0. clamp: a k above the
// number alive becomes that number (the first pass is then run again with the clamped ks, which
// the device reads from the packed meta).
// Returns how many entries of each problem may be kept. write=false stops after the first pass
// and the argument checks (for callers that only need those counts).
std::vector<int64_t> run_select(Prepared& pr, std::vector<int64_t> ks, bool layerwise, bool clamp,
                                bool write = true) {
  const size_t L = pr.x.size();
  const at::Device device = pr.x[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<gpu::TopkTensor> tensors(L);
  std::vector<int64_t> numels(L);
  for (size_t i = 0; i < L; ++i) {
    tensors[i].scores = pr.x[i].data_ptr();
    tensors[i].keep = pr.keep.empty() ? nullptr : pr.keep[i].data_ptr<bool>();
    tensors[i].out = pr.out[i].data_ptr<bool>();
    tensors[i].numel = pr.x[i].numel();
    numels[i] = tensors[i].numel;
  }
  const auto dtype = pr.x[0].scalar_type() == at::kDouble ? gpu::ScoreDtype::kFloat64 : gpu::ScoreDtype::kFloat32;
  gpu::TopkMaskPlan plan;
  C10_CUDA_CHECK(gpu::topk_mask_plan(&plan, dtype, static_cast<int64_t>(L), numels.data(), layerwise));

  // The tensor table goes to the device through pinned memory with a non-blocking copy: the
  // caching host allocator keeps the buffer until the copy has run, and no sync is spent on it.
  at::Tensor meta_host = at::empty({static_cast<int64_t>(plan.meta_bytes)},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  gpu::topk_mask_pack_meta(plan, meta_host.data_ptr(), tensors.data(), ks.data());
  const at::Tensor meta = meta_host.to(device, /*non_blocking=*/true);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));

  std::vector<int64_t> alive(static_cast<size_t>(plan.num_problems));
  std::vector<int32_t> nan(L);
  bool needs_select = false;
  C10_CUDA_CHECK(gpu::topk_mask_first_pass(plan, meta.data_ptr(), workspace.data_ptr(), stream, ks.data(),
                                           alive.data(), nan.data(), &needs_select));
  // The CPU kernel's checks, in its order: over all tensors, NaN first, then k; layerwise, tensor
  // by tensor (NaN, then its k), since it selects one tensor after the other. With clamp no k is
  // too large.
  auto check_k = [&](size_t p) {
    TORCH_CHECK_VALUE(clamp || ks[p] <= alive[p], "topk_mask: k=", ks[p], " exceeds the ", alive[p],
                      " entries that may be kept (keep is True)");
  };
  if (layerwise) {
    for (size_t i = 0; i < L; ++i) {
      TORCH_CHECK_VALUE(!nan[i], "topk_mask: scores[", i, "] contains NaN", kNanHint);
      check_k(i);
    }
  } else {
    for (size_t i = 0; i < L; ++i) TORCH_CHECK_VALUE(!nan[i], "topk_mask: scores[", i, "] contains NaN", kNanHint);
    check_k(0);
  }
  if (!write) return alive;

  bool clamped = false;
  for (size_t p = 0; clamp && p < ks.size(); ++p) {
    if (ks[p] > alive[p]) {
      ks[p] = alive[p];
      clamped = true;
    }
  }
  at::Tensor meta_clamped;
  if (clamped) {  // the device reads ks from the packed table: pack the clamped ones, redo the pass
    at::Tensor host = at::empty({static_cast<int64_t>(plan.meta_bytes)},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    gpu::topk_mask_pack_meta(plan, host.data_ptr(), tensors.data(), ks.data());
    meta_clamped = host.to(device, /*non_blocking=*/true);
    C10_CUDA_CHECK(gpu::topk_mask_first_pass(plan, meta_clamped.data_ptr(), workspace.data_ptr(), stream,
                                             ks.data(), alive.data(), nan.data(), &needs_select));
  }
  const at::Tensor& meta_used = clamped ? meta_clamped : meta;
  C10_CUDA_CHECK(gpu::topk_mask_finish(plan, meta_used.data_ptr(), workspace.data_ptr(), stream, needs_select));
  return alive;
  // meta and workspace go back to the caching allocator here, which reuses them only for work
  // queued on this same stream after the kernels above.
}

// The selection, with drop_ties done on top of the exact kernel rather than inside it: a first
// pass checks the arguments (errors read exactly as without drop_ties) and counts the entries
// that may be kept; every problem with 0 < k < alive then selects k+1 and keeps the selected
// entries strictly above its smallest selected score, its (k+1)-th highest. A problem with k == 0
// or k == alive is final as selected. Two host syncs and a few ATen ops: this is the authors'
// masking rule kept simple here; the CPU kernel fuses it into its passes.
std::vector<at::Tensor> select(at::TensorList scores, std::optional<at::TensorList> keep, std::vector<int64_t> ks,
                               bool layerwise, bool drop_ties, bool clamp) {
  Prepared pr = prepare(scores, keep);
  if (!drop_ties) {
    run_select(pr, ks, layerwise, clamp);
    return pr.out;
  }
  // checks and counts first (errors read exactly as without drop_ties), then one selection of k+1
  const std::vector<int64_t> alive = run_select(pr, ks, layerwise, clamp, /*write=*/false);
  const size_t L = pr.x.size();
  std::vector<std::vector<size_t>> members(ks.size());  // tensors of each problem
  for (size_t i = 0; i < L; ++i) members[layerwise ? i : 0].push_back(i);
  std::vector<int64_t> k1(ks.size());
  std::vector<bool> open(ks.size());
  for (size_t p = 0; p < ks.size(); ++p) {
    ks[p] = std::min(ks[p], alive[p]);
    open[p] = ks[p] > 0 && ks[p] < alive[p];
    k1[p] = open[p] ? ks[p] + 1 : ks[p];
  }
  run_select(pr, k1, layerwise, /*clamp=*/false);
  for (size_t p = 0; p < ks.size(); ++p) {
    if (!open[p]) continue;
    std::vector<at::Tensor> mins;
    for (size_t i : members[p]) {
      if (pr.x[i].numel() == 0) continue;
      const auto inf = at::full({}, std::numeric_limits<double>::infinity(), pr.x[i].options());
      mins.push_back(at::where(pr.out[i], pr.x[i], inf).min());
    }
    const at::Tensor thr = at::stack(mins).min();
    for (size_t i : members[p]) pr.out[i] = pr.out[i].logical_and(pr.x[i] > thr);
  }
  return pr.out;
}

std::vector<at::Tensor> topk_mask_cuda(at::TensorList scores, int64_t k, std::optional<at::TensorList> keep,
                                       bool drop_ties, bool clamp) {
  TORCH_CHECK_VALUE(k >= 0, "topk_mask: k must be >= 0, got ", k);
  if (scores.empty()) {  // what the CPU kernel does with no tensors (the dispatcher rarely sends these here)
    if (keep.has_value()) {
      TORCH_CHECK_VALUE(keep->empty(), "topk_mask: keep has ", keep->size(), " tensors but scores has 0");
    }
    TORCH_CHECK_VALUE(k == 0 || clamp, "topk_mask: k=", k, " exceeds the 0 entries that may be kept (keep is True)");
    return {};
  }
  return select(scores, keep, {k}, /*layerwise=*/false, drop_ties, clamp);
}

std::vector<at::Tensor> topk_mask_layerwise_cuda(at::TensorList scores, at::IntArrayRef ks,
                                                 std::optional<at::TensorList> keep, bool drop_ties, bool clamp) {
  TORCH_CHECK_VALUE(ks.size() == scores.size(), "topk_mask_layerwise: ks has ", ks.size(),
                    " entries but scores has ", scores.size());
  for (size_t i = 0; i < ks.size(); ++i) {
    TORCH_CHECK_VALUE(ks[i] >= 0, "topk_mask_layerwise: ks[", i, "] must be >= 0, got ", ks[i]);
  }
  if (scores.empty()) {
    if (keep.has_value()) {
      TORCH_CHECK_VALUE(keep->empty(), "topk_mask: keep has ", keep->size(), " tensors but scores has 0");
    }
    return {};
  }
  return select(scores, keep, std::vector<int64_t>(ks.begin(), ks.end()), /*layerwise=*/true, drop_ties, clamp);
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) {
  m.impl("topk_mask", &ntkfast::topk_mask_cuda);
  m.impl("topk_mask_layerwise", &ntkfast::topk_mask_layerwise_cuda);
}
