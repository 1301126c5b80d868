"""Neural Tangent Transfer beyond the authors' reach: a ResNet on CIFAR-10 (their code stopped at
MLPs and LeNet-5 because the empirical NTK was too slow).

Runs ``ntkfast.transfer`` (layerwise, λ_L2 = 1e-5 as the authors' CNN setting, batch 64) and
records the time of every step (the teacher's targets, the loss through the student's NTK, its
gradient and the Adam step) and the validation history. The results file is rewritten every
``--save-every`` steps, so a run cut short still reports what it did.

    python -m benchmarks.ntt_beyond --data-dir ../shared/data [--model resnet20 --density 0.1 --epochs 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS_DIR, machine_info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="instead of --epochs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import ntkfast
    from ntkfast import data as D
    from ntkfast import models

    device = torch.device(args.device)
    out_path = Path(args.out or RESULTS_DIR / f"ntt-beyond-{args.model}-{args.dataset}-{device.type}.json")
    train_set = D.load_dataset(args.dataset, args.data_dir, train=True)
    torch.manual_seed(args.seed)
    model = models.get(args.model, input_shape=train_set.input_shape).to(device).eval()
    rec = {"command": "python -m benchmarks.ntt_beyond " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(device), "model": args.model, "dataset": args.dataset, "density": args.density,
           "batch_size": 64, "lambda_l2": 1e-5, "steps_planned": None, "steps_done": 0, "step_seconds": [],
           "finished": False}
    last = [time.perf_counter()]

    def save():
        s = rec["step_seconds"]
        if s:
            rec["median_step_s"] = statistics.median(s)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(rec, indent=1))

    def callback(info):
        now = time.perf_counter()
        rec["step_seconds"].append(now - last[0])  # includes a validation when one was logged
        rec["steps_done"] = info["step"]
        if "validation" in info:
            rec.setdefault("validation", []).append(info["validation"])
        if info["step"] % args.save_every == 0:
            save()
        last[0] = time.perf_counter()

    n_train = len(train_set) - 64
    rec["steps_planned"] = args.steps or int(args.epochs * -(-n_train // 64))
    save()
    t0 = time.perf_counter()
    last[0] = t0
    res = ntkfast.transfer(model, args.density, train_set, steps=args.steps,
                           epochs=None if args.steps else args.epochs, lambda_l2=1e-5, seed=args.seed,
                           progress=True, callback=callback)
    rec["total_seconds"] = time.perf_counter() - t0
    rec["finished"] = True
    rec["history"] = res.history
    rec["final_density"] = res.masks.density
    save()
    print(json.dumps({k: rec[k] for k in ("steps_done", "median_step_s", "total_seconds", "final_density")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
