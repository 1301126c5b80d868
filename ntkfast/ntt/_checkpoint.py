"""Checkpoints of a Neural Tangent Transfer, so that a long run (20 epochs of LeNet-5 on a CPU, a
ResNet on CIFAR-10) can be interrupted and resumed with the same result.

A checkpoint holds everything the loop's future depends on: the student's state, Adam's state,
the current mask, the position in the seeded epoch order, the history and the elapsed time. It
also holds a fingerprint of what the run was started with (settings, teacher weights, data), and
a checkpoint whose fingerprint differs from the current call's is refused rather than silently
mixed into another run.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..core.files import atomic_write, check_in_path

FORMAT = "ntkfast.transfer-checkpoint/1"
_KEYS = ("fingerprint", "step", "epoch", "in_epoch", "student", "optimizer", "masks", "history", "pending", "elapsed")


def _checksum(tensors) -> list:
    """Two float64 sums per tensor: cheap, and enough to tell another initialisation or dataset."""
    out = []
    for t in tensors:
        t = t.detach().to("cpu", torch.float64)
        out.append([float(t.sum()), float(t.abs().sum())])
    return out


def fingerprint(teacher: torch.nn.Module, settings: dict, first_batch: torch.Tensor, n_train: int,
                validation: Optional[torch.Tensor]) -> dict:
    return {
        "settings": dict(settings),
        "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in teacher.named_parameters()],
        "teacher": _checksum(p for _, p in teacher.named_parameters()),
        "data": {"n_train": n_train, "first_batch": _checksum([first_batch]),
                 "validation": None if validation is None else _checksum([validation])},
    }


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _difference(saved: dict, now: dict) -> str:
    for part in ("settings", "parameters", "teacher", "data"):
        if not _same(saved.get(part), now.get(part)):
            if part == "settings":
                keys = sorted(k for k in set(saved[part]) | set(now[part])
                              if not _same(saved[part].get(k), now[part].get(k)))
                return "settings " + ", ".join(f"{k} (saved {saved[part].get(k)!r}, now {now[part].get(k)!r})"
                                               for k in keys)
            return {"parameters": "the model's parameters (names or shapes)", "teacher": "the teacher's weights",
                    "data": "the training or validation data"}[part]
    return ""


def load(path, expected: dict) -> Optional[dict]:
    """The saved state, or None when ``path`` does not exist yet."""
    if not os.path.exists(path):
        return None
    check_in_path(path, "checkpoint")  # a folder or a pipe (which would block the reader) is refused
    try:
        # weights_only: a checkpoint is tensors, numbers, strings and containers, so the restricted
        # unpickler reads it whole; a file that asks for anything else (code) is refused unread
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or hostile file
        raise ValueError(f"checkpoint: {os.fspath(path)!r} is not a readable transfer checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {os.fspath(path)!r} is not an ntkfast transfer checkpoint")
    missing = [k for k in _KEYS if k not in state]
    if missing or not isinstance(state.get("fingerprint"), dict):
        raise ValueError(f"checkpoint: {os.fspath(path)!r} is an incomplete transfer checkpoint "
                         f"(missing {', '.join(missing) or 'fingerprint'})")
    diff = _difference(state["fingerprint"], expected)
    if diff:
        raise ValueError(f"checkpoint: {os.fspath(path)!r} belongs to another transfer: {diff} differ; "
                         "pass another path to start afresh")
    return state


def save(path, state: dict) -> None:
    """Written to a temporary file and renamed: an interruption never leaves a half checkpoint."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
