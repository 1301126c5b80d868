"""Neural Tangent Transfer as a method of :func:`ntkfast.prune`: one transfer at the run's density
and scope, whose result is a mask *and* the learned sparse weights (``masks.learned_weights``),
handed back whole through the method contract (``returns="masks"``), never through scores."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ..core.batchnorm import BNMode
from ..core.options import InitMask, Scope, TransferKernel
from ..methods import MethodResult, register
from .transfer import transfer


@register("ntt", "Neural Tangent Transfer: a sparse student trained, label-free, to match the dense model's "
                 "outputs and NTK; its mask and learned weights (masks.learned_weights)", needs_data=True,
          raw_data=True, single_shot=True, takes=("target_density", "scope", "process_group", "exclude", "include"), returns="masks")
def ntt(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    target_density: Optional[float] = None,
    scope: Scope = "layerwise",
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    batch_size: int = 64,
    lambda_ker: float = 1e-3,
    lambda_l2: float = 1e-4,
    lr: float = 5e-4,
    mask_update_every: Optional[int] = 100,
    init_mask: InitMask = "magnitude",
    kernel: TransferKernel = "sparse",
    validation=None,
    log_every: int = 100,
    process_group=None,
    exclude=None,
    bn: Optional[BNMode] = None,
    include=None,
) -> MethodResult:
    """Runs :func:`ntkfast.transfer` at the run's density and scope (prune() passes them), seeded
    with ``seed`` as given. ``data`` reaches it as the user gave it (a dataset works) and is used
    without its labels. It starts from the dense model only: start masks, a second round or prune
    hooks are refused. ``process_group``: the transfer's steps are split over its processes (see
    :func:`ntkfast.transfer`). ``exclude``: weights the student keeps dense (see
    :func:`ntkfast.transfer`); ``include``: the weights besides the Linear and Conv ones it masks. ``bn``: "calibrate" (default where the model has BatchNorm) or "eval" (see :func:`ntkfast.transfer`)."""
    if target_density is None:
        raise ValueError("target_density: NTT needs the density it learns a mask for (prune() passes it)")
    if masks is not None and not all(bool(m.all()) for m in masks.values()):
        raise ValueError("masks: NTT learns its mask from the dense model; it cannot continue from a pruned one "
                         "(use rounds=1 and no start masks or prune hooks)")
    # progress=None: the transfer's bar is an inner bar of prune()'s, silenced with it
    res = transfer(model, target_density, data, steps=steps, epochs=epochs, batch_size=batch_size,
                   lambda_ker=lambda_ker, lambda_l2=lambda_l2, lr=lr, mask_update_every=mask_update_every,
                   init_mask=init_mask, scope=scope, seed=seed, progress=None, validation=validation, log_every=log_every,
                   kernel=kernel, process_group=process_group, exclude=exclude, bn=bn,
                   include=include)
    return MethodResult(masks=res.masks, weights=res.state_dict, info={"history": res.history})
