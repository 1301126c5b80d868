"""Training for evaluation at the papers' protocol: ntkfast's trainer against the loop the
authors' codebases run, and K masked networks trained together against one after another.

Two kinds of case, both on CIFAR-10-shaped data (50,000 random uint8 32x32 images: the timing does
not depend on the pixels), ResNet-20 at density 0.1, SGD with momentum 0.9 and weight decay 5e-4,
batch 128, random crop (pad 4) and flip:

- ``epoch-*``: the peer is a ``torch.utils.data.DataLoader`` over a dataset that crops, flips and
  normalises each image on the host (what torchvision's ``RandomCrop(32, 4)`` +
  ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` do, written with torch ops since
  torchvision is not installed beside the CPU build), batches copied to the device, the masks
  re-applied after every step; ours is :func:`ntkfast.training.train` with ``augment=
  "pad4-crop-flip"`` (batched on the device, the dataset resident there on CUDA), in float32
  (``epoch-fp32``) and with bf16 autocast in channels-last (``epoch-bf16``, CUDA only).
- ``grouped-K*``: the peer is K :func:`~ntkfast.training.train` runs one after another; ours is
  :func:`ntkfast.training_grouped.train_grouped` of the same K networks, stacked (on the CPU, its
  default is one after another, since this case measures the stacked pass slower there). The issue's target on an
  H200: K=8 in at most twice the time of one network.

The two sides draw different crops (per-image host RNG against ntkfast's seeded batch draws), so
``rel_err`` compares the epoch's mean training loss only loosely; the weights are not compared.
On CPU a case runs a few steps (``--steps``), on CUDA a whole epoch (391 steps).

    python -m benchmarks.bench_fast_train [--quick] [--device cuda]
"""
from __future__ import annotations

import copy
import sys
from typing import List

import torch
import torch.nn.functional as F

from .common import Case, Suite
from .floor import training_floor

N_IMAGES = 50_000
BATCH = 128
DENSITY = 0.1
CPU_STEPS = 8
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class _HostAugmented(torch.utils.data.Dataset):
    """The authors' per-image pipeline: pad 4 + random 32x32 crop + flip, to float, normalise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        img = F.pad(self.images[i], (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        img = img[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img.float().div_(255) - self.mean) / self.std, self.labels[i]


def _state(device, steps, k):
    from ntkfast import data, models, prune

    g = torch.Generator().manual_seed(0)
    n = min(N_IMAGES, steps * BATCH)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    dataset = data.ImageDataset(images, labels, classes=[str(i) for i in range(10)], mean=MEAN, std=STD,
                                name="cifar10")
    nets, masks = [], []
    for s in range(k):
        torch.manual_seed(s)
        net = models.resnet20().to(device)
        nets.append(net)
        masks.append(prune(net, "random", DENSITY, seed=s, progress=False))
    return {"dataset": dataset, "host": _HostAugmented(images, labels), "nets": nets, "masks": masks,
            "steps": steps, "device": device}


def _prepare(st):
    return ([copy.deepcopy(n) for n in st["nets"]], st)


def _dataloader_loop(nets, st):
    net, masks, device = nets[0], st["masks"][0], st["device"]
    params = dict(net.named_parameters())
    mask_f = {n: m.to(device, torch.float32) for n, m in masks.items()}
    with torch.no_grad():
        for n, m in mask_f.items():
            params[n].mul_(m)
    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in mask_f.items()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(st["host"], batch_size=BATCH, shuffle=True,
                                         pin_memory=torch.device(device).type == "cuda")
    net.train()
    total, count = torch.zeros((), device=device), 0
    for i, (x, y) in enumerate(loader):
        if i >= st["steps"]:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, m in mask_f.items():
                params[n].mul_(m)
        total += loss.detach() * y.shape[0]
        count += y.shape[0]
    for h in hooks:
        h.remove()
    return float(total) / count


def _ours_epoch(amp, channels_last):
    def run(nets, st):
        from ntkfast.training import train

        r = train(nets[0], st["masks"][0], st["dataset"], None, epochs=1, lr=0.1, momentum=0.9, weight_decay=5e-4,
                  batch_size=BATCH, max_batches=st["steps"], augment="pad4-crop-flip", progress=False, amp=amp,
                  channels_last=channels_last)
        return r.train_loss[0]
    return run


def _sequential(nets, st):
    from ntkfast.training import train

    return [train(n, m, st["dataset"], None, epochs=1, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=BATCH,
                  max_batches=st["steps"], augment="pad4-crop-flip", progress=False).train_loss[0]
            for n, m in zip(nets, st["masks"])]


def _grouped(nets, st):
    from ntkfast.training_grouped import train_grouped

    return [r.train_loss[0] for r in train_grouped(nets, st["masks"], st["dataset"], None, epochs=1, lr=0.1,
                                                   momentum=0.9, weight_decay=5e-4, batch_size=BATCH,
                                                   max_batches=st["steps"], augment="pad4-crop-flip", progress=False,
                                                   stacked=True)]


def _compare_loss(st, peer_out, ours_out):
    a = torch.tensor(peer_out, dtype=torch.float64).flatten()
    b = torch.tensor(ours_out, dtype=torch.float64).flatten()
    return {"rel_err": float(((a - b).abs() / a.abs()).max())}


def _floor(st):
    x = torch.randn(BATCH, 3, 32, 32, device=st["device"])
    return training_floor(st["nets"][0], x, st["steps"], networks=len(st["nets"]), optimizer="sgd",
                          masks=st["masks"][0])


def make_cases(args) -> List[Case]:
    cuda = torch.device(args.device).type == "cuda"
    steps = -(-N_IMAGES // BATCH) if cuda and not args.quick else (2 if args.quick else CPU_STEPS)
    what = "epoch" if steps * BATCH >= N_IMAGES else f"{steps}steps"
    cases = []
    variants = [("fp32", None, None)] + ([("bf16", "bf16", True)] if cuda else [])
    for tag, amp, cl in variants:
        cases.append(Case(name=f"epoch-{tag}-resnet20-B{BATCH}-{what}",
                          params={"model": "resnet20", "batch": BATCH, "steps": steps, "density": DENSITY,
                                  "amp": amp, "channels_last": cl, "augment": "pad4-crop-flip"},
                          setup=lambda d, s=steps: _state(d, s, 1), prepare=_prepare, peer=_dataloader_loop,
                          ours=_ours_epoch(amp, cl), compare=_compare_loss, floor=_floor))
    for k in ((8,) if cuda else (4,)):
        cases.append(Case(name=f"grouped-K{k}-resnet20-B{BATCH}-{what}",
                          params={"model": "resnet20", "batch": BATCH, "steps": steps, "density": DENSITY, "K": k},
                          setup=lambda d, s=steps, k=k: _state(d, s, k), prepare=_prepare, peer=_sequential,
                          ours=_grouped, compare=_compare_loss, floor=_floor))
    return cases


SUITE = Suite("fast_train", make_cases, runs=(3, 1),
              peer="epoch-*: a DataLoader loop with per-image host augmentation; grouped-*: K train() runs one after another",
              ours="epoch-*: ntkfast.training.train (batched device augmentation, resident data on CUDA); "
                   "grouped-*: ntkfast.training_grouped.train_grouped")

main = SUITE.main


if __name__ == "__main__":
    sys.exit(main())
