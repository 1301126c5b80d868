"""Forward time of a channel-pruned ResNet-20 cut down with Torch-Pruning, against the dense
network and the masked one (same shapes, pruned weights zero), on one device, and against the
floor of each (its convolution and linear calls alone, ``benchmarks/floor.py``).

Channel masks only pay off once the channels are gone: a masked network runs every zero, so it
should cost what the dense one does, and the exported one (``export_torch_pruning``) should cost
about what its kept multiply-adds say. This measures the forwards in eval mode under
``torch.no_grad()`` on random CIFAR-sized batches, with the channels ranked globally and
layerwise (which cuts the multiply-adds more evenly, as it thins the early, wide-map layers too):
the dense network and each scope's masked and exported ones are run in turn within each repeat,
so that a change of machine load hits all five alike, and the median per model is kept. The
machine's load average is recorded before and after: on a shared machine the absolute times
move; the ratios, taken within one repeat, move less.

    python -m benchmarks.bench_channel_export                  # density 0.5, both scopes, batch 64 and 256
    python -m benchmarks.bench_channel_export --quick          # a smoke run, not written
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS_DIR, machine_info
from .floor import layer_calls, network_s


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model, x) -> int:
    """Multiply-adds of the conv and linear layers for one batch (what channel removal cuts)."""
    return sum(y.numel() * (m.weight[0].numel() if isinstance(m, torch.nn.Conv2d) else m.weight.shape[1])
               for m, _, y, _ in layer_calls(model, x))


def prepare(density: float, scope: str, method: str, seed: int) -> dict:
    """The dense ResNet-20 of ``seed``, pruned to channel masks under ``scope``, masked and exported."""
    from ntkfast import prune
    from ntkfast.models import resnet20
    from ntkfast.structured import export_torch_pruning

    torch.manual_seed(seed)
    dense = resnet20().eval()
    t0 = time.perf_counter()
    masks = prune(dense, method, density, scope=scope, structure="channel", progress=False, seed=seed)
    prune_s = time.perf_counter() - t0
    masked = masks.apply(copy.deepcopy(dense)).eval()
    t0 = time.perf_counter()
    small = export_torch_pruning(dense, masks, torch.randn(1, 3, 32, 32)).eval()
    export_s = time.perf_counter() - t0
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        max_diff = float((small(probe) - masked(probe)).abs().max())
    x1 = torch.randn(1, 3, 32, 32)
    return {"dense": dense, "masked": masked, "exported": small, "record": {
        "model": "resnet20",
        "method": method,
        "scope": scope,
        "target_density": density,
        "achieved_density": masks.metadata["achieved_density"],
        "parameters": {"dense": _count(dense), "exported": _count(small)},
        "macs_per_image": {"dense": _macs(dense, x1), "exported": _macs(small, x1)},
        "prune_seconds": round(prune_s, 3),
        "export_seconds": round(export_s, 3),
        "max_abs_output_difference_exported_vs_masked": max_diff,
    }}


def run(density: float, scopes, batches, repeats: int, inner: int, method: str, seed: int) -> list:
    """One record per scope. Every scope's masked and exported networks and the one dense network
    (the same weights for every scope) are timed in turn within each repeat, so that a change of
    machine load hits all of them alike and the scopes' times can be compared with each other."""
    prepared = {scope: prepare(density, scope, method, seed) for scope in scopes}
    dense = prepared[scopes[0]]["dense"]
    models = {"dense": dense}
    for scope, p in prepared.items():
        models[f"{scope}/masked"], models[f"{scope}/exported"] = p["masked"], p["exported"]
    g = torch.Generator().manual_seed(seed)
    cases = {scope: [] for scope in scopes}
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, generator=g)
        times = {k: [] for k in models}
        with torch.no_grad():
            for m in models.values():  # warm-up: allocator, one-off kernel choices
                m(x)
            for _ in range(repeats):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        m(x)
                    times[name].append((time.perf_counter() - t0) / inner)
        med = {k: statistics.median(v) for k, v in times.items()}
        # the convolution and linear calls alone, timed one by one: the rest (BatchNorm, ReLU, the
        # residual sums, Python) is overhead that fusing could remove
        floor_dense = network_s(dense, x, input_grad=False, weight_grad=False)["seconds"]
        for scope in scopes:
            mine = {"dense": "dense", "masked": f"{scope}/masked", "exported": f"{scope}/exported"}
            floor = {"dense": floor_dense,
                     "exported": network_s(models[mine["exported"]], x, input_grad=False, weight_grad=False)["seconds"]}
            m = {k: med[v] for k, v in mine.items()}
            cases[scope].append({
                "floor_forward_ms": {k: round(v * 1e3, 3) for k, v in floor.items()},
                "over_floor": {k: round(m[k] / floor[k], 3) for k in floor},
                "batch": batch,
                "median_forward_ms": {k: round(v * 1e3, 3) for k, v in m.items()},
                "all_forward_ms": {k: [round(t * 1e3, 3) for t in times[v]] for k, v in mine.items()},
                "exported_speedup_over_dense": round(m["dense"] / m["exported"], 3),
                "masked_over_dense": round(m["masked"] / m["dense"], 3),
            })
    return [dict(prepared[scope]["record"], repeats=repeats, forwards_per_repeat=inner,
                 timed_with=sorted(models), cases=cases[scope]) for scope in scopes]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--method", default="synflow")
    p.add_argument("--scopes", nargs="+", default=["global", "layerwise"], choices=["global", "layerwise"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 repeats; prints, writes nothing")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "channel_export-cpu.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.batches, a.repeats, a.inner = [8], 2, 1
    load_before = os.getloadavg()
    result = {"runs": run(a.density, a.scopes, a.batches, a.repeats, a.inner, a.method, a.seed)}
    result["machine"] = machine_info(torch.device("cpu"))
    result["load_average_1_5_15_min"] = {"before": [round(v, 2) for v in load_before],
                                         "after": [round(v, 2) for v in os.getloadavg()]}
    result["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    text = json.dumps(result, indent=2)
    print(text)
    if not a.quick:
        from ntkfast.core.files import atomic_write

        atomic_write(a.out, lambda f: f.write(text.encode() + b"\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
