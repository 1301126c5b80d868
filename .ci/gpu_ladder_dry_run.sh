#!/usr/bin/env bash
# Every stage of the GPU ladder (benchmarks/gpu) in its CPU dry run: the scripts run, junit XML is
# written, each stage leaves at most 6 files in $OUT, and the ledger is updated in a temporary copy
# only. Fails on any of those, or on any step that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
before=$(sha256sum benchmarks/results/gpu/ledger.json 2>/dev/null || echo none)
OUT=$out bash benchmarks/gpu/next.sh --stages 6 --dry-run
after=$(sha256sum benchmarks/results/gpu/ledger.json 2>/dev/null || echo none)
[ "$before" = "$after" ] || { echo "gpu_ladder_dry_run: the dry run wrote to the real ledger" >&2; exit 1; }
most=0
for s in 1 2 3 4 5 6; do
  n=$(find "$out" -maxdepth 1 -name "stage$s.*" | wc -l)
  (( n > most )) && most=$n
  [ -s "$out/stage$s.junit.xml" ] || { echo "gpu_ladder_dry_run: stage $s wrote no junit XML" >&2; exit 1; }
  (( n + 1 <= 6 )) || { echo "gpu_ladder_dry_run: stage $s leaves $n files (+ ledger.json), more than 6" >&2; exit 1; }
done
total=$(find "$out" -type f | wc -l)
echo "gpu_ladder_dry_run: OK ($total files for six stages; two stages per window bring back at most $(( 2 * most + 1 )))"
