"""Random scores: S ~ N(0, 1) per entry (Synaptic-Flow's ``Rand``), from a seeded generator."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from ..methods import register
from ..core.targets import finish, resolve_dtype, resolve_targets


@register("random", "Random: S ~ N(0, 1) per weight, from a generator seeded with `seed`", runs_network=False)
def random(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """S ~ N(0, 1) for every entry of every scored tensor (pruned ones included: the masking step
    keeps them pruned). Draws come from a ``torch.Generator`` seeded with ``seed`` on each
    parameter's device, tensor after tensor in the order of ``masks``: the same seed gives the same
    scores bit for bit. ``dtype``: the parameters' dtype by default. ``data``, ``input_shape`` and
    ``train_mode`` are accepted for a uniform interface and ignored."""
    targets = resolve_targets(model, masks)
    dt = resolve_dtype(targets, dtype)
    generators = {}
    scores = OrderedDict()
    for name, t in targets.items():
        dev = t.param.device
        key = str(dev)
        if key not in generators:
            generators[key] = torch.Generator(device=dev).manual_seed(int(seed))
        scores[name] = torch.randn(t.param.shape, generator=generators[key], device=dev, dtype=dt)
    return finish(scores, targets)
