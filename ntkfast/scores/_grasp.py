"""GraSP (Synaptic-Flow's ``GraSP``, after Wang et al.'s code): S = theta * Hg."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import resolve as resolve_shard
from ..methods import register
from ..core.checks import check_number
from ..core.batches import as_batches, cast_input, shard_batches
from ..core.numerics import (all_finite, cross_entropy, divide_by_total, grad_dict, lacks_derivative,
                             second_order_refusal, with_float64_fallback)
from ..core.batchnorm import BNMode, bn_setting, calibrate_batchnorm, check_train_batches
from ..core.state import functional_forward, leaves, masked, state_copy, substitute
from ..core.targets import finish, model_device, resolve_targets


@register("grasp", "GraSP: theta * Hg with temperature 200, normalised by |sum| (no abs; lowest pruned)", needs_data=True,
          takes=("process_group",))
def grasp(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: Optional[bool] = None,
    bn: Optional[BNMode] = None,
    temperature: float = 200.0,
    eps: float = 1e-10,
    process_group=None,
) -> "OrderedDict[str, torch.Tensor]":
    """GraSP: with L_b = mean cross-entropy of f(x_b)/temperature on batch b of ``data`` and the
    network computing with theta * m, g = sum_b dL_b/dtheta (a constant), Hg = sum_b d(g . dL_b/dtheta)/dtheta,
    S = theta * Hg (signed: the lowest scores are pruned), divided by |sum S| + eps. Gradients are
    w.r.t. the raw stored weights, so pruned entries score 0. ``bn`` as for :func:`~ntkfast.scores.snip`.
    ``process_group``: the batches (or their rows) are split over its processes; g and Hg are each
    all-reduced (see :mod:`ntkfast.distributed`)."""
    targets = resolve_targets(model, masks)
    batches = as_batches(data, "data", device=model_device(model))
    temperature = check_number(temperature, "temperature", lo=0.0, lo_open=True)
    eps = check_number(eps, "eps", lo=0.0)
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
        finite = True

        def loss(x, y, w):
            nonlocal finite
            out = functional_forward(model, substitute(state, targets, masked(theta, targets)),
                                     cast_input(x, dt), train_mode=train_mode)
            finite = finite and all_finite(out)
            value = cross_entropy(out / temperature, y)
            return value * w if w != 1.0 else value

        like = [t.detach() for t in theta.values()]

        def first_gradient():  # no graph
            g = OrderedDict((n, torch.zeros_like(t)) for n, t in theta.items())
            for x, y, w in items:
                for n, gn in grad_dict(loss(x, y, w), theta).items():
                    g[n] += gn
            return list(g.values()), ()

        g = OrderedDict(zip(theta, shard.all_sum(first_gradient, like)[0]))

        def hessian_gradient():
            hg = OrderedDict((n, torch.zeros_like(t)) for n, t in theta.items())
            for x, y, w in items:
                # attention's fused kernels (flash, memory-efficient) have no second derivative:
                # the math kernel computes the same attention with one
                with sdpa_kernel([SDPBackend.MATH]):
                    gr = grad_dict(loss(x, y, w), theta, create_graph=True)
                z = sum((g[n] * gr[n]).sum() for n in theta)
                try:
                    second = grad_dict(z, theta)
                except NotImplementedError as exc:
                    if not lacks_derivative(exc):
                        raise
                    raise ValueError(second_order_refusal(
                        "grasp", exc, "leave that layer's weights out of include= (they are then not "
                        "differentiated), or use a first-order method such as SNIP")) from None
                for n, h in second.items():
                    hg[n] += h
            return list(hg.values()), [0.0 if finite else 1.0]

        summed, (bad,) = shard.all_sum(hessian_gradient, like, flags=1)
        hg = OrderedDict(zip(theta, summed))
        finite = bad == 0
        scores = OrderedDict((n, theta[n].detach() * hg[n]) for n in theta)
        return scores, finite and all_finite(scores)

    scores = with_float64_fallback(compute, targets, dtype, scorer="grasp")
    return finish(divide_by_total(scores, abs_total=True, eps=eps), targets)
