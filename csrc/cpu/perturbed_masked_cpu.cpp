// CPU kernels for ntkfast::philox_normal, ntkfast::perturbed_masked and
// ntkfast::perturbed_masked_backward (schemas and semantics: csrc/ntkfast.cpp; the random stream:
// csrc/philox.h).
//
// Every loop walks the stream in order from where its chunk starts, so each Philox block is
// computed once per chunk. Arithmetic follows the reference (ntkfast/_ops.py) operation by
// operation: in float for float16/bfloat16/float32 and in double for float64, rounded to the
// tensor dtype after each operation the reference performs in that dtype (round_to), so that the
// kernel and the reference differ only where libm and torch's own log/sin/cos differ. That also
// needs w + eps * xi not to be contracted into an fma: GCC contracts only in GNU mode (setup.py
// builds with -std=c++17), and clang only within one expression (round_to splits them).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../perturbed_masked_prepare.h"
#include "../philox.h"
#include "../select.h"

namespace ntkfast {
namespace {

constexpr int64_t kGrain = 4096;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename A>
inline A round_to(A x) {
  return static_cast<A>(static_cast<T>(x));
}

// Normal numbers j, j + 1, ... of one seed, in order.
template <typename A>
class NormalStream {
 public:
  NormalStream(uint64_t seed, uint64_t j) : seed_(seed), block_(j >> 2), lane_(static_cast<int>(j & 3)) { fill(); }

  A next() {
    if (lane_ == 4) {
      ++block_;
      lane_ = 0;
      fill();
    }
    return z_[lane_++];
  }

 private:
  void fill() {
    const PhiloxWords x = philox_block(seed_, block_);
    philox_box_muller(x.w[0], x.w[1], &z_[0], &z_[1]);
    philox_box_muller(x.w[2], x.w[3], &z_[2], &z_[3]);
  }

  uint64_t seed_;
  uint64_t block_;
  int lane_;
  A z_[4];
};

struct StreamStart {
  uint64_t seed;
  uint64_t offset;
};

StreamStart read_philox(const char* op, const at::Tensor& philox) {
  const auto a = philox.accessor<int64_t, 1>();
  TORCH_CHECK_VALUE(a[1] >= 0, op, ": the offset (philox[1]) must be >= 0, got ", a[1]);
  return {static_cast<uint64_t>(a[0]), static_cast<uint64_t>(a[1])};
}

at::Tensor philox_normal_cpu(const at::Tensor& philox, at::IntArrayRef size, at::ScalarType dtype) {
  const char* op = "philox_normal";
  check_floating(op, dtype, "dtype");
  check_size(op, size);
  check_philox(op, philox, philox.device());
  const StreamStart s = read_philox(op, philox);
  at::Tensor out = at::empty(size, philox.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_normal_cpu", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      NormalStream<A> z(s.seed, s.offset + static_cast<uint64_t>(begin));
      for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>(z.next());
    });
  });
  return out;
}

at::Tensor perturbed_masked_cpu(const at::Tensor& weight, const at::Tensor& mask, double epsilon,
                                const at::Tensor& philox) {
  const char* op = "perturbed_masked";
  const PerturbedSizes sz = check_perturbed(op, weight, mask, epsilon, philox);
  const StreamStart s = read_philox(op, philox);
  at::Tensor out = at::empty(perturbed_out_shape(weight), weight.options());
  if (sz.numel == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "perturbed_masked_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* clean = out.data_ptr<scalar_t>();
    scalar_t* noisy = clean + sz.numel;
    const A eps = static_cast<A>(epsilon);
    at::parallel_for(0, sz.numel, kGrain, [&](int64_t begin, int64_t end) {
      NormalStream<A> z(s.seed, s.offset + static_cast<uint64_t>(begin));
      int64_t k = begin % sz.mask_numel;
      for (int64_t i = begin; i < end; ++i) {
        const A wi = static_cast<A>(wp[i]);
        const A mk = static_cast<A>(mp[k]);
        const A xi = round_to<scalar_t>(z.next());
        const A shifted = round_to<scalar_t>(wi + round_to<scalar_t>(eps * xi));
        // selects, not products: a weight under a zero mask entry gives exactly 0 whatever it
        // holds (inf * 0 would be NaN); kept_or_zero: ../select.h
        const bool kept = mk != A(0);
        clean[i] = static_cast<scalar_t>(kept_or_zero(kept, wi * mk));
        noisy[i] = static_cast<scalar_t>(kept_or_zero(kept, shifted * mk));
        if (++k == sz.mask_numel) k = 0;
      }
    });
  });
  return out;
}

// One pass over grad: each chunk of mask entries walks the leading draws in order, so grad_mask
// sums over them in a fixed order (p = 0, 1, ...) whatever the thread count. grad_mask is the
// product's derivative everywhere, pruned entries included (what un-pruning would change: it
// depends on the weight there); grad_weight is exactly 0 under a zero mask entry.
std::tuple<at::Tensor, at::Tensor> perturbed_masked_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                                                 const at::Tensor& mask, double epsilon,
                                                                 const at::Tensor& philox,
                                                                 std::array<bool, 2> output_mask) {
  const char* op = "perturbed_masked_backward";
  const PerturbedSizes sz = check_perturbed_backward(op, grad, weight, mask, epsilon, philox);
  const StreamStart s = read_philox(op, philox);
  const bool need_w = output_mask[0];
  const bool need_m = output_mask[1];
  at::Tensor grad_weight = at::empty(need_w ? weight.sizes() : at::IntArrayRef{0}, weight.options());
  at::Tensor grad_mask = at::empty(need_m ? mask.sizes() : at::IntArrayRef{0}, mask.options());
  if (sz.mask_numel == 0 || !(need_w || need_m)) return {grad_weight, grad_mask};
  const int64_t draws = sz.numel / sz.mask_numel;
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "perturbed_masked_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* g0 = g.data_ptr<scalar_t>();
    const scalar_t* g1 = g0 + sz.numel;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* gw = need_w ? grad_weight.data_ptr<scalar_t>() : nullptr;
    scalar_t* gm = need_m ? grad_mask.data_ptr<scalar_t>() : nullptr;
    const A eps = static_cast<A>(epsilon);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(draws, 1));
    at::parallel_for(0, sz.mask_numel, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> sum(need_m ? end - begin : 0, A(0));
      for (int64_t p = 0; p < draws; ++p) {
        const int64_t base = p * sz.mask_numel;
        if (need_w) {
          for (int64_t k = begin; k < end; ++k) {
            const int64_t i = base + k;
            const A both = round_to<scalar_t>(static_cast<A>(g0[i]) + static_cast<A>(g1[i]));
            const A mk = static_cast<A>(mp[k]);
            // exactly 0 under a zero mask entry (the output there is a constant 0), whatever grad
            // holds; a select that keeps the loop vectorised (../select.h)
            gw[i] = static_cast<scalar_t>(kept_or_zero(mk != A(0), both * mk));
          }
        }
        if (need_m) {
          NormalStream<A> z(s.seed, s.offset + static_cast<uint64_t>(base + begin));
          for (int64_t k = begin; k < end; ++k) {
            const int64_t i = base + k;
            const A wi = static_cast<A>(wp[i]);
            const A xi = round_to<scalar_t>(z.next());
            const A shifted = round_to<scalar_t>(wi + round_to<scalar_t>(eps * xi));
            const A clean_part = static_cast<A>(g0[i]) * wi;
            const A noisy_part = static_cast<A>(g1[i]) * shifted;
            sum[k - begin] += clean_part + noisy_part;
          }
        }
      }
      for (int64_t k = begin; need_m && k < end; ++k) gm[k] = static_cast<scalar_t>(sum[k - begin]);
    });
  });
  return {grad_weight, grad_mask};
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CPU, m) {
  m.impl("philox_normal", &ntkfast::philox_normal_cpu);
  m.impl("perturbed_masked", &ntkfast::perturbed_masked_cpu);
  m.impl("perturbed_masked_backward", &ntkfast::perturbed_masked_backward_cpu);
}
