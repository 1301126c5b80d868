"""Profile one 100-round iterative SynFlow prune (keep_rule='authors', as bench_synflow runs it) of
CIFAR ResNet-20: the floor (the conv/linear calls alone of one ones-input forward and backward,
plus one top-k over all the scores, per round), wall time of a few prunes, cProfile grouped into
the per-round costs, and the torch.profiler op table. Not a benchmark suite (no peer): it says
where a round's time goes.

    python -m benchmarks.profile_synflow [method [threads]]     # method default synflow
"""
import copy
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import ntkfast
from ntkfast import models
from ntkfast.ops import topk_mask

method = sys.argv[1] if len(sys.argv) > 1 else "synflow"
if len(sys.argv) > 2:
    torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
model = models.resnet20()


def run():
    return ntkfast.prune(copy.deepcopy(model), method, 0.01, rounds=100, keep_rule="authors", progress=False,
                         on_empty_layer="ignore")


def floor_round():
    """Seconds of the conv/linear calls of one forward + backward of the |theta| network at a
    1x3x32x32 ones input (weight and input gradients, as autograd asks for them), and of one
    topk_mask over all the scores."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, y: calls.append((m, a[0].detach().clone(), y.detach().clone())))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        copy.deepcopy(model).eval()(torch.ones(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    weights = [m.weight.detach().abs() for m, _, _ in calls]

    def convs():
        for i, ((m, x, y), w) in enumerate(zip(calls, weights)):
            if isinstance(m, nn.Conv2d):
                F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
                torch.ops.aten.convolution_backward(y, x, w, None, m.stride, m.padding, m.dilation, False, [0, 0],
                                                    m.groups, [i > 0, True, False])
            else:
                F.linear(x, w), y.t() @ x, y @ w

    n = sum(w.numel() for w in weights)

    def topk():
        topk_mask(weights, n // 2, drop_ties=True, clamp=True)

    out = {}
    for f in (convs, topk):
        f()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(10):
                f()
            ts.append((time.perf_counter() - t) / 10)
        out[f.__name__] = statistics.median(ts)
    return out


fl = floor_round()
print(f"# {method}, ResNet-20, 100 rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
print(f"floor per round: conv/GEMM fwd+bwd {fl['convs'] * 1e3:.2f} ms + topk {fl['topk'] * 1e3:.2f} ms; "
      f"x100 = {(fl['convs'] + fl['topk']) * 100:.3f} s")
run()
walls = []
for _ in range(5):
    t = time.perf_counter()
    run()
    walls.append(time.perf_counter() - t)
print(f"wall per prune (s): {[round(w, 3) for w in walls]}, median {statistics.median(walls):.3f}")

pr = cProfile.Profile()
pr.enable()
run()
pr.disable()
st = pstats.Stats(pr)
total = max(v[3] for v in st.stats.values())
groups = {
    "finite_model (isfinite over every tensor)": ("state.py", "finite_model"),
    "resolve_targets": ("targets.py", "resolve_targets"),
    "threshold -> topk_mask (C++ op + checks)": ("masks.py", "threshold"),
    "Masks.density (progress/log arguments)": ("masks.py", "density"),
    "forward (module calls)": ("module.py", "_wrapped_call_impl"),
    "functional_call forward": ("state.py", "functional_forward"),
    "autograd.grad (backward)": ("autograd/__init__.py", "grad"),
    f"the scorer {method} (inside the method wrappers)": ("_synflow.py", method),
}
print(f"\ncProfile, one prune (profiled, so slower): {total:.3f} s; cumulative per category:")
for label, (fname, func) in groups.items():
    tot = max([v[3] for (f, _, fn), v in st.stats.items() if fn == func and f.endswith(fname)] or [0.0])
    print(f"  {label:52s} {tot:7.3f} s  {tot * 10:6.2f} ms/round")
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
print(s.getvalue())

from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU]) as p:
    run()
print("torch.profiler, one prune, ops by self CPU time:")
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
