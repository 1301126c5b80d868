// CUDA kernels for ntkfast::masked_gram (interface: masked_gram.cuh).
//
// Two kernels per chunk of rows, a row being a pair (i, j) (or a sample i, in the diagonal modes):
// 1. gram_p_kernel: P[row, o] = sum_c mask[o, c] a1[i, c] a2[j, c], a shared-memory tiled product
//    X [rows, C] x mask^T [C, O] (64 x 64 tiles, 16 values of c per step, 4 x 4 outputs per
//    thread) whose rows X[row, c] = a1[i, c] a2[j, c] are formed while they are staged, so X is
//    never stored. P goes to the workspace: rows x O values, the glue bounds the chunk.
// 2. the contraction with b: gram_full_kernel (full, diagonal), one block per row, threads over
//    the K x K outputs, b1[i, :, o], b2[j, :, o] and P staged in shared memory a run of o at a
//    time (or read from global memory where K is too large for that); gram_trace_kernel (trace,
//    diagonal_trace), one warp per row, lanes over o (coalesced), a shuffle reduction.
// Pruned entries (issue 25): the glue passes live_c [C] and live_o [O], whether a column / row of the
// mask has a nonzero. What only zero mask entries read (a1[:, c], a2[:, c] for a dead column c;
// b1[:, :, o], b2[:, :, o] for a dead row o) must contribute nothing whatever it holds, and a product
// with the zero would be NaN for an infinite value: dead columns are staged as zeros (a select while
// staging, not in the inner loop), and the contraction skips dead o (a branch uniform across the
// block in the full kernel; per lane in the trace kernel, where lanes are already over o).
// Every index is 64-bit, and every kernel loops over its work with a grid stride, so grids stay
// within the hardware's limits whatever N1 * N2. Neither the symmetry of a2 = a1, b2 = b1 nor the
// sparsity of the mask is exploited here (the CPU kernel does both).
#include "masked_gram.cuh"

#include <algorithm>

namespace ntkfast {
namespace gpu {
namespace {

constexpr int kTile = 64;       // rows and o per tile of P
constexpr int kTileK = 16;      // values of c per shared-memory step
constexpr int kPThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kFullThreads = 128;
constexpr int kFullPerThread = 4;  // outputs per thread per pass of the full kernel
constexpr int kTraceWarps = 8;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int64_t kSmemBudget = 40 * 1024;  // below the 48 KiB available without opting in

__device__ __forceinline__ void pair_of(int64_t r, int64_t n2, bool diagonal, int64_t& i, int64_t& j) {
  if (diagonal) {
    i = r;
    j = r;
  } else {
    i = r / n2;
    j = r - i * n2;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPThreads)
    gram_p_kernel(const T* __restrict__ a1, const T* __restrict__ a2, const T* __restrict__ mask,
                  const bool* __restrict__ live_c, T* __restrict__ p, int64_t r0, int64_t rows, int64_t n2, int64_t c,
                  int64_t o, bool diagonal) {
  // +1: the transposed stores of a staging step fall in different banks
  __shared__ T xs[kTileK][kTile + 1];
  __shared__ T ms[kTileK][kTile + 1];
  __shared__ int64_t row_a[kTile];
  __shared__ int64_t row_b[kTile];
  const int t = static_cast<int>(threadIdx.x);
  const int tr = t / 16, tc = t % 16;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int64_t col_tiles = (o + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < row_tiles * col_tiles; tile += gridDim.x) {
    const int64_t rt = (tile / col_tiles) * kTile;  // first row of the tile, within the chunk
    const int64_t ot = (tile % col_tiles) * kTile;  // first o
    __syncthreads();  // the previous tile no longer reads row_a / row_b
    if (t < kTile) {
      int64_t i = 0, j = 0;
      if (rt + t < rows) pair_of(r0 + rt + t, n2, diagonal, i, j);
      row_a[t] = i * c;
      row_b[t] = j * c;
    }
    T acc[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[u][v] = T(0);
    }
    for (int64_t c0 = 0; c0 < c; c0 += kTileK) {
      __syncthreads();  // row_a / row_b written; the previous step's tiles consumed
      // 64 rows x 16 columns of X and of the mask, four of each per thread; consecutive threads
      // read consecutive c of one row
#pragma unroll
      for (int q = 0; q < (kTile * kTileK) / kPThreads; ++q) {
        const int e = t + q * kPThreads;
        const int rr = e / kTileK, cc = e % kTileK;
        const int64_t col = c0 + cc;
        T x = T(0), m = T(0);
        if (col < c) {
          // a dead column stays 0: it would meet only zero mask entries, as 0 * inf = NaN
          if (rt + rr < rows && live_c[col]) x = a1[row_a[rr] + col] * a2[row_b[rr] + col];
          if (ot + rr < o) m = mask[(ot + rr) * c + col];
        }
        xs[cc][rr] = x;
        ms[cc][rr] = m;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        T xv[4], mv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          xv[u] = xs[kk][tr + 16 * u];
          mv[u] = ms[kk][tc + 16 * u];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[u][v] += xv[u] * mv[v];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t rr = rt + tr + 16 * u;
      if (rr >= rows) continue;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int64_t oo = ot + tc + 16 * v;
        if (oo < o) p[rr * o + oo] = acc[u][v];
      }
    }
  }
}

// out[row, k, l] = sum_o b1[i, k, o] b2[j, l, o] P[row, o]. staged: b1[i, :, o0 + ..], b2[j, :, ..]
// and P[row, ..] go through shared memory ob values of o at a time (rows ob + 1 apart, against bank
// conflicts); else every thread reads global memory (K too large for shared memory). Uniform per
// launch, so the __syncthreads inside are reached by every thread.
template <typename T>
__global__ void __launch_bounds__(kFullThreads)
    gram_full_kernel(const T* __restrict__ b1, const T* __restrict__ b2, const T* __restrict__ p,
                     const bool* __restrict__ live_o, T* __restrict__ out, int64_t r0, int64_t rows, int64_t n2,
                     int64_t k, int64_t o, int64_t ob, bool diagonal, bool staged) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* b1s = reinterpret_cast<T*>(smem_raw);
  const int64_t obp = ob + 1;
  T* b2s = b1s + k * obp;
  T* ps = b2s + k * obp;
  const int64_t kk = k * k;
  const int64_t t = threadIdx.x;
  for (int64_t rr = blockIdx.x; rr < rows; rr += gridDim.x) {
    int64_t i = 0, j = 0;
    pair_of(r0 + rr, n2, diagonal, i, j);
    const T* b1i = b1 + i * k * o;
    const T* b2j = b2 + j * k * o;
    const T* pr = p + rr * o;
    T* dst = out + (r0 + rr) * kk;
    for (int64_t e0 = 0; e0 < kk; e0 += int64_t{kFullThreads} * kFullPerThread) {
      T acc[kFullPerThread];
      int64_t ek[kFullPerThread], el[kFullPerThread];
#pragma unroll
      for (int q = 0; q < kFullPerThread; ++q) {
        const int64_t e = e0 + t + int64_t{q} * kFullThreads;
        acc[q] = T(0);
        ek[q] = e < kk ? e / k : 0;
        el[q] = e < kk ? e % k : 0;
      }
      if (staged) {
        for (int64_t o0 = 0; o0 < o; o0 += ob) {
          const int64_t w = o - o0 < ob ? o - o0 : ob;
          __syncthreads();  // the previous run of o is consumed
          // a dead o is staged as zeros, P included (P there is 0 * whatever a1 a2 held), selected
          for (int64_t idx = t; idx < k * w; idx += kFullThreads) {
            const int64_t kq = idx / w, oq = idx - kq * w;
            const bool live = live_o[o0 + oq];
            b1s[kq * obp + oq] = live ? b1i[kq * o + o0 + oq] : T(0);
            b2s[kq * obp + oq] = live ? b2j[kq * o + o0 + oq] : T(0);
          }
          for (int64_t idx = t; idx < w; idx += kFullThreads) ps[idx] = live_o[o0 + idx] ? pr[o0 + idx] : T(0);
          __syncthreads();
#pragma unroll
          for (int q = 0; q < kFullPerThread; ++q) {
            if (e0 + t + int64_t{q} * kFullThreads >= kk) continue;
            const T* x = b1s + ek[q] * obp;
            const T* y = b2s + el[q] * obp;
            T s = T(0);
            for (int64_t oq = 0; oq < w; ++oq) s += x[oq] * y[oq] * ps[oq];
            acc[q] += s;
          }
        }
      } else {
#pragma unroll
        for (int q = 0; q < kFullPerThread; ++q) {
          if (e0 + t + int64_t{q} * kFullThreads >= kk) continue;
          const T* x = b1i + ek[q] * o;
          const T* y = b2j + el[q] * o;
          T s = T(0);
          for (int64_t oq = 0; oq < o; ++oq) {
            if (live_o[oq]) s += x[oq] * y[oq] * pr[oq];  // the same oq for every thread: no divergence
          }
          acc[q] = s;
        }
      }
#pragma unroll
      for (int q = 0; q < kFullPerThread; ++q) {
        const int64_t e = e0 + t + int64_t{q} * kFullThreads;
        if (e < kk) dst[e] = acc[q];
      }
    }
  }
}

// out[row] = sum_o P[row, o] sum_k b1[i, k, o] b2[j, k, o]: one warp per row.
template <typename T>
__global__ void __launch_bounds__(32 * kTraceWarps)
    gram_trace_kernel(const T* __restrict__ b1, const T* __restrict__ b2, const T* __restrict__ p,
                      const bool* __restrict__ live_o, T* __restrict__ out, int64_t r0, int64_t rows, int64_t n2,
                      int64_t k, int64_t o, bool diagonal) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warp = threadIdx.x / 32;
  // rr is the same for the whole warp, so every lane takes part in the shuffles
  for (int64_t rr = int64_t{blockIdx.x} * kTraceWarps + warp; rr < rows; rr += int64_t{gridDim.x} * kTraceWarps) {
    int64_t i = 0, j = 0;
    pair_of(r0 + rr, n2, diagonal, i, j);
    const T* b1i = b1 + i * k * o;
    const T* b2j = b2 + j * k * o;
    const T* pr = p + rr * o;
    T acc = T(0);
    for (int64_t oo = lane; oo < o; oo += 32) {
      if (!live_o[oo]) continue;  // a dead o: left out, not multiplied by its zero P
      T d = T(0);
      for (int64_t kq = 0; kq < k; ++kq) d += b1i[kq * o + oo] * b2j[kq * o + oo];
      acc += pr[oo] * d;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[r0 + rr] = acc;
  }
}

unsigned blocks_for(int64_t work_items) {
  return static_cast<unsigned>(std::min(std::max<int64_t>(work_items, 1), kMaxBlocks));
}

template <typename T>
cudaError_t launch_typed(const T* a1, const T* b1, const T* a2, const T* b2, const T* mask, const bool* live_c,
                         const bool* live_o, T* out, T* workspace, int64_t workspace_rows, int64_t n1, int64_t n2,
                         int64_t c, int64_t k, int64_t o, GramModeCode mode, cudaStream_t stream) {
  const bool diagonal = mode == GramModeCode::kDiagonal || mode == GramModeCode::kDiagonalTrace;
  const bool full = mode == GramModeCode::kFull || mode == GramModeCode::kDiagonal;
  const int64_t per_row = full ? k * k : 1;
  const int64_t rows_total = diagonal ? n1 : n1 * n2;
  if (rows_total == 0 || per_row == 0) return cudaSuccess;
  if (c == 0 || o == 0) {
    return cudaMemsetAsync(out, 0, static_cast<size_t>(rows_total * per_row) * sizeof(T), stream);
  }
  // the full kernel's run of o: as long as shared memory allows, at least 2 (else unstaged)
  int64_t ob = 64;
  auto smem_for = [&](int64_t run) { return (2 * k * (run + 1) + run) * static_cast<int64_t>(sizeof(T)); };
  while (ob > 2 && smem_for(ob) > kSmemBudget) ob /= 2;
  const bool staged = smem_for(ob) <= kSmemBudget;
  const size_t smem = staged ? static_cast<size_t>(smem_for(ob)) : 0;
  for (int64_t r0 = 0; r0 < rows_total; r0 += workspace_rows) {
    const int64_t rows = std::min(workspace_rows, rows_total - r0);
    const int64_t tiles = ((rows + kTile - 1) / kTile) * ((o + kTile - 1) / kTile);
    gram_p_kernel<T><<<blocks_for(tiles), kPThreads, 0, stream>>>(a1, a2, mask, live_c, workspace, r0, rows, n2, c,
                                                                   o, diagonal);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (full) {
      gram_full_kernel<T><<<blocks_for(rows), kFullThreads, smem, stream>>>(b1, b2, workspace, live_o, out, r0, rows,
                                                                            n2, k, o, ob, diagonal, staged);
    } else {
      gram_trace_kernel<T><<<blocks_for((rows + kTraceWarps - 1) / kTraceWarps), 32 * kTraceWarps, 0, stream>>>(
          b1, b2, workspace, live_o, out, r0, rows, n2, k, o, diagonal);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t masked_gram_launch(const void* a1, const void* b1, const void* a2, const void* b2, const void* mask,
                               const bool* live_c, const bool* live_o, void* out, void* workspace,
                               int64_t workspace_rows, int64_t n1, int64_t n2, int64_t c, int64_t k, int64_t o,
                               GramModeCode mode, GramDtype dtype, cudaStream_t stream) {
  if (n1 < 0 || n2 < 0 || c < 0 || k < 0 || o < 0 || workspace_rows < 1) return cudaErrorInvalidValue;
  if ((c > 0 && live_c == nullptr) || (o > 0 && live_o == nullptr)) return cudaErrorInvalidValue;
  const bool diagonal = mode == GramModeCode::kDiagonal || mode == GramModeCode::kDiagonalTrace;
  if (diagonal && n1 != n2) return cudaErrorInvalidValue;
  if (dtype == GramDtype::kFloat32) {
    return launch_typed(static_cast<const float*>(a1), static_cast<const float*>(b1), static_cast<const float*>(a2),
                        static_cast<const float*>(b2), static_cast<const float*>(mask), live_c, live_o,
                        static_cast<float*>(out), static_cast<float*>(workspace), workspace_rows, n1, n2, c, k, o, mode,
                        stream);
  }
  if (dtype == GramDtype::kFloat64) {
    return launch_typed(static_cast<const double*>(a1), static_cast<const double*>(b1), static_cast<const double*>(a2),
                        static_cast<const double*>(b2), static_cast<const double*>(mask), live_c, live_o,
                        static_cast<double*>(out), static_cast<double*>(workspace), workspace_rows, n1, n2, c, k, o,
                        mode, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace ntkfast
