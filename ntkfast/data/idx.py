"""MNIST and Fashion-MNIST from their IDX files (gzip-compressed or not).

Accepted layouts under ``root`` (the first match wins, in this order):

- MNIST: ``root/mnist/<file>``, ``root/MNIST/raw/<file>`` (torchvision), ``root/MNIST/<file>``,
  ``root/<file>``;
- Fashion-MNIST: ``root/fashion-mnist/<file>``, ``root/fashion_mnist/<file>``,
  ``root/FashionMNIST/raw/<file>`` (torchvision), ``root/FashionMNIST/<file>``, ``root/<file>``.

Where both ``<file>`` and ``<file>.gz`` exist the uncompressed one is read.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ._paths import PathLike, find_files, root_dir
from .datasets import ImageDataset
from .stats import FASHION_MNIST_CLASSES, MNIST_CLASSES, STATS

__all__ = ["read_idx", "load_mnist", "load_fashion_mnist", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC"]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def _open_maybe_gzip(path: Path):
    """The file opened for reading, through gzip when it starts with the gzip magic; and its size
    on disk (the bound on what a gzip stream can honestly expand to)."""
    f = open(path, "rb")
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f), os.fstat(f.fileno()).st_size, True
    return f, os.fstat(f.fileno()).st_size, False


# deflate cannot expand more than 1032:1; a header promising more than that is lying
_DEFLATE_MAX_RATIO = 1032


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or not) into a numpy uint8 array.

    Header: a big-endian magic ``0x0000 08 nd`` (08 = unsigned byte, nd = number of dimensions),
    then nd big-endian uint32 sizes, then the data. Raises ValueError naming the path when the
    magic (or ``expected_magic``) or the data size does not fit. The header is checked before the
    data is read (or decompressed), and no more than the header promises is ever read.
    """
    path = Path(path)
    f, size, compressed = _open_maybe_gzip(path)
    try:
        with f:
            head = f.read(4)
            if len(head) < 4:
                raise ValueError(f"{path}: not an IDX file (only {len(head)} bytes)")
            magic = int.from_bytes(head, "big")
            if expected_magic is not None and magic != expected_magic:
                raise ValueError(f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x}")
            if head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] == 0:
                raise ValueError(f"{path}: bad IDX magic 0x{magic:08x} (expected 0x000008nn: unsigned bytes, nn dims)")
            ndim = head[3]
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header")
            dims = tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim))
            expected = math.prod(dims)
            bound = size * _DEFLATE_MAX_RATIO if compressed else size - 4 - 4 * ndim
            if expected > bound:
                raise ValueError(f"{path}: IDX header says {dims} = {expected} bytes of data, more than the "
                                 f"{'compressed ' if compressed else ''}file of {size} bytes can hold")
            data = f.read(expected)
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    if len(data) != expected or extra:
        got = f"{len(data)}" if len(data) != expected else "more"
        raise ValueError(f"{path}: IDX header says {dims} = {expected} bytes of data, the file has {got}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


_MNIST_DIRS = ("mnist", "MNIST/raw", "MNIST", "")
_FASHION_DIRS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", "")


def _load_idx_pair(root: Path, subdirs, train: bool, dataset: str) -> Tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    img_path, lbl_path = find_files(root, subdirs, [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"],
                                    dataset)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path}: {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
    if images.shape[0] == 0 or images.ndim != 3:
        raise ValueError(f"{img_path}: expected [N > 0, H, W] images, the IDX header says {images.shape}")
    if images.shape[1:] != (28, 28):
        # another dataset in IDX files (a padded or resized copy) would be read with this one's
        # normalisation and models built for 28 x 28 inputs
        raise ValueError(f"{img_path}: {dataset} images are 28x28, the IDX header says "
                         f"{images.shape[1]}x{images.shape[2]} (another dataset's files?)")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, H, W]
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """MNIST from IDX files (60,000 train / 10,000 test, 1x28x28). See the module doc for layouts."""
    x, y = _load_idx_pair(root_dir(root), _MNIST_DIRS, train, "mnist")
    mean, std = STATS["mnist"]
    return ImageDataset(x, y, classes=MNIST_CLASSES, mean=mean, std=std, normalize=normalize, name="mnist",
                        train=train)


def load_fashion_mnist(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """Fashion-MNIST from IDX files (60,000 train / 10,000 test, 1x28x28)."""
    x, y = _load_idx_pair(root_dir(root), _FASHION_DIRS, train, "fashion-mnist")
    mean, std = STATS["fashion-mnist"]
    return ImageDataset(x, y, classes=FASHION_MNIST_CLASSES, mean=mean, std=std, normalize=normalize,
                        name="fashion-mnist", train=train)
