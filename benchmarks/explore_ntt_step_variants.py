"""Two choices inside the NTT step, timed against their alternatives on the same step (issue 29).

1. The cotangent capture under create_graph: a loop over the outputs (what ntkfast does for
   convolutional students) against vmap's batched backward (what it does elsewhere).
2. BatchNorm's per-channel product sum_p b xhat: an einsum (what ntkfast does), the elementwise
   product and sum it replaced, and an einsum with an elementwise gradient.

The step is that of ``benchmarks.bench_ntt`` (teacher targets computed once outside the timing;
timed: the loss through the student's NTK and its gradient). The variants run interleaved, so a
drift of the machine's speed falls on all of them; the gradients are compared with the default's.

    python -m benchmarks.explore_ntt_step_variants [--model resnet20] [--runs 4] [--variants 0 2 3] \\
        > benchmarks/results/explore-ntt-step-variants-resnet20-cpu.txt
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import time
from contextlib import contextmanager

import torch

from .common import cpu_model


class _ElementwiseGrad(torch.autograd.Function):
    """The einsum forward with the elementwise product's gradient."""

    @staticmethod
    def forward(b, xhat):
        return torch.einsum("nkcp,ncp->nkc", b, xhat)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        b, xhat = ctx.saved_tensors
        gb = g.unsqueeze(3) * xhat.unsqueeze(1) if ctx.needs_input_grad[0] else None
        gx = torch.einsum("nkc,nkcp->ncp", g, b) if ctx.needs_input_grad[1] else None
        return gb, gx


@contextmanager
def _variant(name: str):
    from ntkfast.ntk import _capture, _layers

    saved = (_capture._has_convolution, _layers._channel_dot)
    try:
        if name == "batched capture":
            _capture._has_convolution = lambda model: False
        elif name == "BN elementwise":
            _layers._channel_dot = lambda b, xhat: (b * xhat.unsqueeze(1)).sum(3)
        elif name == "BN einsum, elementwise gradient":
            _layers._channel_dot = _ElementwiseGrad.apply
        yield
    finally:
        _capture._has_convolution, _layers._channel_dot = saved


VARIANTS = ["default (loop, BN einsum)", "batched capture", "BN elementwise", "BN einsum, elementwise gradient"]


def main(argv=None) -> int:
    from ntkfast.ntt import teacher_targets, transfer_loss

    from .bench_ntt import OPTIONS, _state

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--variants", type=int, nargs="+", default=list(range(len(VARIANTS))),
                   help="which, by index: " + "; ".join(f"{i} {v}" for i, v in enumerate(VARIANTS))
                   + " (the default's gradient is the reference: keep 0)")
    args = p.parse_args(argv)
    variants = [VARIANTS[i] for i in args.variants]
    st = _state(args.model, args.batch, torch.device("cpu"))
    student, params = st["student"], list(st["student"].parameters())
    t_out, t_ntk = teacher_targets(st["teacher"], st["x"])
    times = {v: {"loss": [], "gradient": []} for v in variants}
    grads = {}
    for run in range(args.runs + 1):  # the first round warms up and is dropped
        for v in variants:
            with _variant(v):
                t0 = time.perf_counter()
                loss, _ = transfer_loss(student, st["masks"], st["x"], t_out, t_ntk, **OPTIONS)
                t1 = time.perf_counter()
                g = torch.autograd.grad(loss, params)
                t2 = time.perf_counter()
            if run:
                times[v]["loss"].append(t1 - t0)
                times[v]["gradient"].append(t2 - t1)
            grads[v] = g
    ref = grads[variants[0]]
    print(f"# python -m benchmarks.explore_ntt_step_variants --model {args.model} --batch {args.batch} --runs {args.runs}"
          + (f" --variants {' '.join(map(str, args.variants))}" if args.variants != list(range(len(VARIANTS))) else ""))
    print(f"# {_dt.date.today()}, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("# medians (min-max) of the runs, seconds; interleaved; rel. diff: largest gradient difference / largest entry")
    print(f"{'variant':34s} {'loss':>18s} {'gradient':>18s} {'step':>8s} {'rel. diff':>10s}")
    for v in variants:
        lo, gr = times[v]["loss"], times[v]["gradient"]
        step = [a + b for a, b in zip(lo, gr)]
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(grads[v], ref))
        print(f"{v:34s} {statistics.median(lo):6.2f} ({min(lo):.2f}-{max(lo):.2f})"
              f" {statistics.median(gr):6.2f} ({min(gr):.2f}-{max(gr):.2f}) {statistics.median(step):8.2f} {diff:10.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
