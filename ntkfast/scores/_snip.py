"""SNIP and iterative SNIP (Synaptic-Flow's ``SNIP``; NTK-SAP's ``IterSNIP``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from . import register
from ._common import (
    all_finite,
    as_batches,
    cast_input,
    cross_entropy,
    divide_by_total,
    finish,
    functional_forward,
    grad_dict,
    leaves,
    masked,
    model_device,
    resolve_targets,
    state_copy,
    substitute,
    with_float64_fallback,
)


def _summed_loss_grads(model, targets, batches, state, wrt, weights: Callable, train_mode: bool):
    """Sum over the batches of d CE(f(x; weights(wrt)), y) / d wrt, and whether every output was finite."""
    total = OrderedDict((n, torch.zeros_like(t)) for n, t in wrt.items())
    finite = True
    for x, y in batches:
        st = substitute(state, targets, weights(wrt))
        out = functional_forward(model, st, cast_input(x, next(iter(wrt.values())).dtype), train_mode=train_mode)
        finite = finite and all_finite(out)
        for n, g in grad_dict(cross_entropy(out, y), wrt).items():
            total[n] += g
    return total, finite


@register("snip", "SNIP: |dL/dm| = |theta * dL/d(theta*m)| on labelled data, normalised to sum 1", needs_data=True)
def snip(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """SNIP connection sensitivity: S = |dL/dm| evaluated at the current masks m, where the network
    computes with theta * m and L is the mean cross-entropy of a batch, summed over the batches of
    ``data``; i.e. S = |theta * dL/d(theta * m)| (pruned entries get the sensitivity of their stored
    weight). Normalised by the sum of all scores (left as is when that sum is 0). Eval mode unless
    ``train_mode``. ``seed`` and ``input_shape`` are ignored."""
    targets = resolve_targets(model, masks)
    batches = as_batches(data, "data", device=model_device(model))

    def compute(dt):
        state = state_copy(model, dt)
        theta = OrderedDict((n, state[t.param_name]) for n, t in targets.items())
        m = OrderedDict((n, t.mask_as(dt).requires_grad_(True)) for n, t in targets.items())
        grads, finite = _summed_loss_grads(
            model, targets, batches, state, m, lambda mm: {n: theta[n] * mm[n] for n in mm}, train_mode
        )
        scores = OrderedDict((n, g.abs()) for n, g in grads.items())
        return scores, finite and all_finite(scores)

    scores = with_float64_fallback(compute, targets, dtype, scorer="snip")
    return finish(divide_by_total(scores), targets)


@register(
    "iterative_snip",
    "Iterative SNIP: |theta * dL/dtheta| (gradient of the masked network w.r.t. the raw weights), normalised",
    needs_data=True,
)
def iterative_snip(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """Iterative SNIP as in NTK-SAP's code: S = |theta * dL/dtheta| where the network computes with
    theta * m, so dL/dtheta = m * dL/d(theta * m) and pruned entries score 0; L is the mean
    cross-entropy, summed over the batches of ``data``. Normalised by the sum of all scores. Meant for
    the iterative schedule. Eval mode unless ``train_mode``."""
    targets = resolve_targets(model, masks)
    batches = as_batches(data, "data", device=model_device(model))

    def compute(dt):
        state = state_copy(model, dt)
        theta = leaves(state, targets)
        grads, finite = _summed_loss_grads(
            model, targets, batches, state, theta, lambda th: masked(th, targets), train_mode
        )
        scores = OrderedDict((n, (theta[n].detach() * g).abs()) for n, g in grads.items())
        return scores, finite and all_finite(scores)

    scores = with_float64_fallback(compute, targets, dtype, scorer="iterative_snip")
    return finish(divide_by_total(scores), targets)
