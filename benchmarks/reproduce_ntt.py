"""Reproduce the Neural Tangent Transfer demos: test accuracy after supervised training of an NTT
sparse initialisation against a random sparse initialisation at the same density.

Per seed: a fresh zoo network (the NTT papers' init); NTT (``ntkfast.transfer``, layerwise, the
authors' demo settings) gives a mask and learned sparse weights; a random layerwise mask of the
same density is applied to the same initial weights; both are trained supervised (Adam 1e-3,
batch 64) and evaluated on the test set after every epoch. Results are written after every run.

    python -m benchmarks.reproduce_ntt --model lenet300_100 --dataset mnist --data-dir ../shared/data \\
        --density 0.03 --ntt-epochs 20 --train-epochs 50 --seeds 0 1

Long runs: ``--checkpoint-dir DIR --resume`` continues an interrupted reproduction (each transfer
from its last checkpoint, finished runs kept from ``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS_DIR, machine_info


def _run(args) -> dict:
    import ntkfast
    from ntkfast import data as D
    from ntkfast import models
    from ntkfast.training import train

    train_set = D.load_dataset(args.dataset, args.data_dir, train=True)
    test_set = D.load_dataset(args.dataset, args.data_dir, train=False)
    lambda_l2 = args.lambda_l2 if args.lambda_l2 is not None else (1e-4 if args.model == "lenet300_100" else 1e-5)
    out = {"command": "python -m benchmarks.reproduce_ntt " + " ".join(sys.argv[1:]), "machine": machine_info(torch.device("cpu")),
           "model": args.model, "dataset": args.dataset, "density": args.density, "ntt_epochs": args.ntt_epochs,
           "train_epochs": args.train_epochs, "lambda_l2": lambda_l2, "runs": []}
    path = Path(args.out)
    if args.resume and path.exists():  # keep the finished runs of an interrupted reproduction
        previous = json.loads(path.read_text())
        same = ("model", "dataset", "density", "ntt_epochs", "train_epochs", "lambda_l2")
        if any(previous.get(k) != out[k] for k in same):
            raise SystemExit(f"--resume: {path} was made with other settings; pass another --out")
        out["runs"] = previous["runs"]
    done = {(r["seed"], r["init"]) for r in out["runs"]}

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))

    for seed in args.seeds:
        torch.manual_seed(seed)
        model = models.get(args.model, input_shape=train_set.input_shape)
        for init in args.inits:
            if (seed, init) in done:
                continue
            t0 = time.perf_counter()
            net = copy.deepcopy(model)
            rec = {"seed": seed, "init": init}
            if init == "ntt":
                ckpt = None
                if args.checkpoint_dir:
                    ckpt = Path(args.checkpoint_dir) / f"ntt-{args.model}-{args.dataset}-d{args.density}-seed{seed}.ckpt"
                res = ntkfast.transfer(model, args.density, train_set, epochs=args.ntt_epochs, lambda_l2=lambda_l2,
                                       seed=seed, progress=True, log_every=args.log_every, checkpoint=ckpt)
                net.load_state_dict(res.state_dict)
                masks = res.masks
                rec["ntt_seconds"] = res.history["seconds"][-1]  # the whole transfer, across resumptions
                rec["ntt_steps"] = res.masks.metadata["steps"]
                rec["ntt_history"] = res.history
            else:
                masks = ntkfast.prune(model, "random", args.density, scope="layerwise", seed=seed, progress=False)
                masks.apply(net)
            rec["density"] = masks.density
            t1 = time.perf_counter()
            result = train(net, masks, train_set, test_set, args.train_epochs, optimizer="adam", lr=1e-3,
                           batch_size=64, seed=seed, progress=True)
            rec["train_seconds"] = time.perf_counter() - t1
            rec["test_accuracy"] = result.test_accuracy
            rec["final_test_accuracy"] = result.final_test_accuracy
            out["runs"].append(rec)
            print(f"[reproduce_ntt] seed {seed} {init}: test accuracy {result.final_test_accuracy:.4f} "
                  f"(density {masks.density:.4f}, {time.perf_counter() - t0:.0f} s)", flush=True)
            save()
    summary = {}
    for init in args.inits:
        accs = [r["final_test_accuracy"] for r in out["runs"] if r["init"] == init]
        summary[init] = {"mean": sum(accs) / len(accs), "runs": accs}
    out["summary"] = summary
    save()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet300_100")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--density", type=float, default=0.03)
    p.add_argument("--ntt-epochs", type=float, default=20)
    p.add_argument("--train-epochs", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--inits", nargs="+", default=["ntt", "random"], choices=["ntt", "random"])
    p.add_argument("--lambda-l2", type=float, default=None, help="default 1e-4 for lenet300_100, 1e-5 for CNNs")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=None)
    p.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint each transfer there (not in the repository); a rerun resumes it")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and do the rest")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = str(RESULTS_DIR / f"ntt-reproduction-{args.model}-{args.dataset}.json")
    out = _run(args)
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
