"""``nm_mask``: N:M semi-structured selection, the n highest scores in every group of m consecutive
entries along the last dimension (csrc/cpu/nm_mask_cpu.cpp, csrc/cuda/nm_mask.cu), its fake
function, and the reshape + stable-sort reference."""
from __future__ import annotations

import numbers
import re
from typing import Optional

import torch

from .loader import Family
from .topk_mask import _NAN_HINT

FAMILY = Family("nm_mask", "nm_mask")

if FAMILY.defined:

    @torch.library.register_fake("ntkfast::nm_mask")
    def _nm_mask_fake(scores, n, m, keep):
        # the kernels return a contiguous tensor whatever the scores' strides
        return scores.new_empty(scores.shape, dtype=torch.bool)


def _label(name: Optional[str]) -> str:
    return "scores" + (f" ({name!r})" if name is not None else "")


def _check_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"nm_mask: {what} must be an int, got {type(v).__name__}")
    return int(v)


def _check_nm_args(scores, n, m, keep, name) -> tuple:
    """The kernels' checks, in their order and words (csrc/nm_mask_prepare.h), before any work, so
    the reference refuses what the kernels refuse; and the weight's name in the messages."""
    n, m = _check_int(n, "n"), _check_int(m, "m")
    label = _label(name)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"nm_mask: scores must be a tensor, got {type(scores).__name__}")
    if m < 1:
        raise ValueError(f"nm_mask: m must be >= 1, got {m}")
    if not 1 <= n <= m:
        raise ValueError(f"nm_mask: n must lie in [1, m={m}], got {n}")
    if not scores.is_floating_point():
        raise ValueError(f"nm_mask: {label} must be a floating tensor, got {scores.dtype}")
    if scores.is_meta:  # a selection needs values; the meta device has none
        raise ValueError(f"nm_mask: {label} is a meta tensor, which holds no values to rank")
    if scores.dim() < 1:
        raise ValueError(f"nm_mask: {label} must have a dimension for the groups to run along, got a 0-d tensor")
    if scores.shape[-1] % m:
        raise ValueError(f"nm_mask: the last dimension of {label} ({scores.shape[-1]}) is not a multiple of m={m}")
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"nm_mask: keep must be bool, got {got}")
        if keep.shape != scores.shape:
            raise ValueError(f"nm_mask: keep has shape {tuple(keep.shape)} but {label} has shape {tuple(scores.shape)}")
        if keep.device != scores.device:
            raise ValueError(f"nm_mask: keep is on {keep.device} but {label} is on {scores.device}")
    return n, m


def _rename(exc: ValueError, name: Optional[str]) -> ValueError:
    msg = str(exc).split("\nException raised from")[0]
    if name is not None:
        msg = re.sub(r"\bscores\b", _label(name), msg, count=1)
    return ValueError(msg)


def nm_mask(scores: torch.Tensor, n: int, m: int, keep: Optional[torch.Tensor] = None, *,
            name: Optional[str] = None) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive entries along the last
    dimension of ``scores`` (N:M semi-structured sparsity: ``n=2, m=4`` is 2:4).

    Returns a contiguous bool tensor shaped like ``scores``. The last dimension must be a multiple
    of ``m`` (so no group straddles two rows), and ``1 <= n <= m``. Rules, the same on every
    device and in :func:`nm_mask_reference`:

    - **ties**: among equal scores the lower index in the group wins (a stable sort); ``-0.0``
      ties with ``+0.0``; ``-inf`` and ``+inf`` are ordinary values.
    - **keep**: an entry whose ``keep`` is False is never kept and takes no part in the selection,
      whatever its score (NaN and infinities included). A group with fewer than ``n`` keepable
      entries keeps all it has, so it holds fewer than ``n``: the masks have *at most* ``n`` per
      group, *exactly* ``n`` wherever ``keep`` leaves ``n`` or more.
    - **NaN** in a keepable entry raises ValueError naming the tensor (``name``, if given): it
      cannot be ranked, and usually means the scores went wrong.
    - **dtypes**: float16 and bfloat16 are compared in float32 (exactly), float32 and float64 as
      they are; any strides.
    """
    n, m = _check_nm_args(scores, n, m, keep, name)
    if FAMILY.use(scores.device):
        try:
            return torch.ops.ntkfast.nm_mask(scores.detach(), n, m, keep)
        except ValueError as exc:
            raise _rename(exc, name) from None
    return nm_mask_reference(scores, n, m, keep, name=name)


def nm_mask_reference(scores: torch.Tensor, n: int, m: int, keep: Optional[torch.Tensor] = None, *,
                      name: Optional[str] = None) -> torch.Tensor:
    """Reshape to ``[-1, m]``, stable sort each group descending, take the first ``n``: the
    semantics of :func:`nm_mask`, written plainly."""
    n, m = _check_nm_args(scores, n, m, keep, name)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.detach().to(dtype).reshape(-1, m)
    alive = keep.reshape(-1, m) if keep is not None else torch.ones_like(x, dtype=torch.bool)
    if bool((torch.isnan(x) & alive).any()):
        raise ValueError(f"nm_mask: {_label(name)} contains NaN{_NAN_HINT}")
    # what is not keepable plays no part: its value is replaced (a NaN there would poison the sort)
    # and it is moved behind every keepable entry by a second stable sort, which keeps the score
    # order of the first among the keepable ones. + 0.0 makes -0.0 a +0.0, so the two tie.
    x = torch.where(alive, x + 0.0, torch.zeros((), dtype=dtype, device=x.device))
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    dead = (~alive).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(dead, dim=1, stable=True).indices)
    out = torch.zeros_like(alive)
    out.scatter_(1, order[:, :n], True)
    return (out & alive).reshape(scores.shape)
