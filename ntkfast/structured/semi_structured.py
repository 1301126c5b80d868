"""2:4 masks that a GPU runs faster: the masked ``nn.Linear`` weights of a model converted to
PyTorch's semi-structured sparse format (``torch.sparse.to_sparse_semi_structured``), which the
sparse tensor cores of Ampere and later GPUs multiply at up to twice the dense rate.

    masks = ntkfast.prune(model, "ntksap", None, structure="2:4")
    fast = to_semi_structured(model.half().cuda(), masks)     # a copy; model is left as it is

Only what the format can hold is converted: a Linear weight whose mask keeps exactly 2 of every 4
consecutive entries of each row, float16 or bfloat16, on a CUDA device of compute capability 8.0
or more, with a shape PyTorch's kernels take (a weight whose conversion torch refuses, too small
or oddly shaped, is left dense and named, with torch's reason, in the returned report). Every
other weight keeps its mask applied as zeros.
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from ..core.compiled import unwrap
from ..core.targets import prunable_parameters

__all__ = ["check_two_four", "to_semi_structured"]

_DTYPES = (torch.float16, torch.bfloat16)


def check_two_four(masks: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """For every 2-D mask, why it is not 2:4 along its rows ('' when it is): exactly 2 kept in
    every group of 4 consecutive entries of a row."""
    out = {}
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"masks: {name!r} is not a bool tensor")
        if m.dim() != 2:
            out[name] = f"{m.dim()}-d (only Linear weights, 2-d, are converted)"
        elif m.shape[1] % 4:
            out[name] = f"{m.shape[1]} columns, not a multiple of 4"
        else:
            kept = m.reshape(m.shape[0], -1, 4).sum(-1)
            out[name] = "" if bool((kept == 2).all()) else \
                f"{int((kept != 2).sum())} group(s) of 4 do not keep exactly 2"
    return out


def to_semi_structured(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Tuple[nn.Module, Dict[str, str]]:
    """A copy of ``model`` with ``masks`` applied and every Linear weight whose mask is 2:4
    stored semi-structured; returns (the copy, {weight name: why it stayed dense} for the others).
    The copy computes what the masked model computes, up to the sparse kernels' rounding.

    ValueError naming ``model`` when it is not on a CUDA device of compute capability 8.0 or more
    or carries torch.nn.utils.prune hooks; naming ``masks`` when no weight can be converted (a
    weight that is not float16 / bfloat16 is left dense and named) or a mask does not belong to
    the model. ``model`` and ``masks`` are not changed; a compiled model's original module is
    copied."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks: expected a non-empty mapping of weight name -> bool mask")
    model = unwrap(model)  # a torch.compile'd model: its original module is copied (compile the copy again)
    hooked = [n for n, _ in model.named_parameters() if n.endswith("_orig")]
    if hooked:
        raise ValueError(f"model: {hooked[0]!r} is re-parametrised by torch.nn.utils.prune; make the pruning permanent "
                         "first (torch.nn.utils.prune.remove), the masks stay what they are")
    weights = prunable_parameters(model)
    unknown = sorted(set(masks) - set(dict(model.named_parameters())) - set(weights))
    if unknown:
        raise ValueError(f"masks: {unknown[:4]} name no parameter of the model")
    linears = {f"{n}.weight" if n else "weight": mod for n, mod in model.named_modules() if type(mod) is nn.Linear}
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"model: semi-structured sparse weights need a CUDA device, the model is on {device}")
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise ValueError(f"model: semi-structured sparse weights need compute capability 8.0 or more, "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    why = check_two_four({n: m for n, m in masks.items() if n in linears})
    subclassed = {f"{n}.weight": type(mod).__name__ for n, mod in model.named_modules()
                  if isinstance(mod, nn.Linear) and type(mod) is not nn.Linear}
    dense = {n: (f"a Linear subclass ({subclassed[n]}) whose owner may read its weight directly" if n in subclassed
                 else "not an nn.Linear weight") for n in masks if n not in linears}
    for n, reason in why.items():
        w = dict(model.named_parameters())[n]
        if not reason and w.dtype not in _DTYPES:
            reason = f"{w.dtype} (the format takes float16 and bfloat16)"
        if reason:
            dense[n] = reason
    convert = [n for n in why if n not in dense]
    if not convert:
        _none_converted(dense)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            if n in params:
                params[n].mul_(m.to(params[n].device, params[n].dtype))
    from torch.sparse import to_sparse_semi_structured

    mods = {f"{n}.weight" if n else "weight": mod for n, mod in out.named_modules() if type(mod) is nn.Linear}
    converted = 0
    for n in convert:
        lin = mods[n]
        try:
            sparse = to_sparse_semi_structured(lin.weight.detach())
        except (RuntimeError, ValueError) as exc:  # a shape the kernels do not take
            dense[n] = f"torch refused it: {str(exc).splitlines()[0]}"
            continue
        lin.weight = nn.Parameter(sparse, requires_grad=lin.weight.requires_grad)
        converted += 1
    if not converted:
        _none_converted(dense)
    return out, dense


def _none_converted(dense: Mapping[str, str]):
    listed = "; ".join(f"{n}: {r}" for n, r in list(dense.items())[:4])
    raise ValueError(f"masks: no Linear weight can be stored 2:4 ({listed})")
