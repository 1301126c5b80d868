// Schemas of every ntkfast op, in one place, and the pybind11 module ntkfast._C that reports how
// the extension was built. Kernels live in csrc/cpu (CPU) and csrc/cuda (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#ifndef NTKFAST_VERSION
#define NTKFAST_VERSION "unknown"
#endif
#ifndef NTKFAST_TORCH_VERSION
#define NTKFAST_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(ntkfast, m) {
  // Keep exactly k of the highest scores over all tensors (ties: lowest flat index first, in list
  // order then row-major order); entries whose keep is False are never kept.
  // drop_ties: keep only the entries scoring strictly above the (k+1)-th highest, i.e. also drop
  //   every entry tied with the first one left out (the authors' `score <= kthvalue` rule).
  // clamp: a k above the number of keepable entries keeps all of them instead of raising.
  m.def("topk_mask(Tensor[] scores, int k, Tensor[]? keep, bool drop_ties=False, bool clamp=False) -> Tensor[]");
  // The same, with one k per tensor.
  m.def("topk_mask_layerwise(Tensor[] scores, int[] ks, Tensor[]? keep, bool drop_ties=False, bool clamp=False) -> Tensor[]");
  // N:M semi-structured selection: in every group of m consecutive entries along the last dimension
  // (groups never straddle two rows: that size must be a multiple of m), keep the n highest scores
  // whose keep is True (ties: the lower index in the group first); a group with fewer than n such
  // entries keeps all of them. 1 <= n <= m. scores: any floating dtype (float16 and bfloat16 compared
  // in float32), at least one dimension; keep: bool, scores' shape, or None (all). A NaN where keep is
  // True raises. Returns a contiguous bool tensor of scores' shape.
  m.def("nm_mask(Tensor scores, int n, int m, Tensor? keep) -> Tensor");

  // Counter-based normal numbers (csrc/philox.h). philox: int64 [2] = (seed bits, offset) on the
  // device where the work happens, read there (no host sync: capturable in a CUDA graph, and
  // changeable between replays). Numbers offset .. offset + numel - 1 of the stream, row-major.
  m.def("philox_normal(Tensor philox, int[] size, ScalarType dtype) -> Tensor");
  // NTK-SAP's two weight sets in one pass: out[0] = weight * mask, out[1] = (weight + epsilon * xi)
  // * mask, xi[i] = normal number offset + i (flat row-major index i of weight). weight is
  // [*lead, *mask.shape]: mask is broadcast over the leading draws. out: [2, *weight.shape].
  m.def("perturbed_masked(Tensor weight, Tensor mask, float epsilon, Tensor philox) -> Tensor");
  // Its backward, xi regenerated: grad_weight = (grad[0] + grad[1]) * mask; grad_mask = the sum
  // over the leading draws of grad[0] * weight + grad[1] * (weight + epsilon * xi). An output not
  // asked for in output_mask comes back as an empty tensor of shape [0].
  m.def("perturbed_masked_backward(Tensor grad, Tensor weight, Tensor mask, float epsilon, Tensor philox, "
        "bool[2] output_mask) -> (Tensor, Tensor)");

  // The NTK block of a dense layer y = W a with weights W [O, C] scaled entrywise by mask [O, C] (any
  // real values, typically 0/1), for per-sample inputs a [N, C] and output cotangents b [N, K, O]:
  //   full[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c]
  // mode "full": [N1, N2, K, K]; "trace": [N1, N2] = sum_k full[:, :, k, k]; "diagonal" (N1 == N2):
  // [N1, K, K] = full[i, i]; "diagonal_trace" (N1 == N2): [N1] = sum_k full[i, i, k, k].
  // a1 [N1, C], b1 [N1, K, O], a2 [N2, C], b2 [N2, K, O], mask [O, C]: one dtype (float32 or
  // float64), one device. Passing the same tensors as a2 and b2 as a1 and b1 lets the kernels compute
  // one half of the symmetric result. Not differentiable here; ntkfast/_ops.py registers the
  // gradients of a1, b1, a2 and b2 (none for mask).
  m.def("masked_gram(Tensor a1, Tensor b1, Tensor a2, Tensor b2, Tensor mask, str mode) -> Tensor");
  // Per-sample convolution weight gradients, K cotangents per sample (for empirical NTKs of conv
  // layers): input [N, C, H, W], grad_output [N, K, O, Ho, Wo] -> out [N, K, O, C / groups, kh, kw],
  //   out[n, k, o, c, r, s] = sum_{y, x} grad_output[n, k, o, y, x]
  //                             * input[n, g * C / groups + c, y * sh + r * dh - ph, x * sw + s * dw - pw]
  // with g = o / (O / groups) and the input zero outside the image: the gradient of
  // <grad_output[n, k], conv2d(input[n], weight)> with respect to weight. (Ho, Wo) must be the
  // convolution's output size. float32 and float64.
  m.def("conv_weight_grad_per_sample(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");

  // Path sums of a chain of dense layers (the Path Kernel's path network), g(w) = |w| (power 1) or
  // w^2 (power 2) applied to weights[l] * masks[l] on the fly (no transformed copy of any weight):
  //   forward:  a_0 = input [N, C_0], a_l = a_{l-1} g(W_l * M_l)^T + g(bias_l)    -> [N, O_l], l = 1..L
  //   backward: b_L = ones [O_L],     b_{l-1} = g(W_l * M_l)^T b_l (bias-free)    -> [C_l],    l = L..1
  // Returns (forward = [a_1, ..., a_L], backward = [b_0, ..., b_{L-1}]). weights[l] [O_l, C_l] with
  // C_l = O_{l-1}; masks: empty (no mask) or one per layer, shaped like its weight; biases: one
  // entry per layer, None for a layer without one. One dtype (float32 / float64), one device. On
  // CUDA, step k runs the forward of layer k and the backward of layer L + 1 - k in one launch.
  m.def("path_chain(Tensor[] weights, Tensor[] masks, Tensor?[] biases, Tensor input, int power) -> (Tensor[], Tensor[])");
  // The per-weight outer-product score of a dense or convolution layer of the path network:
  //   out = |weight|^weight_power * mask * G,  G = d(sum_n <b_n, layer(a_n)>) / d(layer's weight),
  // i.e. dense (weight [O, C], a [N, C], b [N, O]): G[o, c] = sum_n b[n, o] a[n, c]; convolution
  // (weight [O, C / groups, kh, kw] or [O, C / groups, k], a [N, C, H, W] or [N, C, L], b the
  // gradient at its output [N, O, Ho, Wo] or [N, O, Lo]): the weight gradient of the convolution.
  // weight_power 0, 1 or 2; mask None (ones) or shaped like weight. float32 / float64.
  m.def("path_score(Tensor weight, Tensor? mask, Tensor a, Tensor b, int weight_power, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = NTKFAST_VERSION;
  info["built_with_torch"] = NTKFAST_TORCH_VERSION;
#ifdef NTKFAST_WITH_CUDA
  info["cuda"] = true;
#ifdef NTKFAST_CUDA_ARCHS
  info["cuda_archs"] = NTKFAST_CUDA_ARCHS;
#endif
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ntkfast compiled ops (registered as torch.ops.ntkfast.*)";
  m.def("build_info", &build_info, "How the extension was built");
}
