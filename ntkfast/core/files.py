"""How ntkfast writes and checks the user's files.

Every writer goes through :func:`atomic_write`: the bytes land in a temporary file in the target's
own folder (so the rename stays on one file system) and are renamed into place, so an
interruption, a full disk or an error halfway leaves the old file as it was. :func:`check_out_path`
runs before any work: a run of hours must not end in a traceback about its output path. The
library refuses a missing folder, as ``open`` and ``torch.save`` do; the CLI's ``--out`` accepts
one that can be made (``missing_folders_ok``) and makes it just before writing
(:func:`make_folder`), so that a run that fails leaves no empty folders behind.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import tempfile
from collections.abc import Mapping
from typing import Callable, Iterator, Optional

__all__ = ["atomic_write", "atomic_writer", "check_out_path", "check_out_dir", "make_folder", "plain_data", "read_prefix",
           "check_in_path"]


def check_out_path(path, name: str, *, exists_ok: bool = True, missing_folders_ok: bool = False):
    """The output file ``path`` as a str, checked before the work: its folder exists and is
    writable (or, with ``missing_folders_ok``, can be made: see :func:`make_folder`), and it is
    not a folder. ValueError naming ``name`` otherwise; nothing is created."""
    if path is None:
        return None
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{name}: expected a file path, got an empty string")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a folder; give a file path")
    target = os.path.realpath(path)  # a symlink is written through, to the file it points at
    if os.path.exists(target) and not os.path.isfile(target):
        raise ValueError(f"{name}: {path!r} is not a regular file (a device, pipe or socket); give a file path")
    if os.path.isfile(target) and not os.stat(target).st_mode & 0o222:
        raise ValueError(f"{name}: {path!r} is read-only; make it writable or give another path")
    if os.path.exists(path) and not exists_ok:
        raise ValueError(f"{name}: {path!r} exists already")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if missing_folders_ok:
            _check_creatable(folder, name)
            return path
        raise ValueError(f"{name}: the folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write in the folder {folder!r} (permission denied)")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{name}: {path!r} is not writable (permission denied)")
    return path


def check_out_dir(path, name: str, *, missing_folders_ok: bool = False):
    """The output folder ``path`` as a str, checked before the work: it is a folder (or can be made
    in an existing, writable parent; with ``missing_folders_ok``, with its missing parents too).
    Nothing is created."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{name}: {path!r} is a file; give a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{name}: cannot write in the folder {path!r} (permission denied)")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        if missing_folders_ok:
            _check_creatable(parent, name)
            return path
        raise ValueError(f"{name}: the folder {parent!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot create {path!r} (permission denied)")
    return path


def _check_creatable(folder: str, name: str) -> None:
    """``folder`` can be made with its missing parents: the nearest part of the path that exists is
    a writable folder. ValueError naming ``name`` otherwise."""
    existing = folder
    while not os.path.lexists(existing):  # lexists: a dangling link ends the walk, and is refused below
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ValueError(f"{name}: cannot create the folder {folder!r}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot create the folder {folder!r} in {existing!r} (permission denied)")


def make_folder(folder, name: str) -> None:
    """``mkdir -p folder``: nothing to do where it exists; ValueError naming ``name`` where a part
    of the path is a file, or the folder cannot be made (permissions, a read-only file system)."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.isdir(folder):
        return
    _check_creatable(folder, name)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name}: cannot create the folder {folder!r} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_writer(path, mode: str = "wb") -> Iterator:
    """An open temporary file beside ``path``; on a clean exit it is flushed, synced and renamed
    over ``path`` (keeping an existing file's permissions); on an error it is removed and ``path``
    is untouched. ``path`` is checked first (:func:`check_out_path`): a folder, a device, a pipe or
    a read-only file is refused; a symlink is followed. A file with several hard links gets a new
    inode: the other names keep the old content."""
    path = check_out_path(path, "path")
    # through a symlink to its target, so that the link stays a link and its target is what changes
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:  # a new file: the umask's usual permissions, not mkstemp's 0600
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path, write: Callable, mode: str = "wb") -> None:
    """``write(f)`` into a temporary file renamed over ``path`` (see :func:`atomic_writer`);
    ``write`` may be ``torch.save``'s partial or any function taking an open file."""
    with atomic_writer(path, mode) as f:
        write(f)


def read_prefix(path, n: int) -> Optional[bytes]:
    """The first ``n`` bytes of ``path``, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        return None


def plain_data(value, _depth: int = 0):
    """``value`` as plain data torch.load(weights_only=True) reads: tensors, numbers, strings, None,
    lists and str-keyed dicts; anything else, and anything nested deeper than 32 levels (a cycle),
    as its text."""
    import torch

    if _depth > 32:
        return "<nested too deeply>"
    if value is None or isinstance(value, (bool, str, torch.Tensor)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): plain_data(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, _depth + 1) for v in value]
    return str(value)


def check_in_path(path, name: str) -> str:
    """The input file ``path`` as a str: a path (not another type), naming an existing regular file
    (a folder, a pipe that would block the reader, a device: refused). FileNotFoundError when it
    does not exist."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no file at {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {path!r} is not a regular file (a device, pipe or socket)")
    return path
