"""Which kept weights a pruned network can use: those on some path from an input to an output.

A kept weight whose input unit no input reaches, or whose output unit reaches no output, counts
against the density but cannot change what the network computes from its input (the "effective
sparsity" of Vysogorets and Kempe, JMLR 2023). At high sparsity some pruning methods waste many
weights this way, so comparing methods at equal nominal density can mislead.

    from ntkfast.connectivity import connectivity
    c = connectivity(model, masks)
    print(c.effective.density, c.live_units)

How: a copy of the network in float64 with every kept weight set to 1, every pruned weight and
every bias to 0, normalisation layers and activation modules replaced by the identity and
max-pooling by average pooling of the same window. On an all-ones input its outputs count paths,
and dR/dw for R = the sum of its outputs is the number of input-output paths through w: a kept
weight is effective exactly where that is positive. Residual sums, flattening and pooling carry
the counts through unchanged. Functional activations in a model's forward are supported only
when they are the identity on non-negative values (F.relu and its kin).
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .masks import Masks, parameter_name

__all__ = ["Connectivity", "connectivity"]

_MAX_TO_AVG = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
_ADAPTIVE_MAX_TO_AVG = {nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Dropout,
                nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class Connectivity(NamedTuple):
    """``kept``: the masks given (bool); ``effective``: the kept weights on an input-output path,
    with the same names; ``live_units[name]``: output units (rows of a Linear, output channels of
    a convolution) of that layer with at least one effective weight, of ``units[name]``;
    ``input_paths``: per input element, the number of input-output paths starting there (shape
    ``input_shape``; 0 for an input the pruned network ignores)."""

    kept: Masks
    effective: Masks
    live_units: "OrderedDict[str, int]"
    units: "OrderedDict[str, int]"
    input_paths: torch.Tensor

    @property
    def wasted(self) -> int:
        """Kept weights that are not effective."""
        return self.kept.kept - self.effective.kept


def _pool_as_average(m: nn.Module) -> nn.Module:
    if type(m) in _MAX_TO_AVG:
        if any(d != 1 for d in (m.dilation if isinstance(m.dilation, tuple) else (m.dilation,))):
            raise ValueError(f"model: dilated max-pooling ({type(m).__name__}) has no average-pooling twin")
        if m.return_indices:
            raise ValueError(f"model: {type(m).__name__} with return_indices is not supported")
        return _MAX_TO_AVG[type(m)](m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode,
                                    count_include_pad=False)
    return _ADAPTIVE_MAX_TO_AVG[type(m)](m.output_size)


def _path_network(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model)
    for name, m in list(net.named_modules()):
        if not name:
            continue
        if type(m) in _MAX_TO_AVG or type(m) in _ADAPTIVE_MAX_TO_AVG:
            replacement = _pool_as_average(m)
        elif isinstance(m, _NORMS) or isinstance(m, _ACTIVATIONS):
            replacement = nn.Identity()
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, replacement)
    return net.to(torch.float64).eval()


def connectivity(model: nn.Module, masks: Mapping[str, torch.Tensor], *,
                 input_shape: Optional[Sequence[int]] = None) -> Connectivity:
    """The effective part of ``masks`` on ``model`` (see the module docstring).

    Args:
        model: the network (not modified); a feed-forward network of Linear / Conv layers,
            pooling, normalisation, residual sums and ReLU-like activations.
        masks: name -> bool tensor, True = kept, on Linear / Conv weights (and biases); a
            :class:`ntkfast.Masks` works. Weights without a mask count as kept.
        input_shape: one sample's shape; default ``model.input_shape`` (the zoo's models have it).
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("input_shape: the model has no input_shape attribute; pass one sample's shape")
    input_shape = tuple(int(s) for s in input_shape)
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a mapping name -> bool tensor, got {type(masks).__name__}")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    pnames = OrderedDict()
    for name, m in masks.items():
        try:
            pnames[name] = parameter_name(model, name)
        except KeyError:
            raise ValueError(f"masks: the model has no parameter {name!r}") from None
        if tuple(m.shape) != tuple(params[pnames[name]].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, the parameter {tuple(params[pnames[name]].shape)}")
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, _NORMS):
            raise ValueError(f"masks[{name!r}]: masks on normalisation layers are not supported "
                             "(the path network treats those layers as the identity)")

    net = _path_network(model)
    unit_params = dict(net.named_parameters())
    with torch.no_grad():
        for name, p in unit_params.items():
            p.fill_(1.0 if p.dim() > 1 else 0.0)
        for name, m in masks.items():
            p = unit_params[pnames[name]]
            p.copy_(m.to(device=p.device, dtype=torch.bool).to(p.dtype) * p)
        for p in unit_params.values():
            p.requires_grad_(True)
    device = next(iter(unit_params.values())).device if unit_params else torch.device("cpu")
    x = torch.ones((1,) + input_shape, dtype=torch.float64, device=device, requires_grad=True)
    out = net(x)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model: connectivity needs a tensor output, got {type(out).__name__}")
    total = out.sum()
    if not math.isfinite(float(total.detach())):
        raise OverflowError("connectivity: the number of input-output paths overflows float64")
    grads = torch.autograd.grad(total, [x] + [unit_params[pnames[n]] for n in masks], allow_unused=True)
    effective, kept, live, units = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    for (name, m), g in zip(masks.items(), grads[1:]):
        m = m.to(torch.bool)
        e = torch.zeros_like(m) if g is None else (m & (g.to(m.device) > 0))
        effective[name], kept[name] = e, m
        if e.dim() >= 2:  # Linear / Conv weights: dim 0 is the output unit or channel
            live[name] = int(e.reshape(e.shape[0], -1).any(1).sum())
            units[name] = e.shape[0]
    input_paths = grads[0].detach().reshape(input_shape)
    return Connectivity(Masks(kept), Masks(effective), live, units, input_paths)
