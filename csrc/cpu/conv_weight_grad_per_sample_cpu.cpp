// CPU kernel for ntkfast::conv_weight_grad_per_sample (schema and semantics: csrc/ntkfast.cpp).
//
// For one sample n and one group, the output is a small matrix product over the Ho * Wo positions:
//   out[(k, o), (c, r, s)] = sum_l go[(k, o), l] * patch[l, (c, r, s)],
// where patch is the im2col matrix of the sample, which is never built whole. A task (a sample, a
// group, a block of rows and a block of columns) walks the positions in tiles of kc:
//   b: for each tile, the task's patch columns are gathered from the input (zero-padded first, a
//      copy of only the channels it needs, so that the gather has no bounds checks) into panels of
//      [kc][NR], NR columns per position; kc is chosen so that such a panel stays in L1 (the
//      implicit im2col: kc * J entries at a time, never L * J);
//   a: grad_output's rows are read in place (the K * O rows of a sample are evenly spaced, unless
//      several cotangents meet several groups: then they are copied into panels first);
//   a register-blocked kernel (conv_weight_grad_per_sample_gemm.inc) accumulates MR x NR output
//      tiles: per position, NR / lanes vector loads of b and MR broadcasts of a, MR * NR / lanes
//      FMAs. The MR x NR tile shape is chosen per call from a few, by padded work and measured
//      speed; whole tiles write the output in place, the last rows and columns (fewer than MR or
//      NR) go through a zero-padded buffer.
// grad_output is read from memory once, many rows a short piece at a time (more streams than the
// hardware prefetcher follows): the kernel asks for the next panel's rows while it works on one,
// and the output gets transparent huge pages where it is large (ask_for_huge_pages). Blocks
// are as large as keeps their output tile in L2, split by columns before rows (a column block
// gathers only its own columns). Tasks run in parallel with at::parallel_for; every output entry
// is summed in one fixed order whatever the thread count.
//
// The inner kernel exists for AVX-512 and AVX2 + FMA (compiled for those targets in `#pragma GCC
// target` regions, chosen at run time from what the CPU supports); elsewhere ("generic") the tiles
// are multiplied by at::mm. NTKFAST_CPU_ISA=generic|avx2|avx512 caps the choice (for tests and
// comparisons); it is read on every call.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "../conv_weight_grad_per_sample_prepare.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define NTKFAST_X86_KERNELS 1
#include <immintrin.h>
#else
#define NTKFAST_X86_KERNELS 0
#endif

namespace ntkfast {
namespace {

// ---------------------------------------------------------------------------------------------
// inner kernels, one namespace per instruction set
// ---------------------------------------------------------------------------------------------

#if NTKFAST_X86_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
struct OpsF {
  using T = float;
  using V = __m256;
  static constexpr int kLanes = 8;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
struct OpsD {
  using T = double;
  using V = __m256d;
  static constexpr int kLanes = 4;
  static inline V zero() { return _mm256_setzero_pd(); }
  static inline V load(const double* p) { return _mm256_loadu_pd(p); }
  static inline void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static inline V set1(double x) { return _mm256_set1_pd(x); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
#include "conv_weight_grad_per_sample_gemm.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif
namespace avx512 {
struct OpsF {
  using T = float;
  using V = __m512;
  static constexpr int kLanes = 16;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
struct OpsD {
  using T = double;
  using V = __m512d;
  static constexpr int kLanes = 8;
  static inline V zero() { return _mm512_setzero_pd(); }
  static inline V load(const double* p) { return _mm512_loadu_pd(p); }
  static inline void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static inline V set1(double x) { return _mm512_set1_pd(x); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
#include "conv_weight_grad_per_sample_gemm.inc"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // NTKFAST_X86_KERNELS

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#if NTKFAST_X86_KERNELS
  static const Isa supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
#else
  const Isa supported = Isa::kGeneric;
#endif
  const char* cap = std::getenv("NTKFAST_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return supported;
  Isa wanted = supported;
  if (std::strcmp(cap, "generic") == 0) {
    wanted = Isa::kGeneric;
  } else if (std::strcmp(cap, "avx2") == 0) {
    wanted = Isa::kAvx2;
  } else if (std::strcmp(cap, "avx512") != 0) {
    TORCH_CHECK_VALUE(false, "NTKFAST_CPU_ISA must be generic, avx2 or avx512, got '", cap, "'");
  }
  return std::min(wanted, supported);
}

template <typename T>
using GemmFn = void (*)(int64_t, const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t, bool, bool);

constexpr int64_t kL1PanelBytes = 24 * 1024;  // one panel of b: under half of a 32-48 KiB L1
constexpr int64_t kChunkBytes = 512 * 1024;   // packed rows of a (when they cannot be read in place)
constexpr int64_t kBlockBytes = 1024 * 1024;  // a block's output tile (rows x columns), in L2
constexpr int64_t kMaxRows = 1024;             // rows per block

template <typename T>
struct Micro {
  int64_t mr, nr;
  GemmFn<T> fn;
  // throughput per padded output entry relative to the widest tile, measured on a Xeon with
  // AVX-512 (narrower tiles load more per FMA)
  double speed;
};

// The register tiles per instruction set: MR rows x NV vectors of accumulators, using at most the
// 32 (AVX-512) or 16 (AVX2) vector registers with the NV vectors of b and a broadcast, and at
// most 8 rows (their pointers stay in registers).
// None for Isa::kGeneric: that path multiplies the tiles with at::mm instead.
template <typename T>
int candidates(Isa isa, Micro<T>* out) {
  int n = 0;
#if NTKFAST_X86_KERNELS
  if (isa == Isa::kAvx512) {
    using O = std::conditional_t<std::is_same_v<T, float>, avx512::OpsF, avx512::OpsD>;
    out[n++] = {8, 3 * O::kLanes, &avx512::gemm_panels<O, 8, 3>, 1.0};
    out[n++] = {6, 4 * O::kLanes, &avx512::gemm_panels<O, 6, 4>, 0.8};
    out[n++] = {8, 2 * O::kLanes, &avx512::gemm_panels<O, 8, 2>, 0.8};
    out[n++] = {8, O::kLanes, &avx512::gemm_panels<O, 8, 1>, 0.55};
    return n;
  }
  if (isa == Isa::kAvx2) {
    using O = std::conditional_t<std::is_same_v<T, float>, avx2::OpsF, avx2::OpsD>;
    out[n++] = {4, 3 * O::kLanes, &avx2::gemm_panels<O, 4, 3>, 1.0};
    out[n++] = {6, 2 * O::kLanes, &avx2::gemm_panels<O, 6, 2>, 1.0};
    out[n++] = {8, O::kLanes, &avx2::gemm_panels<O, 8, 1>, 0.55};
    return n;
  }
#endif
  (void)isa;
  (void)out;
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The tile whose padded work, divided by its speed, is least for this output shape.
template <typename T>
Micro<T> choose_micro(Isa isa, int64_t M, int64_t J) {
  Micro<T> c[4];
  const int n = candidates<T>(isa, c);
  TORCH_INTERNAL_ASSERT(n > 0, "conv_weight_grad_per_sample: no register tile for this instruction set");
  int best = 0;
  double best_cost = 0;
  for (int i = 0; i < n; ++i) {
    const double cost = static_cast<double>(round_up(M, c[i].mr)) * static_cast<double>(round_up(J, c[i].nr)) /
                        c[i].speed;
    if (i == 0 || cost < best_cost) {
      best = i;
      best_cost = cost;
    }
  }
  return c[best];
}

struct Blocking {
  int64_t kc;             // positions per tile: a panel of b (kc x NR) fits in L1
  int64_t chunk;          // positions per chunk (a multiple of kc), when rows of a are packed
  int64_t mb, m_blocks;   // rows per block (a multiple of MR), blocks
  int64_t jb, j_blocks;   // columns per block (a multiple of NR), blocks
};

Blocking plan(const ConvWgradGeometry& g, int64_t mr, int64_t nr, int64_t elem) {
  Blocking b{};
  const int64_t kc_max = std::max<int64_t>(16, kL1PanelBytes / (nr * elem));
  b.kc = ceil_div(g.L, ceil_div(g.L, kc_max));
  // Columns are split before rows: a column block gathers only its own patch columns, while
  // every row block would gather all of them again (the rows are only read).
  b.m_blocks = ceil_div(g.M, kMaxRows);
  const int64_t rows = round_up(ceil_div(g.M, b.m_blocks), mr);
  b.j_blocks = ceil_div(round_up(g.J, nr), std::max(nr, kBlockBytes / (rows * elem) / nr * nr));
  // Few samples: more, smaller blocks so that every thread has work (blocks of 2+ panels).
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (g.N * g.groups * b.m_blocks * b.j_blocks < want) {
    if (ceil_div(g.J, b.j_blocks + 1) >= 2 * nr) {
      ++b.j_blocks;
    } else if (ceil_div(g.M, b.m_blocks + 1) >= 2 * mr) {
      ++b.m_blocks;
    } else {
      break;
    }
  }
  b.mb = round_up(ceil_div(g.M, b.m_blocks), mr);
  b.m_blocks = ceil_div(g.M, b.mb);
  b.jb = round_up(ceil_div(g.J, b.j_blocks), nr);
  b.j_blocks = ceil_div(g.J, b.jb);
  const int64_t tiles = ceil_div(g.L, b.kc);
  const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / (b.mb * b.kc * elem));
  b.chunk = b.kc * ceil_div(tiles, ceil_div(tiles, per_chunk));
  return b;
}

template <typename T>
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), 64));
    ptr.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(ptr != nullptr, "conv_weight_grad_per_sample: cannot allocate ", bytes, " bytes");
  }
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr;
  T* get() const { return ptr.get(); }
};

// Row m = (k, o within the group) of (sample n, group grp): its index among grad_output's rows
// of L positions and among the output's rows of J columns.
int64_t row_index(const ConvWgradGeometry& g, int64_t n, int64_t grp, int64_t m) {
  return (n * g.K + m / g.Og) * g.O + grp * g.Og + m % g.Og;
}

template <typename T>
const T* go_row(const ConvWgradGeometry& g, const T* go, int64_t n, int64_t grp, int64_t m) {
  return go + row_index(g, n, grp, m) * g.L;
}

// Rows [m0, m0 + rows) of (n, grp), positions [l0, l0 + len), copied to a[ii * kt + p] per
// tile of kt = kc positions (the last one possibly shorter), tile after tile (each tile a block of padded_rows * kc), so that every row
// is read front to back once; rows from `rows` up to padded_rows are zero.
template <typename T>
void pack_a(const ConvWgradGeometry& g, const T* go, int64_t n, int64_t grp, int64_t m0, int64_t rows,
            int64_t padded_rows, int64_t l0, int64_t len, int64_t kc, T* a) {
  for (int64_t ii = 0; ii < padded_rows; ++ii) {
    const T* src = ii < rows ? go_row(g, go, n, grp, m0 + ii) + l0 : nullptr;
    for (int64_t t0 = 0; t0 < len; t0 += kc) {
      const int64_t kt = std::min(kc, len - t0);
      T* dst = a + t0 * padded_rows + ii * kt;
      if (src == nullptr) {
        std::fill(dst, dst + kt, T(0));
      } else {
        std::copy(src + t0, src + t0 + kt, dst);
      }
    }
  }
}

// The channels [c0, c0 + cn) of (sample n, group grp) that a column block reads, zero-padded to
// (H + 2 ph) x (W + 2 pw), so that gathering patches needs no bounds checks: every patch entry
// then lies inside the padded planes. Skipped (the input read in place) without padding.

template <typename T>
const T* padded_planes(const ConvWgradGeometry& g, const T* x, int64_t n, int64_t grp, int64_t c0, int64_t cn,
                       T* buf) {
  const T* src = x + (n * g.C + grp * g.Cg + c0) * g.H * g.W;
  if (g.ph == 0 && g.pw == 0) return src;
  const int64_t hp = g.H + 2 * g.ph, wp = g.W + 2 * g.pw;
  for (int64_t c = 0; c < cn; ++c) {
    T* dst = buf + c * hp * wp;
    std::fill(dst, dst + g.ph * wp, T(0));
    for (int64_t y = 0; y < g.H; ++y) {
      T* row = dst + (g.ph + y) * wp;
      std::fill(row, row + g.pw, T(0));
      std::copy(src + (c * g.H + y) * g.W, src + (c * g.H + y + 1) * g.W, row + g.pw);
      std::fill(row + g.pw + g.W, row + wp, T(0));
    }
    std::fill(dst + (g.ph + g.H) * wp, dst + hp * wp, T(0));
  }
  return buf;
}

// b: the implicit im2col tile, columns [j0, j0 + jc) for positions [l0, l0 + kc), as panels
// [kc][NR], gathered from the (padded) planes of the channels from c0 on; columns past jc are zero.
template <typename T>
void pack_b(const ConvWgradGeometry& g, const T* planes, int64_t c0, int64_t j0, int64_t jc, int64_t l0, int64_t kc,
            int64_t nr, T* b) {
  const int64_t panels = ceil_div(jc, nr);
  const int64_t khw = g.kh * g.kw;
  const int64_t hp = g.H + 2 * g.ph, wp = g.W + 2 * g.pw;
  const int64_t row_step = g.sh * wp;
  for (int64_t jj = 0; jj < panels * nr; ++jj) {
    T* dst = b + (jj / nr) * kc * nr + jj % nr;
    if (jj >= jc) {
      for (int64_t p = 0; p < kc; ++p) dst[p * nr] = T(0);
      continue;
    }
    const int64_t j = j0 + jj;
    const int64_t r = (j % khw) / g.kw;
    const int64_t s = j % g.kw;
    // entry (y, xo) of this column: base[y * sh * wp + xo * sw]
    const T* base = planes + (j / khw - c0) * hp * wp + r * g.dh * wp + s * g.dw;
    int64_t y = l0 / g.Wo;
    int64_t xo = l0 % g.Wo;
    for (int64_t p = 0; p < kc; ++y, xo = 0) {
      const int64_t cnt = std::min(g.Wo - xo, kc - p);
      const T* src = base + y * row_step + xo * g.sw;
      T* d = dst + p * nr;
      if (g.sw == 1) {
        for (int64_t q = 0; q < cnt; ++q) d[q * nr] = src[q];
      } else {
        for (int64_t q = 0; q < cnt; ++q) d[q * nr] = src[q * g.sw];
      }
      p += cnt;
    }
  }
}

template <typename T>
void conv_wgrad_cpu_kernel(const ConvWgradGeometry& g, const T* x, const T* go, T* out, Isa isa) {
  const Micro<T> mk = choose_micro<T>(isa, g.M, g.J);
  const Blocking bl = plan(g, mk.mr, mk.nr, sizeof(T));
  // The rows of a block are evenly spaced in grad_output (stride L) unless several cotangents
  // meet several groups; then they are packed.
  const bool in_place = g.groups == 1 || g.K == 1;
  const int64_t tasks = g.N * g.groups * bl.m_blocks * bl.j_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> a(in_place ? mk.mr * bl.kc : bl.mb * bl.chunk), b(bl.jb * bl.kc);
    AlignedBuffer<T> c(in_place ? bl.mb * mk.nr + mk.mr * bl.jb : bl.mb * bl.jb);
    const int64_t max_channels = std::min(g.Cg, ceil_div(bl.jb, g.kh * g.kw) + 1);
    const bool padded = g.ph > 0 || g.pw > 0;
    AlignedBuffer<T> pad(padded ? max_channels * (g.H + 2 * g.ph) * (g.W + 2 * g.pw) : 0);
    for (int64_t t = begin; t < end; ++t) {
      int64_t rest = t;
      const int64_t jblk = rest % bl.j_blocks;
      rest /= bl.j_blocks;
      const int64_t mblk = rest % bl.m_blocks;
      rest /= bl.m_blocks;
      const int64_t grp = rest % g.groups;
      const int64_t n = rest / g.groups;
      const int64_t m0 = mblk * bl.mb, mc = std::min(bl.mb, g.M - m0);
      const int64_t j0 = jblk * bl.jb, jc = std::min(bl.jb, g.J - j0);
      const int64_t m_panels = ceil_div(mc, mk.mr), n_panels = ceil_div(jc, mk.nr);
      const int64_t ldc = n_panels * mk.nr;
      const int64_t c0 = j0 / (g.kh * g.kw), cn = (j0 + jc - 1) / (g.kh * g.kw) + 1 - c0;
      const T* planes = padded_planes(g, x, n, grp, c0, cn, pad.get());
      if (in_place) {
        // Whole panels read grad_output's rows in place and write the output's in place (both
        // evenly spaced); the last rows (fewer than MR) and the last columns (fewer than NR) go
        // through zero-padded copies instead, since a whole panel there would run past the
        // block, into rows that other tasks write, or past the tensors.
        const T* rows = go_row(g, go, n, grp, m0);
        T* out_rows = out + row_index(g, n, grp, m0) * g.J + j0;
        const int64_t full_m = mc / mk.mr, tail_m = mc - full_m * mk.mr;
        const int64_t full_j = jc / mk.nr, tail_j = jc - full_j * mk.nr;
        T* edge_j = c.get();                       // [full_m * MR][NR]: the last columns
        T* edge_m = c.get() + bl.mb * mk.nr;       // [MR][ldc]: the last rows, every column
        for (int64_t l0 = 0; l0 < g.L; l0 += bl.kc) {
          const int64_t kt = std::min(bl.kc, g.L - l0);
          const bool acc = l0 > 0;
          pack_b(g, planes, c0, j0, jc, l0, kt, mk.nr, b.get());
          if (full_m > 0 && full_j > 0) mk.fn(kt, rows + l0, g.L, b.get(), out_rows, g.J, full_m, full_j, acc, true);
          if (full_m > 0 && tail_j > 0) {
            mk.fn(kt, rows + l0, g.L, b.get() + full_j * kt * mk.nr, edge_j, mk.nr, full_m, 1, acc, full_j == 0);
          }
          if (tail_m > 0) {
            pack_a(g, go, n, grp, m0 + full_m * mk.mr, tail_m, mk.mr, l0, kt, kt, a.get());
            mk.fn(kt, a.get(), kt, b.get(), edge_m, ldc, 1, n_panels, acc, false);
          }
        }
        for (int64_t ii = 0; ii < full_m * mk.mr && tail_j > 0; ++ii) {
          std::memcpy(out_rows + ii * g.J + full_j * mk.nr, edge_j + ii * mk.nr,
                      static_cast<size_t>(tail_j) * sizeof(T));
        }
        for (int64_t ii = 0; ii < tail_m; ++ii) {
          std::memcpy(out_rows + (full_m * mk.mr + ii) * g.J, edge_m + ii * ldc, static_cast<size_t>(jc) * sizeof(T));
        }
        continue;
      }
      for (int64_t l0 = 0; l0 < g.L; l0 += bl.chunk) {
        const int64_t len = std::min(bl.chunk, g.L - l0);
        pack_a(g, go, n, grp, m0, mc, m_panels * mk.mr, l0, len, bl.kc, a.get());
        for (int64_t t0 = 0; t0 < len; t0 += bl.kc) {
          const int64_t kt = std::min(bl.kc, len - t0);
          pack_b(g, planes, c0, j0, jc, l0 + t0, kt, mk.nr, b.get());
          mk.fn(kt, a.get() + t0 * m_panels * mk.mr, kt, b.get(), c.get(), ldc, m_panels, n_panels, l0 + t0 > 0,
                false);
        }
      }
      for (int64_t ii = 0; ii < mc; ++ii) {
        T* dst = out + row_index(g, n, grp, m0 + ii) * g.J + j0;
        std::memcpy(dst, c.get() + ii * ldc, static_cast<size_t>(jc) * sizeof(T));
      }
    }
  });
}

// Without a vector kernel for this CPU: the same tiles and implicit im2col, each tile's product
// by at::mm into the output (whichever BLAS torch was built with, usually far faster than a
// portable loop). b is then one panel of all the block's columns, and a tile holds as many
// positions as keep it in L2.
template <typename T>
void conv_wgrad_cpu_blas(const ConvWgradGeometry& g, const T* x, const T* go, T* out) {
  const Blocking bl = plan(g, 8, 8, sizeof(T));
  const int64_t kc = std::min(g.L, std::max<int64_t>(64, kChunkBytes / (bl.jb * static_cast<int64_t>(sizeof(T)))));
  const bool in_place = g.groups == 1 || g.K == 1;
  const int64_t tasks = g.N * g.groups * bl.m_blocks * bl.j_blocks;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> a(in_place ? 0 : bl.mb * kc), b(bl.jb * kc), c(in_place ? 0 : bl.mb * bl.jb);
    const bool padded = g.ph > 0 || g.pw > 0;
    const int64_t max_channels = std::min(g.Cg, ceil_div(bl.jb, g.kh * g.kw) + 1);
    AlignedBuffer<T> pad(padded ? max_channels * (g.H + 2 * g.ph) * (g.W + 2 * g.pw) : 0);
    for (int64_t t = begin; t < end; ++t) {
      int64_t rest = t;
      const int64_t jblk = rest % bl.j_blocks;
      rest /= bl.j_blocks;
      const int64_t mblk = rest % bl.m_blocks;
      rest /= bl.m_blocks;
      const int64_t grp = rest % g.groups;
      const int64_t n = rest / g.groups;
      const int64_t m0 = mblk * bl.mb, mc = std::min(bl.mb, g.M - m0);
      const int64_t j0 = jblk * bl.jb, jc = std::min(bl.jb, g.J - j0);
      const int64_t c0 = j0 / (g.kh * g.kw), cn = (j0 + jc - 1) / (g.kh * g.kw) + 1 - c0;
      const T* planes = padded_planes(g, x, n, grp, c0, cn, pad.get());
      at::Tensor dst = in_place ? at::from_blob(out + row_index(g, n, grp, m0) * g.J + j0, {mc, jc}, {g.J, 1}, opts)
                                : at::from_blob(c.get(), {mc, jc}, opts);
      for (int64_t l0 = 0; l0 < g.L; l0 += kc) {
        const int64_t kt = std::min(kc, g.L - l0);
        pack_b(g, planes, c0, j0, jc, l0, kt, jc, b.get());
        at::Tensor rows;
        if (in_place) {
          rows = at::from_blob(const_cast<T*>(go_row(g, go, n, grp, m0) + l0), {mc, kt}, {g.L, 1}, opts);
        } else {
          pack_a(g, go, n, grp, m0, mc, mc, l0, kt, kt, a.get());
          rows = at::from_blob(a.get(), {mc, kt}, opts);
        }
        const at::Tensor patches = at::from_blob(b.get(), {kt, jc}, opts);
        if (l0 == 0) {
          at::mm_out(dst, rows, patches);
        } else {
          dst.addmm_(rows, patches);
        }
      }
      for (int64_t ii = 0; !in_place && ii < mc; ++ii) {
        std::memcpy(out + row_index(g, n, grp, m0 + ii) * g.J + j0, c.get() + ii * jc,
                    static_cast<size_t>(jc) * sizeof(T));
      }
    }
  });
}

// A large output is typically fresh memory from mmap, and its first touch costs a page fault per
// 4 KiB page, as much time as the arithmetic at some layer sizes (the output has L times fewer
// entries than the products that sum into it): ask the kernel for 2 MiB pages there (Linux
// transparent huge pages in "madvise" mode, what PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for
// every allocation). Only a hint; failures are ignored.
void ask_for_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = out.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

at::Tensor conv_weight_grad_per_sample_cpu(const at::Tensor& input, const at::Tensor& grad_output,
                                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvWgradGeometry g = check_conv_wgrad("conv_weight_grad_per_sample", input, grad_output, kernel_size, stride,
                                               padding, dilation, groups);
  at::Tensor out = at::empty(conv_wgrad_out_shape(g), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  ask_for_huge_pages(out);
  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_output.contiguous();
  const Isa isa = best_isa();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_weight_grad_per_sample_cpu", [&] {
    if (isa == Isa::kGeneric) {
      conv_wgrad_cpu_blas<scalar_t>(g, x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    } else {
      conv_wgrad_cpu_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                      isa);
    }
  });
  return out;
}

}  // namespace
}  // namespace ntkfast

TORCH_LIBRARY_IMPL(ntkfast, CPU, m) {
  m.impl("conv_weight_grad_per_sample", &ntkfast::conv_weight_grad_per_sample_cpu);
}
