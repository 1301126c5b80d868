"""Labelled batches as the methods take them: what a user may pass as ``data``, normalised to a
list of ``(inputs, class indices)``; this process's share of them; the shape of one input."""
from __future__ import annotations

from typing import List, Mapping, Tuple

import torch
from torch import nn

from .checks import check_shape

__all__ = ["Batch", "as_batches", "shard_batches", "resolve_input_shape", "cast_input"]

Batch = Tuple[torch.Tensor, torch.Tensor]


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


def _is_multi_input(data) -> bool:
    """``((x1, x2, ...), targets)``: one batch of a model with several inputs (not two batches,
    whose second item would be a pair too)."""
    return (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)
            and isinstance(data[0], (tuple, list)) and len(data[0]) > 0
            and all(isinstance(t, torch.Tensor) for t in data[0]))


def as_batches(data, name: str = "data", *, device=None) -> List[Batch]:
    """Normalise ``data`` — a labelled batch ``(inputs, targets)`` of tensors, or an iterable of
    such batches (a DataLoader, a list, a generator) — into a list of ``(x, y)`` pairs, ``y`` as
    int64 class indices, moved to ``device`` if given. Raises ValueError naming ``name`` for a
    wrong structure, an empty iterable, inputs and targets of different batch sizes, non-finite
    inputs, or targets that are not class indices (integers >= 0)."""
    if data is None:
        raise ValueError(f"{name}: a labelled batch (inputs, targets) or an iterable of such batches is needed, got None")
    if _is_pair(data):
        items = [data]
    elif _is_multi_input(data):
        raise ValueError(f"{name}: the inputs are a {type(data[0]).__name__} of {len(data[0])} tensors (a model taking "
                         "several inputs); ntkfast feeds a model one input tensor: wrap the model so that it takes "
                         "one (e.g. the inputs concatenated, split again inside its forward)")
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
        if x.is_meta or y.is_meta:
            raise ValueError(f"{where}: meta tensors have no values")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{where}: the inputs hold {int((~torch.isfinite(x)).sum())} NaN/inf value(s)")
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"{where}: targets must be class indices >= 0, got {int(y.min())}")
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


def resolve_input_shape(model: nn.Module, input_shape=None, data=None) -> Tuple[int, ...]:
    """Shape of one input example (no batch dimension): ``input_shape`` if given, else the model's
    ``input_shape`` attribute, else the shape of the inputs in ``data`` (a tensor batch or labelled
    batches) without their batch dimension; ValueError naming ``input_shape`` otherwise."""
    if input_shape is not None:
        return check_shape(input_shape, "input_shape")
    attr = getattr(model, "input_shape", None)
    if attr is not None:
        return check_shape(attr, f"input_shape: {type(model).__name__}.input_shape")
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
