#!/usr/bin/env bash
# GPU ladder, stage 2 -- sanitizer + GPU paths: compute-sanitizer memcheck, racecheck and synccheck
# on sanitize_ops.py (every op x dtype x direction; "unsupported" where the runtime refuses the
# sanitizer), then the @slow kernel tests (top-k, the dense path score past one grid) and the CUDA variants of the NTK-SAP (grouped engine, CUDA
# graphs), NTK, transfer, training, Path Kernel, connectivity and device tests.
#   bash benchmarks/gpu/stage2.sh [--dry-run]
source "$(dirname "$0")/lib.sh"
stage_begin 2 "$@"
ensure_build

# sanitize TOOL CAP_S: the driver under one compute-sanitizer tool, our kernels only where the
# sanitizer can filter by kernel name (torch's own kernels are not ours to check, and cost time)
sanitize() {
  local tool=$1 cap=$2
  if [ "$DRY_RUN" = 1 ]; then
    step "sanitizer-$tool" "$cap" "$PY" benchmarks/gpu/sanitize_ops.py --device cpu
    return
  fi
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "=== sanitizer-$tool: compute-sanitizer not found"
    STEPS+=("sanitizer-$tool=unsupported (compute-sanitizer not installed)")
    return
  fi
  local filter=()
  compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && filter=(--kernel-name kns=ntkfast)
  local out=$WORK/sanitizer-$tool.txt
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer-$tool" "$cap" bash -c \
    'compute-sanitizer --tool "$1" --error-exitcode 99 "${@:3}" "$PY" benchmarks/gpu/sanitize_ops.py 2>&1 | tee "$2"; exit ${PIPESTATUS[0]}' \
    _ "$tool" "$out" "${filter[@]}"
  local rc=$?
  if [ $rc -ne 0 ] && [ ${#filter[@]} -gt 0 ] && ! grep -q "^case " "$out"; then
    # the driver never started: the kernel-name filter may be what this version refuses
    echo "=== sanitizer-$tool: no case ran with ${filter[*]}; again without the filter"
    unset 'STEPS[${#STEPS[@]}-1]'
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer-$tool" "$cap" bash -c \
      'compute-sanitizer --tool "$1" --error-exitcode 99 "$PY" benchmarks/gpu/sanitize_ops.py 2>&1 | tee "$2"; exit ${PIPESTATUS[0]}' \
      _ "$tool" "$out"
    rc=$?
  fi
  if [ $rc -ne 0 ] && grep -qiE "device not supported|not supported on this|unsupported (device|platform)" "$out"; then
    unset 'STEPS[${#STEPS[@]}-1]'
    STEPS+=("sanitizer-$tool=unsupported ($(grep -iE -m1 'not supported|unsupported' "$out" | cut -c1-120))")
  fi
}

sanitize memcheck 75
sanitize racecheck 75
sanitize synccheck 50
pytest_step slow-kernels 60 -m slow tests/test_topk_mask_cuda.py tests/test_path_ops.py
pytest_step gpu-paths 120 -m "not slow" -k cuda \
  tests/test_ntksap.py tests/test_ntk.py tests/test_transfer.py tests/test_train.py tests/test_pathkernel.py \
  tests/test_connectivity.py tests/test_devices.py tests/test_training_grouped.py tests/test_ntksap_tokens.py
stage_end; exit $?
