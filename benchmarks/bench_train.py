"""Supervised training of a pruned network: ``ntkfast.training.train`` against the loop a user
would write in plain PyTorch (NCHW tensors, Adam, the masks re-applied after every step), on the
same initial weights, masks and batches in the same order.

Both sides run the same number of Adam steps; the comparison is the relative difference of the
final weights (float rounding only: the layouts order the sums differently). ntkfast trains a
2-D convolutional network on CPU in the channels-last layout (see ``ntkfast/training.py``); an
MLP is the control, where the two loops should be level.

    python -m benchmarks.bench_train [--quick]
"""
from __future__ import annotations

import copy
import sys
from typing import List

import torch
import torch.nn.functional as F

from .common import Case, Suite
from .floor import training_floor

# (model, input shape, batch): the zoo's LeNet-5 and ResNet-20 at the study's batch sizes, and an MLP
WORKLOADS = [("lenet5", (1, 28, 28), 64), ("lenet5", (1, 28, 28), 128), ("resnet20", (3, 32, 32), 128),
             ("lenet300_100", (1, 28, 28), 128)]
STEPS = 20
# GPU only: one CIFAR-10 epoch of ResNet-20 (50,000 images in batches of 128: 391 steps), the unit the
# study's GPU cells are counted in; on this 2-core CPU one run of each side would take minutes
EPOCH_WORKLOADS = [("resnet20", (3, 32, 32), 128, -(-50_000 // 128))]
DENSITY = 0.1


def _state(model_name, shape, batch, steps, device):
    from ntkfast import data, models, prune
    from ntkfast.training import _iterate

    torch.manual_seed(0)
    model = models.get(model_name, input_shape=shape).to(device)
    masks = prune(model, "random", DENSITY, seed=0, progress=False)
    dataset = data.GaussianNoise(shape, batch * steps, num_classes=10, seed=1)
    # the batches train() draws in its first epoch with seed 0, for the peer to replay
    batches = list(_iterate(dataset, batch, True, 0, device, steps))
    return {"model": model, "masks": masks, "dataset": dataset, "batches": batches, "batch": batch, "steps": steps}


def _prepare(st):
    return (copy.deepcopy(st["model"]), st)


def _peer(model, st):
    params = dict(model.named_parameters())
    masks = {n: m.to(params[n].device, params[n].dtype) for n, m in st["masks"].items()}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x, y in st["batches"]:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)
    for h in hooks:
        h.remove()
    return [p.detach() for p in model.parameters()]


def _ours(model, st):
    from ntkfast.training import train

    train(model, st["masks"], st["dataset"], None, epochs=1, optimizer="adam", lr=1e-3,
          batch_size=st["batch"], max_batches=st["steps"], seed=0, progress=False)
    return [p.detach() for p in model.parameters()]


def _compare(st, peer_out, ours_out):
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(peer_out, ours_out)) ** 0.5
    den = sum(float(a.double().square().sum()) for a in peer_out) ** 0.5
    return {"rel_err": num / den}


def _make_case(model_name, shape, batch, quick, steps=None) -> Case:
    epoch = steps is not None
    steps = 3 if quick else (steps or STEPS)
    batch = 16 if quick else batch
    params = {"model": model_name, "input_shape": list(shape), "batch": batch, "steps": steps, "density": DENSITY,
              "optimizer": "adam", "dtype": "float32"}
    name = f"{model_name}-B{batch}-" + ("epoch" if epoch and not quick else f"{steps}steps")
    return Case(name=name, params=params,
                setup=lambda d: _state(model_name, shape, batch, steps, d),
                prepare=_prepare, peer=_peer, ours=_ours, compare=_compare,
                floor=lambda st: training_floor(st["model"], st["batches"][0][0], steps, masks=st["masks"]))


def make_cases(args) -> List[Case]:
    seen, cases = set(), []
    for m, s, b in WORKLOADS:
        case = _make_case(m, s, b, args.quick)
        if case.name not in seen:  # --quick makes the batch sizes equal
            seen.add(case.name)
            cases.append(case)
    if torch.device(args.device).type == "cuda":
        cases += [_make_case(m, s, b, args.quick, steps) for m, s, b, steps in EPOCH_WORKLOADS]
    return cases


SUITE = Suite("train", make_cases,
              peer="a plain PyTorch masked Adam loop in the NCHW layout over the same batches",
              ours="ntkfast.training.train (channels-last on CPU for 2-D convolutional networks)")

main = SUITE.main


if __name__ == "__main__":
    sys.exit(main())
