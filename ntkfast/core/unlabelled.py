"""Unlabelled inputs for label-free methods (Neural Tangent Transfer): one view over the many
shapes a user's data comes in, with a held-out validation slice and seeded epochs of batches.

Accepted: an input tensor ``[N, ...]``; a pair ``(inputs, targets)`` (targets ignored); an
ntkfast dataset (``ntkfast.data``; read through its fast ``batches``); a map-style torch Dataset
(items ``x`` or ``(x, ...)``); or any other iterable of batches, a list or a DataLoader (tensors
or tuples whose first element is the input), which is read once into memory. The inputs are
real-valued, or token ids (an integer tensor) where the caller says the model embeds them.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from .tokens import ID_DTYPES


def _first(item):
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("data: an empty item")
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"data: expected input tensors (or tuples whose first element is one), got {type(item).__name__}")
    return item


def accepted_inputs(x: torch.Tensor, ids: bool) -> bool:
    """Real-valued inputs, or (``ids``: for a model that embeds them) integer token ids."""
    return x.is_floating_point() or (ids and x.dtype in ID_DTYPES)


def _is_labelled_pair(data) -> bool:
    """(inputs [N, ...], labels [N] or one-hot [N, K]): the labels are integers, 1-d, or shaped
    unlike the inputs (two input batches of the same shape are not a pair)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        return False
    x, y = data
    if x.dim() < 2 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        return False
    return y.dim() == 1 or not y.is_floating_point() or (y.dim() == 2 and y.shape[1:] != x.shape[1:])


class Unlabelled:
    """Indexable unlabelled inputs: ``take(idx)`` returns the inputs at those indices as one batch."""

    def __init__(self, data, name: str = "data", *, ids: bool = False):
        self._tensor: Optional[torch.Tensor] = None
        self._dataset = None
        self._fast = False
        if isinstance(data, torch.Tensor):
            self._tensor = data
        elif _is_labelled_pair(data):
            self._tensor = data[0]  # a labelled batch: the labels are not used
        elif hasattr(data, "batches") and hasattr(data, "subset") and hasattr(data, "__len__"):
            self._dataset, self._fast = data, True
        elif (hasattr(data, "__getitem__") and hasattr(data, "__len__")
              and not isinstance(data, (str, bytes, dict, list, tuple))):  # lists: of batches
            self._dataset = data
        else:
            try:
                items = [_first(b) for b in data]
            except TypeError:
                raise ValueError(f"{name}: expected input tensors, a dataset or an iterable of batches, "
                                 f"got {type(data).__name__}") from None
            if not items:
                raise ValueError(f"{name}: no batches (the iterable is empty)")
            shapes = {tuple(t.shape[1:]) for t in items}
            if len(shapes) != 1:
                raise ValueError(f"{name}: batches have different sample shapes {sorted(shapes)}")
            self._tensor = torch.cat(items)
        if self._tensor is not None and (self._tensor.dim() < 2 or not accepted_inputs(self._tensor, ids)):
            raise ValueError(f"{name}: expected a floating-point input tensor [N, ...]"
                             f"{' or token ids (integers)' if ids else ''}, got "
                             f"{self._tensor.dtype} {tuple(self._tensor.shape)}")
        if len(self) == 0:
            raise ValueError(f"{name}: no samples")

    def __len__(self) -> int:
        return self._tensor.shape[0] if self._tensor is not None else len(self._dataset)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self._tensor is not None:
            return self._tensor[idx.to(self._tensor.device)]
        if self._fast:
            return next(iter(self._dataset.subset(idx).batches(len(idx))))[0]
        return torch.stack([_first(self._dataset[int(i)]) for i in idx])

    def epoch(self, indices: torch.Tensor, batch_size: int, seed: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """Batches over ``indices`` in an order drawn from ``seed``, from batch number ``skip`` on
        (a resumed run); a last batch with fewer than two samples is dropped (it cannot be split
        into two halves)."""
        g = torch.Generator().manual_seed(int(seed))
        order = indices[torch.randperm(len(indices), generator=g)]
        for start in range(skip * batch_size, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) >= 2:
                yield self.take(idx)

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int) -> int:
        full, rest = divmod(n, batch_size)
        return full + (1 if rest >= 2 else 0) if n >= 2 else 0

    @staticmethod
    def check_batch_size(batch_size) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size: expected an int >= 2 (each batch is split in two halves), got {batch_size!r}")
        return batch_size


def split_validation(source: Unlabelled, validation, name: str = "validation", *, ids: bool = False):
    """(training indices, validation inputs). An int holds out that many samples from the end
    of the data; a tensor is used as it is and nothing is held out; 0 or None: no validation."""
    n = len(source)
    all_idx = torch.arange(n)
    if validation is None or (isinstance(validation, int) and not isinstance(validation, bool) and validation == 0):
        return all_idx, None
    if isinstance(validation, torch.Tensor):
        if validation.dim() < 2 or validation.shape[0] < 2 or not accepted_inputs(validation, ids):
            raise ValueError(f"{name}: expected at least two floating-point validation inputs [N, ...]"
                             f"{' or token ids' if ids else ''}, got "
                             f"{validation.dtype} {tuple(validation.shape)}")
        return all_idx, validation
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 2:
        raise ValueError(f"{name}: expected a number of held-out samples >= 2, a tensor of inputs, or None; got {validation!r}")
    if n - validation < 2:
        raise ValueError(f"{name}: holding out {validation} of {n} samples leaves fewer than 2 to train on")
    return all_idx[: n - validation], source.take(all_idx[n - validation:])


def total_steps(n_train: int, batch_size: int, steps, epochs) -> int:
    per_epoch = Unlabelled.batches_per_epoch(n_train, batch_size)
    if steps is not None:
        return steps
    return int(math.ceil(epochs * per_epoch))
