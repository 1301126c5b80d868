"""Multiply-accumulates of one forward pass, and the fraction a set of masks leaves.

The rule is the one of the Synaptic-Flow and NTK-SAP code (``Utils/metrics.py`` there), so our
"remaining FLOPs" can sit beside their tables: one sample; each parameter tensor is charged the
multiply-accumulates it takes part in (not x2), and a pruned tensor is charged its kept fraction:

- Linear: weight ``in * out`` per output position, bias ``out`` per position;
- Conv (1-3 d): weight ``in/groups * out * prod(kernel) * prod(output size)``, bias
  ``out * prod(output size)``; ConvTranspose: the same product over the *input* size;
- BatchNorm, GroupNorm, LayerNorm and InstanceNorm with affine parameters: scale and shift one
  per element of the output each.

Pooling, activations, residual additions and attention products carry no parameter and are not
counted (as there). Parameters of other modules are listed in ``uncounted`` rather than guessed.
The forward runs on a copy of the model moved to the meta device: no arithmetic, and the
user's model (BatchNorm statistics included) is not touched (the copy briefly takes the model's
memory again before it moves). A weight used twice (a module called twice, a tied weight) is
charged each use, where the authors' counter keeps one call per module.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from .core.checks import check_mask, check_shape
from .core.concurrency import holds_model

__all__ = ["FlopCount", "count_flops"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class FlopCount:
    """``per_param``: parameter name -> multiply-accumulates of one sample; ``remaining``: the
    same scaled by each mask's kept fraction (a tensor without a mask counts whole)."""

    per_param: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    remaining_per_param: "OrderedDict[str, float]" = field(default_factory=OrderedDict)
    uncounted: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_param.values())

    @property
    def remaining(self) -> float:
        return sum(self.remaining_per_param.values())

    @property
    def fraction(self) -> float:
        """Remaining over total: the FLOPs density the papers print beside the weight density."""
        return self.remaining / self.total if self.total else 1.0


def _module_counts(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> Dict[str, int]:
    if isinstance(module, nn.Linear):
        positions = out.numel() // out.shape[-1] // out.shape[0]  # per sample: tokens, pixels
        return {"weight": module.in_features * module.out_features * positions, "bias": module.out_features * positions}
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        per_out = module.in_channels // module.groups * k
        if module.transposed:  # each input position scatters into out_channels x kernel outputs
            spatial_in = math.prod(inp.shape[2:])
            return {"weight": module.in_channels * module.out_channels // module.groups * k * spatial_in,
                    "bias": module.out_channels * math.prod(out.shape[2:])}
        spatial = math.prod(out.shape[2:])
        return {"weight": per_out * module.out_channels * spatial, "bias": module.out_channels * spatial}
    if isinstance(module, _NORMS):
        n = out[0].numel()
        return {"weight": n, "bias": n}
    return {}


@holds_model
@torch.no_grad()
def count_flops(model: nn.Module, input_shape=None, masks: Optional[Mapping[str, torch.Tensor]] = None) -> FlopCount:
    """Multiply-accumulates of one forward of ``model`` on a sample of ``input_shape`` (default:
    ``model.input_shape``, as the zoo's models have), and what ``masks`` (name -> bool tensor, an
    ntkfast ``Masks`` too) leave of them. Floating inputs only (token models: give their
    embedding's output shape to the rest, or count by hand)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("input_shape: the model has no input_shape attribute; give the shape of one sample")
    shape = check_shape(input_shape, "input_shape")
    from .core.compiled import plain_name, unwrap

    model = unwrap(model)  # a torch.compile'd model: its original module, whose names masks take
    params = dict(model.named_parameters())
    # every name a shared parameter goes by -> the one named_parameters() reports
    alias = {n: next(k for k, v in params.items() if v is p)
             for n, p in model.named_parameters(remove_duplicate=False)}
    kept: Dict[str, float] = {}
    if masks is not None:
        items = masks.items() if isinstance(masks, Mapping) else None
        if items is None:
            raise TypeError(f"masks: expected a mapping of parameter name -> mask, got {type(masks).__name__}")
        for name, m in items:
            m = check_mask(m, f"masks[{name!r}]")
            name = plain_name(name)
            if name not in params:
                raise ValueError(f"masks: the model has no parameter {name!r}")
            if tuple(m.shape) != tuple(params[name].shape):
                raise ValueError(f"masks[{name!r}]: shape {tuple(m.shape)} but the parameter is {tuple(params[name].shape)}")
            kept[name] = float(m.sum()) / m.numel() if m.numel() else 1.0

    try:
        ghost = copy.deepcopy(model).to("meta")  # shapes only; the user's model runs nothing
    except RuntimeError as exc:  # e.g. torch.nn.utils.prune's computed weights cannot be copied
        raise ValueError(f"model: count_flops works on a copy, and this model cannot be copied "
                         f"({str(exc).splitlines()[0][:160]}); count the plain model and pass the masks") from None
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = floating.dtype if floating is not None else torch.float32  # a float64 model takes float64 inputs
    counts: "OrderedDict[str, int]" = OrderedDict()
    seen = set()

    def hook(prefix):
        def record(module, args, out):
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            for attr, n in _module_counts(module, args[0], out).items():
                p = getattr(module, attr, None)
                if isinstance(p, nn.Parameter):
                    name = alias.get(f"{prefix}.{attr}" if prefix else attr)
                    if name is None:
                        continue
                    # a module called twice, or a weight shared by two, counts every use (the
                    # authors' counter keeps one call per module)
                    counts[name] = counts.get(name, 0) + int(n)
                    seen.add(name)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in ghost.named_modules()]
    try:
        ghost(torch.zeros((1, *shape), device="meta", dtype=dtype))
    except Exception as exc:
        raise ValueError(f"input_shape: the model's forward fails on one sample of shape {shape} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    finally:
        for h in handles:
            h.remove()
    result = FlopCount()
    for name in params:
        if name in counts:
            result.per_param[name] = counts[name]
            result.remaining_per_param[name] = counts[name] * kept.get(name, 1.0)
        else:
            result.uncounted.append(name)
    return result
