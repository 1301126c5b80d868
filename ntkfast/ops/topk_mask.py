"""``topk_mask`` / ``topk_mask_layerwise``: keep exactly the k highest scores over a list of
tensors without concatenating them (csrc/cpu/topk_mask_cpu.cpp, csrc/cuda/topk_mask.cu), their
fake functions, and the torch.cat + stable-sort reference."""
from __future__ import annotations

import numbers
import re
from typing import Optional, Sequence

import torch

from .loader import Family

FAMILY = Family("topk_mask", "topk_mask", "topk_mask_layerwise")
# the kernels' words (csrc/topk_prepare.h, kNanHint), so that every path raises the same message
_NAN_HINT = " where keep allows it: a NaN cannot be ranked (give it keep=False, or a number)"

if FAMILY.defined:

    @torch.library.register_fake("ntkfast::topk_mask")
    def _topk_mask_fake(scores, k, keep, drop_ties=False, clamp=False):
        return [torch.empty_like(s, dtype=torch.bool) for s in scores]

    @torch.library.register_fake("ntkfast::topk_mask_layerwise")
    def _topk_mask_layerwise_fake(scores, ks, keep, drop_ties=False, clamp=False):
        return [torch.empty_like(s, dtype=torch.bool) for s in scores]


def _label(i: int, names: Optional[Sequence[str]]) -> str:
    return f"scores[{i}]" + (f" ({names[i]!r})" if names is not None else "")


def _check_topk_args(scores, keep, names) -> None:
    if not isinstance(scores, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in scores):
        raise TypeError("scores must be a list of tensors")
    if names is not None and len(names) != len(scores):
        raise ValueError(f"names has {len(names)} entries but scores has {len(scores)}")
    devices = {s.device for s in scores}
    if len(devices) > 1:
        raise ValueError(f"scores must all be on one device, got {sorted(map(str, devices))}")
    for i, s in enumerate(scores):
        if not s.is_floating_point():
            raise ValueError(f"{_label(i, names)} must be a floating tensor, got {s.dtype}")
        if s.is_meta:  # a top-k needs values; the meta device has none
            raise ValueError(f"{_label(i, names)} is a meta tensor, which holds no values to rank")
    if keep is not None:
        if len(keep) != len(scores):
            raise ValueError(f"keep has {len(keep)} tensors but scores has {len(scores)}")
        for i, (s, kp) in enumerate(zip(scores, keep)):
            if kp.dtype != torch.bool:
                raise ValueError(f"keep[{i}] must be a bool tensor, got {kp.dtype}")
            if kp.shape != s.shape:
                raise ValueError(f"keep[{i}] has shape {tuple(kp.shape)} but {_label(i, names)} has {tuple(s.shape)}")
            if kp.device != s.device:
                raise ValueError(f"keep[{i}] is on {kp.device} but {_label(i, names)} is on {s.device}")


def _rename(exc: ValueError, names: Optional[Sequence[str]]) -> ValueError:
    msg = str(exc).split("\nException raised from")[0]
    if names is not None:
        msg = re.sub(r"scores\[(\d+)\]", lambda m: _label(int(m.group(1)), names), msg)
    return ValueError(msg)


def _check_k(k, name: str, clamp: bool = False) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)  # numpy integers too
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    if k >= 2**62:
        if clamp:  # any k above the alive count means "all of them"
            return 2**62
        raise ValueError(f"{name}={k} is beyond any tensor list's size")
    return k


def topk_mask(
    scores: Sequence[torch.Tensor],
    k: int,
    keep: Optional[Sequence[torch.Tensor]] = None,
    *,
    drop_ties: bool = False,
    clamp: bool = False,
    names: Optional[Sequence[str]] = None,
) -> list:
    """Keep exactly the ``k`` highest scores across all tensors, without concatenating them.

    Returns one bool tensor per score tensor. Entries whose ``keep`` is False are never kept and
    take no part in the selection, whatever their score (NaN, ``+inf`` and ``-inf`` included): the
    masks are those with any other values there. Ties at the threshold are broken
    deterministically: among equal scores the entry with the lowest flat position wins, where
    positions run through the tensors in list order and through each tensor in row-major order.
    ``-0.0`` and ``+0.0`` tie. ``-inf``/``+inf`` are ordinary values where keep allows them. A NaN
    in an entry that may be kept raises ValueError naming the tensor (``names``, if given, label
    the tensors in messages): it cannot be ranked, and is refused rather than silently dropped,
    since a NaN score usually means the scores went wrong. ``k`` larger than
    the number of entries that may be kept raises ValueError, or with ``clamp=True`` keeps all of
    them.

    ``drop_ties=True`` keeps only the entries scoring strictly above the (k+1)-th highest: the top
    k minus every entry tied with the first one left out, so possibly fewer than k. This is the
    masking rule of the Synaptic-Flow / NTK-SAP code (``score <= kthvalue`` is pruned).
    """
    _check_topk_args(scores, keep, names)
    k = _check_k(k, "k", clamp)
    if len(scores) == 0:
        if k:
            raise ValueError(f"k={k} exceeds the 0 entries that may be kept")
        return []
    keep_list = list(keep) if keep is not None else None
    if FAMILY.use(scores[0].device):
        try:
            return list(torch.ops.ntkfast.topk_mask(list(scores), k, keep_list, drop_ties, clamp))
        except ValueError as exc:
            raise _rename(exc, names) from None
    return topk_mask_reference(scores, k, keep_list, drop_ties=drop_ties, clamp=clamp, names=names)


def topk_mask_layerwise(
    scores: Sequence[torch.Tensor],
    ks: Sequence[int],
    keep: Optional[Sequence[torch.Tensor]] = None,
    *,
    drop_ties: bool = False,
    clamp: bool = False,
    names: Optional[Sequence[str]] = None,
) -> list:
    """Per-tensor variant of :func:`topk_mask`: keep exactly ``ks[i]`` entries of ``scores[i]``
    (``drop_ties`` and ``clamp`` apply per tensor)."""
    _check_topk_args(scores, keep, names)
    if len(ks) != len(scores):
        raise ValueError(f"ks has {len(ks)} entries but scores has {len(scores)}")
    ks = [_check_k(k, f"ks[{i}]", clamp) for i, k in enumerate(ks)]
    if len(scores) == 0:
        return []
    keep_list = list(keep) if keep is not None else None
    if FAMILY.use(scores[0].device):
        try:
            return list(torch.ops.ntkfast.topk_mask_layerwise(list(scores), ks, keep_list, drop_ties, clamp))
        except ValueError as exc:
            raise _rename(exc, names) from None
    return topk_mask_layerwise_reference(scores, ks, keep_list, drop_ties=drop_ties, clamp=clamp, names=names)


def topk_mask_reference(scores, k, keep=None, *, drop_ties=False, clamp=False, names=None) -> list:
    """torch.cat + stable sort: the semantics of :func:`topk_mask`, written plainly."""
    _check_topk_args(scores, keep, names)
    k = _check_k(k, "k", clamp)
    if len(scores) == 0:
        if k:
            raise ValueError(f"k={k} exceeds the 0 entries that may be kept")
        return []
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32
    flat = torch.cat([s.detach().reshape(-1).to(dtype) for s in scores])
    alive = (
        torch.cat([kp.reshape(-1) for kp in keep]) if keep is not None else torch.ones_like(flat, dtype=torch.bool)
    )
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.numel())
    nan = torch.isnan(flat) & alive
    if bool(nan.any()):
        first = int(torch.nonzero(nan)[0])
        i = next(j for j in range(len(scores)) if offsets[j] <= first < offsets[j + 1])
        raise ValueError(f"topk_mask: {_label(i, names)} contains NaN{_NAN_HINT}")
    n_alive = int(alive.sum())
    if clamp:
        k = min(k, n_alive)
    if k > n_alive:
        raise ValueError(f"topk_mask: k={k} exceeds the {n_alive} entries that may be kept (keep is True)")
    idx = torch.nonzero(alive).reshape(-1)
    vals = flat[idx] + 0.0  # -0.0 -> +0.0 so signed zeros tie
    order = torch.sort(vals, descending=True, stable=True).indices
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[idx[order[:k]]] = True
    if drop_ties and 0 < k < n_alive:
        out &= alive & (flat + 0.0 > vals[order[k]])
    return [out[offsets[i] : offsets[i + 1]].view(s.shape) for i, s in enumerate(scores)]


def topk_mask_layerwise_reference(scores, ks, keep=None, *, drop_ties=False, clamp=False, names=None) -> list:
    """Per-tensor :func:`topk_mask_reference`."""
    _check_topk_args(scores, keep, names)
    if len(ks) != len(scores):
        raise ValueError(f"ks has {len(ks)} entries but scores has {len(scores)}")
    ks = [_check_k(k, f"ks[{i}]", clamp) for i, k in enumerate(ks)]
    out = []
    for i, s in enumerate(scores):
        try:
            out += topk_mask_reference([s], ks[i], [keep[i]] if keep is not None else None,
                                       drop_ties=drop_ties, clamp=clamp)
        except ValueError as exc:
            # the single-tensor call says scores[0]; name the tensor in the caller's list
            raise ValueError(str(exc).replace("scores[0]", _label(i, names), 1)) from None
    return out
