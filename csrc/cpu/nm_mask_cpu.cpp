// CPU kernel for ntkfast::nm_mask: in every group of m consecutive entries along the last dimension,
// keep the n highest scores that keep allows.
//
// An entry's rank is the number of keepable entries of its group that beat it: a higher key, or the
// same key at a lower index (the reference's stable sort). It is kept iff it is keepable and its
// rank is below n, so a group with fewer than n keepable entries keeps all of them, and the result
// never depends on how the groups are split among threads. Up to kRankMax entries per group the
// ranks are counted pair by pair: m - 1 integer compares per entry, no branch on the data, the loops
// unrolled for m = 2, 4, 8 and 16 (the patterns sparse tensor cores and the literature use). Above it
// that would cost O(m^2) per group; a partial selection (std::nth_element) costs O(m).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "nm_mask_prepare.h"
#include "topk_key.h"

namespace ntkfast {
namespace {

constexpr int64_t kRankMax = 32;
// entries per parallel task: enough that a task outweighs its scheduling, few enough that the
// smallest layers still split over a few threads
constexpr int64_t kGrainEntries = int64_t{1} << 14;

// Groups [g0, g1). kM > 0: m is kM, known to the compiler; kM == 0: m is m_rt (at most kRankMax).
// Returns whether a keepable entry is NaN (the caller raises; the masks written are then unused).
template <typename scalar_t, int kM>
bool groups_by_rank(const scalar_t* x, const bool* kp, bool* out, int64_t g0, int64_t g1, int64_t m_rt, int64_t n) {
  using Key = FloatKey<scalar_t>;
  using key_t = typename Key::key_t;
  constexpr int64_t kCap = kM > 0 ? kM : kRankMax;
  const int64_t m = kM > 0 ? kM : m_rt;
  key_t key[kCap];
  bool alive[kCap];
  bool nan = false;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * m;
    for (int64_t i = 0; i < m; ++i) {
      const scalar_t v = x[base + i];
      alive[i] = !kp || kp[base + i];
      nan |= alive[i] & (v != v);
      key[i] = Key::of(v);
    }
    for (int64_t i = 0; i < m; ++i) {
      int64_t rank = 0;
      for (int64_t j = 0; j < i; ++j) rank += alive[j] & (key[j] >= key[i]);  // ties: the lower index wins
      for (int64_t j = i + 1; j < m; ++j) rank += alive[j] & (key[j] > key[i]);
      out[base + i] = alive[i] & (rank < n);
    }
  }
  return nan;
}

template <typename scalar_t>
bool groups_by_selection(const scalar_t* x, const bool* kp, bool* out, int64_t g0, int64_t g1, int64_t m, int64_t n) {
  using Key = FloatKey<scalar_t>;
  using key_t = typename Key::key_t;
  using Entry = std::pair<key_t, int64_t>;  // (key, index in the group)
  std::vector<Entry> cand;
  cand.reserve(static_cast<size_t>(m));
  // a strict total order (indices differ), so the first n after nth_element are exactly the top n
  const auto better = [](const Entry& a, const Entry& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  bool nan = false;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * m;
    cand.clear();
    for (int64_t i = 0; i < m; ++i) {
      out[base + i] = false;
      if (kp && !kp[base + i]) continue;
      const scalar_t v = x[base + i];
      nan |= v != v;
      cand.emplace_back(Key::of(v), i);
    }
    const int64_t take = std::min<int64_t>(n, static_cast<int64_t>(cand.size()));
    if (take < static_cast<int64_t>(cand.size())) {
      std::nth_element(cand.begin(), cand.begin() + (take - 1), cand.end(), better);
    }
    for (int64_t r = 0; r < take; ++r) out[base + cand[r].second] = true;
  }
  return nan;
}

at::Tensor nm_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m, const std::optional<at::Tensor>& keep) {
  NmPrepared pr = nm_prepare(scores, n, m, keep, at::kCPU);
  const int64_t groups = pr.x.numel() / m;
  if (groups == 0) return pr.out;
  std::atomic<bool> any_nan{false};
  AT_DISPATCH_FLOATING_TYPES(pr.x.scalar_type(), "nm_mask_cpu", [&] {
    const scalar_t* x = pr.x.data_ptr<scalar_t>();
    const bool* kp = pr.keep.defined() ? pr.keep.data_ptr<bool>() : nullptr;
    bool* o = pr.out.data_ptr<bool>();
    const int64_t grain = std::max<int64_t>(1, kGrainEntries / m);
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      bool nan = false;
      switch (m) {
        case 2: nan = groups_by_rank<scalar_t, 2>(x, kp, o, g0, g1, m, n); break;
        case 4: nan = groups_by_rank<scalar_t, 4>(x, kp, o, g0, g1, m, n); break;
        case 8: nan = groups_by_rank<scalar_t, 8>(x, kp, o, g0, g1, m, n); break;
        case 16: nan = groups_by_rank<scalar_t, 16>(x, kp, o, g0, g1, m, n); break;
        default:
          nan = m <= kRankMax ? groups_by_rank<scalar_t, 0>(x, kp, o, g0, g1, m, n)
                              : groups_by_selection<scalar_t>(x, kp, o, g0, g1, m, n);
      }
      if (nan) any_nan.store(true, std::memory_order_relaxed);
    });
  });
  TORCH_CHECK_VALUE(!any_nan.load(), "nm_mask: scores contains NaN", kNanHint);
  return pr.out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CPU, m) {
  m.impl("nm_mask", &ntkfast::nm_mask_cpu);
}
