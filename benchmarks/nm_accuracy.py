"""Which scorer's N:M masks train best: accuracy after training, per method and structure (issue 28).

Each cell prunes a fresh network with ``prune(..., structure="N:M")`` (the method's own rounds:
100 for SynFlow, 20 for NTK-SAP, 1 for the others), trains it with the study's LeNet-300-100 /
MNIST protocol (Adam, lr 1e-3, batch 128; any zoo model and dataset with --model, --dataset)
for a few epochs, and records the final test accuracy.
The dense network, trained the same way with the same seeds, is the reference the loss is counted
from. Cells are appended to ``--out`` as JSON lines, so an interrupted run resumes.

    python -m benchmarks.nm_accuracy --data-dir ../shared/data --out FILE \
        [--structures 2:4 1:4] [--methods magnitude random snip synflow ntksap] [--seeds 0 1] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROUNDS = {"synflow": 100, "ntksap": 20}


def _cell(method, structure, seed, epochs, train_set, test_set, scoring_batch, model_name="lenet300_100",
          exclude=None):
    import ntkfast
    from ntkfast import models

    torch.manual_seed(seed)
    model = models.get(model_name, input_shape=tuple(train_set.input_shape), num_classes=train_set.num_classes)
    t0 = time.perf_counter()
    masks = None
    if method != "dense":
        masks = ntkfast.prune(model, method, None, structure=structure, rounds=ROUNDS.get(method, 1),
                              data=scoring_batch if method in ("snip", "grasp", "iterative_snip") else None,
                              seed=seed, progress=False, exclude=exclude)
    prune_s = time.perf_counter() - t0
    res = ntkfast.train(model, masks, train_set, test_set, epochs=epochs, optimizer="adam", lr=1e-3,
                        batch_size=128, seed=seed, progress=False)
    return {"model": model_name, "method": method, "structure": structure if method != "dense" else None, "seed": seed,
            "epochs": epochs, "final_test_accuracy": res.final_test_accuracy,
            "density": None if masks is None else masks.pruned_density, "prune_seconds": prune_s}


def _key(r):
    return r["method"], r["structure"], r["seed"], r["epochs"]


def table(records) -> str:
    dense = {r["seed"]: r["final_test_accuracy"] for r in records if r["method"] == "dense"}
    rows = {}
    for r in records:
        if r["method"] != "dense" and r["seed"] in dense:
            rows.setdefault((r["structure"], r["method"]), []).append(dense[r["seed"]] - r["final_test_accuracy"])
    lines = ["| structure | method | seeds | accuracy lost vs dense (points, mean) | spread (points) |",
             "|---|---|---:|---:|---:|"]
    for (structure, method), losses in sorted(rows.items(), key=lambda kv: (kv[0][0], statistics.mean(kv[1]))):
        spread = max(losses) - min(losses)
        lines.append(f"| {structure} | {method} | {len(losses)} | {100 * statistics.mean(losses):.2f} | "
                     f"{100 * spread:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--structures", nargs="+", default=["2:4", "1:4"])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "random", "snip", "synflow", "ntksap"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="lenet300_100")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--exclude", nargs="*", default=None, help="layers kept dense (e.g. a stem whose inputs fit no M)")
    args = ap.parse_args(argv)
    from ntkfast import data

    train_set = data.load_dataset(args.dataset, args.data_dir, train=True)
    test_set = data.load_dataset(args.dataset, args.data_dir, train=False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train_set), generator=g)[:100].tolist()
    scoring_batch = (torch.stack([train_set[i][0] for i in idx]), torch.tensor([int(train_set[i][1]) for i in idx]))
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[_key(r)] = r
    from .common import machine_info, machine_string

    # the CPU's model name (platform.processor() gives only "x86_64" on Linux)
    machine = {"cpu": machine_string(torch.device("cpu"), machine_info(torch.device("cpu"))),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    cells = [("dense", None, s) for s in args.seeds] + [(m, st, s) for st in args.structures
                                                         for m in args.methods for s in args.seeds]
    for method, structure, seed in cells:
        key = (method, structure, seed, args.epochs)
        if key in done:
            continue
        r = _cell(method, structure, seed, args.epochs, train_set, test_set, scoring_batch, args.model, args.exclude)
        r["machine"] = machine
        done[key] = r
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{method:>9} {structure or 'dense':>5} seed {seed}: {100 * r['final_test_accuracy']:.2f}%", flush=True)
    print(table([r for r in done.values() if r["epochs"] == args.epochs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
