"""Finding a dataset's files under the ``root`` the user gives, and errors that name what is
missing and what the folder seems to hold instead."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

# the suffixes torchvision's ImageFolder accepts (compared case-insensitively)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def root_dir(root) -> Path:
    """``root`` as a Path (``~`` expanded); a root of another type is refused by name."""
    if isinstance(root, bytes):
        root = os.fsdecode(root)
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root: expected the directory holding the dataset files, got {type(root).__name__}")
    if not os.fspath(root):  # Path("") is the working directory: most likely an unset variable
        raise ValueError("root: empty; give the directory holding the dataset files ('.' for this one)")
    return Path(os.path.expanduser(os.fspath(root)))


# what each dataset's files look like, to tell a user who gave the wrong name which one they have:
# a mark is a path under root, or a tuple of paths that must all be there. The folder itself of a
# dataset counts too (root = .../cifar-100-python given for cifar10), by files only it holds.
_SIGNATURES = (
    ("cifar10", ("cifar-10-batches-py", "data_batch_1", "batches.meta")),
    ("cifar100", ("cifar-100-python", ("meta", "train", "test"))),
    ("tiny-imagenet", ("tiny-imagenet-200", "wnids.txt")),
    ("svhn", ("train_32x32.mat", "test_32x32.mat", "svhn/train_32x32.mat", "svhn/test_32x32.mat")),
    ("mnist", ("mnist", "MNIST")),
    ("fashion-mnist", ("fashion-mnist", "fashion_mnist", "FashionMNIST")),
)


def _marked(root: Path, mark) -> bool:
    if isinstance(mark, tuple):
        return all((root / m).is_file() for m in mark)
    return (root / mark).exists()


def datasets_found(root: Path) -> List[str]:
    """The dataset names whose files or folders sit directly under ``root``."""
    found = []
    try:
        for name, marks in _SIGNATURES:
            if any(_marked(root, m) for m in marks):
                found.append(name)
    except OSError:
        return []
    return found


def mixup_hint(root: Path, dataset: str) -> str:
    """' (... holds <other> files: ...)' when ``root`` looks like another dataset's folder."""
    other = [d for d in datasets_found(root) if d != dataset]
    if not other:
        return ""
    return (f"; {str(root)!r} looks like the folder of {' and '.join(other)}, not {dataset}: "
            f"is the dataset name right?")


def _not_a_folder(root: Path, dataset: str, looking_for: str) -> FileNotFoundError:
    if root.is_file():
        return FileNotFoundError(f"root: {dataset}: {str(root)!r} is a file, not a folder (an archive? extract it "
                                 f"and pass the folder it makes)")
    return FileNotFoundError(f"root: {dataset}: the folder {str(root)!r} does not exist{looking_for}")


def _candidates(base: Path, filename: str, compressed_ok: bool) -> List[Path]:
    return [base / n for n in ((filename, filename + ".gz") if compressed_ok else (filename,))]


def find_file(root: Path, subdirs: Sequence[str], filename: str, dataset: str, compressed_ok: bool = True) -> Path:
    """The first ``root/<subdir>/<filename>`` (or ``.gz`` when ``compressed_ok``) that is a file;
    FileNotFoundError naming the dataset, the file and every path tried otherwise."""
    return find_files(root, subdirs, [filename], dataset, compressed_ok)[0]


def find_files(root: Path, subdirs: Sequence[str], filenames: Sequence[str], dataset: str,
               compressed_ok: bool = True) -> List[Path]:
    """The files ``filenames`` (each also as ``.gz`` when ``compressed_ok``), all from one folder:
    the first ``root/<subdir>`` that holds any of them. A folder holding only some is refused
    naming the missing ones, rather than completed from another folder, which would mix two
    copies of the dataset without a word."""
    tried = []
    for sub in subdirs:
        base = root / sub if sub else root
        found = {}
        for filename in filenames:
            cands = _candidates(base, filename, compressed_ok)
            tried.extend(str(p) for p in cands)
            hit = next((p for p in cands if p.is_file()), None)
            if hit is not None:
                found[filename] = hit
        if len(found) == len(filenames):
            return [found[f] for f in filenames]
        if found:
            missing = [f for f in filenames if f not in found]
            raise FileNotFoundError(
                f"root: {dataset}: the folder {str(base)!r} holds {', '.join(map(repr, found))} but not "
                f"{', '.join(map(repr, missing))}{' (or .gz)' if compressed_ok else ''} (a partial copy of the dataset?)")
    if not root.is_dir():
        raise _not_a_folder(root, dataset, f" (looking for {filenames[0]!r})")
    raise FileNotFoundError(
        f"root: {dataset} file {filenames[0]!r}{' (or .gz)' if compressed_ok else ''} not found under {str(root)!r}; "
        f"tried: {', '.join(tried)}{mixup_hint(root, dataset)}")


def find_dir(root: Path, candidates: Sequence[str], marker: str, dataset: str) -> Path:
    """The first ``root/<candidate>`` holding ``marker`` (a file or folder); FileNotFoundError
    naming the dataset and the paths tried otherwise."""
    if not root.is_dir():
        raise _not_a_folder(root, dataset, "")
    tried = []
    for sub in candidates:
        base = root / sub if sub else root
        tried.append(str(base / marker))
        if (base / marker).exists():
            return base
    raise FileNotFoundError(f"root: {dataset}: {marker!r} not found under {str(root)!r}; tried: "
                            f"{', '.join(tried)}{mixup_hint(root, dataset)}")


def require_dir(path: Path, dataset: str, what: str) -> Path:
    """``path`` if it is a folder; FileNotFoundError naming the dataset, ``what`` and the path."""
    if not path.is_dir():
        raise FileNotFoundError(f"root: {dataset}: {what} folder {str(path)!r} not found (a partial copy of the dataset?)")
    return path


def require_file(path: Path, dataset: str, what: str) -> Path:
    """``path`` if it is a file; FileNotFoundError naming the dataset, ``what`` and the path."""
    if not path.is_file():
        raise FileNotFoundError(f"root: {dataset}: {what} {str(path)!r} not found (a partial copy of the dataset?)")
    return path
