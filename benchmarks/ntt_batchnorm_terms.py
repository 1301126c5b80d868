"""How BatchNorm's statistics weigh NTT's two loss terms on a fresh ResNet-20 (issue 28, part 2).

A fresh network's running statistics are (0, 1): in eval mode BatchNorm is the identity, the
activations grow through the residual stages, and the kernel term of the transfer loss (the
distance between the student's and the teacher's NTK, times lambda_ker) dwarfs the output term.
This measures both terms over the first steps of ``ntkfast.transfer`` with ``bn="eval"`` and
``bn="calibrate"``, on real CIFAR-10 images, the authors' batch of 64 and loss weights.

    python -m benchmarks.ntt_batchnorm_terms --data-dir ../shared/data [--steps 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch


def measure(data_dir: str, steps: int, density: float, seed: int) -> dict:
    from ntkfast import data, models, transfer

    images = data.load_dataset("cifar10", data_dir, train=True).subset(16 * 64 + 64)
    x = torch.stack([images[i][0] for i in range(len(images))])
    out = {}
    for bn in ("eval", "calibrate"):
        torch.manual_seed(seed)
        model = models.resnet20()
        rows = []

        def keep(rec):
            rows.append({k: float(rec[k]) for k in ("kernel_distance", "target_distance", "l2", "loss")})

        t0 = time.perf_counter()
        transfer(model, density, x, steps=steps, batch_size=64, lambda_ker=1e-3, lambda_l2=1e-5, bn=bn,
                 validation=0, progress=False, callback=keep)
        out[bn] = {"steps": rows, "seconds": time.perf_counter() - t0,
                   "kernel_over_output": [1e-3 * r["kernel_distance"] / r["target_distance"] for r in rows]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = {"command": "python -m benchmarks.ntt_batchnorm_terms " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "model": "resnet20", "density": args.density, "seed": args.seed,
           "results": measure(args.data_dir, args.steps, args.density, args.seed)}
    for bn, r in res["results"].items():
        print(f"bn={bn}: lambda_ker * kernel distance / output distance per step: "
              + ", ".join(f"{v:.3g}" for v in r["kernel_over_output"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
