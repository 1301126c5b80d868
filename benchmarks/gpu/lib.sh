# Shared by the GPU ladder's stage scripts (sourced, not run). A stage:
#   source benchmarks/gpu/lib.sh; stage_begin N "$@"; step ...; pytest_step ...; stage_end
# Every step runs under a timeout inside the stage's budget (STAGE_BUDGET_S, default 290 s; a dry run 1200 s and 5x the caps: a stage
# must fit 5 minutes of command time on a fresh machine, its build included), its output teed into
# the stage log. What a stage leaves in $OUT (4 files): stageN.log, stageN.junit.xml (every pytest
# run and driver of the stage), stageN.json (its ledger entry, the environment and any results) and
# ledger.json (the whole ledger after this entry).
# Dry run (--dry-run, or NTKFAST_GPU_DRY_RUN=1; what CI does): no GPU needed; the build is the
# existing CPU one, the drivers run on the CPU, pytest only collects the stage's selection, and the
# ledger entry goes to a temporary copy of the ledger. It checks the harness, not the GPU.
set -uo pipefail  # no -e: every step's status is recorded, and the ledger says which failed

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PY=${PY:-python3}
export PY
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# TF32 off everywhere unless a case is named for it (torch reads this at start-up)
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0
export NVIDIA_TF32_OVERRIDE=0

stage_begin() {
  STAGE=$1; shift
  DRY_RUN=${NTKFAST_GPU_DRY_RUN:-0}
  for a in "$@"; do [ "$a" = --dry-run ] && DRY_RUN=1; done
  # a dry run checks the harness, not the timing: on a busy 2-core CI machine it gets room
  STAGE_BUDGET_S=${STAGE_BUDGET_S:-$([ "$DRY_RUN" = 1 ] && echo 1200 || echo 290)}
  CAP_SCALE=$([ "$DRY_RUN" = 1 ] && echo 5 || echo 1)
  STAGE_START=$(date +%s)
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ntkfast-stage$STAGE.XXXXXX")
  if [ -z "${OUT:-}" ]; then OUT=$WORK/out; fi
  mkdir -p "$OUT"
  LOG=$OUT/stage$STAGE.log
  STEPS=()
  JUNITS=()
  if [ "$DRY_RUN" = 1 ]; then
    # the ledger is updated in a temporary copy: a dry run never claims a stage
    if [ -z "${NTKFAST_LEDGER:-}" ]; then
      export NTKFAST_LEDGER=$WORK/ledger.json
      [ -f benchmarks/results/gpu/ledger.json ] && cp benchmarks/results/gpu/ledger.json "$NTKFAST_LEDGER"
    fi
  fi
  exec > >(tee -a "$LOG") 2>&1
  echo "=== stage $STAGE ($( [ "$DRY_RUN" = 1 ] && echo 'DRY RUN, ' )budget ${STAGE_BUDGET_S} s) at $(date -u +%FT%TZ)"
  step env 60 "$PY" benchmarks/gpu/env_info.py "$WORK/env.json"
  if [ "$DRY_RUN" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "stage $STAGE: no CUDA device here; run with --dry-run to check the harness on the CPU"
    STEPS+=("cuda-device=FAILED no device")
    stage_end
    exit 1
  fi
}

left() { echo $(( STAGE_BUDGET_S - ($(date +%s) - STAGE_START) )); }

# step NAME CAP_S CMD...: CMD under a timeout of min(CAP_S, what is left of the budget - 10 s)
step() {
  local name=$1 cap=$(( $2 * ${CAP_SCALE:-1} )); shift 2
  local budget=$(( $(left) - 10 ))
  (( budget < cap )) && cap=$budget
  if (( cap < 5 )); then
    echo "=== $name: NOT RUN (only $(left) s of the stage's budget left)"
    STEPS+=("$name=not run (budget)")
    return 1
  fi
  echo "=== $name (timeout ${cap} s): $*"
  local t0=$(date +%s)
  # SIGINT first: pytest then still writes its junit XML and names what it was running
  timeout -s INT --kill-after=15 "$cap" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    STEPS+=("$name=ok")
  elif (( rc == 124 || rc == 137 || rc == 130 || (dt >= cap && rc == 2) )); then
    STEPS+=("$name=TIMEOUT after ${dt} s")
  else
    STEPS+=("$name=FAILED rc=$rc")
  fi
  echo "=== $name: rc=$rc in ${dt} s"
  return $rc
}

# pytest_step NAME CAP_S PYTEST_ARGS...: -rfE, junit XML, a per-test timeout, -n workers (a
# failure is named even when the step runs out of time). Dry run: collection only.
pytest_step() {
  local name=$1 cap=$2; shift 2  # step() scales the cap
  local xml=$WORK/$name.xml
  JUNITS+=("$xml")
  local args=(-m pytest -q -rfE -p no:cacheprovider -p no:benchmark --junitxml="$xml")
  if [ "$DRY_RUN" = 1 ]; then
    args+=(--collect-only)
  else
    args+=(--timeout="${PYTEST_TIMEOUT:-120}" --durations=15)
    if "$PY" -c "import xdist" 2>/dev/null; then
      local workers=${PYTEST_WORKERS:-8}
      args+=(-n "$workers")
      # each worker's torch would take every core: 8 x 16 threads thrash 16 cores
      export OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
    fi
  fi
  step "$name" "$cap" "$PY" "${args[@]}" "$@"
}

# ensure_build: the CUDA build (FORCE_CUDA=1, sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise),
# reused when ntkfast/_C is newer than every source and loads with its CUDA kernels. Dry run: the
# CPU build that ./run.sh setup made must load.
ensure_build() {
  if [ "$DRY_RUN" = 1 ]; then
    step build 120 "$PY" -c "import ntkfast.ops as o; i = o.build_info(); print(i); assert i['extension'], i"
    return
  fi
  if "$PY" - <<'PYEOF'
import glob, os, sys, sysconfig
so = "ntkfast/_C" + sysconfig.get_config_var("EXT_SUFFIX")
if not os.path.exists(so):
    sys.exit(1)
srcs = [f for f in glob.glob("csrc/**/*", recursive=True) if os.path.isfile(f)] + ["setup.py"]
if any(os.path.getmtime(f) > os.path.getmtime(so) for f in srcs):
    sys.exit(1)
import ntkfast.ops as o
sys.exit(0 if o.build_info().get("cuda") else 1)
PYEOF
  then
    echo "=== build: reused (ntkfast/_C is newer than its sources and has CUDA kernels)"
    STEPS+=("build=ok")
    return 0
  fi
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    step build 240 "$PY" setup.py -q build_ext --inplace
}

stage_end() {
  local wall=$(( $(date +%s) - STAGE_START ))
  "$PY" benchmarks/gpu/junit.py "$OUT/stage$STAGE.junit.xml" "${JUNITS[@]}"
  local rec=(record "$STAGE" --junit "$OUT/stage$STAGE.junit.xml" --env "$WORK/env.json" --wall-s "$wall")
  for s in "${STEPS[@]}"; do rec+=(--step "$s"); done
  [ "$DRY_RUN" = 1 ] && rec+=(--dry-run)
  [ -n "${STAGE_RESULTS:-}" ] && rec+=(--results "$STAGE_RESULTS")
  "$PY" benchmarks/gpu/ledger.py "${rec[@]}" >"$OUT/stage$STAGE.json"
  cp "${NTKFAST_LEDGER:-benchmarks/results/gpu/ledger.json}" "$OUT/ledger.json"
  echo "=== stage $STAGE done in ${wall} s; steps: ${STEPS[*]}"
  "$PY" - "$OUT/stage$STAGE.json" <<'PYEOF'
import json, sys
e = json.load(open(sys.argv[1]))["entry"]
print(f"=== stage {e['stage']} {e['status'].upper()}: {e['passed']} passed, {e['failed']} failed, {e['skipped']} skipped")
for f in e["failures"][:40]:
    print(f"    {f}")
sys.exit(1 if e["status"] == "failed" or e["failed"] else 0)  # a dry run with failures fails too
PYEOF
  local rc=$?
  sleep 1  # let tee write the last lines into the log before the script exits
  case "$OUT" in "$WORK"/*) ;; *) rm -rf "$WORK" ;; esac  # the scratch folder, unless it holds $OUT
  return $rc
}

# Benchmark stages: bench_begin sets RES (the results folder) and BENCH (the suites' common
# arguments: CUDA at full size, or in a dry run the CPU at --quick sizes, one run, no memory);
# bench NAME CAP_S MODULE ARGS... runs one suite; bench_end packs the results into the stage's JSON.
bench_begin() {
  RES=$WORK/results
  mkdir -p "$RES"
  if [ "$DRY_RUN" = 1 ]; then
    BENCH=(--device cpu --quick --runs 1 --no-memory --no-readme --out "$RES")
  else
    BENCH=(--device cuda --no-readme --out "$RES")
  fi
}

bench() { local name=$1 cap=$2 module=$3; shift 3; step "$name" "$cap" "$PY" -m "benchmarks.$module" "${BENCH[@]}" "$@"; }

bench_end() {
  STAGE_RESULTS=$WORK/results.json
  "$PY" benchmarks/gpu/collect_results.py pack "$RES" "$STAGE_RESULTS"
}
