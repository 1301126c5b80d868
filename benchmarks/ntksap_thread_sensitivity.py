"""How much NTK-SAP's masks depend on the number of CPU threads, in float32 and float64.

Thread counts change the order of the reductions inside convolutions and matrix products, so
float32 scores move in their last digits. This script measures how far that travels:

- round-1 scores (the dense network, one ``ntksap`` call) at each thread count: their relative
  norm difference, and the median per-weight relative difference in the bottom and top tenth of
  the scores. NTK-SAP's score is |sum over pieces of a signed gradient|, so the smallest scores
  are near-cancellations, which rounding moves most in relative terms;
- the full iterative prune (``rounds`` rounds, as the authors) at each thread count: how many
  mask entries differ, what fraction of the kept weights both masks keep, and the largest
  per-layer density difference;
- with ``--compare-seed``, the same comparison between seed and seed + 1 (new draws of weights,
  inputs and perturbations) at one thread count: the scale against which to read the above.

Each thread count runs in the same process one after the other (torch.set_num_threads), with
the same model, seed and draws, so the thread count is the only difference.

    python -m benchmarks.ntksap_thread_sensitivity --model resnet20 --rounds 20 --dtypes float32 float64 --compare-seed
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS_DIR, machine_info


def _score_stats(a: dict, b: dict) -> dict:
    x = torch.cat([t.reshape(-1) for t in a.values()]).double()
    y = torch.cat([t.reshape(-1) for t in b.values()]).double()
    rel = (x - y).abs() / x.abs().clamp_min(torch.finfo(torch.float64).tiny)
    order = x.argsort()
    tenth = max(len(order) // 10, 1)
    return {
        "relative_norm_difference": float((x - y).norm() / x.norm()),
        "identical": bool(torch.equal(x, y)),
        "median_relative_difference_bottom_tenth": float(rel[order[:tenth]].median()),
        "median_relative_difference_top_tenth": float(rel[order[-tenth:]].median()),
        "weights_changed": int((x != y).sum()),
        "weights": len(x),
    }


def _mask_stats(a, b) -> dict:
    diff = kept_a = both = 0
    layer_gap = 0.0
    for name, ma in a.items():
        mb = b[name]
        ka, kb = ma.bool(), mb.bool()
        diff += int((ka != kb).sum())
        kept_a += int(ka.sum())
        both += int((ka & kb).sum())
        layer_gap = max(layer_gap, abs(float(ka.float().mean()) - float(kb.float().mean())))
    return {"entries_differing": diff, "kept": kept_a, "kept_by_both_fraction": both / max(kept_a, 1),
            "largest_layer_density_difference": layer_gap}


def _run(args) -> dict:
    import ntkfast
    from ntkfast.scores import ntksap

    out = {"command": "python -m benchmarks.ntksap_thread_sensitivity " + " ".join(sys.argv[1:]),
           "machine": machine_info(torch.device("cpu")), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
           "model": args.model, "density": args.density, "rounds": args.rounds, "seed": args.seed,
           "threads": args.threads, "results": []}
    torch.manual_seed(args.seed)
    model = ntkfast.models.get(args.model)
    for name in args.dtypes:
        dtype = getattr(torch, name)
        rec = {"dtype": name}
        scores, masks, seconds = {}, {}, {}
        for t in args.threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            scores[t] = ntksap(model, None, seed=args.seed, dtype=dtype)
            masks[t] = ntkfast.prune(model, "ntksap", args.density, rounds=args.rounds, seed=args.seed,
                                     progress=False, dtype=dtype)
            seconds[t] = time.perf_counter() - t0
        base = args.threads[0]
        for t in args.threads[1:]:
            key = f"{base} vs {t} threads"
            rec[key] = {"round1_scores": _score_stats(scores[base], scores[t]),
                        f"masks_after_{args.rounds}_rounds": _mask_stats(masks[base], masks[t])}
        if args.compare_seed:
            torch.set_num_threads(base)
            other = ntkfast.prune(model, "ntksap", args.density, rounds=args.rounds, seed=args.seed + 1,
                                  progress=False, dtype=dtype)
            rec[f"seed {args.seed} vs seed {args.seed + 1}, {base} thread(s)"] = {
                f"masks_after_{args.rounds}_rounds": _mask_stats(masks[base], other)}
        rec["seconds"] = {str(t): s for t, s in seconds.items()}
        out["results"].append(rec)
        print(json.dumps(rec, indent=1), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--compare-seed", action="store_true",
                   help="also prune with seed + 1 (first thread count): the mask change a new draw makes, for scale")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if len(args.threads) < 2:
        p.error("--threads: give at least two thread counts to compare")
    out = _run(args)
    path = Path(args.out) if args.out else RESULTS_DIR / f"ntksap-thread-sensitivity-{args.model}-cpu.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
