"""Profile one 100-round iterative SynFlow prune (keep_rule='authors', as bench_synflow runs it) of
CIFAR ResNet-20: the floor (the conv/linear calls alone of one ones-input forward and backward,
plus one top-k over all the scores, per round), wall time of a few prunes, cProfile grouped into
the per-round costs, and the torch.profiler op table. The floor is benchmarks.floor.path_floor. Not a benchmark suite (no peer): it says
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

import ntkfast
from ntkfast import models

from .floor import path_floor

method = sys.argv[1] if len(sys.argv) > 1 else "synflow"
if len(sys.argv) > 2:
    torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
model = models.resnet20()


def run():
    return ntkfast.prune(copy.deepcopy(model), method, 0.01, rounds=100, keep_rule="authors", progress=False,
                         on_empty_layer="ignore")


fl = path_floor(model, rounds=100)
print(f"# {method}, ResNet-20, 100 rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
print(f"floor (benchmarks.floor.path_floor): {fl['floor_s']:.3f} s for 100 rounds "
      f"(network {fl['floor_parts']['network_s']:.3f} s, selection {fl['floor_parts']['selection_s']:.3f} s)")
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
