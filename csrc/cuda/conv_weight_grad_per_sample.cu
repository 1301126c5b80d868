// CUDA kernel for ntkfast::conv_weight_grad_per_sample (interface: conv_weight_grad_per_sample.cuh).
//
// For one sample and one group the output is a matrix product over the Ho * Wo positions,
//   out[(k, o), (c, r, s)] = sum_l go[(k, o), l] * patch[l, (c, r, s)],
// with patch the sample's im2col matrix, never stored. A block owns a tile of kBM rows (k, o)
// x kBN columns (c, r, s) of one (sample, group) and walks the positions kBK at a time: it stages
// those positions of its grad_output rows and the matching patch entries, gathered from the input
// (zero outside the image: implicit im2col), in shared memory, then every thread accumulates a
// kTM x kTN piece of the tile in registers. The tile's row offsets, column offsets and the
// positions' coordinates are worked out once into shared tables, so the gathers need no division.
//
// Few tiles for the device (a small batch, a small layer with many positions) would leave most
// multiprocessors idle: the positions are then split into parts, each part's sums go to its own
// copy of the output in the workspace, and a second kernel adds the copies in a fixed order
// (deterministic, no atomics). Offsets are int64 throughout; the block index runs over a
// grid-stride loop, so any number of tiles fits the grid's limits.
#include "conv_weight_grad_per_sample.cuh"

#include <algorithm>

namespace ntkfast {
namespace gpu {
namespace {

constexpr int kBM = 64;  // rows (k, o) per tile
constexpr int kBN = 64;  // columns (c, r, s) per tile
constexpr int kBK = 16;  // positions staged at a time
constexpr int kTM = 4;   // rows per thread: ty + 16 * i
constexpr int kTN = 4;   // columns per thread: tx + 16 * j
constexpr int kThreadsX = kBN / kTN;  // 16
constexpr int kThreadsY = kBM / kTM;  // 16
constexpr int kThreads = kThreadsX * kThreadsY;  // 256
constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;
constexpr size_t kMaxWorkspace = size_t{1} << 30;  // splitting never asks for more than 1 GiB
constexpr int kReduceThreads = 256;

static_assert(kThreadsX * kTN == kBN && kThreadsY * kTM == kBM, "the threads cover the tile");
static_assert(kBK <= kThreads && kBM <= kThreads && kBN <= kThreads, "one table entry per thread");

struct Plan {
  int64_t M, J, L;             // rows, columns, positions of one (sample, group)
  int64_t m_tiles, n_tiles;    // tiles per (sample, group)
  int64_t splits, chunk;       // position parts, positions per part (a multiple of kBK)
  int64_t blocks;              // N * groups * splits * m_tiles * n_tiles
  int64_t out_numel;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Plan make_plan(const ConvWgradShape& s, size_t elem, int sm_count) {
  Plan p{};
  p.M = s.K * (s.O / s.groups);
  p.J = (s.C / s.groups) * s.kh * s.kw;
  p.L = s.Ho * s.Wo;
  p.m_tiles = ceil_div(p.M, kBM);
  p.n_tiles = ceil_div(p.J, kBN);
  p.out_numel = s.N * s.K * s.O * p.J;
  const int64_t tiles = s.N * s.groups * p.m_tiles * p.n_tiles;
  // Aim for a few blocks per multiprocessor; a part keeps at least 4 stagings of positions.
  const int64_t target = 4 * static_cast<int64_t>(std::max(sm_count, 1));
  int64_t splits = 1;
  if (tiles > 0 && tiles < target) {
    splits = std::min(ceil_div(target, tiles), std::max<int64_t>(1, p.L / (4 * kBK)));
    const size_t copy_bytes = elem * static_cast<size_t>(std::max<int64_t>(p.out_numel, 1));
    const int64_t cap = static_cast<int64_t>(kMaxWorkspace / copy_bytes);
    splits = std::max<int64_t>(1, std::min(splits, cap));
  }
  p.chunk = ceil_div(ceil_div(p.L, splits), kBK) * kBK;
  p.splits = ceil_div(p.L, p.chunk);
  p.blocks = tiles * p.splits;
  return p;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_wgrad_kernel(const T* __restrict__ x, const T* __restrict__ go, T* __restrict__ out, ConvWgradShape s,
                      Plan p) {
  __shared__ T a_tile[kBK][kBM + 1];  // [position][row]; +1: the transposing stores hit distinct banks
  __shared__ T b_tile[kBK][kBN + 1];  // [position][column]
  __shared__ int64_t row_base[kBM];   // offset of the row's position 0 in grad_output, -1 past M
  __shared__ int64_t col_plane[kBN];  // offset of the column's input plane, -1 past J
  __shared__ int64_t col_dy[kBN];     // r * dh - ph
  __shared__ int64_t col_dx[kBN];     // s * dw - pw
  __shared__ int64_t pos_y[kBK];      // y * sh of a staged position
  __shared__ int64_t pos_x[kBK];      // x * sw
  __shared__ bool pos_ok[kBK];        // the position lies in this part

  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX;
  const int ty = tid / kThreadsX;
  const int64_t og = s.O / s.groups;
  const int64_t cg = s.C / s.groups;
  const int64_t khw = s.kh * s.kw;
  const int64_t plane = s.H * s.W;

  for (int64_t vb = blockIdx.x; vb < p.blocks; vb += gridDim.x) {
    int64_t rest = vb;
    const int64_t jt = rest % p.n_tiles;
    rest /= p.n_tiles;
    const int64_t mt = rest % p.m_tiles;
    rest /= p.m_tiles;
    const int64_t part = rest % p.splits;
    rest /= p.splits;
    const int64_t grp = rest % s.groups;
    const int64_t n = rest / s.groups;
    const int64_t m0 = mt * kBM;
    const int64_t j0 = jt * kBN;
    const int64_t p_begin = part * p.chunk;
    const int64_t p_end = p_begin + p.chunk < p.L ? p_begin + p.chunk : p.L;

    __syncthreads();  // the previous tile is done with the tables
    if (tid < kBM) {
      const int64_t m = m0 + tid;
      row_base[tid] = m < p.M ? ((n * s.K + m / og) * s.O + grp * og + m % og) * p.L : -1;
    }
    if (tid < kBN) {
      const int64_t j = j0 + tid;
      if (j < p.J) {
        const int64_t c = j / khw;
        const int64_t r = (j % khw) / s.kw;
        const int64_t q = j % s.kw;
        col_plane[tid] = (n * s.C + grp * cg + c) * plane;
        col_dy[tid] = r * s.dh - s.ph;
        col_dx[tid] = q * s.dw - s.pw;
      } else {
        col_plane[tid] = -1;
        col_dy[tid] = 0;
        col_dx[tid] = 0;
      }
    }

    T acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = T(0);
    }

    for (int64_t pc = p_begin; pc < p_end; pc += kBK) {
      if (tid < kBK) {
        const int64_t l = pc + tid;
        pos_ok[tid] = l < p_end;
        pos_y[tid] = l < p_end ? (l / s.Wo) * s.sh : 0;
        pos_x[tid] = l < p_end ? (l % s.Wo) * s.sw : 0;
      }
      __syncthreads();  // tables written; everyone is done computing with the previous stage
      // consecutive threads take consecutive positions: coalesced reads of grad_output rows and,
      // with stride 1, of input rows
      for (int e = tid; e < kBK * kBM; e += kThreads) {
        const int pl = e % kBK;
        const int ml = e / kBK;
        const int64_t base = row_base[ml];
        a_tile[pl][ml] = (pos_ok[pl] && base >= 0) ? go[base + pc + pl] : T(0);
      }
      for (int e = tid; e < kBK * kBN; e += kThreads) {
        const int pl = e % kBK;
        const int jl = e / kBK;
        T v = T(0);
        const int64_t cp = col_plane[jl];
        if (pos_ok[pl] && cp >= 0) {
          const int64_t iy = pos_y[pl] + col_dy[jl];
          const int64_t ix = pos_x[pl] + col_dx[jl];
          if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W) v = x[cp + iy * s.W + ix];
        }
        b_tile[pl][jl] = v;
      }
      __syncthreads();
#pragma unroll
      for (int pl = 0; pl < kBK; ++pl) {
        T a[kTM];
        T b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = a_tile[pl][ty + kThreadsY * i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) b[j] = b_tile[pl][tx + kThreadsX * j];
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
      }
    }

    // rows of the output: the same (n, k, o) index as grad_output's rows, of J entries each
    T* dst = out + part * p.out_numel;
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int ml = ty + kThreadsY * i;
      const int64_t base = row_base[ml];
      if (base < 0) continue;
      const int64_t row = base / p.L;
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t col = j0 + tx + kThreadsX * j;
        if (col < p.J) dst[row * p.J + col] = acc[i][j];
      }
    }
  }
}

// out[i] = sum over parts q = 0, 1, ... of parts[q * numel + i], in that order.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    sum_parts_kernel(const T* __restrict__ parts, T* __restrict__ out, int64_t numel, int64_t count) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < numel;
       i += int64_t{gridDim.x} * blockDim.x) {
    T sum = parts[i];
    for (int64_t q = 1; q < count; ++q) sum += parts[q * numel + i];
    out[i] = sum;
  }
}

template <typename T>
cudaError_t launch_typed(const T* x, const T* go, T* out, T* workspace, const ConvWgradShape& s, const Plan& p,
                         cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(p.blocks, kMaxGrid));
  if (p.splits == 1) {
    conv_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(x, go, out, s, p);
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  conv_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(x, go, workspace, s, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t reduce_blocks = std::min<int64_t>(ceil_div(p.out_numel, kReduceThreads), int64_t{1} << 20);
  sum_parts_kernel<T><<<static_cast<unsigned>(reduce_blocks), kReduceThreads, 0, stream>>>(workspace, out, p.out_numel,
                                                                                          p.splits);
  return cudaGetLastError();
}

bool valid(const ConvWgradShape& s) {
  return s.N >= 0 && s.C >= 1 && s.H >= 0 && s.W >= 0 && s.K >= 1 && s.O >= 1 && s.Ho >= 1 && s.Wo >= 1 &&
         s.kh >= 1 && s.kw >= 1 && s.sh >= 1 && s.sw >= 1 && s.ph >= 0 && s.pw >= 0 && s.dh >= 1 && s.dw >= 1 &&
         s.groups >= 1 && s.C % s.groups == 0 && s.O % s.groups == 0;
}

size_t elem_size(ConvWgradDtype dtype) { return dtype == ConvWgradDtype::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace

size_t conv_wgrad_workspace_bytes(const ConvWgradShape& s, ConvWgradDtype dtype, int sm_count) {
  if (!valid(s)) return 0;
  const Plan p = make_plan(s, elem_size(dtype), sm_count);
  if (p.splits == 1 || p.out_numel == 0) return 0;
  return static_cast<size_t>(p.splits) * static_cast<size_t>(p.out_numel) * elem_size(dtype);
}

cudaError_t conv_wgrad_launch(const void* input, const void* grad_output, void* out, void* workspace,
                              const ConvWgradShape& s, ConvWgradDtype dtype, int sm_count, cudaStream_t stream) {
  if (!valid(s)) return cudaErrorInvalidValue;
  const Plan p = make_plan(s, elem_size(dtype), sm_count);
  if (p.out_numel == 0 || p.blocks == 0) return cudaSuccess;
  if (dtype == ConvWgradDtype::kFloat64) {
    return launch_typed(static_cast<const double*>(input), static_cast<const double*>(grad_output),
                        static_cast<double*>(out), static_cast<double*>(workspace), s, p, stream);
  }
  return launch_typed(static_cast<const float*>(input), static_cast<const float*>(grad_output),
                      static_cast<float*>(out), static_cast<float*>(workspace), s, p, stream);
}

}  // namespace gpu
}  // namespace ntkfast
