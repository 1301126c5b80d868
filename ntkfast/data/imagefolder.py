"""Image folders too large for memory (ImageNet): a lazy dataset that decodes on access.

The layout is torchvision's ImageFolder, one folder per class::

    root/train/<class>/**/<image>      root/val/<class>/**/<image>

``imagenet`` reads ``root/train`` and ``root/val`` (ILSVRC-2012 with its validation images
sorted into class folders, as the usual preparation script leaves them); ``imagefolder`` reads
any such tree, its evaluation split from ``root/val`` or else ``root/test``. Classes are the
sorted folder names, files are sorted within each class and found recursively, and only
ImageFolder's image suffixes count (``.jpg``, ``.jpeg``, ``.png``, ``.ppm``, ``.bmp``, ``.pgm``,
``.tif``, ``.tiff``, ``.webp``, any case), as torchvision does. The evaluation split is indexed
by the training split's classes, so a validation folder missing a class keeps the labels right,
and one with a class the training split lacks is refused.

Each image is decoded with Pillow when it is read, converted to RGB, and (with ``size``) its
shorter side resized to ``size`` and the centre ``crop`` square cut out: ``size=256, crop=224``
is the authors' evaluation transform for ImageNet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..core.checks import check_int
from ._paths import PathLike, is_image_file, mixup_hint, root_dir
from .datasets import Normalizing, _batch_slices, _subset_indices
from .images import decode_rgb, require_pillow
from .stats import STATS

__all__ = ["ImageFolder", "load_imagenet", "load_imagefolder"]


def _class_folders(folder: Path, dataset: str) -> List[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        loose = any(e.is_file() and is_image_file(e.name) for e in os.scandir(folder))
        why = (" (its images lie directly in it; sort them into one folder per class first)" if loose else "")
        raise FileNotFoundError(f"root: {dataset}: {str(folder)!r} has no class folders{why}")
    return classes


def _scan(folder: Path, classes: Sequence[str], dataset: str, strict: bool) -> List[Tuple[str, int]]:
    """(path, label) of every image under ``folder/<class>``, in ImageFolder's order. ``strict``:
    every class must have a folder (a training split)."""
    known = set(classes)
    present = _class_folders(folder, dataset)
    unknown = [c for c in present if c not in known]
    if unknown:
        raise ValueError(f"root: {dataset}: {str(folder)!r} has class folders the training split lacks "
                         f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}): a mixed-up dataset folder?")
    samples = []
    for label, name in enumerate(classes):
        target = folder / name
        if not target.is_dir():
            if strict:
                raise FileNotFoundError(f"root: {dataset}: class folder {str(target)!r} not found")
            continue
        found = [os.path.join(d, f) for d, _, files in sorted(_walk_once(target))
                 for f in sorted(files) if is_image_file(f)]
        if not found:
            raise ValueError(f"root: {dataset}: class folder {str(target)!r} holds no images")
        samples.extend((p, label) for p in found)
    return samples


def _walk_once(top):
    """os.walk following links (as torchvision does), each real folder once, and never into a
    folder that holds ``top`` itself: a link back up the tree (train/a/loop -> ..) would otherwise
    list the same images again and again, and other classes' images as this one's."""
    top_real = os.path.realpath(top)
    seen = set()
    for d, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(d)
        if real in seen or (real != top_real and (top_real + os.sep).startswith(real + os.sep)):
            dirs[:] = []
            continue
        seen.add(real)
        yield d, dirs, files


class ImageFolder(Normalizing, Dataset):
    """A folder of class folders, decoded image by image when read.

    ``dataset[i]`` is ``(x, y)`` as for :class:`~ntkfast.data.ImageDataset`: ``x`` float32
    ``[3, H, W]`` in [0, 1], normalised when ``normalize``. ``dataset.raw`` has the same items
    with ``x`` as decoded uint8 (4x less to move): what a DataLoader with worker processes should
    carry, followed by :meth:`transform` on the device. :meth:`batches` does that.

    Args:
        folder: the split's folder, one sub-folder per class.
        classes: the class names to index labels by (the training split's, for an evaluation
            split); default: ``folder``'s sub-folders, sorted.
        size, crop: resize the shorter side to ``size`` and cut the centre ``crop`` square
            (``crop`` defaults to ``size``); with neither, every image must have the size of the
            first.
        mean, std: per-channel normalisation (default: ImageNet's).
        num_workers: worker processes of :meth:`batches` (default: up to 8, one per CPU core).

    Attributes as :class:`~ntkfast.data.ImageDataset`: ``classes``, ``num_classes``,
    ``input_shape``, ``targets``, ``mean``, ``std``, ``normalize``, ``name``, ``train``; and
    ``samples`` (``(path, label)`` per item).
    """

    def __init__(self, folder: PathLike, *, classes: Optional[Sequence[str]] = None, size: Optional[int] = None,
                 crop: Optional[int] = None, mean: Sequence[float] = STATS["imagenet"][0],
                 std: Sequence[float] = STATS["imagenet"][1], normalize: bool = True, name: str = "imagefolder",
                 train: bool = True, num_workers: Optional[int] = None):
        self.size = check_int(size, "size", lo=1, allow_none=True)
        self.crop = check_int(crop, "crop", lo=1, allow_none=True)
        if self.crop is not None and (self.size is None or self.crop > self.size):
            raise ValueError(f"crop: expected a square no larger than size ({self.size}), got {crop}")
        self.num_workers = check_int(num_workers, "num_workers", lo=0, allow_none=True)
        folder = root_dir(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"folder: {name}: {str(folder)!r} does not exist")
        require_pillow(name)
        self.folder, self.name, self.train = folder, name, train
        self.classes = list(classes) if classes is not None else _class_folders(folder, name)
        self.samples = _scan(folder, self.classes, name, strict=classes is None)
        self.targets = torch.tensor([y for _, y in self.samples], dtype=torch.int64)
        self._init_normalizing(mean, std, normalize, channels=3)
        side = self.crop or self.size
        self._shape = (3, side, side) if side else tuple(self.read(0).shape)

    @classmethod
    def _view(cls, parent: "ImageFolder", samples) -> "ImageFolder":
        obj = cls.__new__(cls)
        obj.__dict__.update(parent.__dict__)
        obj.samples = list(samples)
        obj.targets = torch.tensor([y for _, y in obj.samples], dtype=torch.int64)
        return obj

    # -- properties ------------------------------------------------------------------------------
    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def raw(self) -> "_RawItems":
        """The items as ``(uint8 [3, H, W], label)``, un-normalised."""
        return _RawItems(self)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (f"ImageFolder({self.name} {split}, n={len(self)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, folder={str(self.folder)!r})")

    # -- access ----------------------------------------------------------------------------------
    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded as uint8 ``[3, H, W]``; ValueError naming the file when it is
        unreadable or (without ``size``) of another size than the first."""
        path = self.samples[index][0]
        img = decode_rgb(path, self.name, self.size, self.crop)
        expected = getattr(self, "_shape", None)
        if expected is not None and tuple(img.shape) != expected:
            raise ValueError(f"{self.name}: {path}: a {img.shape[2]}x{img.shape[1]} image where the folder's are "
                             f"{expected[2]}x{expected[1]}; give size= to resize them all")
        return img

    def __getitem__(self, index) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.read(index)), self.targets[index]

    def subset(self, n_or_indices) -> "ImageFolder":
        """The first ``n`` items, or those at the given indices (as :meth:`ImageDataset.subset`);
        nothing is decoded."""
        idx = _subset_indices(n_or_indices, len(self))
        return ImageFolder._view(self, [self.samples[i] for i in idx.tolist()])

    def _workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(8, cpus) if cpus > 1 else 0

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                device=None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches as :meth:`ImageDataset.batches` does (the same seeded order),
        decoded by a DataLoader's worker processes and normalised after the move to ``device``."""
        order = [idx.tolist() for _, idx in _batch_slices(len(self), batch_size, shuffle, seed, drop_last)]
        workers = self._workers() if len(order) > 1 else 0  # one batch: not worth starting processes
        pin = device is not None and torch.device(device).type == "cuda"
        loader = DataLoader(self.raw, batch_sampler=order, num_workers=workers, pin_memory=pin)
        for imgs, y in loader:
            if device is not None:
                imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield self.transform(imgs), y

    def mean_image(self) -> torch.Tensor:
        """The mean image ``[3, H, W]`` in [0, 1], not normalised (every image is decoded)."""
        if len(self) == 0:
            raise ValueError("dataset is empty")
        total = torch.zeros(self.input_shape, dtype=torch.float64)
        loader = DataLoader(self.raw, batch_size=256, num_workers=self._workers())
        for imgs, _ in loader:
            total += imgs.to(torch.float64).sum(0)
        return (total / (255.0 * len(self))).to(torch.float32)


class _RawItems(Dataset):
    def __init__(self, parent: ImageFolder):
        self.parent = parent

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, index) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.parent.read(index), self.parent.targets[index]


def _split_dir(root: Path, names: Sequence[str], dataset: str, what: str) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    if not root.is_dir():
        raise FileNotFoundError(f"root: {dataset}: the folder {str(root)!r} does not exist")
    tried = " or ".join(repr(str(root / n)) for n in names)
    raise FileNotFoundError(f"root: {dataset}: the {what} folder {tried} not found (expected root/train and "
                            f"root/val, one folder per class inside each){mixup_hint(root, dataset)}")


def _load(root, train: bool, dataset: str, eval_names: Sequence[str], need_both: bool, **kw) -> ImageFolder:
    root = root_dir(root)
    train_dir = root / "train"
    if need_both or train:
        train_dir = _split_dir(root, ("train",), dataset, "training")
    if train:
        if need_both:  # a partial copy fails now, not after an epoch
            _split_dir(root, eval_names, dataset, "evaluation")
        return ImageFolder(train_dir, name=dataset, train=True, **kw)
    eval_dir = _split_dir(root, eval_names, dataset, "evaluation")
    classes = _class_folders(train_dir, dataset) if train_dir.is_dir() else None
    return ImageFolder(eval_dir, classes=classes, name=dataset, train=False, **kw)


def load_imagenet(root: PathLike, train: bool = True, normalize: bool = True, size: int = 256, crop: Optional[int] = 224,
                  num_workers: Optional[int] = None) -> ImageFolder:
    """ImageNet (ILSVRC-2012) from ``root/train/<wnid>/`` and ``root/val/<wnid>/`` (both must
    exist), decoded lazily. Default ``size=256, crop=224``: the authors' evaluation transform,
    3x224x224 inputs; see :class:`ImageFolder`."""
    mean, std = STATS["imagenet"]
    return _load(root, train, "imagenet", ("val",), True, size=size, crop=crop, mean=mean, std=std,
                 normalize=normalize, num_workers=num_workers)


def load_imagefolder(root: PathLike, train: bool = True, normalize: bool = True, size: Optional[int] = None,
                     crop: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None, num_workers: Optional[int] = None) -> ImageFolder:
    """Any ImageFolder tree: ``root/train/<class>/`` and ``root/val/<class>/`` (or
    ``root/test/<class>/``), decoded lazily; normalised with ImageNet's mean and std unless
    ``mean``/``std`` are given. See :class:`ImageFolder`."""
    if (mean is None) != (std is None):
        raise ValueError("mean, std: give both or neither")
    if mean is None:
        mean, std = STATS["imagenet"]
    return _load(root, train, "imagefolder", ("val", "test"), False, size=size, crop=crop, mean=mean, std=std,
                 normalize=normalize, num_workers=num_workers)
