"""SVHN cropped digits from ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5 files, read
with scipy, an optional dependency), under ``root/svhn/``, ``root/SVHN/`` or ``root`` itself.

Each file holds ``X``, uint8 ``[32, 32, 3, N]`` (height, width, channel, image), and ``y``,
``[N, 1]`` labels 1..10 where 10 stands for the digit 0: the labels here are the digits, 0..9.
Both files must be present whichever split is read. The ``extra`` split is not read.
"""
from __future__ import annotations

import numpy as np
import torch

from ._paths import PathLike, find_file, require_file, root_dir
from .datasets import ImageDataset
from .stats import STATS, SVHN_CLASSES

__all__ = ["load_svhn"]

NAME = "svhn"
_DIRS = ("svhn", "SVHN", "")


def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"{NAME}: reading its .mat files needs scipy, which is not installed: "
                          "pip install scipy, or the extra: pip install ntkfast[svhn]") from None
    return loadmat


def _read(path) -> tuple:
    loadmat = _loadmat()
    try:
        m = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # noqa: BLE001 - whatever scipy trips on, the file is not one it can read
        # (NotImplementedError: a MATLAB v7.3 HDF5 file)
        raise ValueError(f"{path}: not an SVHN .mat file ({type(e).__name__}: {e})") from None
    if "X" not in m or "y" not in m:
        raise ValueError(f"{path}: not an SVHN .mat file (no 'X' / 'y' variables)")
    x, y = m["X"], m["y"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: SVHN 'X' must be uint8 [32, 32, 3, N], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n = x.shape[3]
    if n == 0:
        raise ValueError(f"{path}: the svhn file holds no images")
    if not isinstance(y, np.ndarray) or y.size != n or y.ndim not in (1, 2) or y.dtype.kind not in "iuf":
        raise ValueError(f"{path}: SVHN 'y' must be {n} labels [N, 1], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
    y = y.reshape(-1)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError(f"{path}: SVHN 'y' must hold whole numbers")
    y = y.astype(np.int64)
    if y.min() < 1 or y.max() > 10:
        raise ValueError(f"{path}: SVHN labels out of range 1..10 (10 is the digit 0), found {y.min()}..{y.max()}")
    return x, y


def load_svhn(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """SVHN (73,257 train / 26,032 test, 3x32x32, labels the digits 0..9). See the module doc."""
    root = root_dir(root)
    path = find_file(root, _DIRS, "train_32x32.mat" if train else "test_32x32.mat", NAME, compressed_ok=False)
    require_file(path.parent / ("test_32x32.mat" if train else "train_32x32.mat"), NAME, "the other split's file")
    x, y = _read(path)
    # [H, W, C, N] -> [N, C, H, W]
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    mean, std = STATS[NAME]
    return ImageDataset(images, torch.from_numpy(y % 10), classes=SVHN_CLASSES, mean=mean, std=std,
                        normalize=normalize, name=NAME, train=train)
