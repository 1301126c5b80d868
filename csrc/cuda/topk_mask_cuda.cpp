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

#include <cstdint>
#include <optional>
#include <vector>

#include "topk_mask.cuh"

namespace ntkfast {
namespace {

// float64 if any score is float64, else float32 (float16 and bfloat16 are compared in float32).
at::ScalarType common_dtype(at::TensorList scores) {
  bool any_double = false;
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto dt = scores[i].scalar_type();
    TORCH_CHECK_VALUE(at::isFloatingType(dt), "topk_mask: scores[", i, "] must be a floating tensor, got ", dt);
    any_double |= dt == at::kDouble;
  }
  return any_double ? at::kDouble : at::kFloat;
}

struct Prepared {
  std::vector<at::Tensor> x, keep, out;
};

Prepared prepare(at::TensorList scores, const std::optional<at::TensorList>& keep) {
  Prepared pr;
  const auto dt = common_dtype(scores);
  if (keep.has_value()) {
    TORCH_CHECK_VALUE(keep->size() == scores.size(), "topk_mask: keep has ", keep->size(),
                      " tensors but scores has ", scores.size());
  }
  const at::Device device = scores[0].device();
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor& s = scores[i];
    TORCH_CHECK_VALUE(s.device().is_cuda(), "topk_mask: scores[", i, "] is on ", s.device(), ", expected cuda");
    TORCH_CHECK_VALUE(s.device() == device, "topk_mask: scores[", i, "] is on ", s.device(), " but scores[0] is on ",
                      device);
    pr.x.push_back(s.to(dt).contiguous());
    if (keep.has_value()) {
      const at::Tensor& kp = (*keep)[i];
      TORCH_CHECK_VALUE(kp.scalar_type() == at::kBool, "topk_mask: keep[", i, "] must be bool, got ", kp.scalar_type());
      TORCH_CHECK_VALUE(kp.sizes() == s.sizes(), "topk_mask: keep[", i, "] has shape ", kp.sizes(),
                        " but scores[", i, "] has shape ", s.sizes());
      TORCH_CHECK_VALUE(kp.device() == s.device(), "topk_mask: keep[", i, "] is on ", kp.device(),
                        " but scores[", i, "] is on ", s.device());
      pr.keep.push_back(kp.contiguous());
    }
    pr.out.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  }
  return pr;
}

// Runs the selection on the current stream of the scores' device. ks: one k (all tensors
// together) or one per tensor (layerwise), already checked to be >= 0.
void run_select(Prepared& pr, const std::vector<int64_t>& ks, bool layerwise) {
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
  // by tensor (NaN, then its k), since it selects one tensor after the other.
  if (layerwise) {
    for (size_t i = 0; i < L; ++i) {
      TORCH_CHECK_VALUE(!nan[i], "topk_mask: scores[", i, "] contains NaN");
      TORCH_CHECK_VALUE(ks[i] <= alive[i], "topk_mask: k=", ks[i], " exceeds the ", alive[i],
                        " entries that may be kept (keep is True)");
    }
  } else {
    for (size_t i = 0; i < L; ++i) TORCH_CHECK_VALUE(!nan[i], "topk_mask: scores[", i, "] contains NaN");
    TORCH_CHECK_VALUE(ks[0] <= alive[0], "topk_mask: k=", ks[0], " exceeds the ", alive[0],
                      " entries that may be kept (keep is True)");
  }
  C10_CUDA_CHECK(gpu::topk_mask_finish(plan, meta.data_ptr(), workspace.data_ptr(), stream, needs_select));
  // meta and workspace go back to the caching allocator here, which reuses them only for work
  // queued on this same stream after the kernels above.
}

std::vector<at::Tensor> topk_mask_cuda(at::TensorList scores, int64_t k, std::optional<at::TensorList> keep) {
  TORCH_CHECK_VALUE(k >= 0, "topk_mask: k must be >= 0, got ", k);
  if (scores.empty()) {  // what the CPU kernel does with no tensors (the dispatcher rarely sends these here)
    if (keep.has_value()) {
      TORCH_CHECK_VALUE(keep->empty(), "topk_mask: keep has ", keep->size(), " tensors but scores has 0");
    }
    TORCH_CHECK_VALUE(k == 0, "topk_mask: k=", k, " exceeds the 0 entries that may be kept (keep is True)");
    return {};
  }
  Prepared pr = prepare(scores, keep);
  run_select(pr, {k}, /*layerwise=*/false);
  return pr.out;
}

std::vector<at::Tensor> topk_mask_layerwise_cuda(at::TensorList scores, at::IntArrayRef ks,
                                                 std::optional<at::TensorList> keep) {
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
  Prepared pr = prepare(scores, keep);
  run_select(pr, std::vector<int64_t>(ks.begin(), ks.end()), /*layerwise=*/true);
  return pr.out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) {
  m.impl("topk_mask", &ntkfast::topk_mask_cuda);
  m.impl("topk_mask_layerwise", &ntkfast::topk_mask_layerwise_cuda);
}
