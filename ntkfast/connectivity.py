"""Which kept weights a pruned network can use: those on some path from an input to an output.

A kept weight whose input unit no input reaches, or whose output unit reaches no output, counts
against the density but cannot change what the network computes from its input (the "effective
sparsity" of Vysogorets and Kempe, JMLR 2023). At high sparsity some pruning methods waste many
weights this way, so comparing methods at equal nominal density can mislead.

    from ntkfast.connectivity import connectivity
    c = connectivity(model, masks)
    print(c.effective.density, c.live_units)

How: the network's own forward, run in float64 on an all-ones input through
torch.func.functional_call with every kept weight set to 1 and every pruned weight and bias to 0,
under a torch function mode that makes normalisation, activation, dropout and softmax functions
the identity and max-pooling average pooling of the same window (whether called as modules or
as functions). Its outputs then count paths, and dR/dw for R = the sum of the outputs is the
number of input-output paths through w: a kept weight is effective exactly where that is
positive. Residual sums, flattening and pooling carry the counts through unchanged. The model
itself is not copied or changed. Not understood, and refused by name: parameters other than the
weights and biases of Linear and convolution layers (and those of normalisation layers and
PReLU, which drop out). Not detected: constants a forward adds or subtracts (an input
normalisation inside the model) and max-reductions written as ``amax``; both can miscount.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .masks import Masks, parameter_name
from .core.checks import check_shape
from .core.concurrency import holds_model
from .core.state import output_tensor, scoring_mode

__all__ = ["Connectivity", "connectivity"]

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_DROPPED = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.PReLU)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# functions (and Tensor methods) of these names pass their input through in the path network
_IDENTITY = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_",
    "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "softplus", "softsign", "prelu", "rrelu", "glu_", "logsigmoid", "softmax", "log_softmax", "dropout",
    "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "batch_norm",
    "layer_norm", "group_norm", "instance_norm", "local_response_norm", "rms_norm",
}
_MAX_POOLS = {"max_pool1d": F.avg_pool1d, "max_pool2d": F.avg_pool2d, "max_pool3d": F.avg_pool3d}
_ADAPTIVE_MAX_POOLS = {"adaptive_max_pool1d": F.adaptive_avg_pool1d, "adaptive_max_pool2d": F.adaptive_avg_pool2d,
                       "adaptive_max_pool3d": F.adaptive_avg_pool3d}


def _as_average(avg):
    def pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        if any(d != 1 for d in (dilation if isinstance(dilation, (tuple, list)) else (dilation,))):
            raise ValueError("model: dilated max-pooling has no average-pooling twin")
        if return_indices:
            raise ValueError("model: max-pooling with return_indices is not supported")
        return avg(input, kernel_size, stride, padding, ceil_mode=ceil_mode, count_include_pad=False)
    return pool


class _PathMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _IDENTITY and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name in _MAX_POOLS:
            return _as_average(_MAX_POOLS[name])(*args, **kwargs)
        if name in _ADAPTIVE_MAX_POOLS:
            if kwargs.pop("return_indices", False) or (len(args) > 2 and args[2]):
                raise ValueError("model: adaptive max-pooling with return_indices is not supported")
            return _ADAPTIVE_MAX_POOLS[name](*args[:2], **kwargs)
        return func(*args, **kwargs)


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


def _unit_tensors(model: nn.Module, masks: Mapping[str, torch.Tensor], pnames: Mapping[str, str]):
    """{parameter name: its value in the path network}: Linear / conv weights 1 (times the mask),
    their biases 0, the dropped layers' parameters 1 (unused); any other parameter is refused."""
    out, seen = {}, set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen:  # a tied weight: functional_call gives its other names the same value
                continue
            seen.add(id(p))
            if isinstance(module, _LAYERS) and pname in ("weight", "weight_orig"):
                value = torch.ones(p.shape, dtype=torch.float64, device=p.device)
            elif isinstance(module, _LAYERS) and pname in ("bias", "bias_orig"):
                value = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            elif isinstance(module, _DROPPED):
                value = torch.ones(p.shape, dtype=torch.float64, device=p.device)
            else:
                raise ValueError(f"model: parameter {full!r} of a {type(module).__name__} has no known place in the "
                                 "path count (understood: Linear and convolution weights and biases, and the "
                                 "parameters of normalisation layers and PReLU)")
            out[full] = value
    for name, m in masks.items():
        t = out[pnames[name]]
        out[pnames[name]] = t * m.to(device=t.device, dtype=torch.bool).to(t.dtype)
    return out


@holds_model
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
    input_shape = check_shape(input_shape, "input_shape")
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
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"masks[{name!r}] must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(params[pnames[name]].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, the parameter {tuple(params[pnames[name]].shape)}")
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, _NORMS):
            raise ValueError(f"masks[{name!r}]: masks on normalisation layers are not supported "
                             "(the path network treats those layers as the identity)")

    unit = _unit_tensors(model, masks, pnames)
    leaves = [unit[pnames[n]].requires_grad_(True) for n in masks]
    device = next(iter(unit.values())).device if unit else torch.device("cpu")
    x = torch.ones((1,) + input_shape, dtype=torch.float64, device=device, requires_grad=True)
    try:
        # scoring_mode restores every module's own flag (a BatchNorm left in eval in a model in train)
        with scoring_mode(model, False), torch.enable_grad(), _PathMode():
            out = output_tensor(functional_call(model, unit, (x,)))
    except RuntimeError as e:  # shape mismatches surface here; the model's own message says where
        raise ValueError(f"input_shape {input_shape}: the model's forward failed on one sample of it: {e}") from e
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model: connectivity needs a tensor output, got {type(out).__name__}")
    total = out.sum()
    if not math.isfinite(float(total.detach())):
        raise OverflowError("connectivity: the number of input-output paths overflows float64")
    grads = torch.autograd.grad(total, [x] + leaves, allow_unused=True)
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
