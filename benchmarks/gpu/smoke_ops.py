"""Run every compiled op once per dtype and direction on the GPU and hold it to the CPU kernel on
the same inputs (op_cases.py). Exits 1 on any mismatch or error, or if an op of the ntkfast
namespace has no case here.

    python3 benchmarks/gpu/smoke_ops.py [--device cuda] [--junit FILE]

--device cpu (the dry run, and CI) runs each case on the CPU twice: that checks the cases
themselves and this harness, not the GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import junit  # noqa: E402
import op_cases  # noqa: E402


def run_case(case, device) -> str:
    """None when the device agrees with the CPU kernel, else what went wrong."""
    inputs = case.make(op_cases.gen_for(case.name), case.dtype)
    want = case.run(op_cases.to_device(inputs, "cpu"))
    got = case.run(op_cases.to_device(inputs, device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    if len(got) != len(want):
        return f"{len(got)} outputs on {device}, {len(want)} on the CPU"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.device.type != torch.device(device).type:
            return f"output {i} came back on {g.device}, not {device}"
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i}: {tuple(g.shape)} {g.dtype} on {device}, {tuple(w.shape)} {w.dtype} on the CPU"
        if case.exact:
            if not torch.equal(g.cpu(), w):
                return f"output {i}: {int((g.cpu() != w).sum())} entries differ (exact comparison)"
        else:
            err = op_cases.relative_error(g, w)
            if not err <= op_cases.TOLERANCE[case.dtype]:
                return f"output {i}: relative error {err:.3g} > {op_cases.TOLERANCE[case.dtype]:.1g}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--junit", default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = op_cases.all_cases()
    results = []
    missing = op_cases.uncovered_ops(cases)
    if missing:
        results.append(("every_op_has_a_case", 0.0, f"ops with no case in op_cases.py: {missing}"))
    for case in cases:
        t0 = time.perf_counter()
        try:
            err = run_case(case, args.device)
        except Exception:
            err = traceback.format_exc()
        dt = time.perf_counter() - t0
        results.append((case.name, dt, err))
        print(f"{'ok  ' if err is None else 'FAIL'} {case.name} ({dt * 1e3:.0f} ms)"
              + ("" if err is None else "\n     " + err.strip().replace("\n", "\n     ")), flush=True)
    failed = sum(1 for r in results if r[2])
    print(f"smoke_ops on {args.device}: {len(results) - failed} passed, {failed} failed")
    if args.junit:
        junit.write(args.junit, f"smoke_ops.{args.device}", results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
