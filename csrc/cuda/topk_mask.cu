// CUDA kernels for ntkfast::topk_mask and ntkfast::topk_mask_layerwise (interface: topk_mask.cuh).
//
// The same selection as the CPU kernel (csrc/cpu/topk_mask_cpu.cpp), reached on the device:
//
//   keys      FloatKey<T>::of maps every score to an unsigned key with a > b iff key(a) > key(b),
//             -0.0 and +0.0 to one key. Entries whose keep is False are skipped by every kernel.
//   select    A most-significant-digit radix select, 11-bit digits: 3 passes for float32 (11, 11,
//             10 bits), 6 for float64 (11 x 5, 9). Each pass histograms, into 2048 bins, the digit
//             of the entries whose higher digits equal the prefix chosen so far; a one-block-per-
//             problem kernel then walks the bins from the top, finds the bin holding the
//             remaining-th highest entry, appends it to the prefix and subtracts the entries of
//             the higher bins from `remaining`. Prefix, mask, remaining and a mode live on the
//             device (SelectState), so a pass never waits for the host.
//   early     If the chosen bin holds exactly `remaining` entries, every entry whose masked key
//   exit      is >= prefix is kept and nothing is left to break (mode kWhole); later passes skip
//             the problem without reading its data.
//   ties      After the last pass the prefix is the exact threshold key and more entries equal it
//             than are still to be kept (mode kTies): the first `remaining` of them in flat
//             order are kept. Per-chunk counts of equal entries, an exclusive scan over chunks
//             (cub::DeviceScan), and inside a chunk warp ballots plus a scan of per-warp counts
//             give every equal entry its exact flat rank.
//   sync      One host sync in all, after the first pass: it returns the NaN flags and the
//             number of keepable entries, which the caller needs for its error messages (and to
//             skip the later passes when every k is 0 or everything).
//
// Work is cut into chunks of kTopkChunk elements that never span two tensors (like the CPU's
// segments): a chunk index is a position in a virtual flat index space over all tensors, found
// from the per-tensor prefix sums of chunk counts (chunk_offsets), so the tensors are never
// concatenated and empty tensors simply own no chunk. Chunks are in flat order, which the tie
// rank depends on. Layerwise runs one independent selection (problem) per tensor in the same
// launches: problem p = tensor p, its own histogram and state.
#include "topk_mask.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../topk_key.h"

namespace ntkfast {
namespace gpu {
namespace {

constexpr int kThreads = 256;                 // per block, in every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 16;                    // elements per thread per chunk
static_assert(int64_t{kThreads} * kItems == kTopkChunk, "a block reads one chunk at a time");
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kBinsPerThread = kBins / kThreads;
static_assert(kBins % kThreads == 0, "bins divide evenly among the threads of the choose kernel");
constexpr int kRankSlots = kItems * kWarps;   // per-(row, warp) tie counts in the write kernel
static_assert(kRankSlots % 32 == 0, "one warp scans the per-(row, warp) counts");
constexpr unsigned kFullMask = 0xffffffffu;
// Bound on chunks per block of the histogram kernel: a block's shared-memory bins are 32-bit and
// count at most chunks_per_block * kTopkChunk entries between flushes, which must stay < 2^32.
constexpr int64_t kMaxChunksPerBlock = int64_t{1} << 19;
constexpr int kHistBlocksPerSM = 8;           // 256 threads and 8 KiB of shared memory each

// Modes of a problem's selection.
enum : int {
  kActive = 0,   // more radix passes needed
  kWhole = 1,    // keep exactly the keepable entries with (key & mask) >= prefix
  kTies = 2,     // keep key > prefix, and the first `remaining` entries with key == prefix
  kNone = 3,     // k == 0: keep nothing
  kInvalid = 4,  // k > number of keepable entries: the host raises, the output is not used
};

struct SelectState {
  unsigned long long prefix;     // chosen high digits of the threshold key
  unsigned long long mask;       // which bits of the key prefix covers
  unsigned long long remaining;  // how many entries matching prefix are still to be kept (>= 1 while kActive)
  int mode;
  int unused;
};

// Device view of the meta buffer.
struct Meta {
  const TopkTensor* tensors;
  const int64_t* chunk_offsets;  // [L + 1]: tensor t owns chunks [chunk_offsets[t], chunk_offsets[t + 1])
  const int64_t* ks;             // [num_problems]
  int64_t num_tensors;
  int64_t num_chunks;
  int layerwise;
};

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// Bits [shift, shift + width) of the key are the digit of pass `pass`, from the most significant.
__host__ __device__ inline void pass_digit(int key_bits, int pass, int* shift, int* width) {
  const int hi = key_bits - pass * kDigitBits;
  const int lo = hi > kDigitBits ? hi - kDigitBits : 0;
  *shift = lo;
  *width = hi - lo;
}

// NaN from the bits, not from v != v, so that no math flag can fold the test away.
__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool is_nan(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
}

__device__ __forceinline__ int64_t problem_of(const Meta& m, int64_t tensor) { return m.layerwise ? tensor : 0; }

// First chunk of problem p: where its flat order (and its tie ranks) starts.
__device__ __forceinline__ int64_t first_chunk_of(const Meta& m, int64_t p) { return m.layerwise ? m.chunk_offsets[p] : 0; }

// The tensor owning chunk c: the largest t < L with chunk_offsets[t] <= c. Empty tensors own no
// chunk (chunk_offsets[t] == chunk_offsets[t + 1]) and are passed over, since the largest such t
// is the one whose range is non-empty: chunk_offsets[t + 1] > c (or t + 1 == L, and
// chunk_offsets[L] = num_chunks > c).
__device__ __forceinline__ int64_t tensor_of_chunk(const Meta& m, int64_t c) {
  int64_t lo = 0, hi = m.num_tensors - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (m.chunk_offsets[mid] <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Loads chunk c of tensor t in a striped arrangement (row j, thread i holds chunk element
// j * kThreads + i: coalesced loads, and flat order is (row, warp, lane) order). ok[j]: the
// element exists and may be kept. nan: a keepable element is NaN (only computed if kCheckNan).
template <typename T, bool kCheckNan>
__device__ __forceinline__ void load_chunk(const Meta& m, int64_t t, int64_t c,
                                           typename FloatKey<T>::key_t (&key)[kItems], bool (&ok)[kItems],
                                           bool* nan) {
  const TopkTensor tt = m.tensors[t];
  const T* __restrict__ x = static_cast<const T*>(tt.scores);
  const bool* __restrict__ kp = tt.keep;
  const int64_t base = (c - m.chunk_offsets[t]) * kTopkChunk;
  const int64_t n = tt.numel - base;  // >= 1: chunk c exists
  bool anynan = false;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = int64_t{j} * kThreads + threadIdx.x;
    const bool in = i < n;
    const T v = in ? x[base + i] : T(0);
    ok[j] = in && (kp == nullptr || kp[base + i]);
    key[j] = FloatKey<T>::of(v);
    if (kCheckNan) anynan |= ok[j] && is_nan(v);
  }
  if (kCheckNan) *nan = anynan;
}

// Adds one to sh[bin] for each lane with `valid`. All 32 lanes must call it together. When every
// valid lane of the warp has the same bin (many equal scores: all-zero or constant layers), one
// lane adds their count, instead of 32 conflicting atomics on one shared-memory word.
__device__ __forceinline__ void hist_add(unsigned* sh, unsigned bin, bool valid) {
  const unsigned valid_lanes = __ballot_sync(kFullMask, valid);
  if (valid_lanes == 0) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(valid_lanes) - 1;
  const unsigned leader_bin = __shfl_sync(kFullMask, bin, leader);
  if (__all_sync(kFullMask, !valid || bin == leader_bin)) {
    if (lane == leader) atomicAdd(&sh[leader_bin], static_cast<unsigned>(__popc(valid_lanes)));
  } else if (valid) {
    atomicAdd(&sh[bin], 1u);
  }
}

// Adds the block's shared bins to a problem's global histogram and zeroes them. Block-uniform.
__device__ __forceinline__ void flush_hist(unsigned* sh, unsigned long long* g) {
  __syncthreads();  // every atomic on sh is done
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    const unsigned v = sh[b];
    if (v != 0) {
      atomicAdd(&g[b], static_cast<unsigned long long>(v));
      sh[b] = 0;
    }
  }
  __syncthreads();  // zeros visible before the next atomics
}

__global__ void init_kernel(const int64_t* __restrict__ ks, SelectState* __restrict__ states, int64_t num_problems) {
  const int64_t p = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (p < num_problems) {
    SelectState s;
    s.prefix = 0;
    s.mask = 0;
    s.remaining = static_cast<unsigned long long>(ks[p]);
    s.mode = kActive;
    s.unused = 0;
    states[p] = s;
  }
}

// One radix pass: for every chunk of an active problem, histograms the digit [shift, shift+width)
// of the keepable entries whose key matches the problem's prefix. Each block takes a contiguous
// run of chunks (so it changes problem, and flushes its shared bins, at most once per tensor
// boundary). In the first pass (prefix 0, mask 0: every keepable entry counts) it also flags
// tensors holding a keepable NaN; a NaN gets a key like any other value, and the host raises
// before its selection could matter.
template <typename T, bool kFirst>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(Meta m, const SelectState* __restrict__ states, unsigned long long* __restrict__ hist,
                     int* __restrict__ nan_flags, int shift, int width, int64_t chunks_per_block) {
  using key_t = typename FloatKey<T>::key_t;
  __shared__ unsigned sh[kBins];
  const int64_t c_begin = int64_t{blockIdx.x} * chunks_per_block;
  const int64_t c_end = c_begin + chunks_per_block < m.num_chunks ? c_begin + chunks_per_block : m.num_chunks;
  if (c_begin >= c_end) return;  // block-uniform
  for (int b = threadIdx.x; b < kBins; b += kThreads) sh[b] = 0;
  __syncthreads();
  const key_t digit_mask = (key_t{1} << width) - 1;  // width <= 11
  int64_t t = tensor_of_chunk(m, c_begin);
  int64_t cur = -1;  // problem whose entries sh holds
  bool dirty = false;
  SelectState st{};
  // Everything below depends on the chunk index only, hence is uniform across the block, so the
  // __syncthreads in flush_hist and the warp votes in hist_add are reached by all threads.
  for (int64_t c = c_begin; c < c_end; ++c) {
    while (m.chunk_offsets[t + 1] <= c) ++t;  // next non-empty tensor; t + 1 <= L since c < num_chunks
    const int64_t p = problem_of(m, t);
    if (p != cur) {
      if (dirty) flush_hist(sh, hist + cur * kBins);
      dirty = false;
      cur = p;
      st = states[p];  // not written during this kernel
    }
    if (st.mode != kActive) continue;  // early exit: nothing left to find in this problem
    dirty = true;
    const key_t prefix = static_cast<key_t>(st.prefix);
    const key_t mask = static_cast<key_t>(st.mask);
    key_t key[kItems];
    bool ok[kItems];
    bool nan = false;
    load_chunk<T, kFirst>(m, t, c, key, ok, &nan);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const bool valid = ok[j] && (key[j] & mask) == prefix;
      hist_add(sh, static_cast<unsigned>((key[j] >> shift) & digit_mask), valid);
    }
    if (kFirst && nan) nan_flags[t] = 1;  // racing stores of the same value
  }
  if (dirty) flush_hist(sh, hist + cur * kBins);
}

// One block per problem, after each histogram pass: finds the bin holding the remaining-th
// highest matching entry and narrows the state to it, then zeroes the histogram for the next
// pass. The bins are walked from the top: thread i owns bins kBins-1-(i*8) down to kBins-8-(i*8),
// and an exclusive block scan of the per-thread sums gives `above`, the number of matching
// entries in higher bins. Exactly one bin b has above(b) < remaining <= above(b) + count(b): a
// nonempty one, since remaining >= 1 and remaining <= total (pass 0: checked here; later passes:
// the total is the count of the bin chosen before, and remaining was cut to at most that count).
__global__ void __launch_bounds__(kThreads)
    choose_kernel(SelectState* __restrict__ states, unsigned long long* __restrict__ hist,
                  unsigned long long* __restrict__ alive, int shift, int width, int first, int last) {
  using BlockScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int64_t p = blockIdx.x;
  SelectState st = states[p];
  if (st.mode != kActive) return;  // block-uniform; an inactive problem's histogram stayed zero
  unsigned long long* h = hist + p * kBins;
  unsigned long long cnt[kBinsPerThread];
  unsigned long long sum = 0;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    const int bin = kBins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + i);
    cnt[i] = h[bin];
    h[bin] = 0;  // only this thread touches this bin here
    sum += cnt[i];
  }
  unsigned long long above, total;
  BlockScan(scan_storage).ExclusiveSum(sum, above, total);
  if (first) {
    // total = every keepable entry of the problem (mask 0 matched them all). The k checks of the
    // CPU kernel, in the same order; the host reads alive and raises for kInvalid.
    if (threadIdx.x == 0) alive[p] = total;
    const unsigned long long k = st.remaining;
    int mode = kActive;
    if (k == 0) {
      mode = kNone;
    } else if (k > total) {
      mode = kInvalid;
    } else if (k == total) {
      mode = kWhole;  // prefix 0, mask 0: every keepable entry
    }
    if (mode != kActive) {
      if (threadIdx.x == 0) states[p].mode = mode;
      return;
    }
  }
  const unsigned long long rem = st.remaining;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    if (above < rem && rem <= above + cnt[i]) {  // the one owner
      const int bin = kBins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + i);
      const unsigned long long left = rem - above;  // to keep among entries of this bin, 1..cnt[i]
      st.prefix |= static_cast<unsigned long long>(bin) << shift;
      st.mask |= ((1ull << width) - 1) << shift;
      st.remaining = left;
      st.mode = left == cnt[i] ? kWhole : (last ? kTies : kActive);
      states[p] = st;
    }
    above += cnt[i];
  }
}

// Number of keepable entries equal to the threshold per chunk (0 for chunks of problems not in
// kTies). One block per chunk; every chunk's count is written.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(Meta m, const SelectState* __restrict__ states, unsigned long long* __restrict__ ties) {
  using key_t = typename FloatKey<T>::key_t;
  using BlockReduce = cub::BlockReduce<unsigned, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  const int64_t c = blockIdx.x;
  const int64_t t = tensor_of_chunk(m, c);
  const SelectState st = states[problem_of(m, t)];
  if (st.mode != kTies) {
    if (threadIdx.x == 0) ties[c] = 0;
    return;
  }
  const key_t thr = static_cast<key_t>(st.prefix);
  key_t key[kItems];
  bool ok[kItems];
  load_chunk<T, false>(m, t, c, key, ok, nullptr);
  unsigned n = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) n += (ok[j] && key[j] == thr) ? 1u : 0u;
  const unsigned total = BlockReduce(reduce_storage).Sum(n);
  if (threadIdx.x == 0) ties[c] = total;
}

// Writes every output entry of one chunk per block.
//   kWhole: keep iff keepable and (key & mask) >= prefix. These are the entries of the higher
//           bins of every pass plus all of the chosen bin: exactly k, the ties included whole.
//   kTies:  keep iff keepable and (key > thr, or key == thr and rank < remaining), where rank is
//           the number of keepable entries equal to thr before this one in the problem's flat
//           order = (ties in earlier chunks of the problem: a difference of the exclusive scan)
//           + (in earlier (row, warp) slots of this chunk: a one-warp scan of ballot counts)
//           + (in lower lanes of the same slot: popc of the ballot below the lane).
//   else:   nothing is kept (k == 0; kInvalid never reaches here, the host raised).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    write_kernel(Meta m, const SelectState* __restrict__ states, const unsigned long long* __restrict__ ties_scan) {
  using key_t = typename FloatKey<T>::key_t;
  __shared__ unsigned slot[kRankSlots];
  const int64_t c = blockIdx.x;
  const int64_t t = tensor_of_chunk(m, c);
  const int64_t p = problem_of(m, t);
  const SelectState st = states[p];
  bool* __restrict__ out = m.tensors[t].out;
  const int64_t base = (c - m.chunk_offsets[t]) * kTopkChunk;
  const int64_t n = m.tensors[t].numel - base;
  if (st.mode == kWhole || st.mode == kTies) {  // block-uniform
    key_t key[kItems];
    bool ok[kItems];
    load_chunk<T, false>(m, t, c, key, ok, nullptr);
    bool res[kItems];
    if (st.mode == kWhole) {
      const key_t prefix = static_cast<key_t>(st.prefix);
      const key_t mask = static_cast<key_t>(st.mask);
#pragma unroll
      for (int j = 0; j < kItems; ++j) res[j] = ok[j] && (key[j] & mask) >= prefix;
    } else {
      const key_t thr = static_cast<key_t>(st.prefix);
      const int lane = threadIdx.x & 31;
      const int warp = threadIdx.x >> 5;
      const unsigned below = (1u << lane) - 1u;
      unsigned lane_rank[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const unsigned eq = __ballot_sync(kFullMask, ok[j] && key[j] == thr);
        lane_rank[j] = static_cast<unsigned>(__popc(eq & below));
        if (lane == 0) slot[j * kWarps + warp] = static_cast<unsigned>(__popc(eq));
      }
      __syncthreads();
      if (warp == 0) {  // exclusive scan of slot[], in (row, warp) = flat order, in place
        constexpr int kPer = kRankSlots / 32;
        unsigned v[kPer];
        unsigned s = 0;
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          v[q] = slot[lane * kPer + q];
          s += v[q];
        }
        unsigned incl = s;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned y = __shfl_up_sync(kFullMask, incl, off);
          if (lane >= off) incl += y;
        }
        unsigned run = incl - s;
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          slot[lane * kPer + q] = run;
          run += v[q];
        }
      }
      __syncthreads();
      const unsigned long long chunk_rank = ties_scan[c] - ties_scan[first_chunk_of(m, p)];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const bool eq = ok[j] && key[j] == thr;
        const unsigned long long rank = chunk_rank + slot[j * kWarps + warp] + lane_rank[j];
        res[j] = (ok[j] && key[j] > thr) || (eq && rank < st.remaining);
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = int64_t{j} * kThreads + threadIdx.x;
      if (i < n) out[base + i] = res[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = int64_t{j} * kThreads + threadIdx.x;
      if (i < n) out[base + i] = false;
    }
  }
}

Meta make_meta(const TopkMaskPlan& plan, const void* meta_dev) {
  const char* b = static_cast<const char*>(meta_dev);
  Meta m;
  m.tensors = reinterpret_cast<const TopkTensor*>(b + plan.meta_tensors);
  m.chunk_offsets = reinterpret_cast<const int64_t*>(b + plan.meta_chunk_offsets);
  m.ks = reinterpret_cast<const int64_t*>(b + plan.meta_ks);
  m.num_tensors = plan.num_tensors;
  m.num_chunks = plan.num_chunks;
  m.layerwise = plan.layerwise ? 1 : 0;
  return m;
}

struct Work {
  unsigned long long* hist;
  unsigned long long* alive;
  int* nan;
  SelectState* states;
  unsigned long long* ties;
  unsigned long long* ties_scan;
  void* cub;
};

Work make_work(const TopkMaskPlan& plan, void* workspace) {
  char* b = static_cast<char*>(workspace);
  Work w;
  w.hist = reinterpret_cast<unsigned long long*>(b + plan.ws_hist);
  w.alive = reinterpret_cast<unsigned long long*>(b + plan.ws_alive);
  w.nan = reinterpret_cast<int*>(b + plan.ws_nan);
  w.states = reinterpret_cast<SelectState*>(b + plan.ws_state);
  w.ties = reinterpret_cast<unsigned long long*>(b + plan.ws_ties);
  w.ties_scan = reinterpret_cast<unsigned long long*>(b + plan.ws_ties_scan);
  w.cub = b + plan.ws_cub;
  return w;
}

template <typename T>
constexpr int key_bits() {
  return FloatKey<T>::kBits;
}

// The histogram grid: about kHistBlocksPerSM blocks per SM, each a contiguous run of chunks.
void hist_grid(const TopkMaskPlan& plan, unsigned* blocks, int64_t* chunks_per_block) {
  const int64_t target = std::max<int64_t>(1, int64_t{plan.num_sms} * kHistBlocksPerSM);
  int64_t cpb = (plan.num_chunks + target - 1) / target;
  cpb = std::min(std::max<int64_t>(cpb, 1), kMaxChunksPerBlock);
  *chunks_per_block = cpb;
  *blocks = static_cast<unsigned>((plan.num_chunks + cpb - 1) / cpb);
}

template <typename T>
cudaError_t launch_pass(const TopkMaskPlan& plan, const Meta& m, const Work& w, cudaStream_t stream, int pass) {
  int shift = 0, width = 0;
  pass_digit(key_bits<T>(), pass, &shift, &width);
  const bool first = pass == 0;
  const bool last = pass == plan.num_passes - 1;
  if (plan.num_chunks > 0) {
    unsigned blocks = 0;
    int64_t cpb = 0;
    hist_grid(plan, &blocks, &cpb);
    if (first) {
      histogram_kernel<T, true><<<blocks, kThreads, 0, stream>>>(m, w.states, w.hist, w.nan, shift, width, cpb);
    } else {
      histogram_kernel<T, false><<<blocks, kThreads, 0, stream>>>(m, w.states, w.hist, w.nan, shift, width, cpb);
    }
  }
  choose_kernel<<<static_cast<unsigned>(plan.num_problems), kThreads, 0, stream>>>(w.states, w.hist, w.alive, shift,
                                                                                   width, first ? 1 : 0, last ? 1 : 0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t first_pass_impl(const TopkMaskPlan& plan, const Meta& m, const Work& w, void* workspace,
                            cudaStream_t stream) {
  // hist, alive and nan are contiguous: one memset zeroes them.
  cudaError_t err = cudaMemsetAsync(static_cast<char*>(workspace) + plan.ws_hist, 0, plan.ws_state - plan.ws_hist, stream);
  if (err != cudaSuccess) return err;
  const unsigned init_blocks = static_cast<unsigned>((plan.num_problems + kThreads - 1) / kThreads);
  init_kernel<<<init_blocks, kThreads, 0, stream>>>(m.ks, w.states, plan.num_problems);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_pass<T>(plan, m, w, stream, 0);
}

template <typename T>
cudaError_t finish_impl(const TopkMaskPlan& plan, const Meta& m, const Work& w, cudaStream_t stream, bool needs_select) {
  cudaError_t err = cudaSuccess;
  if (needs_select) {
    // A problem that finished early (kWhole) is skipped by these launches on the device.
    for (int pass = 1; pass < plan.num_passes; ++pass) {
      err = launch_pass<T>(plan, m, w, stream, pass);
      if (err != cudaSuccess) return err;
    }
  }
  if (plan.num_chunks == 0) return cudaSuccess;
  const unsigned chunks = static_cast<unsigned>(plan.num_chunks);
  if (needs_select) {  // otherwise no problem can be in kTies and ties_scan is not read
    tie_count_kernel<T><<<chunks, kThreads, 0, stream>>>(m, w.states, w.ties);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    size_t bytes = plan.cub_bytes;
    err = cub::DeviceScan::ExclusiveSum(w.cub, bytes, w.ties, w.ties_scan, static_cast<int>(plan.num_chunks), stream);
    if (err != cudaSuccess) return err;
  }
  write_kernel<T><<<chunks, kThreads, 0, stream>>>(m, w.states, w.ties_scan);
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_mask_plan(TopkMaskPlan* plan, ScoreDtype dtype, int64_t num_tensors, const int64_t* numels,
                           bool layerwise) {
  if (plan == nullptr || num_tensors < 0 || (num_tensors > 0 && numels == nullptr)) return cudaErrorInvalidValue;
  TopkMaskPlan pl{};
  pl.dtype = dtype;
  pl.layerwise = layerwise;
  pl.num_tensors = num_tensors;
  pl.num_problems = layerwise ? num_tensors : 1;
  int64_t chunks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (numels[t] < 0) return cudaErrorInvalidValue;
    chunks += (numels[t] + kTopkChunk - 1) / kTopkChunk;
  }
  // One block per chunk in the tie-count and write kernels; CUB's scan takes an int count.
  if (chunks > int64_t{0x7fffffff}) return cudaErrorInvalidValue;
  if (pl.num_problems > int64_t{0x7fffffff}) return cudaErrorInvalidValue;
  pl.num_chunks = chunks;
  const int bits = dtype == ScoreDtype::kFloat64 ? 64 : 32;
  pl.num_passes = (bits + kDigitBits - 1) / kDigitBits;

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&pl.num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;

  const size_t L = static_cast<size_t>(num_tensors);
  const size_t P = static_cast<size_t>(pl.num_problems);
  const size_t C = static_cast<size_t>(chunks);
  size_t off = 0;
  pl.meta_tensors = off;
  off = align_up(off + L * sizeof(TopkTensor));
  pl.meta_chunk_offsets = off;
  off = align_up(off + (L + 1) * sizeof(int64_t));
  pl.meta_ks = off;
  off = align_up(off + P * sizeof(int64_t));
  pl.meta_bytes = off;

  size_t cub_bytes = 0;
  if (C > 0) {
    err = cub::DeviceScan::ExclusiveSum(nullptr, cub_bytes, static_cast<unsigned long long*>(nullptr),
                                        static_cast<unsigned long long*>(nullptr), static_cast<int>(C));
    if (err != cudaSuccess) return err;
  }
  pl.cub_bytes = cub_bytes;
  off = 0;
  pl.ws_hist = off;  // hist, alive and nan back to back: one memset, and alive + nan one copy back
  off += P * kBins * sizeof(unsigned long long);
  pl.ws_alive = off;
  off += P * sizeof(unsigned long long);
  pl.ws_nan = off;
  off = align_up(off + L * sizeof(int));
  pl.ws_state = off;
  off = align_up(off + P * sizeof(SelectState));
  pl.ws_ties = off;
  off = align_up(off + C * sizeof(unsigned long long));
  pl.ws_ties_scan = off;
  off = align_up(off + C * sizeof(unsigned long long));
  pl.ws_cub = off;
  off = align_up(off + cub_bytes);
  pl.workspace_bytes = off;
  *plan = pl;
  return cudaSuccess;
}

void topk_mask_pack_meta(const TopkMaskPlan& plan, void* meta_host, const TopkTensor* tensors, const int64_t* ks) {
  char* b = static_cast<char*>(meta_host);
  std::memset(b, 0, plan.meta_bytes);
  const size_t L = static_cast<size_t>(plan.num_tensors);
  if (L > 0) std::memcpy(b + plan.meta_tensors, tensors, L * sizeof(TopkTensor));
  int64_t* offsets = reinterpret_cast<int64_t*>(b + plan.meta_chunk_offsets);
  offsets[0] = 0;
  for (size_t t = 0; t < L; ++t) offsets[t + 1] = offsets[t] + (tensors[t].numel + kTopkChunk - 1) / kTopkChunk;
  if (plan.num_problems > 0) {
    std::memcpy(b + plan.meta_ks, ks, static_cast<size_t>(plan.num_problems) * sizeof(int64_t));
  }
}

cudaError_t topk_mask_first_pass(const TopkMaskPlan& plan, const void* meta_dev, void* workspace, cudaStream_t stream,
                                 const int64_t* ks, int64_t* alive, int32_t* nan, bool* needs_select) {
  *needs_select = false;
  if (plan.num_problems == 0) return cudaSuccess;
  const Meta m = make_meta(plan, meta_dev);
  const Work w = make_work(plan, workspace);
  cudaError_t err = plan.dtype == ScoreDtype::kFloat64 ? first_pass_impl<double>(plan, m, w, workspace, stream)
                                                       : first_pass_impl<float>(plan, m, w, workspace, stream);
  if (err != cudaSuccess) return err;
  // The one host sync: alive[] and nan[] are adjacent in the workspace.
  const size_t P = static_cast<size_t>(plan.num_problems);
  const size_t L = static_cast<size_t>(plan.num_tensors);
  std::vector<unsigned char> buf(P * sizeof(unsigned long long) + L * sizeof(int));
  err = cudaMemcpyAsync(buf.data(), static_cast<const char*>(workspace) + plan.ws_alive, buf.size(),
                        cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return err;
  err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return err;
  for (size_t p = 0; p < P; ++p) {
    unsigned long long a;
    std::memcpy(&a, buf.data() + p * sizeof(a), sizeof(a));
    alive[p] = static_cast<int64_t>(a);
    if (ks[p] > 0 && ks[p] < alive[p]) *needs_select = true;
  }
  for (size_t t = 0; t < L; ++t) {
    int f;
    std::memcpy(&f, buf.data() + P * sizeof(unsigned long long) + t * sizeof(int), sizeof(f));
    nan[t] = f;
  }
  return cudaSuccess;
}

cudaError_t topk_mask_finish(const TopkMaskPlan& plan, const void* meta_dev, void* workspace, cudaStream_t stream,
                             bool needs_select) {
  if (plan.num_problems == 0) return cudaSuccess;
  const Meta m = make_meta(plan, meta_dev);
  const Work w = make_work(plan, workspace);
  return plan.dtype == ScoreDtype::kFloat64 ? finish_impl<double>(plan, m, w, stream, needs_select)
                                            : finish_impl<float>(plan, m, w, stream, needs_select);
}

}  // namespace gpu
}  // namespace ntkfast
