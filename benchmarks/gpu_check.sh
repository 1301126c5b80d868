#!/usr/bin/env bash
# One command for a GPU machine with no network, run from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. builds ntkfast's extension with CUDA for the local GPU (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST =
#    the GPU's compute capability), offline (--no-build-isolation --no-deps --no-index);
# 2. prints ntkfast.build_info() and stops if the CUDA kernels are not active;
# 3. runs the whole test suite (tests use cuda whenever it is available);
# 4. runs compute-sanitizer memcheck on the CUDA kernel tests (topk_mask, perturbed_masked), if they exist;
# 5. runs every benchmark with --device cuda, then with --device cpu (files
#    benchmarks/results/<suite>-cuda-<GPU>.json and <suite>-cpu-<GPU>-host.json), and rebuilds
#    benchmarks/results/README.md;
# 6. copies the logs (logs.tar.gz, gpu_check.log) and the results it wrote (results/*.json and
#    results/README.md: 7 files with the two suites of today) to "$OUT", if set.
#
# Everything is held to a budget of BUDGET_S seconds (default 570, inside a 10-minute limit):
# each step gets a timeout, and a step that no longer fits is skipped and reported as SKIPPED, so
# on a slow build the last steps (CPU benchmarks first) are the ones that go. To split the work
# over two calls on a machine that stays warm (the build is kept and reused), run once with
# SKIP_CUDA_BENCH=1 SKIP_CPU_BENCH=1 and once with SKIP_TESTS=1 SKIP_SANITIZER=1.
# The benchmark sizes are the full ones (ResNet-50 score list, SynFlow 100 rounds on ResNet-20
# and VGG-16); what is reduced to fit is the number of timed runs on the host CPU: CPU_RUNS
# (default 2, against the suites' own 5 and 3; on the GPU the suites' defaults, or BENCH_RUNS).
# The runs each result used are in its n_runs field. Knobs (environment): PY, BUDGET_S, BENCH_RUNS,
# CPU_RUNS, CPU_SYNFLOW_ARGS (e.g. "--rounds 20" to shrink the CPU SynFlow runs; recorded in the
# results' command and case name), SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_CUDA_BENCH=1,
# SKIP_CPU_BENCH=1, TORCH_CUDA_ARCH_LIST (overrides the detected compute capability).
set -uo pipefail  # no -e: every step's status is recorded and the summary says which failed

cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-570}
CPU_RUNS=${CPU_RUNS:-2}
CPU_SYNFLOW_ARGS=${CPU_SYNFLOW_ARGS:-}
START=$(date +%s)
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/ntkfast-gpu-check.XXXXXX")
export PYTHONUNBUFFERED=1

exec > >(tee -a "$LOGDIR/gpu_check.log") 2>&1

RESULTS=()   # step: status lines for the summary
FAILED=0
WROTE=()     # result files this run wrote

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

copy_out() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/results"
  tar -C "$LOGDIR" -czf "$OUT/logs.tar.gz" . 2>/dev/null || true
  cp "$LOGDIR/gpu_check.log" "$OUT/gpu_check.log" 2>/dev/null || true
  for f in "${WROTE[@]}" benchmarks/results/README.md; do
    [ -f "$f" ] && cp "$f" "$OUT/results/" 2>/dev/null
  done
  return 0
}
trap copy_out EXIT

# run_step NAME CAP_S KIND -- CMD...: runs CMD under a timeout of min(CAP_S, time left - 15 s),
# output teed to $LOGDIR/NAME.log. KIND: "critical" (a failure stops the script), "optional" (a
# timeout is reported but does not fail the script) or "-".
run_step() {
  local name=$1 cap=$2 critical=$3; shift 4
  local budget; budget=$(( $(left) - 15 ))
  (( budget < cap )) && cap=$budget
  if (( cap < 20 )); then
    echo "=== $name: SKIPPED (only $(left) s of the budget left)"
    RESULTS+=("$name: SKIPPED (budget)")
    return 0
  fi
  echo "=== $name (timeout ${cap} s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    RESULTS+=("$name: ok (${dt} s)")
  elif (( rc == 124 || rc == 137 )); then
    if [ "$critical" = optional ]; then
      RESULTS+=("$name: TIMEOUT after ${dt} s (results of the cases it finished are kept)")
    else
      RESULTS+=("$name: TIMEOUT after ${dt} s")
      FAILED=1
    fi
  else
    RESULTS+=("$name: FAILED rc=$rc (${dt} s)")
    FAILED=1
  fi
  if (( rc != 0 )) && [ "$critical" = critical ]; then
    echo "=== $name failed: stopping"
    summary
    exit 1
  fi
  return 0
}

summary() {
  echo
  echo "=== summary ($(( $(date +%s) - START )) s; logs in $LOGDIR)"
  printf '  %s\n' "${RESULTS[@]}"
}

# -- 0. the machine ---------------------------------------------------------------------------------
echo "=== machine"
nvidia-smi || true
command -v nvcc >/dev/null && nvcc --version | tail -n 2
$PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "=== torch sees no GPU: stopping"; exit 1
fi
ARCH=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
GPU_SLUG=$($PY -c "import torch; from benchmarks.common import slug; print(slug(torch.cuda.get_device_name()))")
echo "GPU: $GPU_SLUG, TORCH_CUDA_ARCH_LIST=$ARCH"

# -- 1. build ---------------------------------------------------------------------------------------
run_step build 360 critical -- env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e .

# -- 2. CUDA kernels active? --------------------------------------------------------------------------
run_step build_info 60 critical -- $PY - <<'EOF'
import json, sys
import torch
import ntkfast
info = ntkfast.build_info()
print(json.dumps(info, indent=1, default=str))
ok = info.get("backend") == "compiled-cuda"
try:  # a CUDA kernel registered for the op, not only a CUDA build
    has = torch._C._dispatch_has_kernel_for_dispatch_key("ntkfast::topk_mask", "CUDA")
    print("ntkfast::topk_mask has a CUDA kernel:", has)
    ok = ok and has
except Exception as exc:  # private API moved: fall back to running the op on the GPU
    print("could not query the dispatcher:", exc)
    x = [torch.randn(1000, device="cuda")]
    ok = ok and bool(ntkfast.ops.topk_mask(x, 10)[0].sum() == 10)
if not ok:
    sys.exit("CUDA kernels are NOT active")
print("CUDA kernels active")
EOF

# -- 3. tests ---------------------------------------------------------------------------------------
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  RESULTS+=("pytest: SKIPPED (SKIP_TESTS=1)")
else
  run_step pytest 240 - -- $PY -m pytest -q tests
fi

# -- 4. compute-sanitizer -----------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ "${SKIP_SANITIZER:-0}" = 1 ]; then
  RESULTS+=("sanitizer: SKIPPED (SKIP_SANITIZER=1)")
elif [ -z "$SAN" ]; then
  RESULTS+=("sanitizer: SKIPPED (no compute-sanitizer)")
elif [ ! -f tests/test_topk_mask_cuda.py ]; then
  RESULTS+=("sanitizer: SKIPPED (no tests/test_topk_mask_cuda.py)")
else
  # no caching allocator, so that an out-of-bounds access inside a cached block is seen too
  F0=$FAILED
  run_step sanitizer 150 - -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 1 $PY -m pytest -q tests/test_topk_mask_cuda.py tests/test_perturbed_masked.py -k cuda
  if grep -q "Device not supported" "$LOGDIR/sanitizer.log" 2>/dev/null; then
    FAILED=$F0  # not a finding about our kernels
    unset 'RESULTS[-1]'
    RESULTS+=("sanitizer: NO RESULT: compute-sanitizer refuses this device (a gVisor runtime?)")
  fi
fi

# -- 5. benchmarks ------------------------------------------------------------------------------------
if [ "${SKIP_CUDA_BENCH:-0}" = 1 ]; then
  RESULTS+=("bench_cuda: SKIPPED (SKIP_CUDA_BENCH=1)")
else
  CUDA_RUNS=()
  [ -n "${BENCH_RUNS:-}" ] && CUDA_RUNS=(--runs "$BENCH_RUNS")
  run_step bench_cuda 300 - -- $PY -m benchmarks.run_all --device cuda "${CUDA_RUNS[@]}"
  for f in benchmarks/results/*-cuda-"$GPU_SLUG".json; do [ -f "$f" ] && WROTE+=("$f"); done
fi

if [ "${SKIP_CPU_BENCH:-0}" = 1 ]; then
  RESULTS+=("bench_cpu: SKIPPED (SKIP_CPU_BENCH=1)")
else
  CPU_EXTRA=()
  [ -n "$CPU_SYNFLOW_ARGS" ] && CPU_EXTRA=(--extra "synflow:$CPU_SYNFLOW_ARGS")
  run_step bench_cpu 600 optional -- $PY -m benchmarks.run_all --device cpu --runs "$CPU_RUNS" \
    --tag "$GPU_SLUG-host" "${CPU_EXTRA[@]}"
  for f in benchmarks/results/*-cpu-"$GPU_SLUG"-host.json; do [ -f "$f" ] && WROTE+=("$f"); done
fi
$PY -m benchmarks.common >/dev/null || true  # README from every JSON there

summary
exit $FAILED
