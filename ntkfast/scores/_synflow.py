"""SynFlow (Tanaka et al. 2020; Synaptic-Flow's ``SynFlow``): data-free synaptic saliency."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from . import register
from ._common import (
    all_finite,
    finish,
    functional_forward,
    grad_dict,
    model_device,
    resolve_input_shape,
    resolve_targets,
    state_copy,
    substitute,
    with_float64_fallback,
)


@register("synflow", "SynFlow: |theta * dR/dtheta|, R = sum of the |state|-network's output on ones (data-free)")
def synflow(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """SynFlow: every parameter and buffer is replaced by its absolute value (BatchNorm running
    statistics included, as the authors' |state_dict|), the masked network (|theta| * m) in eval mode
    (train mode with ``train_mode``) is fed an all-ones input of batch 1, R = sum of the outputs and
    S = |theta * dR/dtheta| (gradient w.r.t. the raw weight, so pruned entries score 0); for a
    bias-free ReLU MLP S_e = sum over input-output paths through e of |product of the path's weights|.

    ``input_shape`` (one example, no batch dimension): the argument, else ``model.input_shape``,
    else the shape of ``data``'s inputs. ``dtype=torch.float64`` computes in double; a float32
    computation that overflows (deep networks) is redone in float64 with a warning. ``seed`` is
    ignored."""
    targets = resolve_targets(model, masks)
    shape = resolve_input_shape(model, input_shape, data)
    device = model_device(model)

    def compute(dt):
        # The scored weights are not copied with the rest of the state: their effective weight
        # W = |theta| * m is the leaf itself. The authors differentiate w.r.t. the raw weight,
        # dR/dtheta = m * dR/dW, and |theta * m * dR/dW| = |W * dR/dW| exactly (m is 0 or 1).
        state = state_copy(model, dt, transform=torch.abs, skip={t.param_name for t in targets.values()})
        # (|theta| * m, not torch.where(m, |theta|, 0): where with a bool mask is several times slower)
        w = OrderedDict(
            (n, t.param.detach().to(dt).abs().mul_(t.mask).requires_grad_(True)) for n, t in targets.items()
        )
        x = torch.ones((1,) + tuple(shape), dtype=dt, device=device)
        out = functional_forward(model, substitute(state, targets, w), x, train_mode=train_mode)
        grads = grad_dict(out.sum(), w)
        scores = OrderedDict((n, (w[n].detach() * g).abs_()) for n, g in grads.items())
        return scores, all_finite(out, scores)

    return finish(with_float64_fallback(compute, targets, dtype, scorer="synflow"), targets)
