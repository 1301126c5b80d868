"""The Neural Tangent Transfer loss written with torch.func only (vmap(jacrev) Jacobians,
contracted by einsum, and torch.func.grad for its gradient): the independent oracle the tests hold
:func:`ntkfast.ntt.transfer_loss` to, and the peer its benchmark runs beside it."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Tuple

import torch
from torch.func import functional_call, grad, jacrev, vmap


def _values(theta, masks):
    return OrderedDict((n, t * masks[n].to(t.dtype) if n in masks else t) for n, t in theta.items())


def _ntk(model, theta, masks, x1, x2, kernel: str) -> torch.Tensor:
    buffers = dict(model.named_buffers())

    if kernel == "sparse":
        def f(p, x):  # derivatives with respect to θ through θ ⊙ m: pruned entries get zero
            return functional_call(model, {**_values(p, masks), **buffers}, (x.unsqueeze(0),)).reshape(-1)
        point = theta
    else:  # "authors_code": with respect to every entry, at the point θ ⊙ m
        def f(p, x):
            return functional_call(model, {**p, **buffers}, (x.unsqueeze(0),)).reshape(-1)
        point = _values(theta, masks)
    j1 = vmap(jacrev(f), (None, 0))(point, x1)
    j2 = vmap(jacrev(f), (None, 0))(point, x2)
    return sum(torch.einsum("iaf,jbf->ijab", j1[n].flatten(2), j2[n].flatten(2)) for n in j1)


def loss(model, theta: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], x: torch.Tensor,
         teacher_out: torch.Tensor, teacher_ntk: torch.Tensor, *, density: float, lambda_ker: float,
         lambda_l2: float, kernel: str = "sparse") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    h = x.shape[0] // 2
    buffers = dict(model.named_buffers())
    values = _values(theta, masks)
    out = functional_call(model, {**values, **buffers}, (x,)).reshape(x.shape[0], -1)
    ntk = _ntk(model, theta, masks, x[:h], x[h:], kernel)
    ker = (ntk - teacher_ntk).square().sum() / teacher_ntk.numel()
    target = (out - teacher_out).square().sum() / out.numel()
    l2 = sum(values[n].square().sum() for n in masks)
    total = lambda_ker * ker + target + (lambda_l2 / density) * l2
    return total, {"kernel_distance": ker, "target_distance": target, "l2": l2}


def teacher_targets(model, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dense teacher's outputs and cross-NTK between the halves of x, in torch.func."""
    h = x.shape[0] // 2
    theta = OrderedDict((n, p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        out = functional_call(model, {**theta, **dict(model.named_buffers())}, (x,)).reshape(x.shape[0], -1)
    return out, _ntk(model, theta, {}, x[:h], x[h:], "sparse")


def loss_and_grad(model, masks, x, teacher_out, teacher_ntk, **kw):
    """(loss, {name: gradient}) with respect to the model's trainable parameters, all torch.func."""
    theta = OrderedDict((n, p.detach()) for n, p in model.named_parameters() if p.requires_grad)

    def scalar(th):
        total, _ = loss(model, th, masks, x, teacher_out, teacher_ntk, **kw)
        return total, total

    g, value = grad(scalar, has_aux=True)(theta)
    return value, g
