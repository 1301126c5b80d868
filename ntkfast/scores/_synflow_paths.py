"""The SynFlow variants the Path Kernel paper motivates (Gebhart, Saxena, Schrater, 2021), on the
path network of :mod:`ntkfast.pathkernel`:

- ``synflow_l2`` (the authors' code): |θ| · S_SynFlow = |θ² ⊙ ∂R₁/∂|θ||.
- ``synflow_l2_squared`` (later public code, e.g. PHEW's): the network with weights θ² is fed ones,
  R₂ = Σ_p π_p², S = |θ| ⊙ ∂R₂/∂(θ²) = Σ_{p∋e} π_p² / |θ_e|.
- ``synflow_dist``: SynFlow with the mean training input x̄ (un-normalised, ≥ 0) fed instead of ones.
- ``synflow_l2_dist``: |θ| · S_SynFlow-Dist, the authors' L2 variant fed x̄.

The transformed state is built once per pruning run (the per-run cache) and only the scored
weights are rebuilt each round: iterative pruning never copies the model per round.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from . import register
from ..core.targets import finish, resolve_targets


def _network(model, masks, power, dtype, input_shape, data, cache, inputs=None, key=None):
    from ..pathkernel._network import PathNetwork

    dt = torch.float64 if dtype is None else dtype
    if cache is None:
        return PathNetwork(model, masks, power, dt, input_shape=input_shape, inputs=inputs, data=data)
    key = ("path network", key, power, str(dt))
    net = cache.get(key)
    if net is None:
        net = cache[key] = PathNetwork(model, masks, power, dt, input_shape=input_shape, inputs=inputs, data=data)
    else:  # the state is unchanged; only the masks move between rounds
        net.targets = resolve_targets(model, masks)
    return net


def _flow(net, weight_power: int) -> "OrderedDict[str, torch.Tensor]":
    """|θ|^weight_power ⊙ m ⊙ ∂R₁/∂(|θ| ⊙ m), as a magnitude like the authors' ``abs_()``:
    weight_power 1 is the flow through each kept weight (SynFlow), 2 its L2 variant."""
    return OrderedDict((n, s.abs_()) for n, s in net.scores(weight_power).items())


def mean_input(data) -> torch.Tensor:
    """x̄ over ``data``: an ntkfast image dataset gives its un-normalised mean image; otherwise the
    mean of the inputs as given (tensor, labelled pair, dataset or batches)."""
    from .. import data as D
    from ..core.unlabelled import Unlabelled

    if isinstance(data, D.ImageDataset):
        return D.mean_input(data).double()
    source = Unlabelled(data)
    n = len(source)
    total = None
    for start in range(0, n, 4096):
        chunk = source.take(torch.arange(start, min(n, start + 4096))).double().sum(0)
        total = chunk if total is None else total + chunk
    return total / n


def _dist_input(data, input_mean, cache):
    if input_mean is not None:
        if not isinstance(input_mean, torch.Tensor):
            raise ValueError(f"input_mean: expected a tensor (one input, no batch dimension), got {type(input_mean).__name__}")
        x = input_mean
    elif data is None:
        raise ValueError("data: the Dist variants feed the mean training input; pass data= (or input_mean=)")
    else:
        key = ("mean input", id(data))
        x = cache.get(key) if cache is not None else None
        if x is None:
            x = mean_input(data)
            if cache is not None:
                cache[key] = x
    if bool((x < 0).any()):
        raise ValueError("data: the mean input has negative entries (normalised inputs?); SynFlow-Dist feeds the "
                         "un-normalised mean (ntkfast datasets give it whatever their normalisation), or pass "
                         "input_mean=")
    return x


@register("synflow_l2", "SynFlow-L2 (Path Kernel authors' code): |theta| * SynFlow score (data-free)")
def synflow_l2(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None, seed: int = 0,
               dtype=None, input_shape=None, cache: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """|θ| · |θ ⊙ ∂R₁/∂θ| with R₁ the |state| network's output on ones (float64 unless ``dtype``).
    ``seed`` is ignored."""
    net = _network(model, masks, 1, dtype, input_shape, data, cache)
    return finish(_flow(net, 2), net.targets)


@register("synflow_l2_squared", "SynFlow-L2, squared paths (PHEW-style code): |theta| * dR2/d(theta^2), "
                                "the theta^2 network fed ones (data-free)")
def synflow_l2_squared(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None,
                       seed: int = 0, dtype=None, input_shape=None,
                       cache: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """|θ| ⊙ ∂R₂/∂(θ²), R₂ = Σ outputs of the squared network on ones = Σ_p π_p² (the path
    kernel's diagonal times |θ|). ``seed`` is ignored."""
    net = _network(model, masks, 2, dtype, input_shape, data, cache)
    return finish(net.scores(1), net.targets)


@register("synflow_dist", "SynFlow-Dist: SynFlow fed the mean (un-normalised) training input instead of ones",
          raw_data=True)
def synflow_dist(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None,
                 input_mean: Optional[torch.Tensor] = None, seed: int = 0, dtype=None,
                 cache: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """|θ ⊙ ∂R₁/∂θ| with the |state| network fed x̄, the mean training input of ``data`` (an ntkfast
    image dataset gives its un-normalised mean image) or ``input_mean``. ``seed`` is ignored."""
    x = _dist_input(data, input_mean, cache)
    net = _network(model, masks, 1, dtype, None, None, cache, inputs=x, key="dist")
    return finish(_flow(net, 1), net.targets)


@register("synflow_l2_dist", "SynFlow-L2-Dist: |theta| * SynFlow-Dist score (the authors' L2 variant fed the mean "
                             "training input)", raw_data=True)
def synflow_l2_dist(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None,
                    input_mean: Optional[torch.Tensor] = None, seed: int = 0, dtype=None,
                    cache: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """|θ| · |θ ⊙ ∂R₁/∂θ| with the |state| network fed x̄ (see :func:`synflow_dist`)."""
    x = _dist_input(data, input_mean, cache)
    net = _network(model, masks, 1, dtype, None, None, cache, inputs=x, key="dist")
    return finish(_flow(net, 2), net.targets)
