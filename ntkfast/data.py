"""Readers for MNIST, Fashion-MNIST and CIFAR-10 in their original on-disk formats, and a
Gaussian-noise dataset for the data-free methods. Nothing is downloaded.

Accepted layouts under the ``root`` you give (the first match wins, in this order):

- MNIST: ``root/mnist/<file>``, ``root/MNIST/raw/<file>`` (torchvision), ``root/MNIST/<file>``,
  ``root/<file>``;
- Fashion-MNIST: ``root/fashion-mnist/<file>``, ``root/fashion_mnist/<file>``,
  ``root/FashionMNIST/raw/<file>`` (torchvision), ``root/FashionMNIST/<file>``, ``root/<file>``;
- CIFAR-10: ``root/cifar-10-batches-py/<file>`` (the release archive, also torchvision's),
  ``root/<file>``.

IDX files (``train-images-idx3-ubyte`` ...) may be gzip-compressed (``.gz``) or not; where both
exist the uncompressed one is read. CIFAR-10 batches are the python pickles of the release,
read with an unpickler that only admits the numpy array constructors the files need.

Datasets keep uint8 images ``[N, C, H, W]`` and int64 targets in memory and convert on access:
``ImageDataset[i]`` gives ``(x, y)`` with ``x`` float32, scaled to [0, 1] and normalised with the
dataset's standard mean and std (unless ``normalize=False``). ``ImageDataset.batches`` yields
whole-tensor batches, far faster than a DataLoader indexing one item at a time.
"""
from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .core.checks import check_int

__all__ = [
    "ImageDataset", "GaussianNoise", "load_dataset", "load_mnist", "load_fashion_mnist", "load_cifar10",
    "mean_input", "read_idx", "available", "STATS",
]

PathLike = Union[str, "os.PathLike[str]"]

# (mean, std) per channel of the training pixels scaled to [0, 1].
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
}

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def available() -> List[str]:
    """Canonical dataset names accepted by :func:`load_dataset`."""
    return ["mnist", "fashion-mnist", "cifar10"]


# =============================================================================================
# Datasets
# =============================================================================================

def _batch_order(n: int, shuffle: bool, seed: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return torch.randperm(n, generator=g)


def _batch_slices(n: int, batch_size, shuffle: bool, seed: int, drop_last: bool):
    """(start, indices) of each batch over n items, in a seeded order when shuffling."""
    batch_size = check_int(batch_size, "batch_size", lo=1)
    order = _batch_order(n, shuffle, seed)
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


class ImageDataset(Dataset):
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
        if targets.dim() != 1 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be a 1-d tensor of {images.shape[0]} labels, got {tuple(targets.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean and std need one value per channel ({images.shape[1]})")
        if not all(math.isfinite(float(m)) for m in mean) or not all(math.isfinite(float(v)) and float(v) > 0 for v in std):
            raise ValueError(f"mean and std: expected finite values and std > 0, got mean {tuple(mean)}, std {tuple(std)}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets: expected integer class labels, got dtype {targets.dtype}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(classes)):
            raise ValueError(f"targets: labels must lie in 0..{len(classes) - 1} (one per class name), got "
                             f"{int(targets.min())}..{int(targets.max())}")
        self.images = images
        self.targets = targets.to(torch.int64)
        self.classes = list(classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.normalize = bool(normalize)
        self.name = name
        self.train = train
        c = images.shape[1]
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(c, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(c, 1, 1)

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
    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (``[C,H,W]`` or ``[B,C,H,W]``, any device) -> float32 as items are given."""
        x = images.to(torch.float32).div_(255.0)
        if self.normalize:
            x = x.sub_(self._mean.to(x.device)).div_(self._std.to(x.device))
        return x

    def __getitem__(self, index) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.targets[index]

    def subset(self, n_or_indices) -> "ImageDataset":
        """The first ``n`` items (an int), or the items at the given indices (a sequence, a tensor,
        or a bool mask). The result holds copies of the selected images."""
        idx = _subset_indices(n_or_indices, len(self))
        return ImageDataset(_take(self.images, idx), _take(self.targets, idx), classes=self.classes,
                            mean=self.mean, std=self.std, normalize=self.normalize, name=self.name,
                            train=self.train)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                device=None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches of whole tensors. ``shuffle`` draws one permutation from a
        generator seeded with ``seed`` (the global RNG is not touched). With ``device``, the
        uint8 batch is moved there before conversion."""
        for start, idx in _batch_slices(len(self), batch_size, shuffle, seed, drop_last):
            if shuffle:
                imgs, y = _take(self.images, idx), _take(self.targets, idx)
            else:
                imgs, y = self.images[start:start + batch_size], self.targets[start:start + batch_size]
            if device is not None:
                imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield self.transform(imgs), y

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        batch_size = check_int(batch_size, "batch_size", lo=1)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def class_counts(self) -> List[int]:
        return torch.bincount(self.targets, minlength=self.num_classes).tolist()


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
    """The mean input ``[C, H, W]`` (float32). For an :class:`ImageDataset`: the mean image in
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
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    total = None
    for i in range(n):
        x = torch.as_tensor(dataset[i][0], dtype=torch.float64)
        total = x.clone() if total is None else total.add_(x)
    return (total / n).to(torch.float32)


# =============================================================================================
# File readers
# =============================================================================================

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


def _find(root: Path, subdirs: Sequence[str], filename: str, dataset: str, compressed_ok: bool = True) -> Path:
    tried = []
    for sub in subdirs:
        base = root / sub if sub else root
        names = (filename, filename + ".gz") if compressed_ok else (filename,)
        for name in names:
            p = base / name
            tried.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"root: {dataset} file {filename!r}{' (or .gz)' if compressed_ok else ''} not found under {str(root)!r}; "
        f"tried: {', '.join(tried)}")


def _root(root) -> Path:
    if isinstance(root, bytes):
        root = os.fsdecode(root)
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root: expected the directory holding the dataset files, got {type(root).__name__}")
    return Path(os.path.expanduser(os.fspath(root)))


_MNIST_DIRS = ("mnist", "MNIST/raw", "MNIST", "")
_FASHION_DIRS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", "")
_CIFAR_DIRS = ("cifar-10-batches-py", "")


def _load_idx_pair(root: Path, subdirs, train: bool, dataset: str) -> Tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    img_path = _find(root, subdirs, f"{prefix}-images-idx3-ubyte", dataset)
    lbl_path = _find(root, subdirs, f"{prefix}-labels-idx1-ubyte", dataset)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path}: {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
    if images.shape[0] == 0 or images.ndim != 3:
        raise ValueError(f"{img_path}: expected [N > 0, H, W] images, the IDX header says {images.shape}")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, H, W]
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """MNIST from IDX files (60,000 train / 10,000 test, 1x28x28). See the module doc for layouts."""
    x, y = _load_idx_pair(_root(root), _MNIST_DIRS, train, "mnist")
    mean, std = STATS["mnist"]
    return ImageDataset(x, y, classes=MNIST_CLASSES, mean=mean, std=std, normalize=normalize, name="mnist",
                        train=train)


def load_fashion_mnist(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """Fashion-MNIST from IDX files (60,000 train / 10,000 test, 1x28x28)."""
    x, y = _load_idx_pair(_root(root), _FASHION_DIRS, train, "fashion-mnist")
    mean, std = STATS["fashion-mnist"]
    return ImageDataset(x, y, classes=FASHION_MNIST_CLASSES, mean=mean, std=std, normalize=normalize,
                        name="fashion-mnist", train=train)


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


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no 'data' / 'labels' keys)")
    # the release's 'data' is an array; anything else (a list nested to blow up in np.asarray) is
    # refused before numpy builds it
    if not isinstance(d["data"], np.ndarray):
        raise ValueError(f"{path}: CIFAR-10 'data' must be a uint8 array [N, 3072], got {type(d['data']).__name__}")
    data = d["data"]
    raw = d["labels"]
    if not isinstance(raw, (list, np.ndarray)) or len(raw) != data.shape[0]:
        raise ValueError(f"{path}: CIFAR-10 'labels' must be a list of {data.shape[0]} ints, got "
                         f"{type(raw).__name__}{f' of {len(raw)}' if isinstance(raw, (list, np.ndarray)) else ''}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        raise ValueError(f"{path}: CIFAR-10 'labels' must be ints")
    labels = np.asarray(raw, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: CIFAR-10 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0] if labels.ndim else 0} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels out of range 0..9")
    return data, labels


def load_cifar10(root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """CIFAR-10 from the python batches (50,000 train in data_batch_1..5 / 10,000 test, 3x32x32)."""
    root = _root(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    paths = [_find(root, _CIFAR_DIRS, n, "cifar10", compressed_ok=False) for n in names]
    parts = [_cifar_batch(p) for p in paths]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    if data.shape[0] == 0:
        raise ValueError(f"root: the cifar10 batches under {str(root)!r} hold no images")
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    x = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    y = torch.from_numpy(labels)
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
    return ImageDataset(x, y, classes=classes, mean=mean, std=std, normalize=normalize, name="cifar10",
                        train=train)


_LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, root: PathLike, train: bool = True, normalize: bool = True) -> ImageDataset:
    """Load ``name`` ("mnist", "fashion-mnist" / "fashion_mnist" / "fmnist", "cifar10" /
    "cifar-10") from ``root``; the train split unless ``train=False``."""
    key = _ALIASES.get(name.lower()) if isinstance(name, str) else None
    if key is None:
        raise ValueError(f"dataset must be one of {', '.join(available())} (or an alias: "
                         f"{', '.join(a for a in _ALIASES if a not in available())}); got {name!r}")
    return _LOADERS[key](root, train=train, normalize=normalize)
