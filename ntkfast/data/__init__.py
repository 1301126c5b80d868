"""Dataset readers for the original on-disk formats, and a Gaussian-noise dataset for the
data-free methods. Nothing is downloaded.

``load_dataset(name, root, train=True, normalize=True, **options)`` reads one split of:

- ``mnist``, ``fashion-mnist``: IDX files, 1x28x28 (:mod:`ntkfast.data.idx`);
- ``cifar10``, ``cifar100``: the python pickles, 3x32x32; CIFAR-100's option ``labels="coarse"``
  (:mod:`ntkfast.data.cifar`);
- ``svhn``: ``train_32x32.mat`` / ``test_32x32.mat``, 3x32x32, needs scipy (:mod:`ntkfast.data.svhn`);
- ``tiny-imagenet``: ``tiny-imagenet-200/``, 3x64x64, needs Pillow; option ``cache_dir``
  (:mod:`ntkfast.data.tiny_imagenet`);
- ``imagenet``, ``imagefolder``: ``train/<class>/`` and ``val/<class>/`` trees, decoded lazily,
  need Pillow; options ``size``, ``crop``, ``num_workers`` (:mod:`ntkfast.data.imagefolder`).

The first five return an in-memory :class:`ImageDataset`, the last two a lazy
:class:`ImageFolder` with the same interface. Each reader module documents its layout.

A missing, partial or mixed-up folder, or a label out of range, raises FileNotFoundError or
ValueError naming the dataset and the file or folder before any image is decoded. An unreadable
image raises ValueError naming it when it is decoded: while loading, for the in-memory readers.
"""
from __future__ import annotations

import inspect
from typing import List, Union

from ._paths import PathLike
# the private helpers and class-name lists stay importable from ntkfast.data, as before it was split
from .cifar import _ArrayUnpickler, _cifar_batch, _unpickle, load_cifar10, load_cifar100  # noqa: F401
from .datasets import (GaussianNoise, ImageDataset, _batch_order, _batch_slices, _subset_indices,  # noqa: F401
                       _take, mean_input)
from .idx import (_DEFLATE_MAX_RATIO, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, _load_idx_pair,  # noqa: F401
                  _open_maybe_gzip, load_fashion_mnist, load_mnist, read_idx)
from .imagefolder import ImageFolder, load_imagefolder, load_imagenet
from .stats import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, MNIST_CLASSES, STATS, SVHN_CLASSES  # noqa: F401
from .svhn import load_svhn
from .tiny_imagenet import load_tiny_imagenet

__all__ = [
    "ImageDataset", "ImageFolder", "GaussianNoise", "load_dataset", "load_mnist", "load_fashion_mnist",
    "load_cifar10", "load_cifar100", "load_svhn", "load_tiny_imagenet", "load_imagenet", "load_imagefolder",
    "mean_input", "read_idx", "available", "STATS",
]

_LOADERS = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "tiny-imagenet": load_tiny_imagenet,
    "imagenet": load_imagenet,
    "imagefolder": load_imagefolder,
}

_ALIASES = {
    **{name: name for name in _LOADERS},
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar-100": "cifar100", "cifar_100": "cifar100",
    "tiny_imagenet": "tiny-imagenet", "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet",
    "image-folder": "imagefolder", "image_folder": "imagefolder",
}


def available() -> List[str]:
    """Canonical dataset names accepted by :func:`load_dataset`."""
    return list(_LOADERS)


def _options(loader) -> List[str]:
    fixed = {"root", "train", "normalize"}
    return [p for p in inspect.signature(loader).parameters if p not in fixed]


def load_dataset(name: str, root: PathLike, train: bool = True, normalize: bool = True,
                 **options) -> Union[ImageDataset, ImageFolder]:
    """Load the split of dataset ``name`` (see :func:`available`; aliases such as ``cifar-100``
    and ``fmnist`` too) found under ``root``: the train split unless ``train=False``.

    ``options`` go to that dataset's reader: ``labels="coarse"`` (cifar100), ``cache_dir``
    (tiny-imagenet), ``size``, ``crop``, ``num_workers`` (imagenet, imagefolder; also ``mean``,
    ``std`` for imagefolder). An option the reader does not take is refused by name.
    """
    key = _ALIASES.get(name.lower()) if isinstance(name, str) else None
    if key is None:
        raise ValueError(f"dataset must be one of {', '.join(available())} (or an alias: "
                         f"{', '.join(a for a in _ALIASES if a not in available())}); got {name!r}")
    loader = _LOADERS[key]
    takes = _options(loader)
    for option in options:
        if option not in takes:
            raise ValueError(f"{option}: not an option of the {key} reader (it takes: "
                             f"{', '.join(takes) if takes else 'no options'})")
    return loader(root, train=train, normalize=normalize, **options)
