"""Shared machinery of the scorers: which tensors are scored under which masks, functional
evaluation of the masked network on copies of the model's state, data and input-shape handling,
the float64 fallback and score normalisation.

A scorer built from these pieces never changes the model: it evaluates ``model`` with
:func:`torch.func.functional_call` on detached copies of every parameter and buffer
(:func:`state_copy`), inside :func:`scoring_mode`, which sets the train/eval flags for the call and
restores them (and any plain tensor attribute a forward hook re-assigns, such as the ``weight``
that torch.nn.utils.prune recomputes) afterwards. Gradients are taken with
:func:`torch.autograd.grad` with respect to leaves of those copies, so no ``.grad`` field and no
``requires_grad`` flag of the model is touched.

The masked network. Each scored tensor (a :class:`Target`) has an *effective mask*: the caller's
mask AND, when its module carries one, the module's own ``<attr>_mask`` buffer (torch.nn.utils.prune
hooks, or masked layers in the style of Synaptic-Flow that compute ``weight_mask * weight``). A
scorer decides the effective weight the module must use (typically ``theta * mask``) and
:func:`substitute` puts it into the parameter's slot of the state while setting the module's own
mask buffer to ones, so that whatever masking mechanism the module has, it computes with exactly
that weight. The mask therefore acts once, whichever way it is stored.

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

import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import prunable_parameters

__all__ = [
    "Target",
    "resolve_targets",
    "resolve_dtype",
    "model_device",
    "state_copy",
    "leaves",
    "masked",
    "substitute",
    "scoring_mode",
    "functional_forward",
    "copy_model",
    "cast_copy",
    "private_copy",
    "as_batches",
    "resolve_input_shape",
    "cast_input",
    "cross_entropy",
    "grad_dict",
    "all_finite",
    "with_float64_fallback",
    "remember_float64",
    "divide_by_total",
    "finish",
    "shard_batches",
]

Batch = Tuple[torch.Tensor, torch.Tensor]


# -- what is scored ------------------------------------------------------------------------------
class Target(NamedTuple):
    """One scored tensor.

    ``name``: the mask name (``<module>.weight``); ``param_name``: the name of the tensor in
    ``model.named_parameters()`` (``<module>.weight_orig`` under torch.nn.utils.prune hooks);
    ``param``: the model's parameter itself (read, never written); ``mask``: the effective bool mask
    (caller's mask AND the module's own mask buffer), on the parameter's device; ``mask_buffer``:
    the name in ``model.named_buffers()`` of the module's own ``<attr>_mask`` buffer, or None.
    """

    name: str
    param_name: str
    param: torch.Tensor
    mask: torch.Tensor
    mask_buffer: Optional[str]

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective mask as 0/1 values of ``dtype``."""
        return self.mask.to(dtype)


def resolve_targets(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None) -> "OrderedDict[str, Target]":
    """The tensors to score, in the order of ``masks`` (default: all ones over
    :func:`ntkfast.masks.prunable_parameters`), with their effective masks.

    Raises ValueError naming ``masks`` for unknown names, wrong shapes or non-tensors, and naming
    ``model`` when it has no prunable weight."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if masks is None:
        params = prunable_parameters(model)
        if not params:
            raise ValueError(
                f"model: no prunable weights found in {type(model).__name__} "
                "(expected Linear or Conv1d/2d/3d modules)"
            )
        masks = OrderedDict((n, torch.ones_like(p, dtype=torch.bool)) for n, p in params.items())
    elif not isinstance(masks, Mapping):
        raise ValueError(f"masks: expected a mapping name -> bool tensor (e.g. ntkfast.Masks), got {type(masks).__name__}")
    if len(masks) == 0:
        raise ValueError("masks: empty; nothing to score")
    named_params = dict(model.named_parameters())
    named_buffers = dict(model.named_buffers())
    out: "OrderedDict[str, Target]" = OrderedDict()
    for name, m in masks.items():
        if name in named_params:
            pname = name
        elif name + "_orig" in named_params:
            pname = name + "_orig"
        else:
            raise ValueError(f"masks: the model has no parameter for mask {name!r}")
        p = named_params[pname]
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"masks[{name!r}]: expected a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"masks[{name!r}]: shape {tuple(m.shape)} but the parameter has shape {tuple(p.shape)}")
        mask = m.detach().to(device=p.device)
        if mask.dtype != torch.bool:
            mask = mask != 0
        bname = name + "_mask"
        buf = named_buffers.get(bname)
        if buf is not None and tuple(buf.shape) == tuple(p.shape):
            mask = mask & (buf.detach().to(p.device) != 0)
        else:
            bname = None
        out[name] = Target(name, pname, p, mask, bname)
    return out


def resolve_dtype(targets: Mapping[str, Target], dtype=None) -> torch.dtype:
    """The computation dtype: ``dtype`` (a floating torch.dtype or its name, e.g. "float64"), or
    None for the dtype of the first scored parameter."""
    if dtype is None:
        first = next(iter(targets.values())).param
        return first.dtype if first.is_floating_point() else torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype such as torch.float64, got {dtype!r}")
    return dtype


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# -- the functional state ------------------------------------------------------------------------
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


def functional_forward(
    model: nn.Module, state: Mapping[str, torch.Tensor], x, *, train_mode: bool = False
) -> torch.Tensor:
    """``model(x)`` computed with ``state`` in place of its parameters and buffers, in eval mode
    (train mode with ``train_mode=True``; BatchNorm then updates the copies in ``state``, not the
    model). Returns the output tensor (the first element of a tuple/list output)."""
    with scoring_mode(model, train_mode):
        out = torch.func.functional_call(model, dict(state), (x,))
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
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


# -- data ----------------------------------------------------------------------------------------
def _is_pair(obj) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[0], torch.Tensor)
        and isinstance(obj[1], torch.Tensor)
    )


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    return f"a {type(obj).__name__}"


def as_batches(data, name: str = "data", *, device=None) -> List[Batch]:
    """Normalise ``data`` — a labelled batch ``(inputs, targets)`` of tensors, or an iterable of
    such batches (a DataLoader, a list, a generator) — into a list of ``(x, y)`` pairs, ``y`` as
    int64 class indices, moved to ``device`` if given. Raises ValueError naming ``name`` for a
    wrong structure, an empty iterable, inputs and targets of different batch sizes, or targets
    that are not integer class indices."""
    if data is None:
        raise ValueError(f"{name}: a labelled batch (inputs, targets) or an iterable of such batches is needed, got None")
    if _is_pair(data):
        items = [data]
    elif isinstance(data, torch.Tensor):
        raise ValueError(
            f"{name}: got a single tensor of shape {tuple(data.shape)}; expected a labelled batch "
            "(inputs, targets) or an iterable of such batches"
        )
    elif isinstance(data, (Mapping, str, bytes)):
        raise ValueError(f"{name}: expected a labelled batch (inputs, targets) or an iterable of them, got {_describe(data)}")
    else:
        try:
            items = list(iter(data))
        except TypeError:
            raise ValueError(
                f"{name}: expected a labelled batch (inputs, targets) or an iterable of them, got {_describe(data)}"
            ) from None
        if not items:
            raise ValueError(f"{name}: no batches (the iterable is empty)")
    out: List[Batch] = []
    for i, item in enumerate(items):
        where = f"{name}" if len(items) == 1 and item is data else f"{name} batch {i}"
        if not _is_pair(item):
            raise ValueError(f"{where}: expected a pair (inputs, targets) of tensors, got {_describe(item)}")
        x, y = item
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"{where}: inputs must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        if y.dim() < 1:
            raise ValueError(f"{where}: targets must have a batch dimension, got shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} targets (batch sizes differ)")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{where}: targets must be integer class indices, got dtype {y.dtype}")
        y = y.to(torch.long)
        if device is not None:
            x, y = x.to(device), y.to(device)
        out.append((x, y))
    return out


def shard_batches(batches: List[Batch], shard, train_mode: bool) -> List[Tuple[torch.Tensor, torch.Tensor, float]]:
    """This process's share of a sum over ``batches`` of mean losses, as (x, y, weight) with the loss
    of (x, y) to be multiplied by weight: whole batches in contiguous blocks when they divide
    evenly over the processes or in train mode (BatchNorm must see each batch whole); otherwise
    (eval mode) a contiguous block of rows of every batch, weighted by its share of the batch, which
    is exact because an eval-mode mean loss is the weighted sum of the losses of its row blocks."""
    if not shard.split:
        return [(x, y, 1.0) for x, y in batches]
    if train_mode or len(batches) % shard.size == 0:
        return [(batches[i][0], batches[i][1], 1.0) for i in shard.block(len(batches))]
    out = []
    for x, y in batches:
        rows = shard.block(x.shape[0])
        if len(rows):
            out.append((x[rows.start:rows.stop], y[rows.start:rows.stop], len(rows) / x.shape[0]))
    return out


def _check_shape(shape, where: str) -> Tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"input_shape: {where} must be a sequence of positive ints, got {shape!r}") from None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"input_shape: {where} must be a non-empty sequence of positive ints, got {shape!r}")
    return dims


def resolve_input_shape(model: nn.Module, input_shape=None, data=None) -> Tuple[int, ...]:
    """Shape of one input example (no batch dimension): ``input_shape`` if given, else the model's
    ``input_shape`` attribute, else the shape of the inputs in ``data`` (a tensor batch or labelled
    batches) without their batch dimension; ValueError naming ``input_shape`` otherwise."""
    if input_shape is not None:
        return _check_shape(input_shape, "the argument")
    attr = getattr(model, "input_shape", None)
    if attr is not None:
        return _check_shape(attr, f"{type(model).__name__}.input_shape")
    if data is not None:
        x = data if isinstance(data, torch.Tensor) else as_batches(data, "data")[0][0]
        if x.dim() < 2:
            raise ValueError(f"input_shape: cannot infer it from data inputs of shape {tuple(x.shape)}; pass input_shape")
        return tuple(int(d) for d in x.shape[1:])
    raise ValueError(
        f"input_shape: cannot tell the input shape of {type(model).__name__}; pass input_shape=(C, H, W) "
        "(one example, no batch dimension), give the model an `input_shape` attribute, or pass data"
    )


def cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating inputs cast to the computation dtype; integer inputs (token ids) unchanged."""
    return x.to(dtype) if x.is_floating_point() else x


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, as nn.CrossEntropyLoss() in the authors' code."""
    return F.cross_entropy(logits, y)


# -- gradients, overflow, normalisation ----------------------------------------------------------
def grad_dict(
    output: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, create_graph: bool = False
) -> "OrderedDict[str, torch.Tensor]":
    """``d output / d inputs[name]`` for every name (zeros where ``output`` does not depend on it)."""
    names = list(inputs)
    tensors = [inputs[n] for n in names]
    if not output.requires_grad:
        return OrderedDict((n, torch.zeros_like(t)) for n, t in zip(names, tensors))
    grads = torch.autograd.grad(output, tensors, create_graph=create_graph, allow_unused=True)
    return OrderedDict(
        (n, g if g is not None else torch.zeros_like(t)) for n, t, g in zip(names, tensors, grads)
    )


def _floating_tensors(objs, out: list) -> list:
    for obj in objs:
        if isinstance(obj, Mapping):
            _floating_tensors(obj.values(), out)
        elif isinstance(obj, (list, tuple)):
            _floating_tensors(obj, out)
        elif isinstance(obj, torch.Tensor) and obj.is_floating_point():
            out.append(obj.detach())
    return out


def all_finite(*objs) -> bool:
    """True when every tensor given (directly, or as values of a mapping, or in a list) is finite.

    Tested through each tensor's sum: an inf or NaN anywhere makes the sum non-finite, and one
    reduction per tensor with a single host sync costs far less than an elementwise isfinite over
    every score each round. A sum can also overflow while every entry is finite; then this says
    False and the caller recomputes in float64, which is merely cautious."""
    tensors = _floating_tensors(objs, [])
    if not tensors:
        return True
    by_device: Dict[torch.device, list] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.sum().double())
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())


def remember_float64(cache: Optional[dict], scorer: str, failed: torch.dtype) -> None:
    """Note in a per-run ``cache`` that ``scorer`` needs float64 on this model, and drop what it
    cached for the ``failed`` dtype (cache keys are ``(scorer, dtype)`` by convention)."""
    if cache is None:
        return
    cache[("float64 fallback", scorer)] = True
    for key in [k for k in cache if isinstance(k, tuple) and len(k) == 2 and k == (scorer, failed)]:
        del cache[key]


def with_float64_fallback(
    compute: Callable[[torch.dtype], Tuple[Mapping[str, torch.Tensor], bool]],
    targets: Mapping[str, Target],
    dtype=None,
    *,
    scorer: str,
    cache: Optional[dict] = None,
):
    """Run ``compute(dt)`` in the computation dtype (see :func:`resolve_dtype`); ``compute`` returns
    ``(scores, finite)`` where ``finite`` says the forward outputs and the raw scores had no inf/nan.
    If they had and ``dt`` is not float64, warn once (RuntimeWarning) and recompute in float64.
    Returns the scores of the last computation."""
    dt = resolve_dtype(targets, dtype)
    remembered = ("float64 fallback", scorer)
    if cache is not None and cache.get(remembered):
        dt = torch.float64  # an earlier call on this model already needed it: skip the retry
    with torch.enable_grad():
        scores, finite = compute(dt)
        if finite or dt == torch.float64:
            return scores
        warnings.warn(
            f"{scorer}: the {str(dt).replace('torch.', '')} computation overflowed (inf/nan in the network "
            "output or the scores); recomputing in float64",
            RuntimeWarning,
            stacklevel=3,
        )
        remember_float64(cache, scorer, dt)
        scores, finite = compute(torch.float64)
    if not finite:
        warnings.warn(f"{scorer}: the scores are not finite even in float64", RuntimeWarning, stacklevel=3)
    return scores


def divide_by_total(
    scores: Mapping[str, torch.Tensor], *, abs_total: bool = False, eps: float = 0.0
) -> "OrderedDict[str, torch.Tensor]":
    """Scores divided by their sum over all tensors (``|sum| + eps`` with ``abs_total``). A zero or
    non-finite total leaves the scores as they are (the authors' code would return nan)."""
    names = list(scores)
    dev = scores[names[0]].device
    total = torch.stack([scores[n].sum().to(dev) for n in names]).sum()
    norm = total.abs() + eps if abs_total else total
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return OrderedDict((n, scores[n]) for n in names)
    return OrderedDict((n, scores[n] / norm.to(scores[n].device)) for n in names)


def finish(scores: Mapping[str, torch.Tensor], targets: Mapping[str, Target]) -> "OrderedDict[str, torch.Tensor]":
    """Detached scores in the order of ``targets``, each on its parameter's device and of its shape."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for n, t in targets.items():
        s = scores[n].detach()
        out[n] = s.to(t.param.device).reshape(t.param.shape)
    return out
