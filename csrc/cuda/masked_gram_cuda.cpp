// Torch glue for the CUDA kernels of ntkfast::masked_gram (masked_gram.cu): the same checks and
// messages as the CPU kernel (csrc/masked_gram_prepare.h), contiguous inputs, the output and a
// workspace for P of at most kWorkspaceElements values (the kernels go through the pairs a chunk at
// a time).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "masked_gram.cuh"
#include "../masked_gram_prepare.h"

namespace ntkfast {
namespace {

constexpr int64_t kWorkspaceElements = int64_t{1} << 25;

at::Tensor masked_gram_cuda(const at::Tensor& a1, const at::Tensor& b1, const at::Tensor& a2, const at::Tensor& b2,
                            const at::Tensor& mask, c10::string_view mode) {
  const char* op = "masked_gram";
  const GramSizes sz = check_masked_gram(op, a1, b1, a2, b2, mask, mode);
  const c10::cuda::CUDAGuard guard(a1.device());
  at::Tensor out = at::empty(gram_out_shape(sz), a1.options());
  if (out.numel() == 0) return out;
  const at::Tensor a1c = a1.contiguous(), b1c = b1.contiguous(), a2c = a2.contiguous(), b2c = b2.contiguous();
  const at::Tensor mc = mask.contiguous();
  // which columns / rows of the mask have a nonzero: the kernels never multiply in what a dead one
  // reads (one pass over the mask, no host sync)
  const at::Tensor nonzero = mc.ne(0);
  const at::Tensor live_c = nonzero.any(0).contiguous(), live_o = nonzero.any(1).contiguous();
  const int64_t rows_total = gram_is_diagonal(sz.mode) ? sz.n1 : sz.n1 * sz.n2;
  const int64_t rows = std::clamp<int64_t>(kWorkspaceElements / std::max<int64_t>(sz.o, 1), 1, rows_total);
  at::Tensor workspace = at::empty({rows, std::max<int64_t>(sz.o, 1)}, a1.options());
  const gpu::GramDtype dtype = a1.scalar_type() == at::kFloat ? gpu::GramDtype::kFloat32 : gpu::GramDtype::kFloat64;
  C10_CUDA_CHECK(gpu::masked_gram_launch(a1c.data_ptr(), b1c.data_ptr(), a2c.data_ptr(), b2c.data_ptr(), mc.data_ptr(),
                                         live_c.data_ptr<bool>(), live_o.data_ptr<bool>(), out.data_ptr(),
                                         workspace.data_ptr(), rows, sz.n1, sz.n2, sz.c, sz.k, sz.o,
                                         static_cast<gpu::GramModeCode>(static_cast<int>(sz.mode)), dtype,
                                         c10::cuda::getCurrentCUDAStream(a1.device().index()).stream()));
  return out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CUDA, m) { m.impl("masked_gram", &ntkfast::masked_gram_cuda); }
