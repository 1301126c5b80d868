"""SNIP and iterative SNIP (Synaptic-Flow's ``SNIP``; NTK-SAP's ``IterSNIP``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..distributed import resolve as resolve_shard
from ..methods import register
from ..core.batches import as_batches, cast_input, shard_batches
from ..core.numerics import all_finite, cross_entropy, divide_by_total, grad_dict, with_float64_fallback
from ..core.batchnorm import BNMode, bn_setting, calibrate_batchnorm, check_train_batches
from ..core.state import functional_forward, leaves, masked, state_copy, substitute
from ..core.targets import finish, model_device, resolve_targets


def _summed_loss_grads(model, targets, items, state, wrt, weights: Callable, train_mode: bool, shard):
    """Sum over the batches of d CE(f(x; weights(wrt)), y) / d wrt, and whether every output was
    finite; ``items`` are this process's (x, y, weight) shares, summed over ``shard``."""

    def local():
        total = OrderedDict((n, torch.zeros_like(t)) for n, t in wrt.items())
        finite = True
        for x, y, w in items:
            st = substitute(state, targets, weights(wrt))
            out = functional_forward(model, st, cast_input(x, next(iter(wrt.values())).dtype), train_mode=train_mode)
            finite = finite and all_finite(out)
            loss = cross_entropy(out, y)
            for n, g in grad_dict(loss * w if w != 1.0 else loss, wrt).items():
                total[n] += g
        return list(total.values()), [0.0 if finite else 1.0]

    summed, (bad,) = shard.all_sum(local, [t.detach() for t in wrt.values()], flags=1)
    return OrderedDict(zip(wrt, summed)), bad == 0


@register("snip", "SNIP: |dL/dm| = |theta * dL/d(theta*m)| on labelled data, normalised to sum 1", needs_data=True,
          takes=("process_group",))
def snip(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: Optional[bool] = None,
    bn: Optional[BNMode] = None,
    process_group=None,
) -> "OrderedDict[str, torch.Tensor]":
    """SNIP connection sensitivity: S = |dL/dm| evaluated at the current masks m, where the network
    computes with theta * m and L is the mean cross-entropy of a batch, summed over the batches of
    ``data``; i.e. S = |theta * dL/d(theta * m)| (pruned entries get the sensitivity of their stored
    weight). Normalised by the sum of all scores (left as is when that sum is 0). ``bn``: the
    BatchNorm statistics, "train" (default on a network with BatchNorm: each batch's own, as
    GraSP's code and the NTK-SAP authors score; measured best; without BatchNorm the default is
    "eval", so dropout stays off), "eval" (the running statistics; Synaptic-Flow's protocol) or
    "calibrate" (see :mod:`ntkfast.core.batchnorm`); ``train_mode=True`` / ``False`` is the older
    spelling of "train" / "eval". ``seed`` and ``input_shape`` are ignored. ``process_group``: the batches (or
    their rows) are split over its processes and the gradients all-reduced (see
    :mod:`ntkfast.distributed`)."""
    targets = resolve_targets(model, masks)
    batches = as_batches(data, "data", device=model_device(model))
    shard = resolve_shard(process_group)
    train_mode, calibrate = bn_setting(bn, train_mode, shard, model)
    if train_mode:
        check_train_batches(model, (b[0] for b in batches))
    items = shard_batches(batches, shard, train_mode)

    def compute(dt):
        state = shard.run(lambda: state_copy(model, dt))  # agreed on: it can run out of memory
        if calibrate:
            calibrate_batchnorm(model, state, (cast_input(x, dt) for x, _, _ in items))
        theta = OrderedDict((n, state[t.param_name]) for n, t in targets.items())
        m = OrderedDict((n, t.mask_as(dt).requires_grad_(True)) for n, t in targets.items())
        grads, finite = _summed_loss_grads(
            model, targets, items, state, m, lambda mm: {n: theta[n] * mm[n] for n in mm}, train_mode, shard
        )
        scores = OrderedDict((n, g.abs()) for n, g in grads.items())
        return scores, finite and all_finite(scores)

    scores = with_float64_fallback(compute, targets, dtype, scorer="snip")
    return finish(divide_by_total(scores), targets)


@register(
    "iterative_snip",
    "Iterative SNIP: |theta * dL/dtheta| (gradient of the masked network w.r.t. the raw weights), normalised",
    needs_data=True,
    takes=("process_group",),
)
def iterative_snip(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: Optional[bool] = None,
    bn: Optional[BNMode] = None,
    process_group=None,
) -> "OrderedDict[str, torch.Tensor]":
    """Iterative SNIP as in NTK-SAP's code: S = |theta * dL/dtheta| where the network computes with
    theta * m, so dL/dtheta = m * dL/d(theta * m) and pruned entries score 0; L is the mean
    cross-entropy, summed over the batches of ``data``. Normalised by the sum of all scores. Meant for
    the iterative schedule. ``bn`` and ``process_group`` as for :func:`snip`."""
    targets = resolve_targets(model, masks)
    batches = as_batches(data, "data", device=model_device(model))
    shard = resolve_shard(process_group)
    train_mode, calibrate = bn_setting(bn, train_mode, shard, model)
    if train_mode:
        check_train_batches(model, (b[0] for b in batches))
    items = shard_batches(batches, shard, train_mode)

    def compute(dt):
        state = shard.run(lambda: state_copy(model, dt))  # agreed on: it can run out of memory
        if calibrate:
            calibrate_batchnorm(model, state, (cast_input(x, dt) for x, _, _ in items))
        theta = leaves(state, targets)
        grads, finite = _summed_loss_grads(
            model, targets, items, state, theta, lambda th: masked(th, targets), train_mode, shard
        )
        scores = OrderedDict((n, (theta[n].detach() * g).abs()) for n, g in grads.items())
        return scores, finite and all_finite(scores)

    scores = with_float64_fallback(compute, targets, dtype, scorer="iterative_snip")
    return finish(divide_by_total(scores), targets)
