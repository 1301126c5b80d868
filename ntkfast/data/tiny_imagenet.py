"""Tiny-ImageNet-200 in the layout of its release archive (``tiny-imagenet-200.zip``).

``root/tiny-imagenet-200/`` or ``root`` itself::

    wnids.txt                           one WordNet id per class
    train/<wnid>/images/*.JPEG          the training images of each class
    val/images/*.JPEG                   the validation images ...
    val/val_annotations.txt             ... and their classes: "<file>\\t<wnid>\\t<box>" per line

The validation split may instead be sorted into ``val/<wnid>/*.JPEG`` (what NTK-SAP's loader
leaves behind after its first run). Classes are indexed in sorted wnid order and items ordered by
class, then file name: the order of the ImageFolder the authors read the folders with. The
``test/`` images have no labels and are not read.

Both splits are checked (every folder, every annotation, every file named) before any image is
decoded; then the split asked for is decoded into memory (Pillow; 100,000 64x64 training images
are 1.2 GB as uint8), in parallel threads. With ``cache_dir`` the decoded split is also written
there, and read back on the next call if the image files have not changed since.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.files import atomic_write, check_out_dir
from ._paths import PathLike, find_dir, is_image_file, require_dir, require_file, root_dir
from .datasets import ImageDataset
from .images import decode_array, require_pillow
from .stats import STATS

__all__ = ["load_tiny_imagenet"]

NAME = "tiny-imagenet"
SIDE = 64
_DIRS = ("tiny-imagenet-200", "")
_CACHE_VERSION = "ntkfast tiny-imagenet cache v1"

Samples = List[Tuple[Path, int]]


def _read_wnids(path: Path) -> List[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").split()  # a byte-order mark is not part of the first id
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"root: {NAME}: cannot read {str(path)!r} ({e})") from None
    if not lines:
        raise ValueError(f"root: {NAME}: {str(path)!r} lists no classes")
    bad = [w for w in lines if "/" in w or "\\" in w or w in (".", "..")]
    if bad:
        raise ValueError(f"root: {NAME}: {str(path)!r} holds {bad[0]!r}, not a WordNet id")
    if len(set(lines)) != len(lines):
        dup = next(w for w in lines if lines.count(w) > 1)
        raise ValueError(f"root: {NAME}: {str(path)!r} lists {dup!r} twice")
    return lines


def _images_in(folder: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))


def _train_samples(base: Path, classes: Sequence[str]) -> Samples:
    train = require_dir(base / "train", NAME, "the train")
    known = set(classes)
    extra = sorted(e.name for e in os.scandir(train) if e.is_dir() and e.name not in known)
    if extra:
        raise ValueError(f"root: {NAME}: {str(train)!r} has class folders not in wnids.txt ({', '.join(extra[:3])}"
                         f"{' ...' if len(extra) > 3 else ''}): a mixed-up dataset folder?")
    samples: Samples = []
    for label, wnid in enumerate(classes):
        folder = require_dir(train / wnid / "images", NAME, f"the class {wnid!r} train")
        files = _images_in(folder)
        if not files:
            raise ValueError(f"root: {NAME}: {str(folder)!r} holds no images")
        samples.extend((folder / f, label) for f in files)
    return samples


def _annotated_val(val: Path, index: dict) -> Samples:
    notes = require_file(val / "val_annotations.txt", NAME, "the validation labels file")
    images = require_dir(val / "images", NAME, "the validation images")
    try:
        text = notes.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"root: {NAME}: cannot read {str(notes)!r} ({e})") from None
    labelled = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{str(notes)!r} line {number}"
        if len(fields) < 2:
            raise ValueError(f"root: {NAME}: {where}: expected '<file>\\t<wnid>\\t...', got {line[:80]!r}")
        file, wnid = fields[0].strip(), fields[1].strip()
        if not file or "/" in file or "\\" in file or file in (".", ".."):
            raise ValueError(f"root: {NAME}: {where}: {file!r} is not a file name")
        if wnid not in index:
            raise ValueError(f"root: {NAME}: {where}: class {wnid!r} is not in wnids.txt")
        if file in labelled:
            raise ValueError(f"root: {NAME}: {where}: {file!r} is labelled twice")
        labelled[file] = index[wnid]
    present = set(_images_in(images))
    missing = sorted(f for f in labelled if f not in present)
    if missing:
        raise FileNotFoundError(f"root: {NAME}: {len(missing)} image(s) named in {str(notes)!r} are not in "
                                f"{str(images)!r} (first: {missing[0]!r})")
    unlabelled = sorted(present - labelled.keys())
    if unlabelled:
        raise ValueError(f"root: {NAME}: {len(unlabelled)} image(s) in {str(images)!r} have no line in "
                         f"{str(notes)!r} (first: {unlabelled[0]!r}): a mixed-up dataset folder?")
    if not labelled:
        raise ValueError(f"root: {NAME}: {str(notes)!r} labels no images")
    return sorted(((images / f, y) for f, y in labelled.items()), key=lambda s: (s[1], s[0].name))


def _sorted_val(val: Path, classes: Sequence[str]) -> Samples:
    known = set(classes)
    folders = sorted(e.name for e in os.scandir(val) if e.is_dir())
    extra = [f for f in folders if f not in known]
    if extra:
        raise ValueError(f"root: {NAME}: {str(val)!r} has class folders not in wnids.txt ({', '.join(extra[:3])}): "
                         "a mixed-up dataset folder?")
    # Tiny-ImageNet's validation split has every class (50 images each): a class without images
    # is a sorting cut short, whose accuracy would be over fewer classes without a word
    samples: Samples = []
    empty = []
    for label, wnid in enumerate(classes):
        files = _images_in(val / wnid) if (val / wnid).is_dir() else []
        if not files:
            empty.append(wnid)
        samples.extend((val / wnid / f, label) for f in files)
    if not samples:
        raise ValueError(f"root: {NAME}: the class folders of {str(val)!r} hold no images")
    if empty:
        raise FileNotFoundError(f"root: {NAME}: {str(val)!r} is sorted into class folders, but {len(empty)} of the "
                                f"{len(classes)} classes have no images there ({', '.join(empty[:3])}"
                                f"{', ...' if len(empty) > 3 else ''}): a partial copy, or a sorting cut short?")
    return samples


def _val_samples(base: Path, classes: Sequence[str]) -> Samples:
    val = require_dir(base / "val", NAME, "the validation")
    if (val / "val_annotations.txt").exists() or (val / "images").exists():
        return _annotated_val(val, {w: i for i, w in enumerate(classes)})
    if any(e.is_dir() and e.name in set(classes) for e in os.scandir(val)):
        return _sorted_val(val, classes)
    raise FileNotFoundError(f"root: {NAME}: {str(val)!r} has neither images/ with val_annotations.txt nor "
                            "one folder per class (a partial copy of the dataset?)")


def _fingerprint(samples: Samples, classes: Sequence[str], train: bool) -> str:
    """What the cached arrays were decoded from: every file's path, size and modification time."""
    h = hashlib.sha256(f"{_CACHE_VERSION}\n{'train' if train else 'val'}\n{' '.join(classes)}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str, n: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            images, targets = z["images"], z["targets"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # unreadable: decoded again and written over
    if images.dtype != np.uint8 or images.shape != (n, 3, SIDE, SIDE) or targets.shape != (n,):
        return None
    return images, targets


def _decode_all(samples: Samples) -> np.ndarray:
    out = np.empty((len(samples), 3, SIDE, SIDE), dtype=np.uint8)

    Image = require_pillow(NAME)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            path = samples[i][0]
            img = decode_array(path, NAME, Image=Image)
            if img.shape != (SIDE, SIDE, 3):
                raise ValueError(f"{NAME}: {path}: a {img.shape[1]}x{img.shape[0]} image; Tiny-ImageNet's are "
                                 f"{SIDE}x{SIDE}")
            out[i] = img.transpose(2, 0, 1)

    # Pillow releases the GIL while decoding, so threads decode in parallel
    workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    chunk = 512
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, s, min(s + chunk, len(samples))) for s in range(0, len(samples), chunk)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()  # the first bad file is reported without decoding the rest
            raise
    return out


def load_tiny_imagenet(root: PathLike, train: bool = True, normalize: bool = True,
                       cache_dir: Optional[PathLike] = None) -> ImageDataset:
    """Tiny-ImageNet-200: 200 classes of 64x64 RGB images, 100,000 train / 10,000 validation
    (``train=False`` reads the labelled validation split). See the module doc for the layout.

    ``cache_dir``: a folder of yours where the decoded split is kept
    (``tiny-imagenet-200-train.npz`` / ``-val.npz``) and reused while the image files are
    unchanged. Nothing is written anywhere else.
    """
    root = root_dir(root)
    if cache_dir is not None:
        cache_dir = Path(check_out_dir(os.fspath(cache_dir), "cache_dir"))
    base = find_dir(root, _DIRS, "wnids.txt", NAME)
    wnids = _read_wnids(base / "wnids.txt")
    classes = sorted(wnids)
    # both splits are checked whichever is read: a partial copy fails before any decoding
    train_samples = _train_samples(base, classes)
    val_samples = _val_samples(base, classes)
    samples = train_samples if train else val_samples
    targets = np.array([y for _, y in samples], dtype=np.int64)
    require_pillow(NAME)
    cache = fingerprint = None
    if cache_dir is not None:
        cache = cache_dir / f"tiny-imagenet-200-{'train' if train else 'val'}.npz"
        fingerprint = _fingerprint(samples, classes, train)
        hit = _read_cache(cache, fingerprint, len(samples))
        if hit is not None and np.array_equal(hit[1], targets):
            return _dataset(hit[0], targets, classes, normalize, train)
    images = _decode_all(samples)
    if cache is not None:
        cache_dir.mkdir(exist_ok=True)
        atomic_write(cache, lambda f: np.savez(f, images=images, targets=targets, fingerprint=np.array(fingerprint)))
    return _dataset(images, targets, classes, normalize, train)


def _dataset(images: np.ndarray, targets: np.ndarray, classes, normalize: bool, train: bool) -> ImageDataset:
    mean, std = STATS[NAME]
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(targets), classes=classes, mean=mean, std=std,
                        normalize=normalize, name=NAME, train=train)
