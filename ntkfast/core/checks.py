"""Argument checks shared across ntkfast: each names the argument and says what it expected.

Every public entry point validates its scalar arguments through these before doing any work, so
a bad value fails at once with a message naming it, and nothing of the user's is touched."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

__all__ = ["check_int", "check_number", "check_choice", "check_device", "check_shape", "check_bytes"]


def check_int(value, name: str, *, lo: Optional[int] = None, allow_none: bool = False,
              error: type = TypeError) -> Optional[int]:
    """An int (numpy integers too, not bool); ``lo``: the smallest allowed. A wrong type raises
    ``error`` (TypeError by default), a value below ``lo`` ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an int, got {type(value).__name__}" if error is TypeError else
                    f"{name} must be an int{f' >= {lo}' if lo is not None else ''}"
                    f"{' or None' if allow_none else ''}, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be an int >= {lo}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_number(value, name: str, *, lo: Optional[float] = None, lo_open: bool = False,
                 hi: Optional[float] = None, hi_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """A finite real number (not bool) in the given bounds, as a float; ValueError otherwise."""
    if value is None and allow_none:
        return None
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    want = f"a finite number{' ' + ' and '.join(bounds) if bounds else ''}{' or None' if allow_none else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    v = float(value)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return v


def check_choice(value, name: str, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_device(device, name: str = "device") -> torch.device:
    """A device torch understands; CUDA only where it is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {device!r} requested but CUDA is not available")
    return dev


def check_shape(shape, name: str) -> tuple:
    """A non-empty sequence of positive ints (an int is one dimension)."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {shape!r}") from None
    if not dims or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def check_bytes(value, name: str = "memory_budget") -> Optional[int]:
    """A positive number of bytes, or None (the default budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name}: expected a positive number of bytes, got {value!r}")
    return int(value)
