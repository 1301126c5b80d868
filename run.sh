#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing (PyTorch 2.13.0 only when no torch
# is present, the build tools), builds the extension when it is absent or older than its sources,
# then runs.
#   ./run.sh test [pytest args]    the test suite
#   ./run.sh prune [args]          `ntkfast prune` (defaults: resnet20, synflow, density 0.1, 100 rounds)
#   ./run.sh <ntkfast command>     any other CLI command (train, methods, models, info)
#   ./run.sh setup                 set up only
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

missing=()
# torch only when absent: an installed torch that fails to import is the user's to mend, not ours to replace
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" || missing+=("torch==2.13.0")
for mod in numpy pytest pybind11 wheel; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
command -v ninja >/dev/null 2>&1 || "$PY" -c "import ninja" 2>/dev/null || missing+=("ninja")
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
  || missing+=("setuptools>=64")
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: installing ${missing[*]}" >&2
  "$PY" -m pip install -q "${missing[@]}"
fi

so=$(ls ntkfast/_C*.so 2>/dev/null | head -n 1 || true)
stale=""
if [ -z "$so" ]; then
  stale="not built"
elif [ -n "$(find csrc setup.py -type f -newer "$so" | head -n 1)" ]; then
  stale="sources changed"
elif ! "$PY" -c "import ntkfast._C" 2>/dev/null; then
  stale="does not load against the installed torch"
else
  # the installed package (what `ntkfast` and imports outside this folder get) must be this checkout
  installed=$(cd / && "$PY" -c "import os, ntkfast; print(os.path.dirname(os.path.dirname(os.path.realpath(ntkfast.__file__))))" 2>/dev/null || true)
  [ "$installed" = "$(pwd -P)" ] || stale="installed package is ${installed:-missing}, not this checkout"
fi
if [ -n "$stale" ]; then
  echo "run.sh: building the extension ($stale)" >&2
  if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2; then
    if [ -z "${FORCE_CPU:-}" ] && [ -z "${FORCE_CUDA:-}" ]; then
      # a failed CUDA build must not cost the CPU kernels
      echo "run.sh: the build failed; retrying without CUDA (FORCE_CPU=1)" >&2
      FORCE_CPU=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
    else
      exit 1
    fi
  fi
fi

cmd=${1:-test}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) exit 0 ;;
  test) exec "$PY" -m pytest -q tests "$@" ;;
  *) exec "$PY" -m ntkfast "$cmd" "$@" ;;
esac
