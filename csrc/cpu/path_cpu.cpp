// CPU kernels of ntkfast::path_chain and ntkfast::path_score (schemas and semantics:
// csrc/ntkfast.cpp).
//
// path_chain is memory-bound (a matrix-vector product per layer and direction): each pass reads a
// weight row (and its mask row) once and applies |w| or w^2 in registers, where the plain-PyTorch
// way writes a transformed copy of every weight and reads it back. The forward pass splits the
// output rows over threads; the backward pass splits the columns, so that each thread streams
// contiguous row pieces and accumulates into its own slice of the result (no reduction across
// threads: the sums are the same whatever the thread count).
//
// path_score: the dense score is an outer product fused with |w|^q * mask. The convolution score
// needs the convolution's weight gradient; that is one GEMM over unfolded input patches (ATen's
// im2col and mm, the BLAS does the heavy part) followed by the same fused epilogue.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../path_prepare.h"
#include "../select.h"

namespace ntkfast {
namespace {

template <typename T, int P>
inline T path_g(T w) {
  if constexpr (P == 1) {
    return std::abs(w);
  } else {
    return w * w;
  }
}

template <typename T>
inline T weight_pow(T w, int64_t q) {
  return q == 0 ? T(1) : (q == 1 ? std::abs(w) : w * w);
}

// Rows per task such that a task touches about 64 KiB of weights: small layers stay on one thread.
inline int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(row_len, 1)); }

template <typename T, int P>
void chain_forward_layer(const T* w, const T* m, const T* bias, const T* a, T* out, int64_t n, int64_t o_size,
                         int64_t c_size) {
  at::parallel_for(0, o_size, grain_rows(c_size), [&](int64_t o0, int64_t o1) {
    std::vector<T> row(c_size);
    for (int64_t o = o0; o < o1; ++o) {
      const T* wr = w + o * c_size;
      if (m != nullptr) {
        const T* mr = m + o * c_size;
        // a select, not a product: a pruned weight is exactly 0 whatever it holds (kept_or_zero:
        // a select that stays vectorised, see ../select.h)
        for (int64_t c = 0; c < c_size; ++c) row[c] = kept_or_zero(mr[c] != T(0), path_g<T, P>(wr[c] * mr[c]));
      } else {
        for (int64_t c = 0; c < c_size; ++c) row[c] = path_g<T, P>(wr[c]);
      }
      const T shift = bias != nullptr ? path_g<T, P>(bias[o]) : T(0);
      for (int64_t i = 0; i < n; ++i) {
        const T* ai = a + i * c_size;
        // eight partial sums: a dot product the compiler vectorises without reassociating floats
        T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 8 <= c_size; c += 8) {
          for (int j = 0; j < 8; ++j) acc[j] += row[c + j] * ai[c + j];
        }
        T tail = 0;
        for (; c < c_size; ++c) tail += row[c] * ai[c];
        out[i * o_size + o] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) +
                              tail + shift;
      }
    }
  });
}

template <typename T, int P>
void chain_backward_layer(const T* w, const T* m, const T* b_out, T* b_in, int64_t o_size, int64_t c_size) {
  constexpr int64_t kCols = 256;
  at::parallel_for(0, c_size, std::max<int64_t>(kCols, grain_rows(o_size)), [&](int64_t c0, int64_t c1) {
    T* z = b_in + c0;
    const int64_t width = c1 - c0;
    for (int64_t c = 0; c < width; ++c) z[c] = T(0);
    for (int64_t o = 0; o < o_size; ++o) {
      const T bo = b_out != nullptr ? b_out[o] : T(1);
      const T* wr = w + o * c_size + c0;
      if (m != nullptr) {
        const T* mr = m + o * c_size + c0;
        for (int64_t c = 0; c < width; ++c) z[c] += kept_or_zero(mr[c] != T(0), path_g<T, P>(wr[c] * mr[c]) * bo);
      } else {
        for (int64_t c = 0; c < width; ++c) z[c] += path_g<T, P>(wr[c]) * bo;
      }
    }
  });
}

template <typename T, int P>
void chain_run(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& m,
               const std::vector<at::Tensor>& bias, const at::Tensor& input, std::vector<at::Tensor>& fwd,
               std::vector<at::Tensor>& bwd) {
  const size_t L = w.size();
  const int64_t n = input.size(0);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& a = l == 0 ? input : fwd[l - 1];
    chain_forward_layer<T, P>(w[l].data_ptr<T>(), m.empty() ? nullptr : m[l].data_ptr<T>(),
                              bias[l].defined() ? bias[l].data_ptr<T>() : nullptr, a.data_ptr<T>(),
                              fwd[l].data_ptr<T>(), n, w[l].size(0), w[l].size(1));
  }
  for (size_t l = L; l-- > 0;) {
    chain_backward_layer<T, P>(w[l].data_ptr<T>(), m.empty() ? nullptr : m[l].data_ptr<T>(),
                               l + 1 == L ? nullptr : bwd[l + 1].data_ptr<T>(), bwd[l].data_ptr<T>(), w[l].size(0),
                               w[l].size(1));
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> path_chain_cpu(
    at::TensorList weights, at::TensorList masks, const std::vector<std::optional<at::Tensor>>& biases,
    const at::Tensor& input, int64_t power) {
  const std::vector<int64_t> outs = check_path_chain("path_chain", weights, masks, biases, input, power);
  const size_t L = weights.size();
  std::vector<at::Tensor> w(L), m, bias(L), fwd(L), bwd(L);
  for (size_t l = 0; l < L; ++l) {
    w[l] = weights[l].contiguous();
    if (!masks.empty()) m.push_back(masks[l].contiguous());
    if (biases[l].has_value()) bias[l] = biases[l]->contiguous();
    fwd[l] = at::empty({input.size(0), outs[l]}, input.options());
    bwd[l] = at::empty({weights[l].size(1)}, input.options());
  }
  at::Tensor x = input.contiguous();
  if (!masks.empty() && !at::isfinite(x).all().item<bool>()) {
    // An input feature read only by pruned weights (its column of masks[0] all zero) contributes
    // nothing: zeroed (a copy of the input, made only when it holds a NaN or infinity somewhere),
    // since the first layer's sums would meet it as 0 * inf.
    x = x.masked_fill(m[0].eq(0).all(0), 0);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "path_chain_cpu", [&] {
    if (power == 1) {
      chain_run<scalar_t, 1>(w, m, bias, x, fwd, bwd);
    } else {
      chain_run<scalar_t, 2>(w, m, bias, x, fwd, bwd);
    }
  });
  return {fwd, bwd};
}

// out[i] = |w[i]|^q * mask[i] * g[i] over a flat range; exactly 0 where mask[i] is 0 (a select:
// w or g may be infinite there, and only pruned entries read what G holds from a pruned channel).
template <typename T>
void score_epilogue(const T* w, const T* m, const T* g, T* out, int64_t numel, int64_t q) {
  at::parallel_for(0, numel, 1 << 15, [&](int64_t i0, int64_t i1) {
    if (m == nullptr) {
      for (int64_t i = i0; i < i1; ++i) out[i] = weight_pow(w[i], q) * g[i];
      return;
    }
    for (int64_t i = i0; i < i1; ++i) out[i] = kept_or_zero(m[i] != T(0), weight_pow(w[i], q) * g[i] * m[i]);
  });
}

// Dense, one sample: the outer product b[o] * a[c] fused with the epilogue (G is never formed).
template <typename T>
void score_dense_single(const T* w, const T* m, const T* a, const T* b, T* out, int64_t o_size, int64_t c_size,
                        int64_t q) {
  at::parallel_for(0, o_size, grain_rows(c_size), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T bo = b[o];
      const T* wr = w + o * c_size;
      T* yr = out + o * c_size;
      if (m != nullptr) {
        const T* mr = m + o * c_size;
        for (int64_t c = 0; c < c_size; ++c) {
          yr[c] = kept_or_zero(mr[c] != T(0), weight_pow(wr[c], q) * mr[c] * (bo * a[c]));  // as above
        }
      } else {
        for (int64_t c = 0; c < c_size; ++c) yr[c] = weight_pow(wr[c], q) * (bo * a[c]);
      }
    }
  });
}

// The convolution's weight gradient sum_n b_n (x) patches(a_n), per group: [O, C / groups * kh * kw].
at::Tensor conv_weight_gradient(const at::Tensor& a, const at::Tensor& b, const PathScoreShape& s) {
  const at::Tensor a4 = a.reshape({s.n, s.c, s.h, s.w});
  const int64_t k = s.kh * s.kw, l = s.ho * s.wo, og = s.o / s.groups;
  const at::Tensor cols = at::im2col(a4, {s.kh, s.kw}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw});  // [N, C k, L]
  const at::Tensor b3 = b.reshape({s.n, s.o, l});
  at::Tensor grad = at::empty({s.o, s.cg * k}, a.options());
  for (int64_t gi = 0; gi < s.groups; ++gi) {
    const at::Tensor bg = b3.narrow(1, gi * og, og).transpose(0, 1).reshape({og, s.n * l});
    const at::Tensor cg = cols.narrow(1, gi * s.cg * k, s.cg * k).transpose(1, 2).reshape({s.n * l, s.cg * k});
    at::Tensor dst = grad.narrow(0, gi * og, og);
    at::mm_out(dst, bg, cg);
  }
  return grad;
}

at::Tensor path_score_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& mask, const at::Tensor& a,
                          const at::Tensor& b, int64_t weight_power, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  const PathScoreShape s = check_path_score("path_score", weight, mask, a, b, weight_power, stride, padding, dilation,
                                            groups);
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  if (out.numel() == 0) return out;
  at::Tensor grad;
  if (s.dense && s.n == 1) {
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "path_score_cpu", [&] {
      score_dense_single<scalar_t>(w.data_ptr<scalar_t>(), m.defined() ? m.data_ptr<scalar_t>() : nullptr,
                                   ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s.o,
                                   s.c, weight_power);
    });
    return out;
  }
  if (s.n == 0) {
    grad = at::zeros(weight.sizes(), weight.options());
  } else if (s.dense) {
    grad = at::mm(b.t(), a).contiguous();
  } else {
    grad = conv_weight_gradient(a, b, s);
  }
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "path_score_cpu", [&] {
    score_epilogue<scalar_t>(w.data_ptr<scalar_t>(), m.defined() ? m.data_ptr<scalar_t>() : nullptr,
                             grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out.numel(), weight_power);
  });
  return out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CPU, m) {
  m.impl("path_chain", &ntkfast::path_chain_cpu);
  m.impl("path_score", &ntkfast::path_score_cpu);
}
