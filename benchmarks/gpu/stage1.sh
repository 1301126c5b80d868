#!/usr/bin/env bash
# GPU ladder, stage 1 -- build + kernels: versions; the CUDA build for sm_90; every op of
# torch.ops.ntkfast has a CUDA kernel; every op once on CUDA against its CPU kernel (smoke_ops.py);
# the CUDA variants of every op test file, @slow excluded.
#   bash benchmarks/gpu/stage1.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
stage_begin 1 "$@"
ensure_build
if [ "$DRY_RUN" = 1 ]; then
  step registrations 60 "$PY" benchmarks/gpu/check_cuda_registrations.py --dry-run
  JUNITS+=("$WORK/smoke.xml")
  step smoke 240 "$PY" benchmarks/gpu/smoke_ops.py --device cpu --junit "$WORK/smoke.xml"
else
  step registrations 60 "$PY" benchmarks/gpu/check_cuda_registrations.py
  JUNITS+=("$WORK/smoke.xml")
  step smoke 90 "$PY" benchmarks/gpu/smoke_ops.py --device cuda --junit "$WORK/smoke.xml"
fi
pytest_step op-tests-cuda 200 -m "not slow" -k cuda \
  tests/test_topk_mask.py tests/test_topk_mask_cuda.py tests/test_nm_mask.py tests/test_perturbed_masked.py tests/test_masked_gram.py \
  tests/test_conv_weight_grad_per_sample.py tests/test_path_ops.py
stage_end; exit $?
