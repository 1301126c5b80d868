// The vectorised inner loops of the masked_gram CPU kernel (csrc/cpu/masked_gram_cpu.cpp), written
// once with GCC vector extensions and included once per instruction set: the including file
// defines NTKFAST_GRAM_ISA (the namespace), NTKFAST_GRAM_VBYTES (vector width in bytes),
// NTKFAST_GRAM_IB (rows of a1 per sparse micro-tile), NTKFAST_GRAM_KB and NTKFAST_GRAM_LB (the
// k x l register block of the full contraction; LB the most), and wraps the inclusion in
// `#pragma GCC target(...)` so that these loops use that instruction set while the rest of the
// extension stays baseline x86-64. Deliberately no include guard. Everything here takes raw
// pointers and sizes.
//
// Layouts (JT = 2 vectors of lanes, the j-width of a panel):
//   XP   [panels][C][JT]        a2 transposed, in panels of JT samples j (zero padded past N2)
//   B2P  [panels][K][O][JT]     b2 in the same panels
//   P    element (ii, o, panel) at P + ii * p_ii + o * p_o + panel * p_panel, JT values from there:
//        P[i0 + ii, j, o] = sum_c mask[o, c] a1[i0 + ii, c] a2[j, c] for the JT samples j of the panel
// The loops vectorise over j (the lanes), so no horizontal sums are needed where the cost is.

namespace NTKFAST_GRAM_ISA {

constexpr int kIB = NTKFAST_GRAM_IB;
constexpr int kLB = NTKFAST_GRAM_LB;
constexpr int kKB = NTKFAST_GRAM_KB;

// Loaded once, used several times: without this GCC folds the load into each multiply-add as a
// memory operand, loading it again every time and making the loop bound by loads.
#ifndef NTKFAST_GRAM_IN_REGISTER
#if defined(__GNUC__) && defined(__x86_64__)
#define NTKFAST_GRAM_IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define NTKFAST_GRAM_IN_REGISTER(x) (void)0
#endif
#endif

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(NTKFAST_GRAM_VBYTES)));
  static constexpr int64_t lanes = NTKFAST_GRAM_VBYTES / sizeof(T);
  static constexpr int64_t jt = 2 * lanes;
};

template <typename T>
inline typename Simd<T>::vec vload(const T* p) {
  typename Simd<T>::vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, typename Simd<T>::vec v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// A tree of additions: log2(lanes) dependent steps instead of lanes.
template <typename T>
inline T hsum(typename Simd<T>::vec v) {
  T b[Simd<T>::lanes];
  __builtin_memcpy(b, &v, sizeof(v));
  for (int64_t w = Simd<T>::lanes / 2; w >= 1; w /= 2) {
    for (int64_t q = 0; q < w; ++q) b[q] += b[q + w];
  }
  return b[0];
}

// dst[r * n + e] = x[r * n + e] * y[e] for r < rows, e < n
template <typename T>
void scale_rows(const T* x, const T* y, int64_t rows, int64_t n, T* dst) {
  using Sv = Simd<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* d = dst + r * n;
    int64_t e = 0;
    for (; e + Sv::lanes <= n; e += Sv::lanes) vstore(d + e, vload(xr + e) * vload(y + e));
    for (; e < n; ++e) d[e] = xr[e] * y[e];
  }
}

// P for IB rows of a1 and `panels` panels, over a sparse mask in CSR form (rowptr, col): S[t * IB
// + ii] = mask value t times a1[i0 + ii, col[t]] (zero for rows past the end). Cost: nnz * IB * JT
// multiply-adds per panel, against O * C * IB * JT for the dense product. The IB x 2 accumulators
// stay in registers; one x load per column of the mask feeds IB multiply-adds.
template <typename T, int IB>
void sparse_p(const int64_t* rowptr, const int32_t* col, const T* S, const T* XP, int64_t c, int64_t o_count,
              int64_t panels, T* P, int64_t p_ii, int64_t p_o, int64_t p_panel) {
  using Sv = Simd<T>;
  using vec = typename Sv::vec;
  constexpr int64_t L = Sv::lanes;
  for (int64_t o = 0; o < o_count; ++o) {
    const int64_t t0 = rowptr[o], t1 = rowptr[o + 1];
    for (int64_t p = 0; p < panels; ++p) {
      const T* xp = XP + p * c * Sv::jt;
      vec acc[IB][2];
      for (int ii = 0; ii < IB; ++ii) acc[ii][0] = acc[ii][1] = vec{};
      for (int64_t t = t0; t < t1; ++t) {
        const T* x = xp + static_cast<int64_t>(col[t]) * Sv::jt;
        const vec x0 = vload(x), x1 = vload(x + L);
        const T* s = S + t * IB;
        for (int ii = 0; ii < IB; ++ii) {
          acc[ii][0] += s[ii] * x0;
          acc[ii][1] += s[ii] * x1;
        }
      }
      T* dst = P + o * p_o + p * p_panel;
      for (int ii = 0; ii < IB; ++ii) {
        vstore(dst + ii * p_ii, acc[ii][0]);
        vstore(dst + ii * p_ii + L, acc[ii][1]);
      }
    }
  }
}

// out[j] = sum_o P[j, o] sum_k b1i[k, o] b2[j, k, o] for the JT * panels samples from the block's
// first one; only the first jcount are written.
template <typename T>
void trace_rows(const T* b1i, const T* P, int64_t p_o, int64_t p_panel, const T* B2P, int64_t k_count,
                int64_t o_count, int64_t panels, T* out, int64_t jcount) {
  using Sv = Simd<T>;
  using vec = typename Sv::vec;
  constexpr int64_t L = Sv::lanes;
  for (int64_t p = 0; p < panels; ++p) {
    const T* pp = P + p * p_panel;
    const T* bp = B2P + p * k_count * o_count * Sv::jt;
    vec acc0 = {}, acc1 = {};
    for (int64_t o = 0; o < o_count; ++o) {
      vec d0 = {}, d1 = {};
      for (int64_t k = 0; k < k_count; ++k) {
        const T bk = b1i[k * o_count + o];
        const T* b = bp + (k * o_count + o) * Sv::jt;
        d0 += bk * vload(b);
        d1 += bk * vload(b + L);
      }
      acc0 += vload(pp + o * p_o) * d0;
      acc1 += vload(pp + o * p_o + L) * d1;
    }
    const int64_t j0 = p * Sv::jt;
    for (int64_t q = 0; q < L && j0 + q < jcount; ++q) out[j0 + q] = acc0[q];
    for (int64_t q = 0; q < L && j0 + L + q < jcount; ++q) out[j0 + L + q] = acc1[q];
  }
}

// acc(k, l) += sum_{o0 <= o < o1} b1[k, o] P[o, panel] b2[panel, l, o] for k0 <= k < k0 + KB and
// l0 <= l < l0 + LB (b1, acc: already offset to k0, (k0, l0)): 2 * KB * LB accumulators in
// registers; per o, the two vectors of P and 2 * LB of b2 are loaded once for 2 * KB * LB
// multiply-adds.
template <typename T, int KB, int LB>
inline void full_chunk(const T* b1, const T* pp, int64_t p_o, const T* bp, int64_t o_count, int64_t k_count,
                       int64_t l0, int64_t o0, int64_t o1, T* acc) {
  using Sv = Simd<T>;
  using vec = typename Sv::vec;
  constexpr int64_t L = Sv::lanes;
  vec a[KB][LB][2];
  for (int kb = 0; kb < KB; ++kb) {
    for (int q = 0; q < LB; ++q) {
      a[kb][q][0] = vload(acc + (kb * k_count + q) * Sv::jt);
      a[kb][q][1] = vload(acc + (kb * k_count + q) * Sv::jt + L);
    }
  }
  for (int64_t o = o0; o < o1; ++o) {
    vec p0 = vload(pp + o * p_o), p1 = vload(pp + o * p_o + L);
    NTKFAST_GRAM_IN_REGISTER(p0);
    NTKFAST_GRAM_IN_REGISTER(p1);
    vec r[KB][2];
    for (int kb = 0; kb < KB; ++kb) {
      const T bk = b1[kb * o_count + o];
      r[kb][0] = bk * p0;
      r[kb][1] = bk * p1;
    }
    for (int q = 0; q < LB; ++q) {
      const T* b = bp + ((l0 + q) * o_count + o) * Sv::jt;
      vec x0 = vload(b), x1 = vload(b + L);
      NTKFAST_GRAM_IN_REGISTER(x0);
      NTKFAST_GRAM_IN_REGISTER(x1);
      for (int kb = 0; kb < KB; ++kb) {
        a[kb][q][0] += r[kb][0] * x0;
        a[kb][q][1] += r[kb][1] * x1;
      }
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    for (int q = 0; q < LB; ++q) {
      vstore(acc + (kb * k_count + q) * Sv::jt, a[kb][q][0]);
      vstore(acc + (kb * k_count + q) * Sv::jt + L, a[kb][q][1]);
    }
  }
}

// full_chunk<T, KB, n> for a run-time n <= LB
template <typename T, int KB, int LB>
inline void full_chunk_n(int n, const T* b1, const T* pp, int64_t p_o, const T* bp, int64_t o_count,
                         int64_t k_count, int64_t l0, int64_t o0, int64_t o1, T* acc) {
  if constexpr (LB > 0) {
    if (n == LB) {
      full_chunk<T, KB, LB>(b1, pp, p_o, bp, o_count, k_count, l0, o0, o1, acc);
    } else {
      full_chunk_n<T, KB, LB - 1>(n, b1, pp, p_o, bp, o_count, k_count, l0, o0, o1, acc);
    }
  }
}

// out[j, k, l] = sum_o b1i[k, o] P[j, o] b2[j, l, o] for the JT * panels samples from the block's
// first one (out: that sample's [K, K] block of row i, rows of K * K); only the first jcount are
// written. The o range is cut in chunks of o_chunk so that the panel's slice of b2 stays in L1
// across all (k, l); acc: scratch of JT * K * K values, (k, l) at acc + (k * K + l) * JT.
template <typename T>
void full_rows(const T* b1i, const T* P, int64_t p_o, int64_t p_panel, const T* B2P, int64_t k_count,
               int64_t o_count, int64_t panels, T* out, int64_t jcount, T* acc, int64_t o_chunk) {
  using Sv = Simd<T>;
  const int64_t kk = k_count * k_count;
  const int64_t n_lchunks = (k_count + kLB - 1) / kLB;
  const int64_t l_base = k_count / n_lchunks, l_extra = k_count % n_lchunks;  // balanced chunks
  for (int64_t p = 0; p < panels; ++p) {
    const T* pp = P + p * p_panel;
    const T* bp = B2P + p * k_count * o_count * Sv::jt;
    for (int64_t e = 0; e < Sv::jt * kk; ++e) acc[e] = 0;
    for (int64_t o0 = 0; o0 < o_count; o0 += o_chunk) {
      const int64_t o1 = std::min(o_count, o0 + o_chunk);
      for (int64_t k = 0; k < k_count; k += kKB) {
        const bool whole = k + kKB <= k_count;  // else the one k left over, with KB = 1
        int64_t l0 = 0;
        for (int64_t ch = 0; ch < n_lchunks; ++ch) {
          const int n = static_cast<int>(l_base + (ch < l_extra ? 1 : 0));
          const T* b1k = b1i + k * o_count;
          T* a = acc + (k * k_count + l0) * Sv::jt;
          if (whole) {
            full_chunk_n<T, kKB, kLB>(n, b1k, pp, p_o, bp, o_count, k_count, l0, o0, o1, a);
          } else {
            full_chunk_n<T, 1, kLB>(n, b1k, pp, p_o, bp, o_count, k_count, l0, o0, o1, a);
          }
          l0 += n;
        }
      }
    }
    const int64_t j0 = p * Sv::jt;
    for (int64_t q = 0; q < Sv::jt && j0 + q < jcount; ++q) {
      T* dst = out + (j0 + q) * kk;
      for (int64_t e = 0; e < kk; ++e) dst[e] = acc[e * Sv::jt + q];
    }
  }
}

// sum_o pd[o] sum_k b1i[k, o] b2i[k, o], over the o with live[o] != 0 (live: nullptr for all). A
// dead o (a mask row of zeros: pd[o] = 0) is left out by a select (a blend), not multiplied by
// pd[o] = 0: b1 and b2 may hold anything there, infinities included.
template <typename T>
T diag_trace_row(const T* b1i, const T* b2i, const T* pd, const T* live, int64_t k_count, int64_t o_count) {
  using Sv = Simd<T>;
  using vec = typename Sv::vec;
  vec acc = {};
  int64_t o = 0;
  for (; o + Sv::lanes <= o_count; o += Sv::lanes) {
    vec d = {};
    for (int64_t k = 0; k < k_count; ++k) d += vload(b1i + k * o_count + o) * vload(b2i + k * o_count + o);
    const vec term = vload(pd + o) * d;
    acc += live == nullptr ? term : (vload(live + o) != vec{} ? term : vec{});
  }
  T s = hsum<T>(acc);
  for (; o < o_count; ++o) {
    if (live != nullptr && live[o] == T(0)) continue;
    T d = 0;
    for (int64_t k = 0; k < k_count; ++k) d += b1i[k * o_count + o] * b2i[k * o_count + o];
    s += pd[o] * d;
  }
  return s;
}

}  // namespace NTKFAST_GRAM_ISA
