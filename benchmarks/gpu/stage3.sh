#!/usr/bin/env bash
# GPU ladder, stage 3 -- kernel benchmarks, each against its peer on the same GPU: topk_mask, nm_mask,
# perturbed_masked, masked_gram, conv_weight_grad_per_sample, the path ops (the Path Kernel's trace,
# built on path_chain / path_score) and SynFlow. TF32 off; peak memory in-process.
#   bash benchmarks/gpu/stage3.sh [--dry-run]
# Dry run: the same suites at --quick sizes on the CPU, one run, no memory measurement.
source "$(dirname "$0")/lib.sh"
stage_begin 3 "$@"
ensure_build
bench_begin
if [ "$DRY_RUN" = 1 ]; then
  PATH_CASES=(--case trace-resnet20)  # --quick renames the cases and drops the large models
else
  PATH_CASES=(--case trace-resnet20 --case trace-vgg16 --case trace-resnet50)
fi
bench topk_mask 45 bench_topk_mask
bench nm_mask 40 bench_nm_mask
bench perturbed_masked 35 bench_perturbed_masked
bench masked_gram 45 bench_masked_gram
bench conv_wgrad 45 bench_conv_weight_grad_per_sample
bench path_ops 35 bench_pathkernel "${PATH_CASES[@]}"
bench synflow 60 bench_synflow
bench_end
stage_end; exit $?
