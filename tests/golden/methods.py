"""Golden fingerprints of every registered method: masks bit for bit, scores by statistics.

Made once before a reorganisation and held after it (tests/test_golden_methods.py), so that moving
code changes no method's result. Each method runs on LeNet-5 and a small BatchNorm ResNet (ResNet-20
at width 4), float64, seed 0, density 0.1, three rounds for the iterative methods, through the
public entry points only: ``ntkfast.prune`` for the masks, ``ntkfast.scores.<method>`` for one
round of scores from the dense model; for NTT, the learned weights ``prune`` returns with its masks.

    python tests/golden/methods.py --write     # rewrite methods.json (only when results SHOULD change)
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "methods.json"
sys.path.insert(0, str(HERE.parent.parent))

ITERATIVE = {"iterative_snip", "synflow", "synflow_l2", "synflow_l2_squared", "synflow_dist", "synflow_l2_dist",
             "ntksap"}
# small settings, so the whole file runs in seconds; the same on both sides of a change
OPTIONS = {"ntksap": {"repeats": 2, "batch_size": 4}, "ntt": {"steps": 4, "batch_size": 8, "mask_update_every": 2}}
MODELS = {"lenet5": {}, "resnet20w4": {"width": 4}}


def _model(name):
    from ntkfast import models

    torch.manual_seed(0)
    return models.get(name.replace("w4", ""), **MODELS[name]).double()


def _data(model):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, *model.input_shape, generator=g, dtype=torch.float64)  # non-negative: SynFlow-Dist needs it
    y = torch.randint(0, 10, (16,), generator=g)
    return x, y


def fingerprint(tensors) -> dict:
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        flat = t.reshape(-1)
        entry = {"shape": list(t.shape), "sha256": hashlib.sha256(flat.contiguous().numpy().tobytes()).hexdigest()[:24]}
        if t.dtype != torch.bool:
            f = flat.double()
            w = 1.0 + (torch.arange(f.numel(), dtype=torch.float64) % 7)
            entry.update(sum=float(f.sum()), sumsq=float(f.square().sum()), wsum=float((f * w).sum()))
        else:
            entry["kept"] = int(flat.sum())
        out[name] = entry
    return out


def compute(methods=None) -> dict:
    import ntkfast
    from ntkfast import scores

    results = {}
    for model_name in MODELS:
        # built-in methods only: tests register their own, underscore-named, scorers
        for method in sorted(methods or [m for m in scores.available() if not m.startswith("_")]):
            model = _model(model_name)
            data = _data(model)
            opts = OPTIONS.get(method, {})
            rounds = 3 if method in ITERATIVE else 1
            masks = ntkfast.prune(model, method, 0.1, rounds=rounds, data=data, seed=0, progress=False, **opts)
            rec = {"masks": fingerprint(dict(masks))}
            if method == "ntt":  # the learned weights prune hands back with the masks
                rec["weights"] = fingerprint({n: masks.learned_weights[n] for n in masks})
            else:
                rec["scores"] = fingerprint(getattr(scores, method)(model, None, data=data, seed=0, **opts))
            results[f"{model_name}/{method}"] = rec
    return results


def main(argv) -> int:
    results = compute()
    if "--write" in argv:
        GOLDEN.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(results)} entries)")
    else:
        print(json.dumps(results, indent=1, sort_keys=True)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
