#!/usr/bin/env bash
# The one command to give a GPU window: runs the first stage of the ladder that has no passing
# ledger entry for the current hashes of what it exercises (benchmarks/gpu/ledger.py). Each stage
# fits 5 minutes; on a warm machine the CUDA build of the previous call is reused.
#   bash benchmarks/gpu/next.sh [--stages N] [--keep-going] [--dry-run]
#   --stages N     up to N stages in a row (a 10-minute call holds two)
#   --keep-going   go on to the next stage after one that failed (not after a failed build)
#   --dry-run      the stages in order from stage 1 whatever the ledger says, on the CPU, the ledger
#                  in a temporary copy (what CI runs)
# Prints "ladder: done" and exits 0 when every stage has passed for the current hashes; else exits
# with the status of the last stage it ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
n=1; keep_going=0; pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) n=$2; shift 2 ;;
    --keep-going) keep_going=1; shift ;;
    --dry-run) pass+=(--dry-run); export NTKFAST_GPU_DRY_RUN=1; shift ;;
    *) echo "next.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "${NTKFAST_GPU_DRY_RUN:-0}" = 1 ] && [ -z "${NTKFAST_LEDGER:-}" ]; then
  NTKFAST_LEDGER=$(mktemp -d)/ledger.json  # one temporary ledger for the whole dry run
  export NTKFAST_LEDGER
  [ -f benchmarks/results/gpu/ledger.json ] && cp benchmarks/results/gpu/ledger.json "$NTKFAST_LEDGER"
fi
"$PY" benchmarks/gpu/ledger.py show
rc=0; first=1
dry=${NTKFAST_GPU_DRY_RUN:-0}
for _ in $(seq "$n"); do
  if [ "$dry" = 1 ]; then
    # a dry run walks the stages in order whatever the ledger says: it checks the harness, and must
    # keep checking it once the real ladder has passed
    stage=$first
    [ "$stage" -gt 6 ] && break
  else
    stage=$("$PY" benchmarks/gpu/ledger.py next --from "$first") || exit 1
  fi
  if [ "$stage" = done ]; then
    [ "$first" = 1 ] && echo "ladder: done"
    break
  fi
  echo "ladder: stage $stage"
  bash "benchmarks/gpu/stage$stage.sh" "${pass[@]}"
  rc=$?
  first=$((stage + 1))
  if (( rc != 0 )); then
    (( keep_going )) || break
    # a build that failed would fail the same way in the next stage: stop
    grep -q '"build": "ok"' "${OUT:-/nonexistent}/stage$stage.json" 2>/dev/null || break
  fi
done
"$PY" benchmarks/gpu/ledger.py show
exit $rc
