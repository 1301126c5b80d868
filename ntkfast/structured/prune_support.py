"""What :func:`ntkfast.prune` needs for ``structure="channel"``: the checks of its arguments
against that structure, and the traced plan its rounds select channels with."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.checks import check_choice
from ..core.compiled import unwrap
from ..core.targets import model_device
from .channels import _AGGREGATES, ChannelPlan
from .trace import ChannelTraceError

__all__ = ["STRUCTURES", "channel_plan_for"]

#: the values of prune's ``structure`` this module answers for (None: unstructured)
STRUCTURES = ("channel",)


def channel_plan_for(model: nn.Module, structure: Optional[str], aggregate: str, *, method: str, info,
                     keep_rule: str, data) -> Optional[ChannelPlan]:
    """The plan for ``prune(..., structure=structure, channel_aggregate=aggregate)``, or None for
    unstructured pruning; ValueError naming the argument that does not fit."""
    if structure is None:
        if aggregate != "sum":
            raise ValueError("channel_aggregate: ranks whole channels, so it needs structure='channel'")
        return None
    check_choice(structure, "structure", STRUCTURES)
    check_choice(aggregate, "channel_aggregate", _AGGREGATES)
    if info.returns == "masks":
        raise ValueError(f"structure: method {method!r} chooses its own masks; channel structure ranks channels by "
                         "a scorer's per-weight scores")
    if keep_rule != "exact":
        raise ValueError(f"keep_rule: {keep_rule!r} sets how many single weights a threshold keeps; with "
                         "structure='channel' whole channels are kept, the nearest the density allows")
    inputs = None
    if data is not None:  # prune has made it a list of (inputs, targets) by now
        first = data[0][0]
        inputs = first[:2] if isinstance(first, torch.Tensor) and first.dim() > 0 else first
        if isinstance(inputs, torch.Tensor):  # a data-free method's batches stay where the user put them
            inputs = inputs.to(model_device(model))
    # layers kept dense by exclude= get no scores: the plan keeps their channels (and the ones tied to them)
    try:
        return ChannelPlan(model, inputs, aggregate=aggregate)
    except ChannelTraceError:
        raise
    except ValueError as exc:  # prune has no example_inputs: name what it takes instead
        message = str(exc)
        if not message.startswith("example_inputs: "):
            raise
        if inputs is not None:
            raise ValueError("data: " + message[len("example_inputs: "):]) from None
        if getattr(unwrap(model), "input_shape", None) is None:
            raise ValueError(f"data: structure='channel' traces the channel ties of {type(unwrap(model)).__name__} "
                             f"with one forward, and method {method!r} was given no data and the model has no "
                             "input_shape; pass data=(inputs, targets)") from None
        raise ValueError("model.input_shape: " + message[len("example_inputs: "):]) from None
