"""Where the time of ``bench_train``'s case goes: ``ntkfast.training.train`` and the plain PyTorch
masked Adam loop (``bench_train._peer``) on the same state, split into the phases of a step.

The phases are timed from outside, without copying either loop: global optimiser step hooks,
``Optimizer.zero_grad``, ``Tensor.backward``, ``F.cross_entropy`` and the model's own forward are
wrapped with timers, so both sides are measured by the same instruments. What is left of a run
(batching, mask re-application, metrics, the progress bar, the checks train() makes before its
first step) is the remainder. Then a torch.profiler table of each side's aten calls, a cProfile
of train()'s setup functions, and the floor of the steps (``benchmarks.floor.training_floor``: the
layers' matrix calls alone and an Adam update's memory traffic over the kept entries).

    python -m benchmarks.profile_train [--model lenet300_100] [--threads 1] [--runs 5]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from . import bench_train as B
from .floor import training_floor

PHASES = ("forward", "loss", "zero_grad", "backward", "optimizer step")


class _Timers:
    """Seconds per phase, summed over the calls made while installed."""

    def __init__(self, model):
        self.model = model
        self.t = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)
        self._fwd = self._step = None

    def _add(self, phase, dt):
        self.t[phase] += dt
        self.calls[phase] += 1

    @contextlib.contextmanager
    def installed(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        timers = self
        orig_zero, orig_backward, orig_ce = torch.optim.Optimizer.zero_grad, torch.Tensor.backward, F.cross_entropy

        def zero_grad(opt, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig_zero(opt, *a, **k)
            finally:
                timers._add("zero_grad", time.perf_counter() - t0)

        def backward(t, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig_backward(t, *a, **k)
            finally:
                timers._add("backward", time.perf_counter() - t0)

        def cross_entropy(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig_ce(*a, **k)
            finally:
                timers._add("loss", time.perf_counter() - t0)

        def fwd_pre(m, args):
            if torch.is_grad_enabled():  # train()'s no-grad probe of the first sample is setup
                self._fwd = time.perf_counter()

        def fwd_post(m, args, out):
            if self._fwd is not None:
                timers._add("forward", time.perf_counter() - self._fwd)
                self._fwd = None

        def step_pre(opt, args, kwargs):
            self._step = time.perf_counter()

        def step_post(opt, args, kwargs):
            timers._add("optimizer step", time.perf_counter() - self._step)

        handles = [self.model.register_forward_pre_hook(fwd_pre), self.model.register_forward_hook(fwd_post),
                   register_optimizer_step_pre_hook(step_pre), register_optimizer_step_post_hook(step_post)]
        torch.optim.Optimizer.zero_grad, torch.Tensor.backward, F.cross_entropy = zero_grad, backward, cross_entropy
        try:
            yield self
        finally:
            torch.optim.Optimizer.zero_grad, torch.Tensor.backward, F.cross_entropy = orig_zero, orig_backward, orig_ce
            for h in handles:
                h.remove()


def phases(fn, st, runs: int) -> dict:
    """Median ms per run of each phase and of the whole call, over ``runs`` runs."""
    rows = {p: [] for p in PHASES + ("total", "remainder")}
    for _ in range(runs):
        model, state = B._prepare(st)
        timers = _Timers(model)
        with timers.installed():
            t0 = time.perf_counter()
            fn(model, state)
            total = time.perf_counter() - t0
        for p in PHASES:
            rows[p].append(timers.t[p])
        rows["total"].append(total)
        rows["remainder"].append(total - sum(timers.t.values()))
    return {p: statistics.median(v) * 1e3 for p, v in rows.items()}


def profiler_table(fn, st, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    model, state = B._prepare(st)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn(model, state)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def setup_profile(st, rows: int = 14) -> str:
    model, state = B._prepare(st)
    pr = cProfile.Profile()
    pr.enable()
    B._ours(model, state)
    pr.disable()
    out = io.StringIO()
    stats = pstats.Stats(pr, stream=out).sort_stats("cumulative")
    stats.print_stats(r"ntkfast/(training|core)", rows)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet300_100", choices=sorted({m for m, _, _ in B.WORKLOADS}))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-tables", action="store_true", help="phases and floor only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name, shape, batch = next((m, s, b) for m, s, b in B.WORKLOADS if m == args.model and b == 128)
    st = B._state(model_name, shape, batch, B.STEPS, torch.device("cpu"))
    for fn in (B._peer, B._ours, B._peer, B._ours):  # warm-up
        fn(*B._prepare(st))
    print(f"{model_name} batch {batch}, {B.STEPS} steps, density {B.DENSITY}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); medians of {args.runs} runs, ms per run of {B.STEPS} steps")
    # interleaved, so that a neighbour's load falls on both sides alike
    peer, ours = {p: [] for p in PHASES + ("total", "remainder")}, {p: [] for p in PHASES + ("total", "remainder")}
    for i in range(args.runs):
        for fn, acc in ((B._peer, peer), (B._ours, ours)) if i % 2 == 0 else ((B._ours, ours), (B._peer, peer)):
            for p, v in phases(fn, st, 1).items():
                acc[p].append(v)
    peer = {p: statistics.median(v) for p, v in peer.items()}
    ours = {p: statistics.median(v) for p, v in ours.items()}
    print(f"{'phase':<16}{'peer ms':>10}{'ours ms':>10}{'peer/step':>11}{'ours/step':>11}")
    for p in PHASES + ("remainder", "total"):
        print(f"{p:<16}{peer[p]:>10.2f}{ours[p]:>10.2f}{peer[p] / B.STEPS:>11.3f}{ours[p] / B.STEPS:>11.3f}")
    print("(backward includes the gradient-mask hooks where a side has them; remainder: batching, gradient and "
          "weight masking outside the backward, ntkfast's gather/scatter of kept entries, metrics, progress bar, "
          "per-call checks and setup)")
    print(f"ratio peer/ours (total): {peer['total'] / ours['total']:.3f}")
    fl = training_floor(st["model"], st["batches"][0][0], B.STEPS, masks=st["masks"])
    print(f"floor (benchmarks.floor.training_floor): {fl['floor_s'] * 1e3:.2f} ms per {B.STEPS} steps "
          f"(layers {fl['floor_parts']['network_s'] * 1e3:.2f} ms, Adam over the kept entries "
          f"{fl['floor_parts']['update_s'] * 1e3:.2f} ms); peer/floor {peer['total'] / 1e3 / fl['floor_s']:.2f}, "
          f"ours/floor {ours['total'] / 1e3 / fl['floor_s']:.2f}")
    if not args.no_tables:
        for name, fn in (("peer", B._peer), ("ours", B._ours)):
            print(f"\n== torch.profiler, {name}, one run of {B.STEPS} steps (self CPU time; profiler overhead "
                  "included)")
            print(profiler_table(fn, st))
        print(f"== cProfile of train(): ntkfast's own functions, one run of {B.STEPS} steps")
        print(setup_profile(st))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
