#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer. Builds ntkfast._C (CPU only,
# -fsanitize=address,undefined, -O1 -g) in a throwaway copy of the tree, never in the checkout (whose
# own in-place extension is left as it is), then runs the op tests against that build with the ASan
# runtime preloaded. The first sanitizer report aborts the test process, so the script fails.
#   bash .ci/sanitize_cpu.sh [pytest args]   extra arguments go to pytest; a -k of yours replaces
#                                             the default selection below
# Environment: PYTHON (default python3); NTKFAST_SANITIZE_ALL=1 runs every case of the op test files
# (about twice as long); NTKFAST_SANITIZE_KEEP=1 keeps the copy (its path is printed) to rerun by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}

# gcc's sanitizers, and the runtimes of that same gcc (another compiler's runtime would not match).
# -fno-wrapv: extensions inherit python's -fwrapv (sysconfig CFLAGS), which defines signed overflow
# as wrapping and so switches UBSan's signed-overflow check off; an int overflow in an index or a
# size is a bug here either way, so the sanitized build reports it.
export CC=gcc CXX=g++
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-wrapv -fno-omit-frame-pointer -g -O1"
ASAN_RT=$(gcc -print-file-name=libasan.so)
STDCXX=$(g++ -print-file-name=libstdc++.so.6)
for lib in "$ASAN_RT" "$STDCXX"; do  # -print-file-name answers the bare name when it has no such file
    [[ $lib == /* && -e $lib ]] || { echo "sanitize_cpu: gcc does not find $lib (libasan: apt install libasan8)" >&2; exit 1; }
done

# The op test files: between them they call every op's CPU kernel, forward and backward.
TESTS=(tests/test_topk_mask.py tests/test_nm_mask.py tests/test_perturbed_masked.py tests/test_masked_gram.py
       tests/test_conv_weight_grad_per_sample.py tests/test_path_ops.py)
# Left out by default, to fit a CI budget: none of them is needed to reach a line of csrc/ that the
# rest does not reach (gcov over the whole run: 1280 of 1280 lines), and they took more than half the
# time (measured on 2 busy cores: ~370 s for every case, ~150 s of it kept):
#  - what never enters _C: the references against their oracles (reference_matches,
#    reference_gradients, conv3d_reference, oracle_matches) and the reference side of the non-finite
#    cases (-reference-); torch is not instrumented, so under the sanitizers they check nothing;
#  - the +inf / -inf variants of the non-finite cases: the NaN variant reads the same memory;
#  - opcheck: the same small inputs again, through fake tensors and AOT tracing (torch's side);
#  - the conv op's gradcheck (finite differences: hundreds of forward calls on one shape) and
#    masked_gram's grads_match_autograd_through_reference: both backwards are PyTorch math, covered
#    on the kernels' outputs by second_order_through_the_backward, the conv grads_match case, and
#    masked_gram's gradcheck and gradgradcheck;
#  - masked_gram's brute force with the path forced dense or sparse: every_instruction_set and the
#    non-finite kernel-dense / kernel-sparse cases force both paths too; brute force [auto] stays.
# Every op keeps its forward-against-reference cases and, where it has a backward, a gradient case.
DESELECT="not reference_matches and not reference_gradients and not conv3d_reference and not oracle_matches"
DESELECT+=" and not -reference- and not (non_finite and inf) and not opcheck"
DESELECT+=" and not (test_conv_weight_grad_per_sample and gradcheck) and not (test_masked_gram and grads_match)"
DESELECT+=" and not (brute_force and not auto)"
SELECT=(-k "$DESELECT")
if [[ ${NTKFAST_SANITIZE_ALL:-0} == 1 ]]; then SELECT=(); fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ntkfast-sanitize.XXXXXX")
if [[ ${NTKFAST_SANITIZE_KEEP:-0} == 1 ]]; then
    echo "sanitize_cpu: keeping $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi

# --- the copy: the working tree's files, tracked or new, but not ignored ones (an in-place _C*.so,
# build/); without git (an exported tree), the same parts minus build outputs
PARTS=(csrc ntkfast tests setup.py build_checks.py pyproject.toml)
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --ignore-failed-read: a tracked file deleted in the working tree is skipped, not an error
    git ls-files -z --cached --others --exclude-standard -- "${PARTS[@]}" \
        | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$WORK"
else
    cp -r "${PARTS[@]}" "$WORK"/
    find "$WORK" \( -name '*.so' -o -name '*.o' -o -name build -o -name __pycache__ \) -prune -exec rm -rf {} +
fi

# --- the build: CPU only (FORCE_CPU=1), the sanitizer flags appended last at compile and link
# (setup.py's NTKFAST_EXTRA_CFLAGS / NTKFAST_EXTRA_LDFLAGS), with the installed torch and setuptools:
# no pip, no download
echo "sanitize_cpu: building the CPU extension with $SAN_FLAGS in $WORK"
t0=$SECONDS
(cd "$WORK" && FORCE_CPU=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} NTKFAST_EXTRA_CFLAGS="$SAN_FLAGS" \
    NTKFAST_EXTRA_LDFLAGS="$SAN_FLAGS" "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) || {
    tail -n 60 "$WORK/build.log" >&2; echo "sanitize_cpu: the sanitized build failed" >&2; exit 1; }
echo "sanitize_cpu: built in $((SECONDS - t0)) s"
SO=$(ls "$WORK"/ntkfast/_C*.so)
readelf -d "$SO" | grep -q 'libasan' \
    || { echo "sanitize_cpu: $SO is not linked against libasan: the flags did not reach the build" >&2; exit 1; }

# --- in the test process itself: the sanitized copy's _C is the one imported, and every op of every
# family runs its CPU kernel, not the pure-PyTorch reference (else the run would prove nothing)
cat >"$WORK/ntkfast_sanitize_check.py" <<'PYEOF'
import os, pkgutil, importlib
import pytest
import torch


def pytest_sessionstart(session):
    import ntkfast._C as C
    import ntkfast.ops
    from ntkfast.ops import loader
    work = os.path.realpath(os.environ["NTKFAST_SANITIZE_WORK"])
    where = os.path.realpath(C.__file__)
    problems = []
    if not where.startswith(work + os.sep):
        problems.append(f"ntkfast._C came from {where}, not from the sanitized copy {work}")
    if not loader.extension_loaded():
        problems.append(f"the extension did not load: {loader.build_info().get('error')}")
    families = [getattr(importlib.import_module(f"ntkfast.ops.{m.name}"), "FAMILY", None)
                for m in pkgutil.iter_modules(ntkfast.ops.__path__)]
    families = [f for f in families if isinstance(f, loader.Family)]
    if not families:
        problems.append("no op family found in ntkfast.ops")
    for f in families:
        if not f.available:
            problems.append(f"{f.what}: not in the build, the tests would run the reference")
        problems += [f"ntkfast::{op}: no CPU kernel" for op in f.ops
                     if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ntkfast::{op}", "CPU")]
    if problems:
        pytest.exit("sanitize_cpu: " + "; ".join(problems), returncode=3)
    ops = sum(len(f.ops) for f in families)
    print(f"sanitize_cpu: testing {where}: {len(families)} families, {ops} ops, CPU kernels all present")
PYEOF

# --- the run (python and torch are not instrumented, only _C*.so is):
# LD_PRELOAD: the ASan runtime must be the first library loaded, or it refuses to start. libstdc++
#   comes with it: python does not link libstdc++, so ASan, starting first, cannot find the real
#   __cxa_throw and its interceptor CHECK-fails on the first C++ exception (every TORCH_CHECK an
#   argument-error test provokes); google/sanitizers#934, gcc PR 84428. libubsan needs no preload:
#   it is an ordinary dependency of _C*.so.
# detect_leaks=0: CPython and torch keep their allocations until exit by design, so LeakSanitizer
#   would report thousands of "leaks" that are not ours.
# halt_on_error=1 (with -fno-sanitize-recover=undefined) and abort_on_error=1: the first report kills
#   the test process with SIGABRT (Python's faulthandler then prints the test's stack), so pytest
#   cannot swallow it and the script fails.
# No suppressions are needed: the full op test files ran clean.
# pytest --capture=sys: the reports go to file descriptor 2, which pytest's default capture would
#   lose together with the aborted process. -m "not slow": the slow cases are GPU sizes.
t0=$SECONDS
(cd "$WORK" && env LD_PRELOAD="$ASAN_RT:$STDCXX${LD_PRELOAD:+:$LD_PRELOAD}" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    PYTHONPATH="$WORK" NTKFAST_SANITIZE_WORK="$WORK" PYTHONDONTWRITEBYTECODE=1 \
    "$PY" -m pytest -q -x -rs -p no:cacheprovider -p ntkfast_sanitize_check --capture=sys -m "not slow" \
    "${SELECT[@]}" "${TESTS[@]}" "$@")
echo "sanitize_cpu: the op tests passed under ASan+UBSan in $((SECONDS - t0)) s"
