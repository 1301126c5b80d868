// CUDA kernels of ntkfast::path_chain and ntkfast::path_score (interface: path.cuh).
//
// path_chain: launch k runs two independent matrix-vector products side by side, the forward of
// layer k (a warp per (sample, output row), lanes striding along the row, a shuffle reduction)
// and the backward of layer L - 1 - k (a thread per input column, looping down the rows, so a warp
// reads 32 consecutive weights of a row at a time). |w| or w^2 is applied to each weight as it is
// loaded. Every sum runs in a fixed order: results do not depend on scheduling.
//
// path_score: dense, a thread per weight; convolution, a block per weight reducing over the
// samples and output positions (shared-memory tree), then |w|^q * mask.
//
// Pruned weights (a zero mask entry) contribute nothing whatever they hold: every product with the
// mask is a select, so a NaN or infinite weight there (or an input only pruned weights read) never
// meets the zero as 0 * inf.
#include <algorithm>
#include "path.cuh"

#include <cstdint>

namespace ntkfast {
namespace gpu {
namespace {

constexpr int kThreads = kPathChainThreads;
constexpr int kWarps = kPathChainRowsPerBlock;
constexpr int kScoreThreads = 128;
constexpr int64_t kMaxScoreBlocks = int64_t{1} << 20;

template <typename T, int P>
__device__ __forceinline__ T path_g(T w) {
  if constexpr (P == 1) {
    return T(fabs(w));  // as the CPU's std::abs: -0.0 gives +0.0
  } else {
    return w * w;
  }
}

template <typename T>
__device__ __forceinline__ T weight_pow(T w, int q) {
  return q == 0 ? T(1) : (q == 1 ? T(fabs(w)) : w * w);
}

struct StepArgs {
  // forward part
  const void* fw_weight;
  const void* fw_mask;
  const void* fw_bias;
  const void* fw_in;
  void* fw_out;
  int64_t fw_o, fw_c;
  // backward part: bw_grad_out nullptr means ones
  const void* bw_weight;
  const void* bw_mask;
  const void* bw_grad_out;
  void* bw_grad_in;
  int64_t bw_o, bw_c;
  int64_t n;
  int64_t forward_blocks;
};

template <typename T, int P>
__global__ void chain_step_kernel(StepArgs args) {
  if (static_cast<int64_t>(blockIdx.x) < args.forward_blocks) {
    const T* w = static_cast<const T*>(args.fw_weight);
    const T* m = static_cast<const T*>(args.fw_mask);
    const T* bias = static_cast<const T*>(args.fw_bias);
    const T* a = static_cast<const T*>(args.fw_in);
    T* out = static_cast<T*>(args.fw_out);
    const int lane = threadIdx.x % 32;
    const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (pair >= args.n * args.fw_o) return;
    const int64_t i = pair / args.fw_o, o = pair % args.fw_o, c_size = args.fw_c;
    const T* wr = w + o * c_size;
    const T* mr = m != nullptr ? m + o * c_size : nullptr;
    const T* ai = a + i * c_size;
    T acc = 0;
    for (int64_t c = lane; c < c_size; c += 32) {
      // a pruned weight's term is left out by a select (not g(w * 0) * a, NaN for an infinite w
      // or a): neither it nor the input it would read contributes
      if (mr != nullptr) {
        acc += mr[c] != T(0) ? path_g<T, P>(wr[c] * mr[c]) * ai[c] : T(0);
      } else {
        acc += path_g<T, P>(wr[c]) * ai[c];
      }
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[i * args.fw_o + o] = acc + (bias != nullptr ? path_g<T, P>(bias[o]) : T(0));
    return;
  }
  const T* w = static_cast<const T*>(args.bw_weight);
  const T* m = static_cast<const T*>(args.bw_mask);
  const T* g = static_cast<const T*>(args.bw_grad_out);
  T* z = static_cast<T*>(args.bw_grad_in);
  const int64_t c = (static_cast<int64_t>(blockIdx.x) - args.forward_blocks) * kThreads + threadIdx.x;
  if (c >= args.bw_c) return;
  T acc = 0;
  for (int64_t o = 0; o < args.bw_o; ++o) {
    const int64_t at = o * args.bw_c + c;
    const bool kept = m == nullptr || m[at] != T(0);
    const T wc = m != nullptr ? w[at] * m[at] : w[at];
    acc += kept ? path_g<T, P>(wc) * (g != nullptr ? g[o] : T(1)) : T(0);  // a select, as in the forward
  }
  z[c] = acc;
}

template <typename T, int P>
cudaError_t chain_run(const PathChainLayer* layers, int64_t num_layers, const void* input, int64_t n,
                      cudaStream_t stream) {
  for (int64_t k = 0; k < num_layers; ++k) {
    const PathChainLayer& f = layers[k];
    const int64_t j = num_layers - 1 - k;
    const PathChainLayer& b = layers[j];
    StepArgs args{};
    args.fw_weight = f.weight;
    args.fw_mask = f.mask;
    args.fw_bias = f.bias;
    args.fw_in = k == 0 ? input : layers[k - 1].forward_out;
    args.fw_out = f.forward_out;
    args.fw_o = f.o;
    args.fw_c = f.c;
    args.bw_weight = b.weight;
    args.bw_mask = b.mask;
    args.bw_grad_out = j + 1 == num_layers ? nullptr : layers[j + 1].backward_out;
    args.bw_grad_in = b.backward_out;
    args.bw_o = b.o;
    args.bw_c = b.c;
    args.n = n;
    args.forward_blocks = (n * f.o + kWarps - 1) / kWarps;
    const int64_t blocks = path_chain_step_blocks(n, f.o, b.c);
    if (blocks == 0) continue;
    if (blocks > kPathMaxGridX) return cudaErrorInvalidValue;  // one launch, no grid-stride loop; the glue checks first
    chain_step_kernel<T, P><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
__global__ void score_dense_kernel(const T* w, const T* m, const T* a, const T* b, T* out, int64_t n, int64_t o_size,
                                   int64_t c_size, int q) {
  const int64_t numel = o_size * c_size;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // grid-stride: the launch caps its grid, so any weight size is covered
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += step) {
    const int64_t o = idx / c_size, c = idx % c_size;
    T g = 0;
    for (int64_t i = 0; i < n; ++i) g += b[i * o_size + o] * a[i * c_size + c];
    const T s = weight_pow(w[idx], q) * g;
    out[idx] = m != nullptr ? (m[idx] != T(0) ? s * m[idx] : T(0)) : s;  // exactly 0 when pruned: a select
  }
}

template <typename T>
__global__ void score_conv_kernel(const T* w, const T* m, const T* a, const T* b, T* out, PathScoreGeometry geo,
                                  int q) {
  __shared__ T partial[kScoreThreads];
  const int64_t idx = blockIdx.x;  // flat index of the weight [o, cg, kh, kw]
  const int64_t s = idx % geo.kw, r = (idx / geo.kw) % geo.kh, cl = (idx / (geo.kw * geo.kh)) % geo.cg;
  const int64_t o = idx / (geo.kw * geo.kh * geo.cg);
  const int64_t ch = (o / (geo.o / geo.groups)) * geo.cg + cl;
  const int64_t positions = geo.n * geo.ho * geo.wo;
  T acc = 0;
  for (int64_t p = threadIdx.x; p < positions; p += kScoreThreads) {
    const int64_t x = p % geo.wo, y = (p / geo.wo) % geo.ho, i = p / (geo.wo * geo.ho);
    const int64_t iy = y * geo.sh + r * geo.dh - geo.ph, ix = x * geo.sw + s * geo.dw - geo.pw;
    if (iy < 0 || iy >= geo.h || ix < 0 || ix >= geo.w) continue;
    acc += b[((i * geo.o + o) * geo.ho + y) * geo.wo + x] * a[((i * geo.c + ch) * geo.h + iy) * geo.w + ix];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kScoreThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const T v = weight_pow(w[idx], q) * partial[0];
    out[idx] = m != nullptr ? (m[idx] != T(0) ? v * m[idx] : T(0)) : v;  // exactly 0 when pruned: a select
  }
}

template <typename T>
cudaError_t score_run(const void* weight, const void* mask, const void* a, const void* b, void* out,
                      const PathScoreGeometry& geo, int q, cudaStream_t stream) {
  const T* w = static_cast<const T*>(weight);
  const T* m = static_cast<const T*>(mask);
  const int64_t numel = geo.o * geo.cg * geo.kh * geo.kw;
  if (numel == 0) return cudaSuccess;
  if (geo.dense) {
    const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxScoreBlocks);
    score_dense_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        w, m, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), geo.n, geo.o, geo.c, q);
  } else {
    if (numel > kPathMaxGridX) return cudaErrorInvalidValue;  // one block per weight; the glue checks first
    score_conv_kernel<T><<<static_cast<unsigned>(numel), kScoreThreads, 0, stream>>>(
        w, m, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), geo, q);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t path_chain_launch(const PathChainLayer* layers, int64_t num_layers, const void* input, int64_t n,
                              int power, PathDtype dtype, cudaStream_t stream) {
  if (dtype == PathDtype::kFloat64) {
    return power == 1 ? chain_run<double, 1>(layers, num_layers, input, n, stream)
                      : chain_run<double, 2>(layers, num_layers, input, n, stream);
  }
  return power == 1 ? chain_run<float, 1>(layers, num_layers, input, n, stream)
                    : chain_run<float, 2>(layers, num_layers, input, n, stream);
}

cudaError_t path_score_launch(const void* weight, const void* mask, const void* a, const void* b, void* out,
                              const PathScoreGeometry& geo, int weight_power, PathDtype dtype, cudaStream_t stream) {
  if (dtype == PathDtype::kFloat64) return score_run<double>(weight, mask, a, b, out, geo, weight_power, stream);
  return score_run<float>(weight, mask, a, b, out, geo, weight_power, stream);
}

}  // namespace gpu
}  // namespace ntkfast
