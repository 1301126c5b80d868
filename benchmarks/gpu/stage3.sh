#!/usr/bin/env bash
# GPU ladder, stage 3 -- kernel benchmarks, each against its peer on the same GPU: topk_mask,
# perturbed_masked, masked_gram, conv_weight_grad_per_sample, the path ops (the Path Kernel's trace,
# built on path_chain / path_score) and SynFlow. TF32 off; peak memory in-process.
#   bash benchmarks/gpu/stage3.sh [--dry-run]
# Dry run: the same suites at --quick sizes on the CPU, one run, no memory measurement.
source "$(dirname "$0")/lib.sh"
stage_begin 3 "$@"
ensure_build
RES=$WORK/results
mkdir -p "$RES"
if [ "$DRY_RUN" = 1 ]; then
  BENCH=(--device cpu --quick --runs 1 --no-memory --no-readme --out "$RES")
  PATH_CASES=(--case trace-resnet20)  # --quick renames the cases and drops the large models
else
  BENCH=(--device cuda --no-readme --out "$RES")
  PATH_CASES=(--case trace-resnet20 --case trace-vgg16 --case trace-resnet50)
fi
bench() { local name=$1 cap=$2 module=$3; shift 3; step "$name" "$cap" "$PY" -m "benchmarks.$module" "${BENCH[@]}" "$@"; }

bench topk_mask 45 bench_topk_mask
bench perturbed_masked 35 bench_perturbed_masked
bench masked_gram 45 bench_masked_gram
bench conv_wgrad 45 bench_conv_weight_grad_per_sample
bench path_ops 35 bench_pathkernel "${PATH_CASES[@]}"
bench synflow 60 bench_synflow
STAGE_RESULTS=$WORK/results.json
"$PY" benchmarks/gpu/collect_results.py pack "$RES" "$STAGE_RESULTS"
stage_end; exit $?
