"""SynFlow (Tanaka et al. 2020; Synaptic-Flow's ``SynFlow``): data-free synaptic saliency."""
from __future__ import annotations

import math
import warnings

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from . import register
from ..core.batches import resolve_input_shape
from ..core.numerics import all_finite, grad_dict, remember_float64, with_float64_fallback
from ..core.state import functional_forward, private_copy, state_copy, substitute
from ..core.targets import finish, model_device, resolve_targets


@register("synflow", "SynFlow: |theta * dR/dtheta|, R = sum of the |state|-network's output on ones (data-free)")
def synflow(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
    cache: Optional[dict] = None,
) -> "OrderedDict[str, torch.Tensor]":
    """SynFlow: every parameter and buffer is replaced by its absolute value (BatchNorm running
    statistics included, as the authors' |state_dict|), the masked network (|theta| * m) in eval mode
    (train mode with ``train_mode``) is fed an all-ones input of batch 1, R = sum of the outputs and
    S = |theta * dR/dtheta| (gradient w.r.t. the raw weight, so pruned entries score 0); for a
    bias-free ReLU MLP S_e = sum over input-output paths through e of |product of the path's weights|.

    ``input_shape`` (one example, no batch dimension): the argument, else ``model.input_shape``,
    else the shape of ``data``'s inputs. ``dtype=torch.float64`` computes in double; a float32
    computation that overflows (deep networks) is redone in float64 with a warning. ``cache``: a
    dict kept across calls on the same, unchanged model (the pruning loop passes one), in which the
    |state| network is built once instead of every call. ``seed`` is ignored."""
    targets = resolve_targets(model, masks)
    shape = resolve_input_shape(model, input_shape, data)
    device = model_device(model)

    def compute(dt):
        # The scored weights' effective value W = |theta| * m is the leaf itself. The authors
        # differentiate w.r.t. the raw weight, dR/dtheta = m * dR/dW, and |theta * m * dR/dW| =
        # |W * dR/dW| exactly (m is 0 or 1).
        x = torch.ones((1,) + tuple(shape), dtype=dt, device=device)
        prepared = _prepared(model, targets, dt, train_mode, cache)
        if prepared is not None:
            dup, slots, absw = prepared
            with torch.no_grad():
                for n, t in targets.items():
                    torch.mul(absw[n], t.mask, out=slots[n].data)
            w = slots
        else:
            state = state_copy(model, dt, transform=torch.abs, skip={t.param_name for t in targets.values()})
            # (|theta| * m, not torch.where(m, |theta|, 0): where with a bool mask is several times slower)
            w = OrderedDict(
                (n, t.param.detach().to(dt).abs().mul_(t.mask).requires_grad_(True)) for n, t in targets.items()
            )
        try:
            if prepared is not None:
                out = dup(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
            else:
                out = functional_forward(model, substitute(state, targets, w), x, train_mode=train_mode)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # shape mismatches surface as RuntimeError from the first layer that sees them
            raise ValueError(f"input_shape: the forward failed for an input of shape {tuple(shape)} "
                             f"(a wrong input_shape?): {exc}") from exc
        r = out.sum()
        grads = grad_dict(r, w)
        scores = OrderedDict((n, (w[n].detach() * g).abs_()) for n, g in grads.items())
        # one reduction per tensor and one host sync: finiteness, and which tensors scored all zero
        sums = torch.stack([v.sum().double() for v in scores.values()] + [r.detach().double()]).tolist()
        zero[:] = [n for n, v in zip(scores, sums) if v == 0.0]
        return scores, all(math.isfinite(v) for v in sums)

    zero: list = []
    result = with_float64_fallback(compute, targets, dtype, scorer="synflow", cache=cache)
    first = next(iter(result.values())).dtype
    # Underflow: in float32 a tensor with alive weights can score exactly 0 everywhere although it
    # carries flow. A tensor can also score 0 because the network is cut through behind it: only a
    # float64 recomputation tells the two apart.
    suspects = [n for n in zero if bool(targets[n].mask.any())] if first != torch.float64 else []
    if suspects:
        result64 = compute(torch.float64)[0]
        if any(bool(result64[n].any()) for n in suspects):
            warnings.warn(f"synflow: the {str(first).replace('torch.', '')} computation underflowed (e.g. "
                          f"{suspects[0]} scored 0 throughout); using float64", RuntimeWarning, stacklevel=2)
            remember_float64(cache, "synflow", first)
            result = result64
    return finish(result, targets)


def _prepared(model, targets, dt, train_mode, cache):
    """The cached |state| copy of ``model`` in ``dt`` with the targets' |theta|, or None when there
    is no cache, in train mode (BatchNorm would carry statistics from one call to the next), or
    when the model cannot be copied."""
    if cache is None or train_mode:
        return None
    key = ("synflow", dt)
    if key not in cache:
        made = private_copy(model, targets, dt, transform=torch.abs)
        if made is None:
            cache[key] = None
        else:
            dup, slots = made
            cache[key] = (dup, slots, OrderedDict((n, p.detach().clone()) for n, p in slots.items()))
    return cache[key]
