"""Run every benchmark suite for one device, then rebuild the results README.

    python -m benchmarks.run_all --device cpu
    python -m benchmarks.run_all --device cuda
    python -m benchmarks.run_all --quick                  # smoke test, results in a temp folder
    python -m benchmarks.run_all --device cpu --extra 'synflow:--models resnet20'

Each suite runs in its own process (one failing suite does not stop the others); the exit status
is non-zero if any failed. Run it alone on the machine: other CPU-heavy processes distort the
timings by several times.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .common import QUICK_DIR, REPO_ROOT, RESULTS_DIR, regenerate_readme

SUITES = {
    "topk_mask": "benchmarks.bench_topk_mask",
    "nm_mask": "benchmarks.bench_nm_mask",
    "synflow": "benchmarks.bench_synflow",
    "perturbed_masked": "benchmarks.bench_perturbed_masked",
    "ntksap": "benchmarks.bench_ntksap",
    "ntk": "benchmarks.bench_ntk",
    "masked_gram": "benchmarks.bench_masked_gram",
    "conv_weight_grad_per_sample": "benchmarks.bench_conv_weight_grad_per_sample",
    "ntt": "benchmarks.bench_ntt",
    "train": "benchmarks.bench_train",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated (default {','.join(SUITES)})")
    p.add_argument("--runs", type=int, default=None, help="timed runs per side (default: each suite's own)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per side (default: each suite's own)")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes, for smoke tests (results in {QUICK_DIR})")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR.relative_to(REPO_ROOT)})")
    p.add_argument("--tag", default=None, help="appended to the results file names")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--extra", action="append", default=[], metavar="SUITE:ARGS",
                   help="extra arguments for one suite, e.g. 'synflow:--rounds 20' (repeatable)")
    args = p.parse_args(argv)

    suites = [s for s in args.suites.split(",") if s]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"--suites: unknown {unknown}; known: {list(SUITES)}")
    extra = {}
    for e in args.extra:
        name, sep, rest = e.partition(":")
        if not sep or name not in SUITES:
            raise SystemExit(f"--extra {e!r}: expected SUITE:ARGS with SUITE one of {list(SUITES)}")
        extra.setdefault(name, []).extend(shlex.split(rest))

    out_dir = Path(args.out) if args.out else (QUICK_DIR if args.quick else RESULTS_DIR)
    common = ["--device", args.device, "--out", str(out_dir), "--no-readme"]
    if args.runs is not None:
        common += ["--runs", str(args.runs)]
    if args.warmup is not None:
        common += ["--warmup", str(args.warmup)]
    if args.quick:
        common.append("--quick")
    if args.tag:
        common += ["--tag", args.tag]
    if args.no_memory:
        common.append("--no-memory")

    failed = []
    for name in suites:
        cmd = [sys.executable, "-m", SUITES[name]] + common + extra.get(name, [])
        print(f"## {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=str(REPO_ROOT)).returncode
        print(f"## {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"## wrote {regenerate_readme(out_dir)}", flush=True)
    if failed:
        print(f"## FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
