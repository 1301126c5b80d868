#!/usr/bin/env bash
# The source distribution a user would `pip install`: built with `python -m build --sdist`, checked to
# hold every file of csrc/ that git tracks (the CUDA sources and headers too, although it is made on
# a CPU machine), then installed into a fresh virtual environment and imported from outside the
# checkout, the compiled extension and the `ntkfast` console script included.
#   bash .ci/sdist_check.sh
# Environment: PYTHON (default python3): the interpreter whose packages (torch) the install sees;
# FORCE_CPU (default 1): the extension is built CPU-only, as on a machine without a CUDA toolkit
# (FORCE_CPU=0 lets setup.py build the CUDA kernels where it finds a toolkit); MAX_JOBS;
# NTKFAST_EXTRA_CFLAGS (default -O0): what is checked here is that the sdist builds and loads, not
# how fast its kernels run, and an unoptimised build takes a fraction of the time (the checkout's
# own -O3 build is CI's first step).
# Leaves nothing behind: the copy of the tree, the sdist and the environment live in one temporary
# directory, removed on exit (NTKFAST_SDIST_KEEP=1 keeps it and prints its path).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
fail() { echo "sdist_check: FAILED -- $*" >&2; exit 1; }

git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1 || fail "not a git checkout (the file list comes from git)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ntkfast-sdist.XXXXXX")
if [[ ${NTKFAST_SDIST_KEEP:-0} == 1 ]]; then echo "sdist_check: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
t_start=$SECONDS

# --- the sdist, made from a copy holding what a clone holds (tracked and new files, not ignored
# ones such as an in-place _C*.so or build/), so that nothing is written into the checkout
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/elsewhere"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$WORK/src"
# looked for from $WORK, not the checkout: there the build/ folder `pip install -e .` leaves passes for
# the package (a namespace package), the install is skipped, and `-m build` fails in the copy
(cd "$WORK" && "$PY" -c "import build.__main__") 2>/dev/null || { echo "sdist_check: installing build" >&2; "$PY" -m pip install -q build >&2; }
# --no-isolation: setup.py imports torch, and an isolated build would download one.
# --skip-dependency-check: build-system.requires names the ninja *package*, while a ninja binary on
# PATH serves as well (pip --no-build-isolation does not check them either)
(cd "$WORK/src" && "$PY" -m build --sdist --no-isolation --skip-dependency-check --outdir "$WORK/dist" . >"$WORK/sdist.log" 2>&1) \
    || { tail -n 40 "$WORK/sdist.log" >&2; fail "python -m build --sdist failed"; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
echo "sdist_check: built $(basename "$SDIST") in $((SECONDS - t_start)) s"

# --- its members, against git's list
tar -tzf "$SDIST" | sed -e 's|^[^/]*/||' -e '/\/$/d' -e '/^$/d' | sort >"$WORK/members"
missing=$(git ls-files csrc | sort | comm -23 - "$WORK/members")
[ -z "$missing" ] || fail "files of csrc/ that git tracks are not in the sdist: $(echo "$missing" | tr '\n' ' ')"
for f in setup.py pyproject.toml build_checks.py LICENSE README.md ntkfast/py.typed ntkfast/_version.py; do
    grep -qxF "$f" "$WORK/members" || fail "$f is not in the sdist"
done
outputs=$(grep -E '\.(so|o|pyd|dylib|pyc)$|^build/' "$WORK/members" || true)
[ -z "$outputs" ] || fail "build outputs in the sdist: $(echo "$outputs" | tr '\n' ' ')"
echo "sdist_check: $(wc -l <"$WORK/members") files; every one of the $(git ls-files csrc | wc -l) csrc/ files git tracks is there"

# --- a fresh environment that sees the packages $PY sees (torch, numpy, tqdm) but not the checkout.
# --system-site-packages alone would not do when $PY is itself a virtual environment (CI's .venv):
# a venv made from a venv sees the base interpreter's packages, not its parent's, so the parent's
# site-packages directories are added by a .pth file (directories only: its .pth files, an editable
# ntkfast of the checkout among them, are not run). --without-pip: the pip $PY has runs inside the
# new environment and installs into it; ensurepip only where there is none.
VENV=$WORK/venv
"$PY" -m venv --system-site-packages --without-pip "$VENV"
VPY=$VENV/bin/python
"$PY" -c "import sys, os; print('\n'.join(p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')))" \
    >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ntkfast_sdist_check_parent.pth"
"$VPY" -m pip --version >/dev/null 2>&1 || "$VPY" -m ensurepip -q >&2

# --- install from the sdist, outside the checkout: the extension is compiled here
t0=$SECONDS
(cd "$WORK/elsewhere" && FORCE_CPU=${FORCE_CPU:-1} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    NTKFAST_EXTRA_CFLAGS=${NTKFAST_EXTRA_CFLAGS--O0} \
    "$VPY" -m pip install --no-build-isolation --no-deps --no-cache-dir "$SDIST" >"$WORK/install.log" 2>&1) \
    || { tail -n 60 "$WORK/install.log" >&2; fail "pip install of the sdist failed"; }
echo "sdist_check: installed (extension compiled) in $((SECONDS - t0)) s"

# --- what a user gets: the package from the environment (not the checkout), the compiled kernels
# loaded, the metadata, py.typed, and the console script
(cd "$WORK/elsewhere" && NTKFAST_SDIST_VENV=$VENV "$VPY" - <<'PYEOF'
import os, sys
from importlib import metadata
import ntkfast
from ntkfast.ops import loader

venv = os.path.realpath(os.environ["NTKFAST_SDIST_VENV"])
where = os.path.realpath(ntkfast.__file__)
problems = []
if not where.startswith(venv + os.sep):
    problems.append(f"ntkfast was imported from {where}, not from the environment {venv}")
if not loader.extension_loaded():
    problems.append(f"ntkfast._C did not load: {loader.build_info().get('error')}")
if metadata.version("ntkfast") != ntkfast.__version__:
    problems.append(f"metadata version {metadata.version('ntkfast')} != ntkfast.__version__ {ntkfast.__version__}")
if not os.path.exists(os.path.join(os.path.dirname(where), "py.typed")):
    problems.append("ntkfast/py.typed was not installed")
meta = metadata.metadata("ntkfast")
if meta.get("License-Expression") != "BSD-3-Clause":
    problems.append(f"License-Expression is {meta.get('License-Expression')!r}")
if not any(str(f).endswith("LICENSE") for f in metadata.files("ntkfast") or ()):
    problems.append("the LICENSE file is not in the installed distribution")
if problems:
    sys.exit("sdist_check: FAILED -- " + "; ".join(problems))
print(f"sdist_check: import ntkfast {ntkfast.__version__} from the environment; backend "
      f"{loader.build_info()['backend']}")
PYEOF
)
# the script pip wrote: sys.exit(main()), so main's return value is the exit status
(cd "$WORK/elsewhere" && "$VENV/bin/ntkfast" info >"$WORK/info.json") || fail "\`ntkfast info\` exited with status $?"
grep -q '"extension": true' "$WORK/info.json" || fail "\`ntkfast info\` does not report the extension: $(cat "$WORK/info.json")"
status=0
(cd "$WORK/elsewhere" && "$VENV/bin/ntkfast" prune --no-such-option >/dev/null 2>&1) || status=$?
[ "$status" = 2 ] || fail "\`ntkfast prune --no-such-option\` exited with status $status, not 2"
echo "sdist_check: OK in $((SECONDS - t_start)) s (the console script runs; a usage error exits 2)"
