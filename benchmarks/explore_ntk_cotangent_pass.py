"""How the NTK capture gets every output's cotangents, three ways, on the same work (issue 29).

- ``replicate``: the batch repeated once per output in one forward pass, and one backward pass
  in which copy i of the batch gets output i's one-hot cotangent (in ntkfast, off by default:
  ``ntkfast.ntk._capture.replicates``);
- ``vmap``: one forward, then vmap's batched backward over the one-hot cotangents (ntkfast's
  default, except for the graph-recording capture of a convolutional network);
- ``loop``: one forward, then one backward pass per output (ntkfast's default there).

Works: the empirical NTK of ResNet-20 (trace, N = 64) and of LeNet-5 (full, N = 64), no graph;
and the NTT step of ``benchmarks.bench_ntt`` on LeNet-5 and ResNet-20 (the loss through the
student's NTK and its gradient, so every pass also records its graph and is differentiated
again). The ways run interleaved, so a drift of the machine's speed falls on all of them; each
result is compared with the loop's.

    python -m benchmarks.explore_ntk_cotangent_pass [--runs 3] [--works ...] \\
        > benchmarks/results/explore-ntk-cotangent-pass-cpu.txt
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Dict, List

import torch

from .common import cpu_model

WAYS = ["replicate", "vmap", "loop"]


@contextmanager
def _way(name: str):
    from ntkfast.ntk import _capture

    saved = (_capture.replicates, _capture._batched_backward, _capture._has_convolution)
    try:
        if name == "replicate":
            _capture.replicates = lambda model: True
        elif name == "vmap":
            _capture._has_convolution = lambda model: False  # batched even when the graph is recorded
        else:
            _capture._batched_backward = lambda *a, **k: None  # what the capture does without a batching rule
        yield
    finally:
        _capture.replicates, _capture._batched_backward, _capture._has_convolution = saved


def _ntk_work(model_name: str, mode: str) -> Callable[[], List[torch.Tensor]]:
    from ntkfast import models
    from ntkfast.ntk import empirical_ntk

    torch.manual_seed(0)
    model = models.get(model_name).eval()
    x = torch.randn(64, *model.input_shape)
    return lambda: [empirical_ntk(model, x, mode=mode)]


def _ntt_work(model_name: str) -> Callable[[], List[torch.Tensor]]:
    from ntkfast.ntt import teacher_targets, transfer_loss

    from .bench_ntt import OPTIONS, _state

    st = _state(model_name, 64, torch.device("cpu"))
    params = list(st["student"].parameters())
    t_out, t_ntk = teacher_targets(st["teacher"], st["x"])

    def step():
        loss, _ = transfer_loss(st["student"], st["masks"], st["x"], t_out, t_ntk, **OPTIONS)
        return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, params)]

    return step


WORKS: Dict[str, Callable[[], Callable[[], List[torch.Tensor]]]] = {
    "ntk-trace-resnet20": lambda: _ntk_work("resnet20", "trace"),
    "ntk-full-lenet5": lambda: _ntk_work("lenet5", "full"),
    "ntt-step-lenet5": lambda: _ntt_work("lenet5"),
    "ntt-step-resnet20": lambda: _ntt_work("resnet20"),
}


def _rel(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
               for x, y in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--works", nargs="+", choices=list(WORKS), default=list(WORKS))
    args = p.parse_args(argv)
    print(f"# python -m benchmarks.explore_ntk_cotangent_pass --runs {args.runs} --works {' '.join(args.works)}")
    print(f"# {_dt.date.today()}, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("# seconds, median (min-max) of the runs after one warm-up, the ways interleaved; rel. diff: the largest "
          "difference from the loop's result over its largest entry")
    print(f"{'work':20s} {'way':10s} {'seconds':>22s} {'vs loop':>8s} {'rel. diff':>10s}")
    for work in args.works:
        run = WORKS[work]()
        times: Dict[str, list] = {w: [] for w in WAYS}
        results: Dict[str, List[torch.Tensor]] = {}
        for r in range(args.runs + 1):
            for w in WAYS:
                with _way(w):
                    t0 = time.perf_counter()
                    results[w] = run()
                    dt = time.perf_counter() - t0
                if r:
                    times[w].append(dt)
        loop = statistics.median(times["loop"])
        for w in WAYS:
            med = statistics.median(times[w])
            print(f"{work:20s} {w:10s} {med:8.3f} ({min(times[w]):.3f}-{max(times[w]):.3f})"
                  f" {loop / med:7.2f}x {_rel(results[w], results['loop']):10.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
