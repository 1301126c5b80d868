"""CIFAR-10 and CIFAR-100 from the python pickles of their release archives.

- CIFAR-10: ``root/cifar-10-batches-py/`` (the archive, also torchvision's layout) or ``root``
  itself: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, optionally ``batches.meta``.
- CIFAR-100: ``root/cifar-100-python/`` or ``root`` itself: ``train``, ``test`` and ``meta``
  (all three are required whichever split is read, so a partial copy fails at once). Fine labels
  (100 classes) by default, coarse (20 superclasses) with ``labels="coarse"``; class names from
  ``meta``.

The pickles are read with an unpickler that admits only the numpy array constructors the files
need: a pickle that names any other global (code to run) is refused.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from ..core.checks import check_choice
from ._paths import PathLike, find_file, find_files, require_file, root_dir
from .datasets import ImageDataset
from .stats import CIFAR10_CLASSES, STATS

__all__ = ["load_cifar10", "load_cifar100"]

_CIFAR_DIRS = ("cifar-10-batches-py", "")
_CIFAR100_DIRS = ("cifar-100-python", "")


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR python batch needs: numpy's array reconstruction."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):
            new = "numpy._core" + module[len("numpy.core"):]
            try:
                return getattr(importlib.import_module(new), name)
            except ImportError:  # numpy < 2
                pass
        return getattr(importlib.import_module(module), name)


def _unpickle(path: Path, what: str = "CIFAR-10 python batch") -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # a damaged pickle can raise nearly anything (LookupError, MemoryError, SystemError)
        raise ValueError(f"{path}: not a {what} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a {what} (a {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _images(path: Path, d: dict, what: str) -> np.ndarray:
    # the release's 'data' is an array; anything else (a list nested to blow up in np.asarray) is
    # refused before numpy builds it
    if not isinstance(d["data"], np.ndarray):
        raise ValueError(f"{path}: {what} 'data' must be a uint8 array [N, 3072], got {type(d['data']).__name__}")
    data = d["data"]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: {what} 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    return data


def _labels(path: Path, raw, n: int, key: str, num_classes: int, what: str) -> np.ndarray:
    if not isinstance(raw, (list, np.ndarray)) or len(raw) != n:
        raise ValueError(f"{path}: {what} {key!r} must be a list of {n} ints, got "
                         f"{type(raw).__name__}{f' of {len(raw)}' if isinstance(raw, (list, np.ndarray)) else ''}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        raise ValueError(f"{path}: {what} {key!r} must be ints")
    labels = np.asarray(raw, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{path}: {n} images but {labels.shape[0] if labels.ndim else 0} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: {what} {key!r} out of range 0..{num_classes - 1} "
                         f"(found {int(labels.min())}..{int(labels.max())})")
    return labels


def _cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        hint = " (it has 'fine_labels': a CIFAR-100 file?)" if "fine_labels" in d else ""
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no 'data' / 'labels' keys){hint}")
    data = _images(path, d, "CIFAR-10")
    labels = _labels(path, d["labels"], data.shape[0], "labels", 10, "CIFAR-10")
    return data, labels


def _to_chw(data: np.ndarray) -> torch.Tensor:
    # each row is 1024 red, then 1024 green, then 1024 blue values, row-major
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))


def load_cifar10(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """CIFAR-10 from the python batches (50,000 train in data_batch_1..5 / 10,000 test, 3x32x32)."""
    root = root_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    paths = find_files(root, _CIFAR_DIRS, names, "cifar10", compressed_ok=False)
    parts = [_cifar_batch(p) for p in paths]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    if data.shape[0] == 0:
        raise ValueError(f"root: the cifar10 batches under {str(root)!r} hold no images")
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    classes = CIFAR10_CLASSES
    meta = paths[0].parent / "batches.meta"
    if meta.is_file():
        try:
            names_ = _unpickle(meta).get("label_names")
            if isinstance(names_, (list, tuple)) and len(names_) == 10:
                classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names_]
        except (ValueError, TypeError):
            pass  # a broken meta file only costs the class names
    mean, std = STATS["cifar10"]
    return ImageDataset(_to_chw(data), torch.from_numpy(labels), classes=classes, mean=mean, std=std,
                        normalize=normalize, name="cifar10", train=train)


_CIFAR100_LABELS = {"fine": ("fine_labels", "fine_label_names", 100),
                    "coarse": ("coarse_labels", "coarse_label_names", 20)}


def _class_names(meta: Path, key: str, n: int) -> List[str]:
    d = _unpickle(meta, "CIFAR-100 meta file")
    names = d.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != n or not all(isinstance(v, (bytes, str)) for v in names):
        raise ValueError(f"{meta}: CIFAR-100 {key!r} must be a list of {n} names, got "
                         f"{type(names).__name__}{f' of {len(names)}' if isinstance(names, (list, tuple)) else ''}")
    return [v.decode("latin1") if isinstance(v, bytes) else v for v in names]


def load_cifar100(root: PathLike, train: bool = True, normalize: bool = True, labels: str = "fine") -> ImageDataset:
    """CIFAR-100 from ``cifar-100-python/{train,test,meta}`` (50,000 train / 10,000 test, 3x32x32).

    ``labels="fine"`` (default): the 100 classes; ``labels="coarse"``: the 20 superclasses. The
    class names come from ``meta``. A folder without ``train``, ``test`` or ``meta`` is refused
    before anything is read.
    """
    labels = check_choice(labels, "labels", tuple(_CIFAR100_LABELS))
    key, names_key, num_classes = _CIFAR100_LABELS[labels]
    root = root_dir(root)
    wanted = find_file(root, _CIFAR100_DIRS, "train" if train else "test", "cifar100", compressed_ok=False)
    folder = wanted.parent
    for other in ("train", "test", "meta"):
        require_file(folder / other, "cifar100", f"the {other!r} file")
    classes = _class_names(folder / "meta", names_key, num_classes)
    d = _unpickle(wanted, "CIFAR-100 python file")
    if "data" not in d or key not in d:
        hint = " (it has 'labels': a CIFAR-10 batch?)" if "labels" in d else ""
        raise ValueError(f"{wanted}: not a CIFAR-100 python file (no 'data' / {key!r} keys){hint}")
    data = _images(wanted, d, "CIFAR-100")
    if data.shape[0] == 0:
        raise ValueError(f"{wanted}: the cifar100 file holds no images")
    y = _labels(wanted, d[key], data.shape[0], key, num_classes, "CIFAR-100")
    mean, std = STATS["cifar100"]
    return ImageDataset(_to_chw(data), torch.from_numpy(y), classes=classes, mean=mean, std=std,
                        normalize=normalize, name="cifar100", train=train)
