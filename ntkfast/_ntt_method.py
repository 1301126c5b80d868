"""Neural Tangent Transfer registered as a method of prune(): the transfer's mask, ranked.

It sits beside the loops, not in scores/: it runs a whole transfer, and scorers stay below the
loops."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from .scores import register
from .transfer import transfer


@register("ntt", "Neural Tangent Transfer: the mask of a sparse student trained, label-free, to match the dense "
                 "model's outputs and NTK (learned weights: ntkfast.transfer)", needs_data=True, raw_data=True,
                 single_shot=True)
def ntt(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    target_density: Optional[float] = None,
    scope: str = "layerwise",
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    batch_size: int = 64,
    lambda_ker: float = 1e-3,
    lambda_l2: float = 1e-4,
    lr: float = 5e-4,
    mask_update_every: Optional[int] = 100,
    init_mask: str = "magnitude",
    kernel: str = "sparse",
    validation=None,
    process_group=None,
) -> "OrderedDict[str, torch.Tensor]":
    """Runs :func:`ntkfast.transfer` at the round's density and scope (prune() passes them) and
    scores kept weights in [1, 2) by their learned magnitude, pruned ones 0, so that prune's
    masking step reproduces the transfer's mask. ``data`` reaches it as the user gave it (a
    dataset works) and is used without its labels. It starts from the dense model only: start
    masks, a second round or prune hooks are refused. ``process_group``: the transfer's steps are
    split over its processes (see :func:`ntkfast.transfer`)."""
    if target_density is None:
        raise ValueError("target_density: the NTT scorer needs the density it learns a mask for (prune() passes it)")
    if masks is not None and not all(bool(m.all()) for m in masks.values()):
        raise ValueError("masks: NTT learns its mask from the dense model; it cannot continue from a pruned one "
                         "(use rounds=1 and no start masks or prune hooks)")
    res = transfer(model, target_density, data, steps=steps, epochs=epochs, batch_size=batch_size,
                   lambda_ker=lambda_ker, lambda_l2=lambda_l2, lr=lr, mask_update_every=mask_update_every,
                   init_mask=init_mask, scope=scope, seed=seed, progress=False, validation=validation, kernel=kernel,
                   process_group=process_group)
    out = OrderedDict()
    for name, m in res.masks.items():
        w = res.state_dict[name].detach().abs().to(torch.float64).cpu()
        top = float(w.max()) if w.numel() else 0.0
        out[name] = m.to(torch.float64) * (1.0 + w / (2.0 * top + 1e-300))
    return out
