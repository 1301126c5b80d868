"""Functional evaluation of a model on copies of its state, and copies of the model itself.

A method built from these pieces never changes the model: it evaluates ``model`` with
:func:`torch.func.functional_call` on detached copies of every parameter and buffer
(:func:`state_copy`), inside :func:`scoring_mode`, which sets the train/eval flags for the call and
restores them (and any plain tensor attribute a forward hook re-assigns, such as the ``weight``
that torch.nn.utils.prune recomputes) afterwards. Gradients are taken with
:func:`torch.autograd.grad` with respect to leaves of those copies, so no ``.grad`` field and no
``requires_grad`` flag of the model is touched.

Typical scorer::

    targets = resolve_targets(model, masks)

    def compute(dt):
        state = state_copy(model, dt)
        theta = leaves(state, targets)                    # raw weights, requires_grad
        st = substitute(state, targets, masked(theta, targets))
        out = functional_forward(model, st, x, train_mode=train_mode)
        g = grad_dict(out.sum(), theta)
        scores = {n: (theta[n] * g[n]).abs() for n in targets}
        return scores, all_finite(out, scores)

    return finish(with_float64_fallback(compute, targets, dtype, scorer="name"), targets)
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from .targets import Target

__all__ = ["state_copy", "leaves", "masked", "substitute", "scoring_mode", "functional_forward", "copy_model",
           "cast_copy", "private_copy", "finite_model", "finite_weights", "RunCache", "run_notes"]


def state_copy(
    model: nn.Module,
    dtype: Optional[torch.dtype] = None,
    *,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    skip=(),
) -> Dict[str, torch.Tensor]:
    """Detached copies (never views) of every parameter and buffer of ``model``, keyed as in
    ``named_parameters()`` / ``named_buffers()``. Floating tensors are cast to ``dtype`` (if given)
    and then passed through ``transform`` (e.g. ``torch.abs``); other tensors are copied as they are.
    Names in ``skip`` are left out (a scorer that supplies those tensors itself need not pay for
    copying the largest ones).
    """
    out: Dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or name in skip:
            continue
        if t.is_floating_point():
            c = t.detach().to(dtype=dtype or t.dtype, copy=True)
            if transform is not None:
                c = transform(c)
        else:
            c = t.detach().clone()
        out[name] = c
    return out


def leaves(state: Mapping[str, torch.Tensor], targets: Mapping[str, Target]) -> "OrderedDict[str, torch.Tensor]":
    """Fresh leaves requiring grad, one per target, holding the state's value of its parameter."""
    return OrderedDict((n, state[t.param_name].detach().clone().requires_grad_(True)) for n, t in targets.items())


def masked(weights: Mapping[str, torch.Tensor], targets: Mapping[str, Target]) -> "OrderedDict[str, torch.Tensor]":
    """``weights[name] * mask`` for every target (the effective weights of the masked network)."""
    return OrderedDict((n, weights[n] * t.mask_as(weights[n].dtype)) for n, t in targets.items())


def substitute(
    state: Mapping[str, torch.Tensor],
    targets: Mapping[str, Target],
    weights: Mapping[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """A new state dict (``state`` itself is not changed) in which every target's parameter slot
    holds ``weights[name]`` (the effective weight its module must compute with) and the module's own
    ``<attr>_mask`` buffer, if any, is ones, so that it does not mask a second time."""
    out = dict(state)
    for n, t in targets.items():
        out[t.param_name] = weights[n]
        if t.mask_buffer is not None:
            out[t.mask_buffer] = torch.ones_like(state[t.mask_buffer])
    return out


@contextmanager
def scoring_mode(model: nn.Module, train_mode: bool = False) -> Iterator[nn.Module]:
    """Set every module to train (``train_mode=True``) or eval mode for the block; on exit restore
    each module's own flag and every plain tensor attribute of every module (forward hooks such as
    torch.nn.utils.prune's re-assign ``module.weight`` during a call)."""
    saved = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        saved.append((m, m.training, attrs))
    try:
        model.train(bool(train_mode))
        yield model
    finally:
        for m, training, attrs in saved:
            m.training = training
            d = vars(m)
            for k in [k for k, v in d.items() if isinstance(v, torch.Tensor) and k not in attrs]:
                del d[k]
            d.update(attrs)


def output_tensor(out):
    """The tensor a model's forward stands for: the output itself, the ``logits`` of a Hugging
    Face ``ModelOutput`` (or of any mapping or object holding a ``logits`` tensor), or the first
    element of a tuple or list. Anything else is returned as is, for the caller to name."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def functional_forward(
    model: nn.Module, state: Mapping[str, torch.Tensor], x, *, train_mode: bool = False
) -> torch.Tensor:
    """``model(x)`` computed with ``state`` in place of its parameters and buffers, in eval mode
    (train mode with ``train_mode=True``; BatchNorm then updates the copies in ``state``, not the
    model). Returns the output tensor (see :func:`output_tensor`)."""
    with scoring_mode(model, train_mode):
        out = output_tensor(torch.func.functional_call(model, dict(state), (x,)))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected the forward to return a tensor, got {type(out).__name__}")
    return out


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for modules holding computed (non-leaf) tensors as plain
    attributes, such as the ``weight`` that torch.nn.utils.prune's hook recomputes: deepcopy
    refuses those, so they are detached for the copy (the hook recomputes them at the next call)."""
    import copy as _copy

    swapped = []
    for m in model.modules():
        d = vars(m)
        for k, v in list(d.items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and not v.is_leaf:
                swapped.append((d, k, v))
                d[k] = v.detach()
    try:
        return _copy.deepcopy(model)
    finally:
        for d, k, v in swapped:
            d[k] = v


def cast_copy(model: nn.Module, dtype: torch.dtype, *, device=None,
              transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              ones_buffers=(), frozen: bool = True) -> nn.Module:
    """A deep copy of ``model`` (:func:`copy_model`) moved to ``device`` (if given), its floating
    parameters and buffers cast to ``dtype`` and passed through ``transform``, the buffers named in
    ``ones_buffers`` (a scorer's own ``<attr>_mask`` buffers) set to ones, and with ``frozen`` every
    parameter's requires_grad off. Raises what deepcopy raises."""
    dup = copy_model(model)
    if device is not None:
        dup.to(device=device)
    with torch.no_grad():
        for t in list(dup.parameters()) + list(dup.buffers()):
            if t.is_floating_point():
                v = t.data.to(dtype)
                t.data = transform(v) if transform is not None else v
        buffers = dict(dup.named_buffers())
        for n in ones_buffers:
            if n in buffers:
                buffers[n].fill_(1)
    if frozen:
        for p in dup.parameters():
            p.requires_grad_(False)
    return dup


def private_copy(model: nn.Module, targets: Mapping[str, Target], dtype: torch.dtype, *,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, train_mode: bool = False):
    """A deep copy of ``model`` for scorers that evaluate the same transformed network many times
    (iterative pruning with a ``cache``): floating parameters and buffers cast to ``dtype`` and
    passed through ``transform``, every parameter frozen except the targets' slots, each target's
    own ``<attr>_mask`` buffer set to ones, and the copy in train or eval mode for good.

    Returns ``(copy, slots)`` with ``slots[name]`` the copy's parameter for target ``name``, or None
    when the model cannot be deep-copied (the caller then evaluates functionally)."""
    try:
        dup = cast_copy(model, dtype, transform=transform,
                        ones_buffers=[t.mask_buffer for t in targets.values() if t.mask_buffer is not None])
    except Exception:  # a module holding something deepcopy refuses; not worth failing over
        return None
    dup.train(bool(train_mode))
    params = dict(dup.named_parameters())
    slots = OrderedDict((n, params[tg.param_name].requires_grad_(True)) for n, tg in targets.items())
    return dup, slots


def finite_model(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *,
                 weights_only: bool = False) -> nn.Module:
    """``model`` itself when every parameter and buffer it computes with is finite; a copy whose
    pruned entries holding NaN/inf are 0 when only pruned entries are non-finite (a pruned weight
    contributes nothing, whatever it holds: ``inf * 0`` would be nan); otherwise ValueError naming
    the tensor. Meta tensors (no values) are refused by name as well. One summing pass over the
    model: cheap beside any forward pass. ``weights_only``: only the scored weights are looked at
    (a method that never runs the network, such as random or magnitude pruning, does not care
    about a NaN bias)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_meta:
            raise ValueError(f"model: {name} is on the meta device (shape only, no values); materialise the model "
                             "first, e.g. model.to_empty(device='cpu') and initialise it")
    keep = None
    if weights_only or masks is not None:  # the masks are checked whatever the weights hold
        keep = _kept(model, masks)
    to_zero = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or not t.is_floating_point() and not t.is_complex() or weights_only and name not in keep:
            continue
        if _all_finite(t.detach()):
            continue
        if keep is None:
            keep = _kept(model, masks)
        bad = ~torch.isfinite(t.detach())
        kept = bad & keep[name] if name in keep else bad
        n = int(kept.sum())
        if n:
            where = "entries the masks keep" if name in keep else "it"
            raise ValueError(f"model: {name} holds {n} NaN/inf value(s) in {where}; the network's output would not be "
                             "finite (only pruned entries may hold non-finite values)")
        to_zero[name] = bad
    if not to_zero:
        return model
    dup = copy_model(model)
    tensors = dict(dup.named_parameters())
    with torch.no_grad():
        for name, bad in to_zero.items():
            tensors[name].masked_fill_(bad, 0)
    return dup


def _kept(model: nn.Module, masks) -> dict:
    from .targets import resolve_targets

    if masks is None and not _has_weights(model):
        return {}
    return {t.param_name: t.mask for t in resolve_targets(model, masks).values()}


def _all_finite(t: torch.Tensor) -> bool:
    # One reduction instead of isfinite's five passes: a NaN or inf entry makes the sum NaN or
    # inf, and a sum of finite entries that overflows only sends the tensor to the exact check.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def finite_weights(fn: Callable = None, *, weights_only: bool = False) -> Callable:
    """Decorator: ``fn(model, masks, ...)`` (``masks`` positional or keyword) computes on the model
    that :func:`finite_model` returns for ``(model, masks)`` (with ``weights_only``)."""
    import functools
    import inspect

    if fn is None:
        return functools.partial(finite_weights, weights_only=weights_only)
    names = list(inspect.signature(fn).parameters)
    at = names.index("masks") if "masks" in names else None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if args and isinstance(args[0], nn.Module):
            masks = args[at] if at is not None and len(args) > at else kwargs.get("masks")
            if masks is None or isinstance(masks, Mapping):  # anything else: fn's own check names it
                args = (_finite_once(args[0], masks, weights_only, kwargs.get("cache")),) + args[1:]
        return fn(*args, **kwargs)

    return run


class RunCache(dict):
    """The per-run cache the pruning loop hands a method that takes one (a dict kept across the
    calls on the same, unchanged model), with ``notes``: what the method wrappers and scorers
    remember between rounds about the model itself (its finiteness, its scored parameters) apart
    from the dict's entries, which a method owns and its tests count. A plain dict as cache works
    the same, with nothing remembered in notes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes: dict = {}


def run_notes(cache) -> Optional[dict]:
    """``cache.notes`` of a :class:`RunCache`, else None."""
    return cache.notes if isinstance(cache, RunCache) else None


def _finite_once(model: nn.Module, masks, weights_only: bool, cache) -> nn.Module:
    """:func:`finite_model`, skipped on the later calls of a pruning run (its :class:`RunCache`)
    once the model was found finite throughout: that verdict does not depend on the masks, and the
    check (an isfinite pass over every tensor, a host sync each) cost as much as a round's forward
    pass."""
    notes = run_notes(cache)
    if notes is None:
        return finite_model(model, masks, weights_only=weights_only)
    key = ("finite model", weights_only)
    if notes.get(key) is model:
        return model
    out = finite_model(model, masks, weights_only=weights_only)
    if out is model:  # otherwise pruned NaN/inf entries were zeroed in a copy, which the masks decide
        notes[key] = model
    return out


def _has_weights(model: nn.Module) -> bool:
    from .targets import prunable_parameters

    return bool(prunable_parameters(model))
