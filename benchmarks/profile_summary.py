"""Where a workload's time goes: torch.profiler's self CPU time per operator, grouped, beside the
workload's floor (benchmarks/floor.py). Run alone on the machine; the summaries behind the
issue-29 remarks are committed as ``results/profile-<work>-cpu.txt``.

    python -m benchmarks.profile_summary ntk-trace-resnet20 > benchmarks/results/profile-ntk-trace-resnet20-cpu.txt
    python -m benchmarks.profile_summary --list
"""
from __future__ import annotations

import argparse
import datetime as _dt
import time
from typing import Callable, Dict, Tuple

import torch

from .common import cpu_model
from . import floor as F

# operator-name fragments -> group, first match wins
GROUPS = [
    ("convolution", "convolutions (forward and backward)"),
    ("mkldnn", "convolutions (forward and backward)"),
    ("conv2d", "convolutions (forward and backward)"), ("im2col", "convolutions (forward and backward)"),
    ("col2im", "convolutions (forward and backward)"),
    ("addmm", "matrix products"), ("mm", "matrix products"), ("bmm", "matrix products"),
    ("matmul", "matrix products"), ("einsum", "matrix products"),
    ("batch_norm", "BatchNorm"),
    ("copy_", "copies and layout changes"), ("clone", "copies and layout changes"),
    ("contiguous", "copies and layout changes"), ("cat", "copies and layout changes"),
    ("stack", "copies and layout changes"), ("to_copy", "copies and layout changes"),
    ("randn", "random draws"), ("normal", "random draws"), ("philox", "random draws"),
    ("topk", "selection"), ("kthvalue", "selection"), ("sort", "selection"),
]


def _ntk_trace_resnet20() -> Tuple[Callable[[], object], Callable[[], dict], str]:
    from ntkfast import models
    from ntkfast.ntk import empirical_ntk

    torch.manual_seed(0)
    model = models.get("resnet20").eval()
    x = torch.randn(64, *model.input_shape)
    return (lambda: empirical_ntk(model, x, mode="trace"), lambda: F.ntk_floor(model, x, 10),
            "ntkfast.ntk.empirical_ntk(resnet20, N=64, mode='trace'), float32")


def _ntksap_resnet20() -> Tuple[Callable[[], object], Callable[[], dict], str]:
    import ntkfast
    from ntkfast import models

    torch.manual_seed(0)
    model = models.get("resnet20")

    def run():
        return ntkfast.prune(model, "ntksap", 0.1, rounds=2, repeats=5, batch_size=100, progress=False,
                             on_empty_layer="ignore")

    return run, lambda: F.ntksap_floor(model, 100, 10, stats_pass=True), \
        "ntkfast.prune(resnet20, 'ntksap', 0.1, rounds=2, repeats=5, batch_size=100), default engine"


def _iterative_snip_resnet20() -> Tuple[Callable[[], object], Callable[[], dict], str]:
    import ntkfast
    from ntkfast import models

    torch.manual_seed(0)
    model = models.get("resnet20")
    x = torch.randn(100, *model.input_shape)
    y = torch.randint(0, 10, (100,))
    rounds = 10

    def run():
        return ntkfast.prune(model, "iterative_snip", 0.1, rounds=rounds, data=[(x, y)], progress=False,
                             on_empty_layer="ignore")

    def floor():
        # per round one forward and backward (input and weight gradients) on the batch in train
        # mode, and one selection over the weights
        net = F.network_s(model, x)
        weights = [m.weight for m, *_ in F.layer_calls(model, x[:1])]
        pick = F.traffic_s(F.tensor_bytes(weights) + sum(w.numel() for w in weights))
        return F.record(rounds * (net["seconds"] + pick), "per round one forward and backward on the 100 "
                        "samples (convolution and linear calls alone) and one selection over the weights",
                        network_s=rounds * net["seconds"], selection_s=rounds * pick)

    return run, floor, ("ntkfast.prune(resnet20, 'iterative_snip', 0.1, rounds=10, data=[(x, y)]), 100 samples, "
                        "one batch, default bn (train)")


def _trace_pi_vgg16() -> Tuple[Callable[[], object], Callable[[], dict], str]:
    from ntkfast import models, pathkernel

    torch.manual_seed(0)
    model = models.get("vgg16").eval()
    return lambda: pathkernel.trace(model), lambda: F.path_floor(model, select=False), \
        "ntkfast.pathkernel.trace(vgg16), default dtype (float32)"


def _ntt_step(model_name: str) -> Callable[[], Tuple[Callable[[], object], Callable[[], dict], str]]:
    def make():
        from .bench_ntt import OPTIONS, _ours, _state
        from .floor import ntt_floor

        st = _state(model_name, 64, torch.device("cpu"))
        return (lambda: _ours(st), lambda: ntt_floor(st["teacher"], st["student"], st["x"], 10),
                f"one NTT step as benchmarks.bench_ntt ({model_name}, B=64, density {OPTIONS['density']}: "
                "teacher targets, the loss through the student's NTK, its gradient), float32")
    return make


WORKS: Dict[str, Callable] = {"ntk-trace-resnet20": _ntk_trace_resnet20, "ntksap-resnet20": _ntksap_resnet20,
                              "trace-pi-vgg16": _trace_pi_vgg16, "iterative-snip-resnet20": _iterative_snip_resnet20,
                              "ntt-step-resnet20": _ntt_step("resnet20"), "ntt-step-lenet5": _ntt_step("lenet5")}


def _group(key: str) -> str:
    for frag, name in GROUPS:
        if frag in key:
            return name
    return "other operators"


def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", nargs="?", choices=list(WORKS))
    p.add_argument("--list", action="store_true")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    if args.list or args.work is None:
        print("\n".join(WORKS))
        return 0
    run, floor, what = WORKS[args.work]()
    run()  # warm-up: one-off kernel choices and plans
    t = time.perf_counter()
    run()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    rows = [r for r in prof.key_averages() if r.self_cpu_time_total > 0]
    total = sum(r.self_cpu_time_total for r in rows)
    groups: Dict[str, float] = {}
    for r in rows:
        groups[_group(r.key)] = groups.get(_group(r.key), 0.0) + r.self_cpu_time_total
    fl = floor()
    print(f"# python -m benchmarks.profile_summary {args.work}")
    print(f"# {_dt.date.today()}, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# {what}")
    print(f"wall time, unprofiled        : {wall:.3f} s")
    print(f"floor                        : {fl['floor_s']:.3f} s ({fl['floor_what']})")
    print(f"wall / floor                 : {wall / fl['floor_s']:.2f}")
    print("self CPU time by group (profiled run):")
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:36s} {us / 1e6:8.3f} s  {100 * us / total:5.1f}%")
    print(f"top {args.top} operators by self CPU time:")
    for r in sorted(rows, key=lambda r: -r.self_cpu_time_total)[:args.top]:
        print(f"  {r.key[:48]:48s} {r.self_cpu_time_total / 1e6:8.3f} s  {100 * r.self_cpu_time_total / total:5.1f}%"
              f"  calls {r.count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
