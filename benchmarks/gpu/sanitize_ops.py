"""The compute-sanitizer driver: every compiled op x dtype x direction of op_cases.py, once each,
on the GPU, with a synchronisation after each so that a report lands next to the case that
caused it. Checks no values (smoke_ops.py does): it exists to be run under

    compute-sanitizer --tool memcheck|racecheck|synccheck python3 benchmarks/gpu/sanitize_ops.py

Run it as it is (--device cpu where there is no GPU) to see every case run. Set
PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck, so that an overrun past a tensor's end is not
hidden inside a larger block of PyTorch's caching allocator.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import op_cases  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    cases = [c for c in op_cases.all_cases() if args.only is None or args.only in c.name]
    missing = op_cases.uncovered_ops(cases) if args.only is None else []
    if missing:
        print(f"sanitize_ops: ops with no case: {missing}")
        return 1
    failed = 0
    for case in cases:
        t0 = time.perf_counter()
        print(f"case {case.name}", flush=True)
        try:
            inputs = op_cases.to_device(case.make(op_cases.gen_for(case.name), case.dtype), args.device)
            case.run(inputs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # an error is reported and the driver goes on to the next case
            failed += 1
            print(f"  ERROR {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        print(f"  done in {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
    print(f"sanitize_ops: {len(cases)} cases on {args.device}, {failed} raised")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
