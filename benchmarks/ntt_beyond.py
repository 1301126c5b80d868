"""Neural Tangent Transfer beyond the authors' reach: a ResNet on CIFAR-10 (their code stopped at
MLPs and LeNet-5 because the empirical NTK was too slow).

Runs ``ntkfast.transfer`` (layerwise, λ_L2 = 1e-5 as the authors' CNN setting, batch 64) and
records the time of every step (the teacher's targets, the loss through the student's NTK, its
gradient and the Adam step) and the validation history. The results file is rewritten every
``--save-every`` steps, so a run cut short still reports what it did.

    python -m benchmarks.ntt_beyond --data-dir ../shared/data [--model resnet20 --density 0.1 --epochs 1]

A run longer than a sitting: ``--checkpoint FILE`` (outside the repository) checkpoints the
transfer every ``--save-every`` steps; the same command again resumes it, keeping the step times
already recorded in the results file up to the checkpoint's step.
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


def _resume_point(checkpoint) -> int:
    """The step a transfer checkpoint was written at (0 when there is none yet)."""
    if not checkpoint or not Path(checkpoint).exists():
        return 0
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])


def _resumed_record(out_path: Path, fresh: dict, step: int) -> dict:
    """The earlier sittings' record, cut back to the checkpoint's step (the steps after it are redone)."""
    if not out_path.exists():
        raise SystemExit(f"--checkpoint: the transfer resumes at step {step}, but {out_path} with the earlier "
                         "step times is missing; pass --out of the earlier run")
    rec = json.loads(out_path.read_text())
    same = ("model", "dataset", "density", "batch_size", "lambda_l2")
    if any(rec.get(k) != fresh[k] for k in same):
        raise SystemExit(f"--checkpoint: {out_path} was made with other settings; pass another --out")
    if len(rec["step_seconds"]) < step:
        raise SystemExit(f"--checkpoint: {out_path} records {len(rec['step_seconds'])} steps, the checkpoint {step}")
    rec["step_seconds"] = rec["step_seconds"][:step]
    rec["validation"] = [v for v in rec.get("validation", []) if v["step"] <= step]
    rec["seconds_before_resume"] = float(sum(rec["step_seconds"]))
    rec["steps_done"], rec["finished"] = step, False
    rec["command"], rec["machine"] = fresh["command"], fresh["machine"]
    rec.setdefault("resumed_at", []).append(step)
    return rec


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
    p.add_argument("--checkpoint", default=None, help="checkpoint file; when it exists, the run resumes from it")
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
    resumed_at = _resume_point(args.checkpoint)
    if resumed_at:
        rec = _resumed_record(out_path, rec, resumed_at)
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
        # the last step too: a kill between the transfer's final checkpoint and the end of this
        # script must not leave the results behind the checkpoint
        if info["step"] % args.save_every == 0 or info["step"] == rec["steps_planned"]:
            save()
        last[0] = time.perf_counter()

    n_train = len(train_set) - 64
    rec["steps_planned"] = args.steps or int(args.epochs * -(-n_train // 64))
    save()
    t0 = time.perf_counter()
    last[0] = t0
    res = ntkfast.transfer(model, args.density, train_set, steps=args.steps,
                           epochs=None if args.steps else args.epochs, lambda_l2=1e-5, seed=args.seed,
                           progress=True, callback=callback, checkpoint=args.checkpoint,
                           checkpoint_every=args.save_every if args.checkpoint else None)
    # wall time of every sitting: the steps' own times plus this sitting's set-up
    rec["total_seconds"] = rec.get("seconds_before_resume", 0.0) + time.perf_counter() - t0
    rec["finished"] = True
    rec["history"] = res.history
    rec["final_density"] = res.masks.density
    save()
    print(json.dumps({k: rec[k] for k in ("steps_done", "median_step_s", "total_seconds", "final_density")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
