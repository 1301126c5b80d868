"""The trainer's data, read once per epoch: what a user may pass as a training or test set, and the
checks each batch gets on the way.

- an ntkfast dataset (:class:`~ntkfast.data.ImageDataset`, ``GaussianNoise``: anything with a
  ``batches`` method) is read through that method, whole tensors at a time;
- a torch map-style ``Dataset``, or any sized, indexable collection whose items are single samples
  ``(input, label)``, through a ``DataLoader`` made here, shuffled from the trainer's seed;
- an ``IterableDataset`` through a ``DataLoader`` made here, in its own order;
- anything else iterable (a ``DataLoader``, a list of ``(inputs [N, ...], labels [N])`` batches,
  an object whose ``__iter__`` starts afresh each time) as batches, as they come: its batch size
  and order are its own.

A one-shot iterator (a generator) is refused: it would be empty from the second epoch on, and the
trainer reads a first batch before training, to check that the data fits the model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .batches import _describe

__all__ = ["BatchSource", "as_source", "check_batch"]

Batch = Tuple[torch.Tensor, torch.Tensor]

_WANTED = ("a dataset of (input, label) samples, or an iterable of (inputs, labels) batches that can be "
           "read again each epoch (a DataLoader, a list)")


def check_batch(item, where: str) -> Batch:
    """``item`` as ``(inputs, labels)``, labels int64 class indices, or ValueError naming ``where``."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ValueError(f"{where}: expected a pair (inputs, labels), got {_describe(item)}")
    x, y = item
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"{where}: expected a pair of tensors (inputs, labels), got "
                         f"({type(x).__name__}, {type(y).__name__})")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be a 1-D tensor of integer class indices, got "
                         f"{y.dtype} of shape {tuple(y.shape)}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: inputs of shape {tuple(x.shape)} for {y.shape[0]} labels (batch sizes differ)")
    return x, y.long()


def _is_batch(item) -> bool:
    """A pair whose label part has a batch dimension: a batch, not one sample."""
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor)
            and item[1].dim() >= 1)


class BatchSource:
    """One of the kinds of data the module's text lists, with what the trainer asks of it."""

    def __init__(self, data, name: str, kind: str):
        self.data, self.name, self.kind = data, name, kind

    def __len__(self) -> int:  # the samples of a dataset, the batches of a collection of batches
        return len(self.data)

    def sized(self) -> bool:
        try:
            len(self.data)
        except TypeError:
            return False
        return True

    def num_batches(self, batch_size: int) -> Optional[int]:
        """Batches per epoch, where that is known before reading them."""
        if not self.sized():
            return None
        if self.kind == "batches":
            return len(self.data)
        return -(-len(self.data) // batch_size)

    @property
    def targets(self) -> Optional[torch.Tensor]:
        """Every label of a dataset that keeps them together (an ntkfast dataset), else None."""
        t = getattr(self.data, "targets", None) if self.kind != "batches" else None
        return t if isinstance(t, torch.Tensor) else None

    def batches(self, batch_size: int, shuffle: bool, seed: int, device, augment=None) -> Iterator[Batch]:
        """One epoch of checked batches on ``device``. ``batch_size``, ``shuffle`` and ``seed``
        apply to the datasets; a collection of batches is read as it is. ``augment``: only for
        the datasets that take it (:meth:`takes_augment`)."""
        if augment is not None:
            it = self.data.batches(batch_size, shuffle=shuffle, seed=seed, device=device, augment=augment)
        elif self.kind == "ntkfast":
            it = self.data.batches(batch_size, shuffle=shuffle, seed=seed, device=device)
        elif self.kind == "batches":
            it = iter(self.data)
        else:
            shuffle = shuffle and self.kind == "samples"  # an IterableDataset has no indices to permute
            g = torch.Generator()
            g.manual_seed(seed)
            it = iter(DataLoader(self.data, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None))
        for i, item in enumerate(it):
            x, y = check_batch(item, f"{self.name} batch {i}")
            yield x.to(device), y.to(device)

    def takes_augment(self) -> bool:
        """Whether batched augmentation applies: a dataset whose ``batches`` hands it raw pixels."""
        import inspect

        fn = getattr(self.data, "batches", None) if self.kind == "ntkfast" else None
        return fn is not None and "augment" in inspect.signature(fn).parameters

    def first_sample(self) -> Optional[Batch]:
        """The first input with a batch dimension of 1, and its label(s), to try the model on
        before training; None where a dataset cannot be indexed so (its first step will tell)."""
        if self.kind in ("ntkfast", "samples"):
            try:
                item = self.data[0]
            except Exception:
                return None
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"{self.name}: expected (input, label) samples, got {_describe(item)}")
            if not isinstance(item[0], torch.Tensor):
                return None
            return item[0].unsqueeze(0), torch.as_tensor(item[1]).reshape(-1)
        x, y = self.first_batch(1, "cpu")
        return x[:1], y

    def first_batch(self, batch_size: int, device) -> Batch:
        """The first batch of an unshuffled epoch, read without moving on any random state: the
        global RNG (random transforms, a DataLoader without a generator) and a DataLoader's own
        generators are as they were, so that training then draws what it would have drawn."""
        with _kept_random_state(self.data):
            batch = next(iter(self.batches(batch_size, False, 0, device)), None)
        if batch is None:
            raise ValueError(f"{self.name} gave no batches")
        return batch


@contextlib.contextmanager
def _kept_random_state(data):
    found = [data, getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    gens = {id(g): g for g in (getattr(o, "generator", None) for o in found) if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in gens.values()]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for g, state in states:
            g.set_state(state)


def as_source(data, name: str) -> BatchSource:
    """``data`` as a :class:`BatchSource`, or ValueError naming ``name`` for what cannot be read
    epoch after epoch."""
    if isinstance(data, BatchSource):
        return data
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or data is None:
        raise ValueError(f"{name}: expected {_WANTED}, got {_describe(data)}")
    if callable(getattr(data, "batches", None)):
        return BatchSource(data, name, "ntkfast")
    if isinstance(data, IterableDataset):
        return BatchSource(data, name, "iterable")
    if isinstance(data, Dataset):
        return BatchSource(data, name, "samples")
    if isinstance(data, DataLoader):
        return BatchSource(data, name, "batches")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError(f"{name} is empty")
        return BatchSource(data, name, "batches" if _is_batch(data[0]) else "samples")
    if not hasattr(data, "__iter__"):
        raise ValueError(f"{name}: expected {_WANTED}, got {_describe(data)}")
    if iter(data) is data:
        raise ValueError(f"{name}: got a one-shot iterator ({type(data).__name__}), which would be empty after "
                         "the first epoch; pass a list of batches, a DataLoader, or an object whose __iter__ "
                         "starts afresh")
    return BatchSource(data, name, "batches")
