"""What the masks of a finished accuracy study connect: per cell, how many kept weights lie on an
input-output path, how many hidden units stay live, and how much of the input the pruned network
reads (and how much of that varies across the training set). The masks are rebuilt from each
cell's record by the study's own pruning code (:func:`ntkfast.study.prune_cell`), checked against
the per-layer densities the study recorded, and measured by :func:`ntkfast.connectivity.connectivity`.

    OMP_NUM_THREADS=1 python -m benchmarks.study_connectivity benchmarks/results/study/lenet300_100-mnist.jsonl \\
        --data-dir ../shared/data --threads 1 --out benchmarks/results/study/analysis/lenet300_100-mnist-connectivity.json

Run with the study's thread count: NTK-SAP's float32 masks depend on it (docs/methods/ntksap.md).
NTT cells are skipped unless --ntt is given (rebuilding them re-runs the transfer).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _first_layer_on_flat_input(masks, input_numel):
    name = next(iter(masks))
    m = masks[name]
    return m if m.dim() == 2 and m.shape[1] == input_numel else None


def input_std(dataset) -> torch.Tensor:
    """Per input element ([C, H, W], pixel values in [0, 1]): its std over the dataset's images."""
    pixels = dataset.images.reshape(len(dataset.images), -1).to(torch.float32) / 255.0
    return pixels.std(0).reshape(dataset.input_shape)


def analyse(records, data_dir, *, ntt=False, informative_std=0.1, log=print):
    from ntkfast import data as D
    from ntkfast.connectivity import connectivity
    from ntkfast.study import prune_cell

    sets = {}
    rows = []
    for r in records:
        if r["method"] == "ntt" and not ntt:
            continue
        if r["dataset"] not in sets:
            ds = D.load_dataset(r["dataset"], data_dir, train=True)
            sets[r["dataset"]] = (ds, input_std(ds))
        ds, std = sets[r["dataset"]]
        t0 = time.perf_counter()
        net, masks = prune_cell(r["model"], r["method"], r["density"], r["seed"], r["rounds"], r["options"], ds,
                                r["protocol"], "cpu")
        same = all(abs(masks.layer_density()[k] - v) < 1e-12 for k, v in r["layer_density"].items())
        c = connectivity(net, masks)
        row = {"method": r["method"], "density": r["density"], "seed": r["seed"],
               "final_test_accuracy": r["final_test_accuracy"], "best_test_accuracy": r.get("best_test_accuracy"),
               "masks_match_the_record": same, "kept": masks.kept, "effective": c.effective.kept,
               "wasted_fraction": c.wasted / masks.kept if masks.kept else 0.0,
               "live_units": {n: [c.live_units[n], c.units[n]] for n in c.units},
               "inputs_read": int((c.input_paths > 0).sum()), "inputs": c.input_paths.numel()}
        info = std > informative_std
        row["informative_inputs"] = int(info.sum())
        row["informative_inputs_read"] = int(((c.input_paths > 0) & info).sum())
        total = float(c.input_paths.sum())
        row["path_share_from_informative_inputs"] = float(c.input_paths[info].sum()) / total if total else 0.0
        first = _first_layer_on_flat_input(c.effective, info.numel())
        if first is not None and first.any():
            row["first_layer_share_on_informative_inputs"] = float(first[:, info.reshape(-1)].sum() / first.sum())
        rows.append(row)
        log(f"[connectivity] {r['method']} d={r['density']} seed={r['seed']}: wasted {row['wasted_fraction']:.3f}, "
            f"live {row['live_units']}, masks match {same} ({time.perf_counter() - t0:.1f} s)")
    return rows


def table(rows) -> str:
    head = ("| method | density | seed | test acc. | wasted kept weights | live hidden units | inputs read "
            "(informative) | first-layer weights on informative inputs |")
    lines = [head, "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        hidden = " / ".join(f"{a}" for a, _ in list(r["live_units"].values())[:-1])
        info = f" ({r['informative_inputs_read']}/{r['informative_inputs']})"
        first = r.get("first_layer_share_on_informative_inputs")
        lines.append(f"| {r['method']} | {r['density']:g} | {r['seed']} | {100 * r['final_test_accuracy']:.2f}% | "
                     f"{100 * r['wasted_fraction']:.1f}% | {hidden} | {r['inputs_read']}{info} | "
                     f"{'' if first is None else f'{100 * first:.1f}%'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study_connectivity", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="study JSONL files")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--methods", nargs="+", default=None, help="only these methods")
    p.add_argument("--ntt", action="store_true", help="also rebuild NTT cells (re-runs each transfer)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (use the study's)")
    p.add_argument("--informative-std", type=float, default=0.1,
                   help="an input element is informative when its std over the training set exceeds this "
                        "(pixel values in [0, 1]; default 0.1)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ntkfast.study import read_results

    records = [r for f in args.results for r in read_results(f)]
    if args.methods:
        records = [r for r in records if r["method"] in args.methods]
    rows = analyse(records, args.data_dir, ntt=args.ntt, informative_std=args.informative_std,
                   log=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(rows))
    if args.out:
        out = {"command": "python -m benchmarks.study_connectivity " + " ".join(sys.argv[1:] if argv is None else argv),
               "threads": torch.get_num_threads(), "informative_std": args.informative_std, "rows": rows}
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
