// CPU kernels for ntkfast::topk_mask and ntkfast::topk_mask_layerwise.
//
// A radix select over order-preserving integer keys of the float scores, with per-thread
// histograms: 16-bit digits from 2^21 entries on (float32 in at most two passes, float64 in four),
// 11-bit digits below that (histograms that stay in cache). The selection stops early once the
// bucket at the threshold is taken whole (not with drop_ties, which needs the exact threshold).
// The tensors are never concatenated: the work is cut into fixed-size segments that may span any
// tensor, so small and large layers parallelise alike.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "topk_key.h"
#include "topk_prepare.h"

namespace ntkfast {
namespace {

// Digit width of the radix passes: 16 bits (two passes for float32) pays off on large inputs; on
// small ones zeroing and merging 2^16-bucket histograms per thread would dominate, so 11 bits.
constexpr int kWideDigitBits = 16;
constexpr int kNarrowDigitBits = 11;
constexpr int64_t kWideFrom = int64_t{1} << 21;
constexpr int64_t kSegment = int64_t{1} << 16;

struct Segment {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename scalar_t>
struct Problem {
  std::vector<const scalar_t*> x;
  std::vector<const bool*> keep;  // nullptr: every entry may be kept
  std::vector<bool*> out;
  std::vector<int64_t> numel;
};

std::vector<Segment> make_segments(const std::vector<int64_t>& numel, const std::vector<int64_t>& tensors) {
  std::vector<Segment> segs;
  for (int64_t t : tensors) {
    for (int64_t b = 0; b < numel[t]; b += kSegment) {
      segs.push_back({t, b, std::min(numel[t], b + kSegment)});
    }
  }
  return segs;
}

// Keeps the k highest alive entries of the tensors listed in `tensors`; writes every out entry.
// drop_ties: keep the entries strictly above the (k+1)-th highest instead. clamp: k above the
// number alive keeps them all instead of raising.
template <typename scalar_t>
void select_topk(const Problem<scalar_t>& p, const std::vector<int64_t>& tensors, int64_t k, bool drop_ties,
                 bool clamp) {
  using Key = FloatKey<scalar_t>;
  using key_t = typename Key::key_t;
  const std::vector<Segment> segs = make_segments(p.numel, tensors);
  const int64_t nseg = static_cast<int64_t>(segs.size());
  const int nthreads = std::max(1, at::get_num_threads());

  int64_t n_total = 0;
  for (int64_t t : tensors) n_total += p.numel[t];
  const int digit_bits = n_total >= kWideFrom ? kWideDigitBits : kNarrowDigitBits;
  const int64_t buckets = int64_t{1} << digit_bits;
  std::vector<int64_t> hist(static_cast<size_t>(nthreads) * buckets);
  std::vector<int64_t> merged(buckets);
  std::vector<char> seg_has_nan(nseg, 0);

  key_t prefix = 0, prefix_mask = 0;
  int64_t remaining = k;   // how many of the entries matching prefix are still to be kept
  int64_t bucket_count = 0;  // entries matching prefix
  bool whole_bucket = false;

  for (int hi = Key::kBits; hi > 0;) {
    const int width = std::min(digit_bits, hi);
    const int shift = hi - width;
    const key_t digit_mask = (key_t{1} << width) - 1;
    const bool first = hi == Key::kBits;
    hi = shift;
    // zeroing and merging the per-thread histograms run in parallel too: serially they would
    // cost nthreads * buckets per pass, more than the data itself on a many-core machine
    at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
      std::fill(hist.begin() + tb * buckets, hist.begin() + te * buckets, 0);
    });
    at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
      const int tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid < nthreads, "topk_mask: thread id ", tid, " beyond ", nthreads, " histograms");
      int64_t* h = hist.data() + static_cast<size_t>(tid) * buckets;
      for (int64_t s = sb; s < se; ++s) {
        const Segment& seg = segs[s];
        const scalar_t* x = p.x[seg.tensor];
        const bool* kp = p.keep[seg.tensor];
        bool nan = false;
        if (first) {
          // Every entry lands in some bucket: add `alive` (0 or 1) instead of branching on it,
          // since a keep mask of mixed entries would mispredict about every other element.
          for (int64_t i = seg.begin; i < seg.end; ++i) {
            const scalar_t v = x[i];
            const bool alive = !kp || kp[i];
            nan |= alive & (v != v);
            h[(Key::of(v) >> shift) & digit_mask] += alive;
          }
        } else {
          // Few entries share the prefix: one well-predicted branch on both conditions.
          for (int64_t i = seg.begin; i < seg.end; ++i) {
            const key_t key = Key::of(x[i]);
            const bool alive = !kp || kp[i];
            if (((key & prefix_mask) == prefix) & alive) ++h[(key >> shift) & digit_mask];
          }
        }
        if (nan) seg_has_nan[s] = 1;
      }
    });
    at::parallel_for(0, buckets, 2048, [&](int64_t bb, int64_t be) {
      for (int64_t b = bb; b < be; ++b) {
        int64_t sum = 0;
        for (int t = 0; t < nthreads; ++t) sum += hist[static_cast<size_t>(t) * buckets + b];
        merged[b] = sum;
      }
    });
    if (first) {
      for (int64_t s = 0; s < nseg; ++s) {
        TORCH_CHECK_VALUE(!seg_has_nan[s], "topk_mask: scores[", segs[s].tensor, "] contains NaN", kNanHint);
      }
      int64_t alive = 0;
      for (int64_t b = 0; b < buckets; ++b) alive += merged[b];
      if (clamp) k = std::min(k, alive);
      TORCH_CHECK_VALUE(k <= alive, "topk_mask: k=", k, " exceeds the ", alive,
                        " entries that may be kept (keep is True)");
      if (k == 0 || k == alive) {
        const bool all = k == alive;
        at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
          for (int64_t s = sb; s < se; ++s) {
            const Segment& seg = segs[s];
            const bool* kp = p.keep[seg.tensor];
            bool* o = p.out[seg.tensor];
            for (int64_t i = seg.begin; i < seg.end; ++i) o[i] = all && (!kp || kp[i]);
          }
        });
        return;
      }
      // drop_ties selects the (k+1)-th highest exactly, then keeps what lies strictly above it.
      remaining = drop_ties ? k + 1 : k;
    }
    int64_t above = 0;
    int64_t chosen = 0;
    for (int64_t b = static_cast<int64_t>(digit_mask); b >= 0; --b) {
      if (above + merged[b] >= remaining) {
        chosen = b;
        break;
      }
      above += merged[b];
    }
    remaining -= above;
    bucket_count = merged[chosen];
    prefix |= static_cast<key_t>(chosen) << shift;
    prefix_mask |= digit_mask << shift;
    if (bucket_count == remaining && !drop_ties) {
      whole_bucket = true;
      break;
    }
  }

  if (drop_ties) {
    // prefix is now the exact key of the (k+1)-th highest alive entry.
    const key_t thr = prefix;
    at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const Segment& seg = segs[s];
        const scalar_t* x = p.x[seg.tensor];
        const bool* kp = p.keep[seg.tensor];
        bool* o = p.out[seg.tensor];
        for (int64_t i = seg.begin; i < seg.end; ++i) o[i] = (!kp || kp[i]) & (Key::of(x[i]) > thr);
      }
    });
    return;
  }

  if (whole_bucket) {
    // Every entry whose leading bits reach the threshold bucket is kept: no tie to break.
    at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const Segment& seg = segs[s];
        const scalar_t* x = p.x[seg.tensor];
        const bool* kp = p.keep[seg.tensor];
        bool* o = p.out[seg.tensor];
        for (int64_t i = seg.begin; i < seg.end; ++i) {
          o[i] = (!kp || kp[i]) & ((Key::of(x[i]) & prefix_mask) >= prefix);
        }
      }
    });
    return;
  }

  // The threshold key is exact (prefix) and more entries equal it than are to be kept: keep the
  // first `remaining` of them in flat order. Count ties per segment, then scan.
  const key_t thr = prefix;
  std::vector<int64_t> ties(nseg + 1, 0);
  at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
    for (int64_t s = sb; s < se; ++s) {
      const Segment& seg = segs[s];
      const scalar_t* x = p.x[seg.tensor];
      const bool* kp = p.keep[seg.tensor];
      int64_t c = 0;
      for (int64_t i = seg.begin; i < seg.end; ++i) c += (!kp || kp[i]) & (Key::of(x[i]) == thr);
      ties[s + 1] = c;
    }
  });
  for (int64_t s = 0; s < nseg; ++s) ties[s + 1] += ties[s];
  at::parallel_for(0, nseg, 1, [&](int64_t sb, int64_t se) {
    for (int64_t s = sb; s < se; ++s) {
      const Segment& seg = segs[s];
      const scalar_t* x = p.x[seg.tensor];
      const bool* kp = p.keep[seg.tensor];
      bool* o = p.out[seg.tensor];
      int64_t rank = ties[s];
      for (int64_t i = seg.begin; i < seg.end; ++i) {
        bool keepit = false;
        if (!kp || kp[i]) {
          const key_t key = Key::of(x[i]);
          if (key > thr) {
            keepit = true;
          } else if (key == thr) {
            keepit = rank < remaining;
            ++rank;
          }
        }
        o[i] = keepit;
      }
    }
  });
}

using Prepared = TopkPrepared;

Prepared prepare(at::TensorList scores, const std::optional<at::TensorList>& keep) {
  return topk_prepare(scores, keep, at::kCPU);
}

template <typename scalar_t>
Problem<scalar_t> view(Prepared& pr) {
  Problem<scalar_t> p;
  for (size_t i = 0; i < pr.x.size(); ++i) {
    p.x.push_back(pr.x[i].data_ptr<scalar_t>());
    p.keep.push_back(pr.keep.empty() ? nullptr : pr.keep[i].data_ptr<bool>());
    p.out.push_back(pr.out[i].data_ptr<bool>());
    p.numel.push_back(pr.x[i].numel());
  }
  return p;
}

std::vector<at::Tensor> topk_mask_cpu(at::TensorList scores, int64_t k, std::optional<at::TensorList> keep,
                                      bool drop_ties, bool clamp) {
  TORCH_CHECK_VALUE(k >= 0, "topk_mask: k must be >= 0, got ", k);
  Prepared pr = prepare(scores, keep);
  std::vector<int64_t> all(scores.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  AT_DISPATCH_FLOATING_TYPES(pr.x.empty() ? at::kFloat : pr.x[0].scalar_type(), "topk_mask_cpu", [&] {
    auto p = view<scalar_t>(pr);
    select_topk<scalar_t>(p, all, k, drop_ties, clamp);
  });
  return pr.out;
}

std::vector<at::Tensor> topk_mask_layerwise_cpu(at::TensorList scores, at::IntArrayRef ks,
                                                std::optional<at::TensorList> keep, bool drop_ties, bool clamp) {
  TORCH_CHECK_VALUE(ks.size() == scores.size(), "topk_mask_layerwise: ks has ", ks.size(),
                    " entries but scores has ", scores.size());
  for (size_t i = 0; i < ks.size(); ++i) {
    TORCH_CHECK_VALUE(ks[i] >= 0, "topk_mask_layerwise: ks[", i, "] must be >= 0, got ", ks[i]);
  }
  Prepared pr = prepare(scores, keep);
  AT_DISPATCH_FLOATING_TYPES(pr.x.empty() ? at::kFloat : pr.x[0].scalar_type(), "topk_mask_layerwise_cpu", [&] {
    auto p = view<scalar_t>(pr);
    for (size_t i = 0; i < scores.size(); ++i) {
      select_topk<scalar_t>(p, {static_cast<int64_t>(i)}, ks[i], drop_ties, clamp);
    }
  });
  return pr.out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CPU, m) {
  m.impl("topk_mask", &ntkfast::topk_mask_cpu);
  m.impl("topk_mask_layerwise", &ntkfast::topk_mask_layerwise_cpu);
}
