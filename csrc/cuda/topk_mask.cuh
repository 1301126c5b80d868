// CUDA kernels for ntkfast::topk_mask and ntkfast::topk_mask_layerwise: the host-side interface.
//
// Pure CUDA, no ATen: raw device pointers, sizes and a cudaStream_t, so the kernels compile with
// nvcc alone (CI has nvcc but no GPU and a CPU-only PyTorch). The torch glue in
// topk_mask_cuda.cpp checks the arguments, converts and allocates, and calls, in this order:
//
//   TopkMaskPlan plan;  topk_mask_plan(&plan, dtype, L, numels, layerwise);
//   host buffer of plan.meta_bytes  <- topk_mask_pack_meta(plan, host, tensors, ks)
//   device copy of that buffer (meta), device scratch of plan.workspace_bytes (workspace)
//   topk_mask_first_pass(...)   launches the first radix pass, then the ONE host sync: it reads
//                               back the per-tensor NaN flags and per-problem counts of entries
//                               that may be kept, for the caller's argument checks
//   topk_mask_finish(...)       the remaining passes, the tie-break and the output; no sync
//
// Only plain scalars and pointers cross this interface (no std:: containers), so a g++-compiled
// caller and the nvcc-compiled kernels need not agree on any library ABI.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ntkfast {
namespace gpu {

enum class ScoreDtype : int { kFloat32 = 0, kFloat64 = 1 };

// One score tensor, contiguous, on the current device. An empty tensor (numel == 0) may have null
// pointers: it is never read.
struct TopkTensor {
  const void* scores;  // float or double [numel], per ScoreDtype
  const bool* keep;    // [numel]; nullptr: every entry may be kept
  bool* out;           // [numel]; every entry is written
  int64_t numel;
};

// Elements per chunk: the unit of work of every kernel. A chunk never spans two tensors.
constexpr int64_t kTopkChunk = 4096;

// Sizes and byte offsets computed once on the host; plain data. Offsets are relative to the start
// of the meta buffer (meta_*) or of the workspace (ws_*), which must be 256-byte aligned (PyTorch's
// allocators align to at least 512).
struct TopkMaskPlan {
  ScoreDtype dtype;
  bool layerwise;
  int64_t num_tensors;   // L
  int64_t num_problems;  // 1, or L when layerwise: one independent selection per problem
  int64_t num_chunks;    // sum over tensors of ceil(numel / kTopkChunk)
  int num_passes;        // radix passes over the keys: 3 for float32, 6 for float64
  int num_sms;           // of the current device, to size the histogram grid
  // meta buffer: TopkTensor[L], int64 chunk_offsets[L + 1], int64 ks[num_problems]
  size_t meta_tensors, meta_chunk_offsets, meta_ks, meta_bytes;
  // workspace: histograms, counts that may be kept, NaN flags, selection states, tie counts,
  // their exclusive scan, and CUB's temporary storage
  size_t ws_hist, ws_alive, ws_nan, ws_state, ws_ties, ws_ties_scan, ws_cub, cub_bytes, workspace_bytes;
};

// Fills *plan for L tensors of the given sizes on the current device. Returns cudaErrorInvalidValue
// for a negative size, or more chunks than one grid dimension holds (more than ~8.8e12 elements).
cudaError_t topk_mask_plan(TopkMaskPlan* plan, ScoreDtype dtype, int64_t num_tensors, const int64_t* numels,
                           bool layerwise);

// Writes the meta buffer (host memory of plan.meta_bytes): the tensors, their chunk offsets, and the
// k of each problem (ks[0] alone unless layerwise). The caller copies it verbatim to the device.
void topk_mask_pack_meta(const TopkMaskPlan& plan, void* meta_host, const TopkTensor* tensors, const int64_t* ks);

// Launches the first radix pass on `stream` and waits for it (the only host sync): on return,
// alive[p] holds how many entries of problem p may be kept (keep is True), nan[t] is nonzero iff a
// keepable entry of tensor t is NaN, and *needs_select says whether any problem has
// 0 < ks[p] < alive[p] (otherwise finish only writes the output). ks is the host copy of the ks
// that were packed. Nothing may be assumed about the output if a NaN is reported or some
// ks[p] > alive[p]: the caller raises instead of calling finish.
cudaError_t topk_mask_first_pass(const TopkMaskPlan& plan, const void* meta_dev, void* workspace, cudaStream_t stream,
                                 const int64_t* ks, int64_t* alive, int32_t* nan, bool* needs_select);

// Launches the remaining passes, the tie-break and the output writes on `stream`; does not wait.
cudaError_t topk_mask_finish(const TopkMaskPlan& plan, const void* meta_dev, void* workspace, cudaStream_t stream,
                             bool needs_select);

}  // namespace gpu
}  // namespace ntkfast
