"""A/B of the NTK engine's gathered kept-entries path for sparse masks (PositionsTerm.sparse_dense)
against forming the full masked per-sample gradient (PositionsTerm.dense), on the NTT step of
benchmarks.bench_ntt, interleaved in one process so that machine load hits both sides alike.

    python -m benchmarks.explore_sparse_gather [--models lenet5 resnet20] [--reps 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lenet5"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ntkfast.ntk import _terms

    from .bench_ntt import _ours, _state

    gathered = _terms.PositionsTerm.sparse_dense
    sides = {"full gradient": lambda self: self.dense(), "gathered": gathered}
    try:
        for model in args.models:
            st = _state(model, 64, torch.device("cpu"))
            times = {k: [] for k in sides}
            for _ in range(args.reps):
                for name, fn in sides.items():
                    _terms.PositionsTerm.sparse_dense = fn
                    t = time.perf_counter()
                    _ours(st)
                    times[name].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{model}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
                  + f" ({med['full gradient'] / med['gathered']:.2f}x), threads {torch.get_num_threads()}")
    finally:
        _terms.PositionsTerm.sparse_dense = gathered
    return 0


if __name__ == "__main__":
    sys.exit(main())
