#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing (PyTorch 2.13.0 only when no torch
# is present, the build tools), builds the extension when it is absent or older than its sources,
# then runs.
#   ./run.sh test [pytest args]    the test suite
#   ./run.sh prune [args]          `ntkfast prune` (defaults: resnet20, synflow, density 0.1, 100 rounds)
#   ./run.sh <ntkfast command>     any other CLI command (train, methods, models, info)
#   ./run.sh python [args]         the Python it set up (`./run.sh python -m mkdocs ...`)
#   ./run.sh setup                 set up only
# Which Python: $PYTHON if set; else the active virtual environment ($VIRTUAL_ENV) or conda
# environment (other than base); else the project's own .venv, made on first use and reused after.
# Nothing is installed into the system's Python.
set -euo pipefail
cd "$(dirname "$0")"

# The project environment sees the packages of the Python it is made from (--system-site-packages)
# and installs only what is missing into .venv: a torch already there, often a CUDA build matched
# to the machine's driver, is used rather than downloaded again (about 900 MB for the CPU wheel,
# several GB with CUDA), as before; the system's own site-packages are only read, never written.
VENV_MARK=.venv/.made-by-run.sh
make_venv() {
  local base=python3
  if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "run.sh: ntkfast needs Python >= 3.10; $base is $("$base" -V 2>&1 || echo missing)." \
         "Set PYTHON=/path/to/python3.10-or-newer, or activate an environment" >&2
    exit 1
  fi
  if [ -e .venv ]; then
    if [ ! -e "$VENV_MARK" ]; then
      echo "run.sh: .venv exists but its Python does not run, and run.sh did not make it;" \
           "remove it (or activate the environment you meant, or set PYTHON)" >&2
      exit 1
    fi
    echo "run.sh: .venv no longer runs (its Python moved or was removed); making it again" >&2
    rm -rf .venv
  fi
  echo "run.sh: making the project environment .venv with $("$base" -V 2>&1) (it sees that Python's packages; installs go into .venv)" >&2
  if ! "$base" -m venv --system-site-packages .venv >&2; then
    rm -rf .venv
    echo "run.sh: could not make .venv (Debian/Ubuntu: apt install python3-venv);" \
         "or activate an environment, or set PYTHON" >&2
    exit 1
  fi
  touch "$VENV_MARK"
}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY=$VIRTUAL_ENV/bin/python
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != base ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
  PY=$CONDA_PREFIX/bin/python
else
  PY=$PWD/.venv/bin/python
  "$PY" -c '' 2>/dev/null || make_venv
  # as `source .venv/bin/activate` would: what the commands start (a bare `python`, `ntkfast`)
  # is this environment too
  export VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH
fi

# One Python process answers every question (each extra one that imports torch costs a second):
# line 1, the packages to install; line 2, why the extension must be (re)built, or nothing.
if ! state=$("$PY" - <<'PYEOF'
import glob, importlib.util, os, re, sys, sysconfig
missing = []
# torch only when absent: an installed torch that fails to import is the user's to mend, not ours to replace
if importlib.util.find_spec("torch") is None:
    missing.append("torch==2.13.0")
for mod in ("numpy", "pytest", "pybind11", "wheel", "hypothesis"):
    if importlib.util.find_spec(mod) is None:
        missing.append(mod)
# read from the installed metadata, without importing (setuptools >= 77: pyproject's SPDX licence;
# tqdm >= 4.66: TQDM_DISABLE and the other TQDM_* variables)
from importlib import metadata
for dist, least in (("setuptools", (77,)), ("tqdm", (4, 66))):
    try:
        have = tuple(int(p) for p in re.findall(r"\d+", metadata.version(dist))[:len(least)])
    except metadata.PackageNotFoundError:
        have = ()
    if have < least:
        missing.append(f"{dist}>={'.'.join(map(str, least))}")
import shutil
if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
    missing.append("ninja")
print(" ".join(missing))
here = os.path.realpath(os.getcwd())
so = "ntkfast/_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")  # this Python's, not a leftover
stale = ""
if missing:
    stale = "set-up changed"
elif not os.path.exists(so):
    stale = "not built"
else:
    built = os.path.getmtime(so)
    sources = [f for f in glob.glob("csrc/**/*", recursive=True) if os.path.isfile(f)] + ["setup.py"]
    if any(os.path.getmtime(f) > built for f in sources):
        stale = "sources changed"
    else:
        # the installed package (what `ntkfast` and imports elsewhere get) must be this checkout
        sys.path = [p for p in sys.path if p not in ("", here) and os.path.realpath(p or ".") != here]
        spec = importlib.util.find_spec("ntkfast")
        where = os.path.dirname(os.path.dirname(os.path.realpath(spec.origin))) if spec and spec.origin else None
        if where != here:
            stale = f"installed package is {where or 'missing'}, not this checkout"
        else:
            try:
                import torch  # noqa: F401
                import ntkfast._C  # noqa: F401
            except Exception:
                stale = "does not load against the installed torch"
print(stale)
PYEOF
); then
  # the check crashed (a stale _C that aborts on import, say): keep what it found missing, rebuild
  state=$(printf '%s\n%s' "$(printf '%s\n' "$state" | sed -n 1p)" "the set-up check itself failed")
fi
missing=$(printf '%s\n' "$state" | sed -n 1p)
stale=$(printf '%s\n' "$state" | sed -n 2p)
if [ -n "$missing" ]; then
  echo "run.sh: installing $missing" >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $missing >&2
fi
# optional (ntkfast.plots): installed when missing, so that its test runs; a failure is not fatal
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
  # no retries (an offline machine must not stall every run); numpy stays as it is
  "$PY" -m pip install -q --retries 0 --timeout 10 --upgrade-strategy only-if-needed matplotlib >&2 \
    || echo "run.sh: matplotlib not installed; the plot test will be skipped" >&2
fi
# optional (ntkfast.structured's export): the same; looked up without importing it (it imports torch)
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch_pruning') is None)" 2>/dev/null; then
  # --no-deps: it needs only torch and numpy, which are here; pip must not fetch another torch
  "$PY" -m pip install -q --retries 0 --timeout 10 --no-deps torch-pruning >&2 \
    || echo "run.sh: torch-pruning not installed; the channel export tests will be skipped" >&2
fi
# optional (the Hugging Face model tests): pure Python, and it does not depend on torch
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('transformers') is None)" 2>/dev/null; then
  "$PY" -m pip install -q --retries 0 --timeout 10 --upgrade-strategy only-if-needed transformers >&2 \
    || echo "run.sh: transformers not installed; the Hugging Face model tests will be skipped" >&2
fi
if [ -n "$stale" ]; then
  echo "run.sh: building the extension ($stale)" >&2
  if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2; then
    if [ "${FORCE_CPU:-0}" != 1 ] && [ "${FORCE_CUDA:-0}" != 1 ] && [ "${NTKFAST_NO_CPU_RETRY:-0}" != 1 ]; then
      # a failed CUDA build must not cost the CPU kernels (NTKFAST_NO_CPU_RETRY=1: fail instead)
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
  python) exec "$PY" "$@" ;;
  test) exec "$PY" -m pytest -q tests "$@" ;;
  *) exec "$PY" -m ntkfast "$cmd" "$@" ;;
esac
