"""The Path Kernel (Gebhart, Saxena, Schrater, 2021): the data-independent factor Π of the NTK.

For a bias-free network with ReLU-like units, a path p from an input unit to an output unit has
the value π_p = Π_{e∈p} θ_e, and Θ = J_π^x(X) Π J_π^x(X')ᵀ with Π = J_θ^π (J_θ^π)ᵀ. Everything
here comes from the *path network*: the model with its weights replaced by |θ| (power 1) or θ²
(power 2), masked, fed an all-ones input:

- :func:`path_norms`: the forward path sums entering every prunable layer and the backward path
  sums from all-ones outputs (a_{l−1} and b_l of algorithms.md);
- :func:`diagonal`: per weight, Σ_{p∋e} (π_p/θ_e)² = ∂R₂/∂(θ_e²), with R₂ = Σ_p π_p²;
- :func:`trace`: tr Π = Σ_e diagonal_e, one forward and one backward pass;
- :func:`spectrum`: the top eigenvalues of Π, by Lanczos on products with G = J_θ^πᵀ J_θ^π,
  without enumerating paths.

A model that embeds token ids feeds each ``nn.Embedding`` every token at once (its input is then
token ids of ``input_shape``): an embedding is a Linear layer on one-hot vectors, and this is its
all-ones input, as for SynFlow (see :mod:`ntkfast.core.tokens`).

Pooling and residual sums are linear and carry through unchanged, so a path through an average
pool carries the pool's coefficient c once (π_p = √c_p Π θ_e; R₂ = Σ_p c_p Π θ_e²). Biases and
BatchNorm follow the authors' SynFlow code: every other parameter and buffer goes through the same
|·| or (·)², so biases add bias-rooted paths; the identities above are exact for bias-free
networks without BatchNorm. Masked weights are not parameters of the pruned network: their
diagonal entries are 0 and they are left out of G.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Mapping, NamedTuple, Optional

import torch
from torch import nn

from ..ops import path_score
from ._network import PathNetwork, check_power, prunable_module_of, token_feed as _token_feed
from ._spectrum import spectrum
from ..core.concurrency import holds_model
from ..core.state import finite_weights

__all__ = ["PathNorms", "path_norms", "trace", "diagonal", "spectrum"]


class PathNorms(NamedTuple):
    """``forward[name]``: the path sums entering the layer of weight ``name`` (its input in the path
    network, one sample, no batch dimension); ``backward[name]``: dR/d(its output), the path sums
    from the all-ones outputs back to it; ``total``: R = Σ outputs = Σ_p |π_p|^power (for a
    bias-free network); ``power``: 1 or 2."""

    forward: "OrderedDict[str, torch.Tensor]"
    backward: "OrderedDict[str, torch.Tensor]"
    total: float
    power: int


@holds_model
@finite_weights
def path_norms(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, power: int = 2,
               inputs: Optional[torch.Tensor] = None, input_shape=None, dtype=torch.float64) -> PathNorms:
    """Forward and backward path sums of every prunable layer, from an all-ones input (or the
    non-negative ``inputs``, one sample without a batch dimension) and all-ones outputs, with
    |W| (power 1) or W ⊙ W (power 2) weights, masked. float64 by default; sums that overflow raise
    an OverflowError naming the first layer that did. Works for any network the model's own
    forward describes (Linear, Conv, pooling, ReLU, residual sums, flatten, ...)."""
    given = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) and input_shape is None else input_shape
    feed = _token_feed(model, given, "path_norms")
    if inputs is not None and feed is not None:
        raise ValueError("inputs: the model embeds token ids, and each embedding is fed every token at once; "
                         "inputs= applies to real-valued inputs only")
    net = PathNetwork(model, masks, check_power(power), dtype, input_shape=input_shape, inputs=inputs, feed=feed)
    calls = net.layer_sums()
    fwd, bwd = OrderedDict(), OrderedDict()
    for n, seen in calls.items():
        if len(seen) > 1:
            raise ValueError(f"model: module {prunable_module_of(n)!r} is called more than once; its path sums are "
                             "not one tensor per layer (trace/diagonal/spectrum still work)")
        if not seen:
            continue
        a, b = seen[0]
        fwd[n] = a[0]
        bwd[n] = b[0]
    return PathNorms(fwd, bwd, net.total, net.power)


@holds_model
@finite_weights
def diagonal(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, input_shape=None,
             dtype=torch.float64) -> "OrderedDict[str, torch.Tensor]":
    """The diagonal of G = J_θ^πᵀ J_θ^π per weight: Σ_{p∋e} (π_p/θ_e)² = ∂R₂/∂(θ_e²), in the
    weight's shape (0 where masked)."""
    return PathNetwork(model, masks, 2, dtype, input_shape=input_shape,
                       feed=_token_feed(model, input_shape, "diagonal")).gradient()


@holds_model
@finite_weights
def trace(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, input_shape=None,
          dtype=None) -> float:
    """tr Π = Σ_p Σ_{e∈p} (π_p/θ_e)² = Σ_e m_e ∂R₂/∂(θ_e² m_e), in one forward and one backward pass
    of the squared path network through its activations only. A dense or convolution layer whose
    every weight is kept contributes Σ_{edges} b[j]·a[i] from channel sums of its path sums (no
    per-weight gradient is formed); other layers sum their diagonal.

    ``dtype``: by default the model's own (float32 for most, as the authors compute), and if a
    path sum overflows there, float64 with a RuntimeWarning, as SynFlow does; every term is
    positive, so float32 loses only rounding (about 1e-6 relative). A ``dtype`` given is used as
    it is: an overflow then raises an OverflowError naming the first layer that overflowed."""
    if dtype is not None:
        return _trace(model, masks, input_shape, dtype)
    try:
        first = _trace(model, masks, input_shape, None)
        if math.isfinite(first):
            return first
    except OverflowError:
        pass
    warnings.warn("trace: the path sums overflowed in the model's dtype; recomputing in float64", RuntimeWarning,
                  stacklevel=4)
    return _trace(model, masks, input_shape, torch.float64)


def _trace(model, masks, input_shape, dtype) -> float:
    net = PathNetwork(model, masks, 2, dtype, input_shape=input_shape, feed=_token_feed(model, input_shape, "trace"))
    if not net.op_route:
        return float(sum(d.sum() for d in net.gradient().values()))
    total = torch.zeros((), dtype=net.dtype, device=net.device)
    for n, calls in net.layer_sums().items():
        for a, b in calls:
            if net.dense[n]:
                total += _edge_sum(net.targets[n].param, a, b, net.geometry[n])
            else:
                total += net.layer_score(n, a, b, 0).sum()
    return float(total)


def _edge_sum(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, geometry: dict) -> torch.Tensor:
    """Σ over every edge (i → j) of an unmasked layer of b[j]·a[i]: for a dense layer the product
    of the two sums per sample; for a convolution, per group, the weight gradient of a one-channel
    convolution between the channel sums of a and b (a kernel-sized result)."""
    if not geometry:
        return (a.reshape(-1, a.shape[-1]).sum(-1) * b.reshape(-1, b.shape[-1]).sum(-1)).sum()
    groups = geometry["groups"]
    n = a.shape[0]
    a_sum = a.reshape(n, groups, -1, *a.shape[2:]).sum(2)
    b_sum = b.reshape(n, groups, -1, *b.shape[2:]).sum(2)
    ones = torch.ones((groups, 1) + tuple(weight.shape[2:]), dtype=a.dtype, device=a.device)
    return path_score(ones, a_sum, b_sum, weight_power=0, **geometry).sum()
