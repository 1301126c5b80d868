"""The sanity checks of pruning at initialisation (Frankle et al. 2021; offered by the NTK-SAP and
Synaptic-Flow code): does a method's mask carry information beyond its per-layer densities, and
beyond the weights it was computed on?

- :func:`shuffle_layerwise`: each layer's mask entries permuted at random, so only the per-layer
  densities survive. (The authors' ``--shuffle`` assigns the permutation to a local name and so
  changes nothing; this one does what the flag describes.)
- :func:`reinitialize`: the pruned network's weights drawn afresh, the mask kept.
- inverted scores: ``prune(..., invert=True)`` keeps the lowest-scoring weights instead.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from .core.checks import check_seed
from .core.concurrency import holds_model, seeded_global_rng
from .masks import Masks

__all__ = ["shuffle_layerwise", "reinitialize"]


def _as_masks(masks) -> Masks:
    if isinstance(masks, Masks):
        return masks
    if isinstance(masks, Mapping):
        return Masks(masks)
    raise TypeError(f"masks: expected ntkfast.Masks or a mapping name -> bool tensor, got {type(masks).__name__}")


def shuffle_layerwise(masks, seed: int = 0) -> Masks:
    """New masks with each tensor's kept entries moved to random positions of the same tensor
    (a seeded permutation per tensor); the per-layer and overall densities are unchanged."""
    masks = _as_masks(masks)
    seed = check_seed(seed, "seed")
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, m in masks.items():
        perm = torch.randperm(m.numel(), generator=g).to(m.device)
        out[name] = m.reshape(-1)[perm].reshape(m.shape)
    meta = dict(masks.metadata)
    meta["sanity"] = {"check": "shuffle_layerwise", "seed": seed}
    return Masks(out, meta)


@holds_model
@torch.no_grad()
def reinitialize(model: nn.Module, masks, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter drawn afresh (the zoo's own initialisation where
    the model has ``reinitialize()``, else each module's ``reset_parameters()``) from ``seed``,
    then ``masks`` applied. The user's model is left as it is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    masks = _as_masks(masks)
    seed = check_seed(seed, "seed")
    fresh = copy.deepcopy(model)
    devices = {p.device for p in fresh.parameters()}
    with seeded_global_rng(seed, sorted(devices, key=str)):
        if callable(getattr(fresh, "reinitialize", None)):
            fresh.reinitialize()
        else:
            drawn = [m for m in fresh.modules() if callable(getattr(m, "reset_parameters", None))]
            if not drawn:
                raise ValueError("model: no module has reset_parameters() and the model has no reinitialize(); "
                                 "nothing knows how to draw its weights")
            for m in drawn:
                m.reset_parameters()
    masks.apply(fresh)
    return fresh
