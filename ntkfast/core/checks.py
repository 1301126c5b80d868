"""Argument checks shared across ntkfast: each names the argument and says what it expected.

Every public entry point validates its scalar arguments through these before doing any work, so
a bad value fails at once with a message naming it, and nothing of the user's is touched. Errors
read ``"<name>: expected <what>, got <value>"`` (ValueError); :func:`check_int` with
``type_error=True`` is the ops' form, ``"<name> must be an int, got <type>"`` (TypeError), as
PyTorch's own ops word a wrong type.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

__all__ = ["check_int", "check_number", "check_choice", "check_density", "check_device", "check_shape", "check_mask", "check_seed",
           "check_bytes"]


def _expected(name: str, what: str, value) -> ValueError:
    return ValueError(f"{name}: expected {what}, got {value!r}")


def _finite(value) -> bool:
    # an int is finite however large (math.isfinite would overflow converting it to a float)
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def check_int(value, name: str, *, lo: Optional[int] = None, allow_none: bool = False,
              type_error: bool = False) -> Optional[int]:
    """An int (numpy integers too, never bool), at least ``lo``; None passes with ``allow_none``.
    ``type_error``: a value that is no int raises TypeError (the ops' convention)."""
    if value is None and allow_none:
        return None
    what = f"an int{f' >= {lo}' if lo is not None else ''}{' or None' if allow_none else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if type_error:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        raise _expected(name, what, value)
    if lo is not None and value < lo:
        raise _expected(name, what, value)
    return int(value)


def check_number(value, name: str, *, lo: Optional[float] = None, lo_open: bool = False,
                 hi: Optional[float] = None, hi_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """A finite real number (never bool) within the bounds, as a float; None passes with ``allow_none``."""
    if value is None and allow_none:
        return None
    bounds = ([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []) + \
             ([f"{'<' if hi_open else '<='} {hi}"] if hi is not None else [])
    what = f"a finite number{' ' + ' and '.join(bounds) if bounds else ''}{' or None' if allow_none else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
        raise _expected(name, what, value)
    try:
        v = float(value)
    except OverflowError:
        raise _expected(name, what, value) from None
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise _expected(name, what, value)
    return v


def check_choice(value, name: str, choices: Sequence):
    """One of ``choices`` (compared with ==)."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise _expected(name, f"one of {', '.join(map(repr, choices))}", value)
    return value


def check_density(value, name: str = "density") -> float:
    """A fraction of weights kept: a number in (0, 1]."""
    return check_number(value, name, lo=0.0, lo_open=True, hi=1.0)


def check_device(device, name: str = "device") -> torch.device:
    """A device torch understands; CUDA only where it is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name}: not a device ({exc}), got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: {device!r} requested but there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cpu" and dev.index not in (None, 0):  # torch ignores it; a typo for cuda:N, most likely
        raise ValueError(f"{name}: there is one CPU device, 'cpu'; got {device!r}")
    if dev.type == "meta":
        raise ValueError(f"{name}: the meta device holds no values; give cpu or cuda")
    return dev


def check_shape(shape, name: str) -> tuple:
    """A non-empty sequence of positive ints (an int is one dimension), as a tuple."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise _expected(name, "a sequence of positive ints", shape) from None
    if not dims or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise _expected(name, "a non-empty sequence of positive ints", shape)
    return tuple(int(d) for d in dims)


def check_bytes(value, name: str = "memory_budget") -> Optional[int]:
    """A positive number of bytes, or None (the default budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or not value > 0:
        raise _expected(name, "a positive number of bytes", value)
    return int(value)


def check_mask(value, name: str) -> torch.Tensor:
    """A mask as a bool tensor: a bool tensor, or a real one holding only 0 and 1 (a soft mask,
    NaN or a complex tensor is refused, not read as "kept" wherever it is non-zero)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a bool (or 0/1) tensor, got {type(value).__name__}")
    if value.is_meta:
        raise ValueError(f"{name}: a meta tensor has no values; expected a bool (or 0/1) tensor")
    if value.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense bool (or 0/1) tensor, got layout {value.layout} (call .to_dense())")
    t = value.detach()
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise ValueError(f"{name}: expected a bool (or 0/1) tensor, got dtype {t.dtype}")
    bad = (t != 0) & (t != 1)  # NaN compares unequal to both
    if bool(bad.any()):
        first = t[bad].reshape(-1)[0].item()
        raise ValueError(f"{name}: expected a bool (or 0/1) tensor, got {int(bad.sum())} value(s) other than 0 and 1 "
                         f"(e.g. {first!r}); a soft mask is not a mask")
    return t != 0


def check_seed(value, name: str = "seed") -> int:
    """A seed torch's generators take: an int in [-2**63, 2**64) (numpy integers too, never bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -2**63 <= value < 2**64:
        raise _expected(name, "an int in [-2**63, 2**64)", value)
    return int(value)
