"""Neural Tangent Transfer: one step (the loss and its gradient with respect to every student
parameter) at batch 64, ntkfast against the same step written with torch.func (vmap(jacrev)
Jacobians contracted by einsum, differentiated by torch.func.grad), same process, same inputs.

The student is a fresh zoo model masked to density 0.03 (layerwise magnitude) that has moved
away from its teacher (Gaussian noise on every weight), as it would have mid-transfer. A step
includes the teacher's outputs and NTK on the batch, recomputed every step as the transfer loop
(and the authors' code) does: each side computes them its own way.

    python -m benchmarks.bench_ntt [--quick] [--device cuda]
"""
from __future__ import annotations

import copy
import sys
from typing import List

import torch

from .common import Case, Suite
from .floor import ntt_floor

WORKLOADS = [("lenet300_100", 64), ("lenet5", 64), ("resnet20", 64)]
OPTIONS = dict(density=0.03, lambda_ker=1e-3, lambda_l2=1e-4)


def _state(model_name: str, batch: int, device):
    from ntkfast import models
    from ntkfast.masks import prunable_parameters
    from ntkfast.ntt import select_masks

    torch.manual_seed(0)
    teacher = models.get(model_name).to(device).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    masks = select_masks(prunable_parameters(student), OPTIONS["density"], "layerwise")
    masks = type(masks)({n: m.to(device) for n, m in masks.items()})
    x = torch.randn(batch, *teacher.input_shape, device=device)
    return {"teacher": teacher, "student": student, "masks": masks, "x": x}


def _ours(st):
    from ntkfast.ntt import teacher_targets, transfer_loss

    student = st["student"]
    params = [p for p in student.parameters()]
    t_out, t_ntk = teacher_targets(st["teacher"], st["x"])
    loss, _ = transfer_loss(student, st["masks"], st["x"], t_out, t_ntk, **OPTIONS)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), [g.detach() for g in grads]


def _peer(st):
    from ntkfast.ntt import reference as ref

    t_out, t_ntk = ref.teacher_targets(st["teacher"], st["x"])
    loss, grads = ref.loss_and_grad(st["student"], st["masks"], st["x"], t_out, t_ntk, **OPTIONS)
    return loss.detach(), [grads[n].detach() for n, _ in st["student"].named_parameters()]


def _compare(st, peer_out, ours_out):
    (pl, pg), (ol, og) = peer_out, ours_out
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(pg, og)) ** 0.5
    den = sum(float(b.double().square().sum()) for b in pg) ** 0.5
    return {"rel_err": num / den, "loss_rel_err": abs(float(ol) - float(pl)) / abs(float(pl))}


def _make_case(model_name: str, batch: int, quick: bool) -> Case:
    batch = 8 if quick else batch
    params = {"model": model_name, "batch": batch, "dtype": "float32", "outputs": 10, **OPTIONS}
    return Case(name=f"{model_name}-step-B{batch}", params=params, setup=lambda d: _state(model_name, batch, d),
                peer=_peer, ours=_ours, compare=_compare,
                floor=lambda st: ntt_floor(st["teacher"], st["student"], st["x"], params["outputs"]))


def make_cases(args) -> List[Case]:
    return [_make_case(m, b, args.quick) for m, b in WORKLOADS]


SUITE = Suite("ntt", make_cases,
              peer="the same NTT step in torch.func (vmap(jacrev) Jacobians, einsum, torch.func.grad)",
              ours="ntkfast.ntt.transfer_loss + backward")

main = SUITE.main


if __name__ == "__main__":
    sys.exit(main())
