"""The in-memory datasets every reader returns (:class:`ImageDataset`), the Gaussian-noise
dataset of the data-free methods, and :func:`mean_input`.

An :class:`ImageDataset` keeps uint8 images ``[N, C, H, W]`` and int64 targets in memory and
converts on access: ``dataset[i]`` gives ``(x, y)`` with ``x`` float32, scaled to [0, 1] and
normalised with the dataset's mean and std (unless ``normalize=False``). ``batches`` yields
whole-tensor batches, far faster than a DataLoader indexing one item at a time.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..core.checks import check_int

__all__ = ["ImageDataset", "GaussianNoise", "mean_input", "Normalizing"]


def _batch_order(n: int, shuffle: bool, seed: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return torch.randperm(n, generator=g)


def _batch_slices(n: int, batch_size, shuffle: bool, seed: int, drop_last: bool, device=None):
    """(start, indices) of each batch over n items, in a seeded order when shuffling (drawn on the
    CPU, so the order is the same on every device; moved to ``device`` once, not per batch)."""
    batch_size = check_int(batch_size, "batch_size", lo=1)
    order = _batch_order(n, shuffle, seed)
    if device is not None and torch.device(device).type != "cpu":
        order = order.to(device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield start, order[start:start + batch_size]


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` along dim 0. On the CPU via numpy, whose fancy indexing of uint8 rows is far
    faster than torch's (for a 128-image CIFAR batch: microseconds instead of milliseconds)."""
    if t.device.type == "cpu" and idx.device.type == "cpu" and not t.requires_grad:
        return torch.from_numpy(t.numpy()[idx.numpy()])
    return t.index_select(0, idx.to(t.device))


def _subset_indices(n_or_indices, length: int) -> torch.Tensor:
    if isinstance(n_or_indices, bool):
        raise ValueError(f"n_or_indices must be an int or a sequence of indices, got {n_or_indices!r}")
    if isinstance(n_or_indices, int):
        if not 0 <= n_or_indices <= length:
            raise ValueError(f"n_or_indices: asked for the first {n_or_indices} of {length} items")
        return torch.arange(n_or_indices)
    idx = torch.as_tensor(n_or_indices)
    if idx.dtype == torch.bool:
        if idx.shape != (length,):
            raise ValueError(f"n_or_indices: a bool mask must have shape ({length},), got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    if idx.dim() != 1 or (idx.numel() and (idx.dtype.is_floating_point or idx.dtype.is_complex)):
        raise ValueError("n_or_indices must be an int or a 1-d sequence of integer indices")
    idx = idx.to(torch.long)
    if idx.numel() and (int(idx.min()) < -length or int(idx.max()) >= length):
        raise ValueError(f"n_or_indices: index out of range for {length} items")
    return idx % length if idx.numel() else idx


class Normalizing:
    """What the two image datasets (in memory and read from a folder) share: uint8 images to the
    float32 inputs their items are (scaled to [0, 1] and, when ``normalize``, normalised per
    channel with ``mean`` and ``std``), and the counts of their batches and classes."""

    def _init_normalizing(self, mean: Sequence[float], std: Sequence[float], normalize: bool, channels: int) -> None:
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels})")
        if not all(math.isfinite(float(m)) for m in mean) or not all(math.isfinite(float(v)) and float(v) > 0 for v in std):
            raise ValueError(f"mean and std: expected finite values and std > 0, got mean {tuple(mean)}, std {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.normalize = bool(normalize)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(channels, 1, 1)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (``[C,H,W]`` or ``[B,C,H,W]``, any device) -> float32 as items are given."""
        x = images.to(torch.float32).div_(255.0)
        if self.normalize:
            x = x.sub_(self._mean.to(x.device)).div_(self._std.to(x.device))
        return x

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        batch_size = check_int(batch_size, "batch_size", lo=1)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def class_counts(self) -> List[int]:
        return torch.bincount(self.targets, minlength=self.num_classes).tolist()


class ImageDataset(Normalizing, Dataset):
    """Images kept as uint8 ``[N, C, H, W]`` with int64 targets; items are ``(x, y)``, ``x`` a
    float32 ``[C, H, W]`` in [0, 1], normalised as ``(x - mean) / std`` when ``normalize``.

    Attributes: ``images``, ``targets``, ``name``, ``train``, ``classes``, ``num_classes``,
    ``input_shape`` (``(C, H, W)``), ``mean`` and ``std`` (per-channel tuples), ``normalize``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], normalize: bool = True, name: str = "",
                 train: bool = True):
        images = torch.as_tensor(images)
        targets = torch.as_tensor(targets)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self._init_normalizing(mean, std, normalize, channels=images.shape[1])
        if targets.dim() != 1 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be a 1-d tensor of {images.shape[0]} labels, got {tuple(targets.shape)}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets: expected integer class labels, got dtype {targets.dtype}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(classes)):
            raise ValueError(f"targets: labels must lie in 0..{len(classes) - 1} (one per class name), got "
                             f"{int(targets.min())}..{int(targets.max())}")
        self.images = images
        self.targets = targets.to(torch.int64)
        self.classes = list(classes)
        self.name = name
        self.train = train

    # -- properties ------------------------------------------------------------------------------
    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (f"ImageDataset({self.name or '?'} {split}, n={len(self)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, normalize={self.normalize})")

    # -- access ----------------------------------------------------------------------------------
    def __getitem__(self, index) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.targets[index]

    def subset(self, n_or_indices) -> "ImageDataset":
        """The first ``n`` items (an int), or the items at the given indices (a sequence, a tensor,
        or a bool mask). The result holds copies of the selected images."""
        idx = _subset_indices(n_or_indices, len(self))
        return ImageDataset(_take(self.images, idx), _take(self.targets, idx), classes=self.classes,
                            mean=self.mean, std=self.std, normalize=self.normalize, name=self.name,
                            train=self.train)

    def to(self, device) -> "ImageDataset":
        """The dataset with its uint8 images and labels on ``device`` (itself where they already lie
        there): its batches are then cut, augmented and normalised there, with no copy from the
        host per step. CIFAR-10's 50,000 images take 150 MB of device memory."""
        device = torch.device(device)
        if self.images.device == device and self.targets.device == device:
            return self
        out = ImageDataset.__new__(ImageDataset)
        out.__dict__.update(self.__dict__)
        out.images, out.targets = self.images.to(device), self.targets.to(device)
        out._mean, out._std = self._mean.to(device), self._std.to(device)
        return out

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                device=None, augment=None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches of whole tensors. ``shuffle`` draws one permutation from a
        generator seeded with ``seed`` (the global RNG is not touched). With ``device``, the
        uint8 batch is moved there before conversion. ``augment`` (see :mod:`ntkfast.augment`):
        called on each uint8 batch where it lies, before normalisation, with a CPU generator
        seeded from ``seed`` (a stream apart from the shuffle's), so an epoch repeats exactly."""
        gen = None
        if augment is not None:
            # an odd multiplier mixes the seed so that the crops do not reuse the permutation's draws
            gen = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
        for start, idx in _batch_slices(len(self), batch_size, shuffle, seed, drop_last, self.images.device):
            if shuffle:
                imgs, y = _take(self.images, idx), _take(self.targets, idx)
            else:
                imgs, y = self.images[start:start + batch_size], self.targets[start:start + batch_size]
            if device is not None:
                imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment is not None:
                imgs = augment(imgs, gen)
            yield self.transform(imgs), y


class GaussianNoise(Dataset):
    """``n`` inputs drawn i.i.d. N(0, 1) with the given shape and uniformly random labels, for the
    data-free methods (and tests). Drawn once, from a generator seeded with ``seed``.

    Same interface as :class:`ImageDataset` where it makes sense: ``input_shape``,
    ``num_classes``, ``classes``, ``__len__``, ``__getitem__``, ``batches``, ``subset``.
    """

    def __init__(self, input_shape: Sequence[int], n: int, num_classes: int = 10, seed: int = 0):
        try:
            shape = tuple(int(s) for s in input_shape)
        except TypeError:
            raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from None
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
        n = check_int(n, "n", lo=1)
        num_classes = check_int(num_classes, "num_classes", lo=1)
        g = torch.Generator()
        g.manual_seed(int(seed))
        self.inputs = torch.randn((n, *shape), generator=g)
        self.targets = torch.randint(num_classes, (n,), generator=g)
        self.input_shape = shape
        self.num_classes = num_classes
        self.classes = [str(i) for i in range(num_classes)]
        self.seed = seed
        self.name = "gaussian-noise"

    @classmethod
    def _from_tensors(cls, inputs, targets, num_classes, seed) -> "GaussianNoise":
        obj = cls.__new__(cls)
        obj.inputs, obj.targets = inputs, targets
        obj.input_shape = tuple(inputs.shape[1:])
        obj.num_classes = num_classes
        obj.classes = [str(i) for i in range(num_classes)]
        obj.seed = seed
        obj.name = "gaussian-noise"
        return obj

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __repr__(self) -> str:
        return f"GaussianNoise(n={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"

    def subset(self, n_or_indices) -> "GaussianNoise":
        idx = _subset_indices(n_or_indices, len(self))
        return GaussianNoise._from_tensors(_take(self.inputs, idx), _take(self.targets, idx),
                                           self.num_classes, self.seed)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                device=None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches; see :meth:`ImageDataset.batches`."""
        for _, idx in _batch_slices(len(self), batch_size, shuffle, seed, drop_last):
            x, y = _take(self.inputs, idx), _take(self.targets, idx)
            if device is not None:
                x, y = x.to(device), y.to(device)
            yield x, y

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        batch_size = check_int(batch_size, "batch_size", lo=1)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)


def mean_input(dataset) -> torch.Tensor:
    """The mean input ``[C, H, W]`` (float32). For an :class:`ImageDataset` (and a lazy
    :class:`~ntkfast.data.ImageFolder`, which decodes every image for it): the mean image in
    [0, 1], NOT normalised, whatever its ``normalize`` (what SynFlow-Dist feeds the network).
    For any other dataset: the mean of its items' inputs as they are returned."""
    if isinstance(dataset, ImageDataset):
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        total = torch.zeros(dataset.input_shape, dtype=torch.float64)
        for start in range(0, len(dataset), 4096):
            total += dataset.images[start:start + 4096].to(torch.float64).sum(0)
        return (total / (255.0 * len(dataset))).to(torch.float32)
    if isinstance(dataset, GaussianNoise):
        return dataset.inputs.to(torch.float64).mean(0).to(torch.float32)
    if callable(getattr(dataset, "mean_image", None)):  # a lazy ImageFolder: un-normalised, as above
        return dataset.mean_image()
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    total = None
    for i in range(n):
        x = torch.as_tensor(dataset[i][0], dtype=torch.float64)
        total = x.clone() if total is None else total.add_(x)
    return (total / n).to(torch.float32)
