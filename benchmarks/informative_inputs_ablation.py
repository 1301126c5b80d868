"""Ablation for the accuracy study: do data-free pruning methods lose accuracy on MNIST because
they spend first-layer weights on pixels that never vary (the blank border)?

Each cell repeats a study cell (same network draw, pruning data, rounds and training protocol,
taken from the study's own record) with one change: the first layer's weights from the
uninformative inputs (training-set std at most ``--informative-std``, pixel values in [0, 1])
are pruned before scoring, so the method spends the whole budget on the informative ones. The
density is the same fraction of *all* prunable weights as in the study.

    OMP_NUM_THREADS=1 python -m benchmarks.informative_inputs_ablation \\
        --study benchmarks/results/study/lenet300_100-mnist.jsonl --data-dir ../shared/data \\
        --methods ntksap synflow --densities 0.1 0.03 --seeds 0 --threads 1 \\
        --out benchmarks/results/study/analysis/lenet300_100-mnist-informative-inputs.jsonl

Rows are appended to ``--out`` as they finish (one JSON line per cell); finished cells are skipped.
A seed the study has not run yet takes the protocol of the same method and density at another
seed (``study_final_test_accuracy`` is then null).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _start_masks(net, informative: torch.Tensor):
    from ntkfast import Masks

    masks = Masks.ones(net)
    first = next(iter(masks))
    if masks[first].dim() != 2 or masks[first].shape[1] != informative.numel():
        raise SystemExit(f"the first prunable layer {first!r} does not read the flattened input")
    masks[first][:, ~informative.reshape(-1)] = False
    return masks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.informative_inputs_ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="the study JSONL whose cells are repeated")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--densities", nargs="+", type=float, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--informative-std", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ntkfast import data as D
    from ntkfast import models
    from ntkfast.connectivity import connectivity
    from ntkfast.study import prune_cell, read_results, train_cell

    from .study_connectivity import input_std

    study = {(r["method"], r["density"], r["seed"]): r for r in read_results(args.study)}
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["method"], r["density"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
    sets = {}
    for seed in args.seeds:
        for density in args.densities:
            for method in args.methods:
                ref = study.get((method, density, seed))
                if ref is None:  # not run yet for this seed: the protocol is the same for every seed
                    ref = next((dict(r, final_test_accuracy=None) for (m, d, _), r in sorted(study.items())
                                if m == method and d == density), None)
                if ref is None:
                    raise SystemExit(f"{args.study} has no cell {method} d={density} to repeat")
                if (method, density, seed) in done:
                    continue
                proto = ref["protocol"]
                if ref["dataset"] not in sets:
                    train_set = D.load_dataset(ref["dataset"], args.data_dir, train=True)
                    sets[ref["dataset"]] = (train_set, D.load_dataset(ref["dataset"], args.data_dir, train=False),
                                            input_std(train_set) > args.informative_std)
                train_set, test_set, informative = sets[ref["dataset"]]
                # the start masks need only the architecture; prune_cell draws the cell's own network
                start = _start_masks(models.get(ref["model"], input_shape=tuple(train_set.input_shape),
                                                num_classes=train_set.num_classes), informative)
                t0 = time.perf_counter()
                net, masks = prune_cell(ref["model"], method, density, seed, ref["rounds"], ref["options"], train_set,
                                        proto, "cpu", start_masks=start)
                prune_s = time.perf_counter() - t0
                c = connectivity(net, masks)
                res = train_cell(net, masks, train_set, test_set, proto, seed, "cpu")
                row = {"method": method, "density": density, "seed": seed, "informative_std": args.informative_std,
                       "informative_inputs": int(informative.sum()), "achieved_density": masks.density,
                       "effective_density": c.effective.density, "layer_density": dict(masks.layer_density()),
                       "live_units": {n: [c.live_units[n], c.units[n]] for n in c.units},
                       "final_test_accuracy": res.final_test_accuracy, "best_test_accuracy": max(res.test_accuracy),
                       "test_accuracy": res.test_accuracy,
                       "study_final_test_accuracy": ref["final_test_accuracy"], "prune_seconds": prune_s,
                       "train_seconds": res.seconds, "threads": torch.get_num_threads(),
                       "command": "python -m benchmarks.informative_inputs_ablation " + " ".join(sys.argv[1:] if argv is None else argv)}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[ablation] {method} d={density} seed={seed}: {res.final_test_accuracy:.4f} "
                      f"(study {ref['final_test_accuracy']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
