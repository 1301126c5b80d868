"""Magnitude scores: S = |theta| (Synaptic-Flow's ``Mag``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from ..methods import register
from ..core.targets import finish, resolve_dtype, resolve_targets


@register("magnitude", "Magnitude: S = |theta| of the stored weights", runs_network=False)
def magnitude(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """S = |theta| of the stored weight (``weight_orig`` under torch.nn.utils.prune hooks). Pruned
    entries get their magnitude too (the masking step keeps them pruned). ``dtype``: the
    parameters' dtype by default. Other arguments are accepted for a uniform interface and ignored.
    """
    targets = resolve_targets(model, masks)
    dt = resolve_dtype(targets, dtype)
    scores = OrderedDict((n, t.param.detach().to(dtype=dt, copy=True).abs_()) for n, t in targets.items())
    return finish(scores, targets)
