"""Structured masks: whole output channels (filters) kept or pruned, and their physical removal.

    from ntkfast import prune
    from ntkfast.structured import channel_masks, export_torch_pruning

    masks = prune(model, "synflow", 0.5, rounds=20, structure="channel")
    small = export_torch_pruning(model, masks, example_inputs)   # pip install torch-pruning

:func:`channel_masks` turns any per-weight scores into channel masks; :func:`channel_groups` lists
the tied channels it finds (:mod:`ntkfast.structured.trace`); :func:`export_torch_pruning` cuts the
pruned channels out with Torch-Pruning. :func:`to_semi_structured` stores 2:4-masked Linear weights
in PyTorch's semi-structured sparse format (CUDA). See "Structured masks" in docs/pruning.md.
"""
from __future__ import annotations

from .channels import Aggregate, ChannelGroup, ChannelPlan, channel_groups, channel_masks
from .export import export_torch_pruning
from .semi_structured import check_two_four, to_semi_structured
from .trace import ChannelTraceError

__all__ = ["channel_masks", "channel_groups", "export_torch_pruning", "to_semi_structured", "check_two_four",
           "ChannelGroup", "ChannelPlan", "ChannelTraceError", "Aggregate"]
