"""NTK-SAP the authors' way: two model copies, three passes and one backward per piece.

For every piece: load theta into copy A; reset its BatchNorm statistics and run it once in train
mode without gradient with momentum 1 (running_var becomes the unbiased batch variance); then A
(theta * m) and copy B ((theta + eps xi) * m, A's statistics) in eval mode on the same Z; the
squared distance of the outputs is backpropagated to the mask and accumulated, signed. This is the
reference the fast engine is tested against, the peer its benchmark runs beside, and the fallback
for models the grouped engine cannot evaluate.
"""
from __future__ import annotations


from collections import OrderedDict
from typing import Dict, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ...core.state import cast_copy, output_tensor
from ...core.targets import Target
from ._draws import Draws


def _copy(model: nn.Module, dtype, device, targets: Mapping[str, Target]) -> nn.Module:
    # the mask acts through the substituted weight: the module's own mask buffer is set to ones
    net = cast_copy(model, dtype, device=device,
                    ones_buffers=[t.mask_buffer for t in targets.values() if t.mask_buffer is not None])
    for m in net.modules():
        if _tracks(m):
            m.momentum = 1.0
    return net


def _tracks(m: nn.Module) -> bool:
    """A normalisation layer with running statistics: BatchNorm, and InstanceNorm with
    track_running_stats, whose eval-mode output reads them the same way."""
    return isinstance(m, _NormBase) and m.track_running_stats


def _load(net: nn.Module, theta: Mapping[str, torch.Tensor]) -> None:
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, v in theta.items():
            params[n].copy_(v)


def _call(net: nn.Module, weights: Dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return output_tensor(torch.func.functional_call(net, weights, (z,)))


def reference_scores(model: nn.Module, targets: Mapping[str, Target], draws: Draws, epsilon: float,
                     dtype: torch.dtype, device) -> "OrderedDict[str, torch.Tensor]":
    """Signed mask gradients summed over every piece of ``draws`` (the caller takes |.| and masks)."""
    a = _copy(model, dtype, device, targets)
    b = _copy(model, dtype, device, targets)
    bn_a = [m for m in a.modules() if _tracks(m)]
    bn_b = [m for m in b.modules() if _tracks(m)]
    masks = OrderedDict((n, t.mask.to(device=device, dtype=dtype).requires_grad_(True)) for n, t in targets.items())
    total = OrderedDict((n, torch.zeros_like(m)) for n, m in masks.items())
    for i in draws.indices:
        theta = draws.theta(i)
        z = draws.z(i)
        _load(a, theta)
        _load(b, theta)
        for m in bn_a:
            m.reset_running_stats()
        a.train()
        with torch.no_grad():
            _call(a, {t.param_name: theta[t.param_name] * masks[n].detach() for n, t in targets.items()}, z)
        a.eval()
        b.eval()
        for ma, mb in zip(bn_a, bn_b):  # B evaluates with A's statistics, as the authors share them
            mb.running_mean, mb.running_var = ma.running_mean, ma.running_var
        out_a = _call(a, {t.param_name: theta[t.param_name] * masks[n] for n, t in targets.items()}, z)
        out_b = _call(b, {t.param_name: (theta[t.param_name] + epsilon * draws.xi(n, i)) * masks[n]
                          for n, t in targets.items()}, z)
        loss = (torch.norm(out_a - out_b, dim=-1) ** 2).sum()
        grads = torch.autograd.grad(loss, list(masks.values()), allow_unused=True)
        for n, g in zip(masks, grads):
            if g is not None:
                total[n] += g
    return total
