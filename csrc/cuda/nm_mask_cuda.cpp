// Torch glue for the CUDA kernel of ntkfast::nm_mask (nm_mask.cu): the CPU kernel's checks and
// conversions (nm_mask_prepare.h), then the launch, and one host sync to read whether a keepable
// score was NaN, so that it raises the CPU kernel's error.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "nm_mask.cuh"
#include "../nm_mask_prepare.h"

namespace ntkfast {
namespace {

at::Tensor nm_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m, const std::optional<at::Tensor>& keep) {
  NmPrepared pr = nm_prepare(scores, n, m, keep, at::kCUDA);
  if (pr.x.numel() == 0) return pr.out;
  const c10::cuda::CUDAGuard guard(pr.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pr.x.device().index()).stream();
  // zeroed on the same (current) stream the kernel runs on
  const at::Tensor nan_flag = at::zeros({1}, pr.x.options().dtype(at::kInt));
  const auto dtype = pr.x.scalar_type() == at::kDouble ? gpu::NmDtype::kFloat64 : gpu::NmDtype::kFloat32;
  C10_CUDA_CHECK(gpu::nm_mask_launch(dtype, pr.x.data_ptr(), pr.keep.defined() ? pr.keep.data_ptr<bool>() : nullptr,
                                     pr.out.data_ptr<bool>(), pr.x.numel(), n, m, nan_flag.data_ptr<int32_t>(),
                                     stream));
  TORCH_CHECK_VALUE(nan_flag.item<int32_t>() == 0, "nm_mask: scores contains NaN", kNanHint);
  return pr.out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) {
  m.impl("nm_mask", &ntkfast::nm_mask_cuda);
}
