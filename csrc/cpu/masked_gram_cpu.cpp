// CPU kernel of ntkfast::masked_gram (schema and semantics: csrc/ntkfast.cpp):
//   out[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c]
// and its trace / diagonal / diagonal_trace reductions.
//
// The cost is P[i, j, o] = sum_c mask[o, c] a1[i, c] a2[j, c] for every (i, j, o): N1 N2 O C
// multiply-adds, against N1 N2 O K^2 for the contraction with b. P is never held whole: the
// samples i are cut in blocks of IB rows, the samples j in panels of JT (two vectors' lanes), and a
// task (one i-block times a run of panels) computes its slice of P into a per-thread buffer and
// contracts it with b right away. Tasks are handed out through an atomic counter, so threads stay
// busy when the tasks differ in size (the symmetric case below).
//
// P's slice is computed one of two ways:
// - dense mask: per row i, one BLAS product mask [O, C] x (a1[i, c] a2[j, c]) [C, jw] (at::mm_out
//   on views of the thread's buffers: MKL or OpenBLAS, single-threaded inside the parallel region);
// - sparse mask (density below sparse_threshold, which depends on the size; measured): the mask in
//   CSR form by rows o, and a register-blocked micro-kernel (masked_gram_simd.h) that costs nnz
//   instead of O * C per (i, j).
// The contraction with b, and the sparse micro-kernel, vectorise over the j of a panel, with b2
// and a2 repacked once into panels ([panel][..][JT]) so that every load is contiguous. They are
// compiled for AVX-512, AVX2+FMA and baseline SSE2 (GCC on x86-64; one baseline build elsewhere),
// and the best one the CPU has is picked at run time.
//
// When a2 and a1 (and b2 and b1) are the same memory, out[i, j] = out[j, i]^T: only the panels at
// or right of each i-block's diagonal are computed and the rest is mirrored afterwards, about half
// the work.
//
// The diagonal modes need P only at i = j: Pd = (a1 * a2) [N, C] x mask^T, one BLAS product
// (multi-threaded) or, for a sparse mask, the same micro-kernel vectorised over i; then a batched
// BLAS product (diagonal) or one vectorised pass per row (diagonal_trace).
//
// Pruned entries (issue 25): mask[o, c] = 0 contributes nothing, whatever a1, a2, b1, b2 hold. In
// the sums that is automatic for finite values, but a product with a zero mask entry is NaN for an
// infinite one. The values that meet only zero mask entries are a1[:, c], a2[:, c] for a column c
// of the mask that is all zero ("dead") and b1[:, :, o], b2[:, :, o] for a dead row o; they are
// replaced by zeros by selects where they are read or repacked (no products with them remain), at
// no cost when the mask has no dead row or column:
// - a2 and b2 are repacked into panels anyway: dead columns / rows are written as zeros there;
// - a1 (dense path) is read one scalar per column c: selected; the sparse path reads only the
//   columns of nonzero mask entries;
// - b1 rows of a task are copied, dead o zeroed, into a per-thread buffer (K * O per row, against
//   N2 * O * (C + K^2) multiply-adds per row), only when the mask has a dead row;
// - diagonal modes: a1 * a2 is a buffer (dead columns zeroed in it), b1 * Pd too (dead rows
//   zeroed); diagonal_trace selects per o in its vector loop (a blend); diagonal's batched BLAS
//   product reads b2 whole: finite values in its dead rows meet exact zeros in b1 * Pd, and only
//   when the result is not finite and a dead row of b2 is not finite either is the product redone
//   from a copy of b2 with its dead rows zeroed (N * K * O values).
//
// Environment overrides, for tests and measurements: NTKFAST_MASKED_GRAM_PATH=dense|sparse (default:
// by density), NTKFAST_MASKED_GRAM_ISA=base|avx2|avx512 (never above what the CPU has).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../masked_gram_prepare.h"

namespace ntkfast {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NTKFAST_GRAM_MULTI_ISA 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define NTKFAST_GRAM_ISA gram_avx512
#define NTKFAST_GRAM_VBYTES 64
#define NTKFAST_GRAM_IB 8
#define NTKFAST_GRAM_KB 2
#define NTKFAST_GRAM_LB 5
#include "masked_gram_simd.h"
#undef NTKFAST_GRAM_ISA
#undef NTKFAST_GRAM_VBYTES
#undef NTKFAST_GRAM_IB
#undef NTKFAST_GRAM_LB
#undef NTKFAST_GRAM_KB
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NTKFAST_GRAM_ISA gram_avx2
#define NTKFAST_GRAM_VBYTES 32
#define NTKFAST_GRAM_IB 4
#define NTKFAST_GRAM_KB 1
#define NTKFAST_GRAM_LB 4
#include "masked_gram_simd.h"
#undef NTKFAST_GRAM_ISA
#undef NTKFAST_GRAM_VBYTES
#undef NTKFAST_GRAM_IB
#undef NTKFAST_GRAM_LB
#undef NTKFAST_GRAM_KB
#pragma GCC pop_options
#endif

// 16-byte vectors: SSE2 on x86-64, NEON on arm64, split into scalars elsewhere
#define NTKFAST_GRAM_ISA gram_base
#define NTKFAST_GRAM_VBYTES 16
#define NTKFAST_GRAM_IB 4
#define NTKFAST_GRAM_KB 1
#define NTKFAST_GRAM_LB 4
#include "masked_gram_simd.h"
#undef NTKFAST_GRAM_ISA
#undef NTKFAST_GRAM_VBYTES
#undef NTKFAST_GRAM_IB
#undef NTKFAST_GRAM_LB
#undef NTKFAST_GRAM_KB

// Fraction of nonzeros below which the CSR micro-kernel is used instead of the BLAS product.
// Measured (Intel Xeon, Sapphire Rapids, AVX-512, MKL; float32 and float64; N = 128 and 256): for
// (C, O) = (784, 300) the two cross near 0.55-0.65 (float64 first), for (2000, 1000) near 0.4 (the
// micro-kernel's operands no longer fit in L2); for masks of at most 64k entries ((300, 100),
// (100, 10)) the micro-kernel wins at every density, the BLAS product being too small to pay for
// preparing its operand. The diagonal modes need P at i = j only: one multi-threaded BLAS call
// against the micro-kernel at one row per tile, which wins only on sparser masks.
double sparse_threshold(int64_t mask_numel, bool diagonal) {
  if (diagonal) return mask_numel <= (int64_t{1} << 16) ? 0.3 : 0.2;
  if (mask_numel <= (int64_t{1} << 16)) return 1.01;  // always
  return mask_numel <= (int64_t{1} << 19) ? 0.5 : 0.35;
}
// Work (multiply-adds or values moved) below which a loop runs on one thread: waking the others
// costs more, and much more on a busy machine, where a woken thread may wait for a time slice.
constexpr int64_t kSerialWork = int64_t{1} << 15;
// The same for the whole pair computation (tasks are coarse).
constexpr int64_t kSerialWorkPairs = int64_t{1} << 21;
// Values of P held per thread (bounds the j-extent of a task).
constexpr int64_t kPBudget = int64_t{1} << 19;
// Bytes of b2 (one panel, an o-chunk, every l) that the full contraction keeps in L1 across k.
constexpr int64_t kL1Budget = 32 * 1024;

// parallel_for's grain for items of `work` each: at least kSerialWork per chunk
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kSerialWork / std::max<int64_t>(work, 1)); }

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#ifdef NTKFAST_GRAM_MULTI_ISA
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

Isa chosen_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("NTKFAST_MASKED_GRAM_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa isa = best;
  if (want == "base") {
    isa = Isa::kBase;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "avx512") {
    isa = Isa::kAvx512;
  } else {
    TORCH_CHECK_VALUE(false, "NTKFAST_MASKED_GRAM_ISA must be base, avx2 or avx512, got '", want, "'");
  }
  return std::min(isa, best);
}

enum class Path { kAuto, kDense, kSparse };

Path chosen_path() {
  const char* env = std::getenv("NTKFAST_MASKED_GRAM_PATH");
  if (env == nullptr || *env == '\0') return Path::kAuto;
  const std::string want(env);
  if (want == "auto") return Path::kAuto;
  if (want == "dense") return Path::kDense;
  if (want == "sparse") return Path::kSparse;
  TORCH_CHECK_VALUE(false, "NTKFAST_MASKED_GRAM_PATH must be auto, dense or sparse, got '", want, "'");
}

template <typename T>
struct Kernels {
  int64_t lanes;
  int64_t ib;
  void (*sparse_p)(const int64_t*, const int32_t*, const T*, const T*, int64_t, int64_t, int64_t, T*, int64_t,
                   int64_t, int64_t);
  void (*sparse_p1)(const int64_t*, const int32_t*, const T*, const T*, int64_t, int64_t, int64_t, T*, int64_t,
                    int64_t, int64_t);
  void (*trace_rows)(const T*, const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t);
  void (*full_rows)(const T*, const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t, T*,
                    int64_t);
  T (*diag_trace_row)(const T*, const T*, const T*, const T*, int64_t, int64_t);
  void (*scale_rows)(const T*, const T*, int64_t, int64_t, T*);
};

#define NTKFAST_GRAM_TABLE(ns)                                                                          \
  Kernels<T> {                                                                                          \
    ns::Simd<T>::lanes, ns::kIB, &ns::sparse_p<T, ns::kIB>, &ns::sparse_p<T, 1>, &ns::trace_rows<T>, \
        &ns::full_rows<T>, &ns::diag_trace_row<T>, &ns::scale_rows<T>                                   \
  }

template <typename T>
Kernels<T> kernels_for(Isa isa) {
#ifdef NTKFAST_GRAM_MULTI_ISA
  if (isa == Isa::kAvx512) return NTKFAST_GRAM_TABLE(gram_avx512);
  if (isa == Isa::kAvx2) return NTKFAST_GRAM_TABLE(gram_avx2);
#endif
  (void)isa;
  return NTKFAST_GRAM_TABLE(gram_base);
}

// The mask by rows o: the columns and values of its nonzeros.
template <typename T>
struct Csr {
  std::vector<int64_t> rowptr;
  std::vector<int32_t> col;
  std::vector<T> val;
};

template <typename T>
Csr<T> to_csr(const T* mask, int64_t o_count, int64_t c, int64_t nnz) {
  Csr<T> csr;
  csr.rowptr.assign(o_count + 1, 0);
  // every entry is written and the cursor advances on nonzeros only: no branch to mispredict on a
  // random mask (hence one spare slot)
  csr.col.resize(static_cast<size_t>(nnz + 1));
  csr.val.resize(static_cast<size_t>(nnz + 1));
  int64_t w = 0;
  for (int64_t o = 0; o < o_count; ++o) {
    const T* row = mask + o * c;
    for (int64_t cc = 0; cc < c; ++cc) {
      csr.col[w] = static_cast<int32_t>(cc);
      csr.val[w] = row[cc];
      w += row[cc] != T(0);
    }
    csr.rowptr[o + 1] = w;
  }
  csr.col.resize(static_cast<size_t>(w));
  csr.val.resize(static_cast<size_t>(w));
  return csr;
}

// A buffer left uninitialised (std::vector would zero it first).
template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// The mask's nonzeros, and which of its columns and rows hold any (live_c [C], live_o [O], 1 where
// they do). One pass; the flags are computed without branches, as count_nonzero was.
struct MaskScan {
  int64_t nnz = 0;
  std::vector<uint8_t> live_c, live_o;
  bool dead_c = false, dead_o = false;  // some column / row is all zero
};

// One row: its nonzeros, OR-ed into live_c. __restrict: live_c is bytes, which may alias anything,
// and without it the loop would reload the row after every store instead of being vectorised.
template <typename T>
int64_t scan_row(const T* __restrict row, uint8_t* __restrict live_c, int64_t c) {
  int64_t nz = 0;
  for (int64_t cc = 0; cc < c; ++cc) {
    const bool live = row[cc] != T(0);
    nz += live;
    live_c[cc] |= static_cast<uint8_t>(live);
  }
  return nz;
}

template <typename T>
MaskScan scan_mask(const T* mask, int64_t o_count, int64_t c) {
  MaskScan sc;
  sc.live_c.assign(static_cast<size_t>(c), 0);
  sc.live_o.assign(static_cast<size_t>(o_count), 0);
  for (int64_t o = 0; o < o_count; ++o) {
    const int64_t nz = scan_row(mask + o * c, sc.live_c.data(), c);
    sc.live_o[o] = nz != 0;
    sc.nnz += nz;
  }
  sc.dead_c = std::find(sc.live_c.begin(), sc.live_c.end(), 0) != sc.live_c.end();
  sc.dead_o = std::find(sc.live_o.begin(), sc.live_o.end(), 0) != sc.live_o.end();
  return sc;
}

// XP[(p * C + c) * JT + q] = x[(p * JT + q) * C + c], zero past n rows: x [n, C] transposed in panels.
// keep (nullptr: all): columns c with keep[c] == 0 are written as zeros, whatever x holds there.
template <typename T>
std::unique_ptr<T[]> panels_of_rows(const T* x, int64_t n, int64_t c, int64_t jt, const uint8_t* keep = nullptr) {
  const int64_t npan = (n + jt - 1) / jt;
  std::unique_ptr<T[]> xp = buffer<T>(npan * c * jt);
  at::parallel_for(0, npan, grain_for(c * jt), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      // writes in order; the reads walk JT rows side by side, a cache line of each at a time
      const int64_t rows = std::min(jt, n - p * jt);
      const T* src = x + p * jt * c;
      T* dst = xp.get() + p * c * jt;
      for (int64_t cc = 0; cc < c; ++cc) {
        const int64_t copied = keep == nullptr || keep[cc] ? rows : 0;
        for (int64_t q = 0; q < copied; ++q) dst[cc * jt + q] = src[q * c + cc];
        for (int64_t q = copied; q < jt; ++q) dst[cc * jt + q] = T(0);
      }
    }
  });
  return xp;
}

struct Task {
  int64_t iblock, p0, p1;
};

template <typename T>
struct Problem {
  const T* a1;
  const T* b1;
  const T* a2;
  const T* b2;
  const T* mask;
  at::Tensor mask_t;  // mask and b2 as tensors, for the BLAS calls
  at::Tensor b2_t;
  int64_t n1, n2, c, k, o;
  // 1 for the mask's columns / rows with a nonzero; nullptr when there is no dead one
  const uint8_t* live_c;
  const uint8_t* live_o;
};

// full and trace
template <typename T>
void gram_pairs(const Problem<T>& pr, const Kernels<T>& kn, bool sparse, int64_t nnz_mask, bool sym, bool full,
                T* out) {
  const int64_t jt = 2 * kn.lanes, ib = kn.ib;
  const int64_t n1 = pr.n1, n2 = pr.n2, c = pr.c, kc = pr.k, oc = pr.o;
  const int64_t npan = (n2 + jt - 1) / jt;
  // dead columns of a2 and dead rows of b2 are repacked as zeros (see the top of the file)
  std::vector<uint8_t> live_ko;
  if (pr.live_o != nullptr) {
    live_ko.resize(static_cast<size_t>(kc * oc));
    for (int64_t k = 0; k < kc; ++k) std::copy(pr.live_o, pr.live_o + oc, live_ko.begin() + k * oc);
  }
  const std::unique_ptr<T[]> xp = panels_of_rows(pr.a2, n2, c, jt, pr.live_c);
  const std::unique_ptr<T[]> b2p =
      panels_of_rows(pr.b2, n2, kc * oc, jt, live_ko.empty() ? nullptr : live_ko.data());  // [panel][K * O][JT]
  Csr<T> csr;
  if (sparse) csr = to_csr(pr.mask, oc, c, nnz_mask);
  const int64_t nnz = sparse ? static_cast<int64_t>(csr.col.size()) : 0;

  // panels per task: as many as kPBudget allows, split evenly
  const int64_t pb_max = std::clamp<int64_t>(kPBudget / std::max<int64_t>(ib * oc * jt, 1), 1, npan);
  std::vector<Task> tasks;
  const int64_t nib = (n1 + ib - 1) / ib;
  for (int64_t b = 0; b < nib; ++b) {
    const int64_t first = sym ? (b * ib) / jt : 0;
    const int64_t span = npan - first;
    if (span <= 0) continue;
    const int64_t pieces = (span + pb_max - 1) / pb_max;
    for (int64_t q = 0; q < pieces; ++q) {
      tasks.push_back({b, first + span * q / pieces, first + span * (q + 1) / pieces});
    }
  }
  // the largest first, so that the dynamic hand-out ends with small ones
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.p1 - x.p0 > y.p1 - y.p0; });
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int64_t pb = pb_max;
  const int64_t jw_max = pb * jt;
  // dense P rows: an odd number of cache lines apart, so that walking o does not hit one L1 set
  const int64_t line = std::max<int64_t>(64 / static_cast<int64_t>(sizeof(T)), 1);
  const int64_t ldp = ((jw_max / line) % 2 == 0) ? jw_max + line : jw_max;
  const int64_t o_chunk = std::max<int64_t>(4, kL1Budget / std::max<int64_t>(kc * jt * sizeof(T), 1));
  const at::Tensor mask_t = pr.mask_t;

  const int64_t work = n1 * n2 * ((sparse ? nnz : oc * c) + oc * kc * (full ? kc : 1));
  const int64_t workers = work < kSerialWorkPairs ? 1 : std::clamp<int64_t>(at::get_num_threads(), 1, ntasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const std::unique_ptr<T[]> pbuf = buffer<T>(ib * oc * ldp);
    const std::unique_ptr<T[]> xt = buffer<T>(sparse ? 0 : c * jw_max);
    const std::unique_ptr<T[]> s = buffer<T>(sparse ? nnz * ib : 0);
    const std::unique_ptr<T[]> at_blk = buffer<T>(sparse ? c * ib : 0);
    const std::unique_ptr<T[]> acc = buffer<T>(full ? jt * kc * kc : 0);
    const std::unique_ptr<T[]> b1_live = buffer<T>(pr.live_o != nullptr ? ib * kc * oc : 0);
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
      const Task task = tasks[t];
      const int64_t i0 = task.iblock * ib, ni = std::min(ib, n1 - i0);
      const int64_t panels = task.p1 - task.p0, jw = panels * jt, j0 = task.p0 * jt;
      // the block's rows of b1 (row ii at b1_rows + ii * K * O), dead o zeroed when there are any
      const T* b1_rows = pr.b1 + i0 * kc * oc;
      if (pr.live_o != nullptr) {
        for (int64_t e = 0; e < ni * kc; ++e) {
          const T* src = b1_rows + e * oc;
          T* dst = b1_live.get() + e * oc;
          for (int64_t o = 0; o < oc; ++o) {
            const T v = src[o];  // loaded unconditionally, so that the select can be a blend
            dst[o] = pr.live_o[o] ? v : T(0);
          }
        }
        b1_rows = b1_live.get();
      }
      int64_t p_ii, p_o, p_panel;
      if (sparse) {
        for (int64_t ii = 0; ii < ib; ++ii) {  // the block's rows of a1, transposed (zero past N1)
          for (int64_t cc = 0; cc < c; ++cc) at_blk[cc * ib + ii] = ii < ni ? pr.a1[(i0 + ii) * c + cc] : T(0);
        }
        for (int64_t e = 0; e < nnz; ++e) {
          const T* a = at_blk.get() + static_cast<int64_t>(csr.col[e]) * ib;
          const T v = csr.val[e];
          for (int64_t ii = 0; ii < ib; ++ii) s[e * ib + ii] = v * a[ii];
        }
        p_o = jt;
        p_panel = oc * jt;
        p_ii = panels * oc * jt;
        kn.sparse_p(csr.rowptr.data(), csr.col.data(), s.get(), xp.get() + task.p0 * c * jt, c, oc, panels,
                    pbuf.get(), p_ii, p_o, p_panel);
      } else {
        p_o = ldp;
        p_panel = jt;
        p_ii = oc * ldp;
        const at::Tensor xt_t = at::from_blob(xt.get(), {c, jw}, opts);
        for (int64_t ii = 0; ii < ni; ++ii) {
          const T* a = pr.a1 + (i0 + ii) * c;
          for (int64_t cc = 0; cc < c; ++cc) {
            // a dead column: 0 (a select), so that the row of X is 0 * 0, whatever a1 holds
            const T scale = pr.live_c == nullptr || pr.live_c[cc] ? a[cc] : T(0);
            T* dst = xt.get() + cc * jw;
            for (int64_t p = 0; p < panels; ++p) {
              const T* src = xp.get() + ((task.p0 + p) * c + cc) * jt;
              for (int64_t q = 0; q < jt; ++q) dst[p * jt + q] = scale * src[q];
            }
          }
          at::Tensor p_t = at::from_blob(pbuf.get() + ii * p_ii, {oc, jw}, {ldp, 1}, opts);
          at::mm_out(p_t, mask_t, xt_t);
        }
      }
      // panel by panel, all rows of the block: the panel's slice of b2 is reused from cache
      for (int64_t p = 0; p < panels; ++p) {
        const T* bp = b2p.get() + (task.p0 + p) * kc * oc * jt;
        const int64_t jcount = std::min(jt, n2 - (j0 + p * jt));
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t i = i0 + ii;
          const T* pp = pbuf.get() + ii * p_ii + p * p_panel;
          const T* b1i = b1_rows + ii * kc * oc;
          if (full) {
            kn.full_rows(b1i, pp, p_o, p_panel, bp, kc, oc, 1, out + (i * n2 + j0 + p * jt) * kc * kc, jcount,
                         acc.get(), o_chunk);
          } else {
            kn.trace_rows(b1i, pp, p_o, p_panel, bp, kc, oc, 1, out + i * n2 + j0 + p * jt, jcount);
          }
        }
      }
    }
  });

  if (sym) {  // out[i, j] for j < i from out[j, i], computed above (row j covers every column >= j);
              // the diagonal blocks' lower triangles from their upper ones: exactly symmetric
    const int64_t kk = full ? kc * kc : 1;
    at::parallel_for(0, n1, grain_for(n2 * kk), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (full) {
          T* d = out + (i * n2 + i) * kk;
          for (int64_t k = 1; k < kc; ++k) {
            for (int64_t l = 0; l < k; ++l) d[k * kc + l] = d[l * kc + k];
          }
        }
        for (int64_t j = 0; j < i; ++j) {
          T* dst = out + (i * n2 + j) * kk;
          const T* src = out + (j * n2 + i) * kk;
          if (!full) {
            *dst = *src;
            continue;
          }
          for (int64_t k = 0; k < kc; ++k) {
            for (int64_t l = 0; l < kc; ++l) dst[k * kc + l] = src[l * kc + k];
          }
        }
      }
    });
  }
}

// diagonal and diagonal_trace
template <typename T>
void gram_diagonal(const Problem<T>& pr, const Kernels<T>& kn, bool sparse, int64_t nnz_mask, bool full, T* out) {
  const int64_t n = pr.n1, c = pr.c, kc = pr.k, oc = pr.o;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // dead columns and rows, by index: zeroed in the buffers below
  std::vector<int64_t> dead_cols, dead_rows;
  for (int64_t cc = 0; pr.live_c != nullptr && cc < c; ++cc) {
    if (!pr.live_c[cc]) dead_cols.push_back(cc);
  }
  for (int64_t o = 0; pr.live_o != nullptr && o < oc; ++o) {
    if (!pr.live_o[o]) dead_rows.push_back(o);
  }
  const std::unique_ptr<T[]> x = buffer<T>(n * c);
  at::parallel_for(0, n, grain_for(c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      kn.scale_rows(pr.a1 + i * c, pr.a2 + i * c, 1, c, x.get() + i * c);
      for (const int64_t cc : dead_cols) x[i * c + cc] = T(0);
    }
  });
  const std::unique_ptr<T[]> pd = buffer<T>(n * oc);  // Pd[i, o] = P[i, i, o]
  if (!sparse) {
    at::Tensor pd_t = at::from_blob(pd.get(), {n, oc}, opts);
    at::mm_out(pd_t, at::from_blob(x.get(), {n, c}, opts), pr.mask_t.t());
  } else {
    const int64_t jt = 2 * kn.lanes;
    const int64_t npan = (n + jt - 1) / jt;
    const std::unique_ptr<T[]> xp = panels_of_rows(x.get(), n, c, jt);
    const Csr<T> csr = to_csr(pr.mask, oc, c, nnz_mask);
    const int64_t grain = grain_for(static_cast<int64_t>(csr.col.size()) * jt);
    at::parallel_for(0, npan, grain, [&](int64_t begin, int64_t end) {
      const std::unique_ptr<T[]> tile = buffer<T>(oc * jt);
      for (int64_t p = begin; p < end; ++p) {
        kn.sparse_p1(csr.rowptr.data(), csr.col.data(), csr.val.data(), xp.get() + p * c * jt, c, oc, 1, tile.get(),
                     0, jt, 0);
        for (int64_t q = 0; q < jt && p * jt + q < n; ++q) {
          T* dst = pd.get() + (p * jt + q) * oc;
          for (int64_t o = 0; o < oc; ++o) dst[o] = tile[o * jt + q];
        }
      }
    });
  }
  if (full) {  // out[i] = (b1[i] * Pd[i]) b2[i]^T: a batch of small products, which BLAS does best
    const std::unique_ptr<T[]> r = buffer<T>(n * kc * oc);
    at::parallel_for(0, n, grain_for(kc * oc), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* ri = r.get() + i * kc * oc;
        kn.scale_rows(pr.b1 + i * kc * oc, pd.get() + i * oc, kc, oc, ri);
        for (int64_t k = 0; k < kc; ++k) {
          for (const int64_t o : dead_rows) ri[k * oc + o] = T(0);
        }
      }
    });
    // BLAS reads b2 whole, dead rows included, against r's zeros there: exact zeros as long as what
    // b2 holds there is finite. Checked after the fact, on the output (n * K * K values, contiguous):
    // only if it is not finite are b2's dead rows looked at, and only if one of those is not finite
    // is the product redone from a copy of b2 with its dead rows zeroed (selected). Measured: a copy
    // made whenever a row was dead about doubled this mode's time, a scan of b2's dead rows up
    // front added some 15%; this check costs nothing measurable.
    at::Tensor out_t = at::from_blob(out, {n, kc, kc}, opts);
    const at::Tensor r_t = at::from_blob(r.get(), {n, kc, oc}, opts);
    at::bmm_out(out_t, r_t, pr.b2_t.transpose(1, 2));
    if (dead_rows.empty() || std::all_of(out, out + n * kc * kc, [](T v) { return std::isfinite(v); })) return;
    bool dead_non_finite = false;
    for (int64_t row = 0; row < n * kc && !dead_non_finite; ++row) {
      for (const int64_t o : dead_rows) dead_non_finite |= !std::isfinite(pr.b2[row * oc + o]);
    }
    if (!dead_non_finite) return;  // the inputs the mask keeps are not finite: so is the result
    at::Tensor b2_t = at::empty_like(pr.b2_t);
    T* dst = b2_t.data_ptr<T>();
    const uint8_t* live_o = pr.live_o;
    at::parallel_for(0, n * kc, grain_for(oc), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* src = pr.b2 + row * oc;
        T* d = dst + row * oc;
        for (int64_t o = 0; o < oc; ++o) {
          const T v = src[o];  // loaded unconditionally, so that the select can be a blend
          d[o] = live_o[o] ? v : T(0);
        }
      }
    });
    at::bmm_out(out_t, r_t, b2_t.transpose(1, 2));
    return;
  }
  // live as a T-valued 0/1 vector, for the vector loop's select
  std::vector<T> live_t;
  if (!dead_rows.empty()) live_t.assign(pr.live_o, pr.live_o + oc);
  const T* live = live_t.empty() ? nullptr : live_t.data();
  at::parallel_for(0, n, grain_for(kc * oc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = kn.diag_trace_row(pr.b1 + i * kc * oc, pr.b2 + i * kc * oc, pd.get() + i * oc, live, kc, oc);
    }
  });
}

at::Tensor masked_gram_cpu(const at::Tensor& a1, const at::Tensor& b1, const at::Tensor& a2, const at::Tensor& b2,
                           const at::Tensor& mask, c10::string_view mode) {
  const char* op = "masked_gram";
  const GramSizes sz = check_masked_gram(op, a1, b1, a2, b2, mask, mode);
  at::Tensor out = at::empty(gram_out_shape(sz), a1.options());
  if (out.numel() == 0) return out;
  if (sz.c == 0 || sz.o == 0) return out.zero_();
  TORCH_CHECK_VALUE(sz.c <= INT32_MAX, op, ": C = ", sz.c, " is too large (at most 2**31 - 1)");
  const bool sym = gram_same_view(a1, a2) && gram_same_view(b1, b2);
  const at::Tensor a1c = a1.contiguous(), b1c = b1.contiguous(), mc = mask.contiguous();
  const at::Tensor a2c = sym ? a1c : a2.contiguous();
  const at::Tensor b2c = sym ? b1c : b2.contiguous();
  const bool diagonal = gram_is_diagonal(sz.mode);
  const bool full = sz.mode == GramMode::kFull || sz.mode == GramMode::kDiagonal;
  const Path path = chosen_path();
  const Isa isa = chosen_isa();
  AT_DISPATCH_FLOATING_TYPES(a1.scalar_type(), "masked_gram_cpu", [&] {
    using T = scalar_t;
    const MaskScan scan = scan_mask(mc.data_ptr<T>(), sz.o, sz.c);
    const Problem<T> pr{a1c.data_ptr<T>(),
                        b1c.data_ptr<T>(),
                        a2c.data_ptr<T>(),
                        b2c.data_ptr<T>(),
                        mc.data_ptr<T>(),
                        mc,
                        b2c,
                        sz.n1,
                        sz.n2,
                        sz.c,
                        sz.k,
                        sz.o,
                        scan.dead_c ? scan.live_c.data() : nullptr,
                        scan.dead_o ? scan.live_o.data() : nullptr};
    const int64_t nnz = scan.nnz;
    if (nnz == 0) {  // every entry pruned: exactly 0, whatever the inputs hold
      out.zero_();
      return;
    }
    const double density = static_cast<double>(nnz) / static_cast<double>(sz.o * sz.c);
    const bool sparse =
        path == Path::kSparse || (path == Path::kAuto && density < sparse_threshold(sz.o * sz.c, diagonal));
    const Kernels<T> kn = kernels_for<T>(isa);
    T* o = out.data_ptr<T>();
    if (diagonal) {
      gram_diagonal(pr, kn, sparse, nnz, full, o);
    } else {
      gram_pairs(pr, kn, sparse, nnz, sym, full, o);
    }
  });
  return out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CPU, m) { m.impl("masked_gram", &ntkfast::masked_gram_cpu); }
