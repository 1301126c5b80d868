"""One thin wrapper per compiled op (torch.ops.ntkfast.*), its fake function and its pure-PyTorch
reference. The reference is what runs when the extension is absent, and what tests hold the
kernels to. This module imports nothing else of the package.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_EXT = None
_EXT_ERROR: Optional[str] = None
try:  # the compiled extension registers torch.ops.ntkfast.* as a side effect of loading
    from . import _C as _EXT  # type: ignore[attr-defined, no-redef]
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"

_WARNED = False


def _fallback_warning() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "ntkfast: the compiled extension ntkfast._C could not be loaded "
            f"({_EXT_ERROR}); every op falls back to its pure-PyTorch reference, which is slower. "
            "Rebuild with `pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )


def extension_loaded() -> bool:
    return _EXT is not None


def build_info() -> dict:
    """Which backend is active and how the extension was built."""
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if _EXT is None:
        info.update(backend="reference", extension=False, cuda=False, error=_EXT_ERROR)
        return info
    info.update(dict(_EXT.build_info()))
    info["extension"] = True
    info["backend"] = "compiled-cuda" if info.get("cuda") else "compiled-cpu"
    info["threads"] = torch.get_num_threads()
    return info


_CUDA_KERNELS: Optional[bool] = None


def _cuda_kernels() -> bool:
    global _CUDA_KERNELS
    if _CUDA_KERNELS is None:
        _CUDA_KERNELS = _EXT is not None and bool(_EXT.build_info().get("cuda"))
    return _CUDA_KERNELS


def _use_kernel(device: torch.device) -> bool:
    if _EXT is None:
        _fallback_warning()
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if _cuda_kernels():
            return True
        _device_warning("cuda", "the extension was built without CUDA kernels (build with FORCE_CUDA=1)")
        return False
    _device_warning(device.type, "ntkfast has no kernels for this device")
    return False


_DEVICE_WARNED: set = set()


def _device_warning(device_type: str, why: str) -> None:
    if device_type not in _DEVICE_WARNED:
        _DEVICE_WARNED.add(device_type)
        warnings.warn(f"ntkfast: {device_type} tensors use the pure-PyTorch reference ops: {why}",
                      RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------
# top-k masking
# ----------------------------------------------------------------------------------------------

if _EXT is not None:

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

    Returns one bool tensor per score tensor. Entries whose ``keep`` is False are never kept.
    Ties at the threshold are broken deterministically: among equal scores the entry with the
    lowest flat position wins, where positions run through the tensors in list order and through
    each tensor in row-major order. ``-0.0`` and ``+0.0`` tie. ``-inf``/``+inf`` are ordinary
    values. A NaN in an entry that may be kept raises ValueError naming the tensor (``names``, if
    given, label the tensors in messages); NaNs where keep is False are ignored. ``k`` larger than
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
    if _use_kernel(scores[0].device):
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
    if _use_kernel(scores[0].device):
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
        raise ValueError(f"topk_mask: {_label(i, names)} contains NaN")
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


# ----------------------------------------------------------------------------------------------
# Philox normal numbers and NTK-SAP's perturbed masked weights
# ----------------------------------------------------------------------------------------------
#
# The stream (csrc/philox.h): normal number j of a 64-bit seed is lane j % 4 of Philox4x32-10 with
# counter (lo(j // 4), hi(j // 4), 0, 0) and key (lo(seed), hi(seed)); Box-Muller on the word
# pairs (x0, x1) and (x2, x3), in float32 (float64 for float64 outputs). The kernels read
# (seed, offset) from an int64 tensor ``philox`` of shape [2] on the device where they run.

_U32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MAX_OFFSET = 2**62
_NORMAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _has_ops(*names: str) -> bool:
    try:
        return all(hasattr(torch.ops.ntkfast, n) for n in names)
    except RuntimeError:
        return False


# An extension built before these ops must not break the import (registering a fake for a
# missing op raises): they then run as their references.
_PHILOX_OPS = _EXT is not None and _has_ops("philox_normal", "perturbed_masked", "perturbed_masked_backward")
_PHILOX_WARNED = False


def _use_philox_kernel(device: torch.device) -> bool:
    return _gate(device, "_PHILOX_OPS", "_PHILOX_WARNED", "philox_normal / perturbed_masked")


def _gate(device: torch.device, available: str, warned: str, what: str) -> bool:
    """Whether an op family's kernel runs on ``device``; the first time a build without it is
    asked, one warning. ``available`` and ``warned`` name this module's flags (tests patch them)."""
    if not _use_kernel(device):
        return False
    flags = globals()
    if not flags[available] and not flags[warned]:
        flags[warned] = True
        warnings.warn(f"ntkfast: the compiled extension predates {what}; it runs on the pure-PyTorch reference. "
                      "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=4)
    return flags[available]


if _PHILOX_OPS:

    @torch.library.register_fake("ntkfast::philox_normal")
    def _philox_normal_fake(philox, size, dtype):
        return torch.empty(size, dtype=dtype, device=philox.device)

    @torch.library.register_fake("ntkfast::perturbed_masked")
    def _perturbed_masked_fake(weight, mask, epsilon, philox):
        return weight.new_empty((2, *weight.shape))

    @torch.library.register_fake("ntkfast::perturbed_masked_backward")
    def _perturbed_masked_backward_fake(grad, weight, mask, epsilon, philox, output_mask):
        return (weight.new_empty(weight.shape if output_mask[0] else (0,)),
                mask.new_empty(mask.shape if output_mask[1] else (0,)))

    def _perturbed_masked_setup_context(ctx, inputs, output):
        weight, mask, epsilon, philox = inputs
        # philox is saved like the others, so writing to it before the backward is caught by
        # autograd's version check instead of silently regenerating other numbers
        ctx.save_for_backward(weight, mask, philox)
        ctx.epsilon = epsilon

    def _perturbed_masked_backward(ctx, grad):
        weight, mask, philox = ctx.saved_tensors
        need_w, need_m = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        grad_weight, grad_mask = torch.ops.ntkfast.perturbed_masked_backward(
            grad, weight, mask, ctx.epsilon, philox, [need_w, need_m])
        return grad_weight if need_w else None, grad_mask if need_m else None, None, None

    torch.library.register_autograd("ntkfast::perturbed_masked", _perturbed_masked_backward,
                                    setup_context=_perturbed_masked_setup_context)


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _check_seed(seed) -> int:
    """The seed as the int64 bit pattern the kernels take."""
    seed = _check_int(seed, "seed")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64) (a negative seed is read as its int64 bit pattern), "
                         f"got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def _check_offset(offset) -> int:
    offset = _check_int(offset, "offset")
    if not 0 <= offset < _MAX_OFFSET:
        raise ValueError(f"offset must be in [0, 2**62), got {offset}")
    return offset


def _check_epsilon(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
    epsilon = float(epsilon)
    if not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite, got {epsilon}")
    return epsilon


def _check_size(size) -> tuple:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size,)
    try:
        size = tuple(_check_int(s, "size") for s in size)
    except TypeError:
        raise TypeError(f"size must be an int or a sequence of ints, got {size!r}") from None
    if any(s < 0 for s in size):
        raise ValueError(f"size must not have negative entries, got {size}")
    return size


def _check_normal_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in _NORMAL_DTYPES:
        raise ValueError(f"{name} must be one of float16, bfloat16, float32, float64, got {dtype}")
    return dtype


def _check_philox_tensor(philox, device: torch.device, where: str = "weight") -> None:
    if not isinstance(philox, torch.Tensor):
        raise TypeError(f"philox must be an int64 tensor of shape [2] (seed, offset), got {type(philox).__name__}")
    if philox.dtype != torch.int64 or tuple(philox.shape) != (2,):
        raise ValueError(f"philox must be an int64 tensor of shape [2] (seed, offset), got {philox.dtype} "
                         f"of shape {tuple(philox.shape)}")
    if philox.device != device:
        raise ValueError(f"philox is on {philox.device} but {where} is on {device}")
    if philox.device.type == "cpu":  # on a GPU the value stays there: reading it would sync
        offset = int(philox[1])
        if not 0 <= offset < _MAX_OFFSET:
            raise ValueError(f"philox[1] (the offset) must be in [0, 2**62), got {offset}")


def _philox_source(seed, offset, philox, device: torch.device):
    """Either the checked philox tensor or a checked (seed as int64 bits, offset) pair."""
    if philox is not None:
        if seed is not None:
            raise ValueError("give either seed (and offset) or philox, not both")
        if not (isinstance(offset, numbers.Integral) and offset == 0):
            raise ValueError("offset must be left at 0 when philox is given: the offset is philox[1]")
        _check_philox_tensor(philox, device)
        return philox
    if seed is None:
        raise TypeError("a seed (or philox=) is needed")
    return _check_seed(seed), _check_offset(offset)


def _philox_tensor(source, device: torch.device) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    return torch.tensor(list(source), dtype=torch.int64, device=device)


def _check_perturbed_args(weight, mask) -> None:
    for name, t in (("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    _check_normal_dtype(weight.dtype, "weight's dtype")
    if mask.dtype != weight.dtype:
        raise ValueError(f"mask must have weight's dtype {weight.dtype}, got {mask.dtype}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
    lead = weight.dim() - mask.dim()
    if lead < 0 or tuple(weight.shape[lead:]) != tuple(mask.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must equal the trailing dimensions of "
                         f"weight's shape {tuple(weight.shape)}")


def _mulhilo32(a: torch.Tensor, m: int):
    """High and low 32 bits of a * m (a: int64 tensor of 32-bit words, m: a 32-bit constant),
    with m split into 16-bit halves so that no int64 product overflows."""
    x = a * (m >> 16)
    y = a * (m & 0xFFFF)
    return (x + (y >> 16)) >> 16, (((x & 0xFFFF) << 16) + y) & _U32


def philox_words_reference(counter, key) -> torch.Tensor:
    """Philox4x32-10 with int64 tensor ops. ``counter``: int64 [..., 4] of 32-bit words c0..c3;
    ``key``: (k0, k1), ints or int64 tensors broadcasting against ``counter[..., 0]``. Returns the
    four output words, int64 [..., 4] in [0, 2**32)."""
    c0, c1, c2, c3 = torch.as_tensor(counter, dtype=torch.int64).unbind(-1)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], -1)


def _box_muller(x_even: torch.Tensor, x_odd: torch.Tensor, acc: torch.dtype):
    # one rounding per operation, in the kernels' order (csrc/philox.h); 2*pi rounded to acc first
    two_pi = torch.tensor(2 * math.pi, dtype=acc)
    u0 = (x_even.to(acc) + 0.5) * 2.0**-32
    u1 = (x_odd.to(acc) + 0.5) * 2.0**-32
    r = torch.sqrt(-2.0 * torch.log(u0))
    theta = two_pi * u1
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_normal_reference(philox, size, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Pure-PyTorch :func:`philox_normal`: normal numbers offset .. offset + numel - 1 of the stream.

    ``philox`` is a (seed, offset) pair of ints or an int64 tensor [2] holding them (read where it
    lies, without a host sync); ``device`` defaults to that tensor's device, else the CPU."""
    size = _check_size(size)
    dtype = _check_normal_dtype(dtype)
    if isinstance(philox, torch.Tensor):
        device = torch.device(device) if device is not None else philox.device
        _check_philox_tensor(philox, device, "device")
        seed, offset = philox[0], philox[1]
    else:
        try:
            seed, offset = philox
        except (TypeError, ValueError):
            raise TypeError("philox must be a (seed, offset) pair or an int64 tensor of shape [2]") from None
        seed, offset = _check_seed(seed), _check_offset(offset)
        device = torch.device(device) if device is not None else torch.device("cpu")
    n = math.prod(size)
    if n == 0:
        return torch.empty(size, dtype=dtype, device=device)
    # whole blocks from the one holding `offset`: one more than n / 4 covers any offset % 4
    blocks = (offset >> 2) + torch.arange((n + 3) // 4 + 1, device=device)
    zero = torch.zeros_like(blocks)
    words = philox_words_reference(torch.stack([blocks & _U32, blocks >> 32, zero, zero], -1),
                                   (seed & _U32, (seed >> 32) & _U32))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z0, z1 = _box_muller(words[:, 0], words[:, 1], acc)
    z2, z3 = _box_muller(words[:, 2], words[:, 3], acc)
    flat = torch.stack([z0, z1, z2, z3], -1).reshape(-1)
    return flat.index_select(0, (offset & 3) + torch.arange(n, device=device)).to(dtype).reshape(size)


def philox_normal(size, seed: int, offset: int = 0, *, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """Normal numbers ``offset .. offset + numel - 1`` of the counter-based stream of ``seed``
    (Philox4x32-10 + Box-Muller), row-major in a tensor of shape ``size``.

    The same (seed, offset) gives the same numbers on every device and thread count (up to the last
    bit of log/sin/cos), and shifting the offset shifts the stream:
    ``philox_normal(n, s, o)[k:] == philox_normal(n - k, s, o + k)``. ``seed``: any int in
    [0, 2**64) (or a negative int64, read as its bit pattern); ``offset``: in [0, 2**62). Computed in
    float32 for float16/bfloat16/float32 and in float64 for float64.
    """
    size = _check_size(size)
    dtype = _check_normal_dtype(dtype)
    seed, offset = _check_seed(seed), _check_offset(offset)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if _use_philox_kernel(device):
        return torch.ops.ntkfast.philox_normal(_philox_tensor((seed, offset), device), list(size), dtype)
    return philox_normal_reference((seed, offset), size, dtype, device)


def perturbed_masked(weight: torch.Tensor, mask: torch.Tensor, epsilon: float, seed: Optional[int] = None,
                     offset: int = 0, *, philox: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NTK-SAP's two weight sets in one pass: ``out[0] = weight * mask`` and
    ``out[1] = (weight + epsilon * xi) * mask``, out of shape ``[2, *weight.shape]``, contiguous.

    ``xi`` is never stored: ``xi.flatten()[i]`` is normal number ``offset + i`` of :func:`philox_normal`'s
    stream for ``seed``, regenerated in the backward. ``weight`` may have leading dimensions that
    ``mask`` lacks (``[P, *mask.shape]``: P draws sharing one mask); ``mask`` is broadcast over them
    and xi runs over all of weight. Differentiable with respect to ``weight`` and ``mask``
    (first order); ``mask`` need not be 0/1.

    The stream's start is given either as ``seed`` (int in [0, 2**64), negative int64 bit patterns
    accepted) and ``offset`` (int in [0, 2**62)), or as ``philox=``: an int64 tensor of shape [2]
    = (seed bits, offset) on weight's device. The kernels read that tensor on the device (no host
    sync), so a call can be captured in a CUDA graph and given new numbers between replays by
    writing to the tensor; writing to it between forward and backward makes autograd raise.
    """
    _check_perturbed_args(weight, mask)
    epsilon = _check_epsilon(epsilon)
    source = _philox_source(seed, offset, philox, weight.device)
    if _use_philox_kernel(weight.device):
        return torch.ops.ntkfast.perturbed_masked(weight, mask, epsilon, _philox_tensor(source, weight.device))
    xi = philox_normal_reference(source, weight.shape, weight.dtype, weight.device)
    return _perturbed_masked_math(weight, mask, epsilon, xi)


def perturbed_masked_reference(weight: torch.Tensor, mask: torch.Tensor, epsilon: float, seed: Optional[int] = None,
                               offset: int = 0, *, philox: Optional[torch.Tensor] = None,
                               xi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`perturbed_masked` in plain PyTorch ops, differentiable by autograd, with xi stored.

    ``xi=`` gives the perturbation itself (a tensor of weight's shape, dtype and device, e.g. one
    drawn elsewhere) instead of a seed or philox tensor."""
    _check_perturbed_args(weight, mask)
    epsilon = _check_epsilon(epsilon)
    if xi is None:
        source = _philox_source(seed, offset, philox, weight.device)
        xi = philox_normal_reference(source, weight.shape, weight.dtype, weight.device)
    else:
        if seed is not None or philox is not None:
            raise ValueError("give one of seed (and offset), philox or xi")
        if not isinstance(xi, torch.Tensor):
            raise TypeError(f"xi must be a tensor, got {type(xi).__name__}")
        if xi.shape != weight.shape or xi.dtype != weight.dtype or xi.device != weight.device:
            raise ValueError(f"xi must match weight's shape, dtype and device {tuple(weight.shape)}, {weight.dtype}, "
                             f"{weight.device}; got {tuple(xi.shape)}, {xi.dtype}, {xi.device}")
    return _perturbed_masked_math(weight, mask, epsilon, xi)


def _perturbed_masked_math(weight, mask, epsilon: float, xi: torch.Tensor) -> torch.Tensor:
    return torch.stack([weight * mask, (weight + epsilon * xi) * mask])


# ----------------------------------------------------------------------------------------------
# masked Gram contraction: the NTK block of a masked dense layer
# ----------------------------------------------------------------------------------------------
#
# For y = (W * mask) a with per-sample inputs a [N, C] and output cotangents b [N, K, O], the NTK
# block of W is  full[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c].
# Every formula below goes through P[i, j, o] = sum_c mask[o, c] a1[i, c] a2[j, c], computed a chunk
# of rows i at a time so that no intermediate grows past _GRAM_CHUNK_ELEMENTS.

_GRAM_MODES = ("full", "trace", "diagonal", "diagonal_trace")
_GRAM_DTYPES = (torch.float32, torch.float64)
_GRAM_CHUNK_ELEMENTS = 2**24
_GRAM_OPS = _EXT is not None and _has_ops("masked_gram")
_GRAM_WARNED = False


def _use_gram_kernel(device: torch.device) -> bool:
    return _gate(device, "_GRAM_OPS", "_GRAM_WARNED", "masked_gram")


def _check_gram_args(a1, b1, a2, b2, mask, mode) -> None:
    named = [("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)] + ([("mask", mask)] if mask is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    if mode not in _GRAM_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _GRAM_MODES))}, got {mode!r}")
    if a1.dtype not in _GRAM_DTYPES:
        raise ValueError(f"a1 must be float32 or float64, got {a1.dtype}")
    for name, t in named[1:]:
        if t.dtype != a1.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but a1 has {a1.dtype}")
        if t.device != a1.device:
            raise ValueError(f"{name} is on {t.device} but a1 is on {a1.device}")
    for name, t, want in (("a1", a1, "[N1, C]"), ("a2", a2, "[N2, C]"), ("b1", b1, "[N1, K, O]"),
                          ("b2", b2, "[N2, K, O]")) + ((("mask", mask, "[O, C]"),) if mask is not None else ()):
        if t.dim() != len(want.split(",")):
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    (n1, c), n2, (k, o) = a1.shape, a2.shape[0], b1.shape[1:]
    if b1.shape[0] != n1:
        raise ValueError(f"b1 has {b1.shape[0]} samples (shape {tuple(b1.shape)}) but a1 has {n1}")
    if a2.shape[1] != c:
        raise ValueError(f"a2 has {a2.shape[1]} features (shape {tuple(a2.shape)}) but a1 has {c}")
    if b2.shape[0] != n2:
        raise ValueError(f"b2 has {b2.shape[0]} samples (shape {tuple(b2.shape)}) but a2 has {n2}")
    if tuple(b2.shape[1:]) != (k, o):
        raise ValueError(f"b2 has shape {tuple(b2.shape)} but must be [N2, K, O] = [{n2}, {k}, {o}] to match b1 "
                         f"{tuple(b1.shape)}")
    if mask is not None and tuple(mask.shape) != (o, c):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must be [O, C] = [{o}, {c}]")
    if mode.startswith("diagonal") and n1 != n2:
        raise ValueError(f"mode {mode!r} pairs each sample with itself and needs as many samples in a2 as in a1, "
                         f"got N1 = {n1} and N2 = {n2}")


def _gram_out_shape(n1: int, n2: int, k: int, mode: str) -> tuple:
    return {"full": (n1, n2, k, k), "trace": (n1, n2), "diagonal": (n1, k, k), "diagonal_trace": (n1,)}[mode]


def _gram_chunk(n2: int, width: int) -> int:
    """Rows i per chunk, so that a [chunk, N2, width] intermediate stays within the budget."""
    return max(1, _GRAM_CHUNK_ELEMENTS // max(1, n2 * width))


def _gram_unmasked(a1, b1, a2, b2, mode: str) -> torch.Tensor:
    """No mask: the sum over (o, c) factorises into (a1 a2^T) times (b1 b2^T)."""
    n1, k, o = b1.shape
    n2 = b2.shape[0]
    if mode == "full":
        bb = (b1.reshape(n1 * k, o) @ b2.reshape(n2 * k, o).T).reshape(n1, k, n2, k).permute(0, 2, 1, 3)
        return (a1 @ a2.T)[:, :, None, None] * bb
    if mode == "trace":
        return (a1 @ a2.T) * (b1.reshape(n1, k * o) @ b2.reshape(n2, k * o).T)
    if mode == "diagonal":
        return (a1 * a2).sum(1)[:, None, None] * torch.bmm(b1, b2.transpose(1, 2))
    return (a1 * a2).sum(1) * (b1 * b2).sum((1, 2))


def _gram_p_chunk(a, a2, mask) -> torch.Tensor:
    """P[i, j, o] = sum_c mask[o, c] a[i, c] a2[j, c] for the rows of a chunk: [ci, N2, O], one GEMM."""
    return (a[:, None, :] * a2[None]) @ mask.T


def _gram_masked_math(a1, b1, a2, b2, mask, mode: str) -> torch.Tensor:
    n1, k, o = b1.shape
    n2 = b2.shape[0]
    if mode.startswith("diagonal"):
        pd = (a1 * a2) @ mask.T  # [N, O]: P at i = j
        if mode == "diagonal":
            return torch.bmm(b1 * pd[:, None, :], b2.transpose(1, 2))
        return (pd * (b1 * b2).sum(1)).sum(1)
    chunk = _gram_chunk(n2, max(a1.shape[1], k * o))
    outs = []
    for i0 in range(0, n1, chunk):
        a, b = a1[i0 : i0 + chunk], b1[i0 : i0 + chunk]
        p = _gram_p_chunk(a, a2, mask)
        ci = a.shape[0]
        if mode == "full":
            # out[i, j, k, l] = sum_o b[i, k, o] (P[i, j, o] b2[j, l, o]): one GEMM per row i
            w = (p[:, :, None, :] * b2[None]).reshape(ci, n2 * k, o)
            outs.append(torch.bmm(b, w.transpose(1, 2)).reshape(ci, k, n2, k).permute(0, 2, 1, 3))
        else:
            outs.append((p * torch.einsum("iko,jko->ijo", b, b2)).sum(-1))
    if not outs:
        return a1.new_zeros(_gram_out_shape(n1, n2, k, mode))
    return torch.cat(outs).contiguous()


def _gram_backward_math(grad, a1, b1, a2, b2, mask, mode: str, need) -> tuple:
    """Gradients of a1, b1, a2, b2 (None where ``need`` is False) given the output's gradient, in
    PyTorch ops: GEMMs over chunks of rows i, like the forward. With H[i, j, o] = sum_{k, l}
    grad[i, j, k, l] b1[i, k, o] b2[j, l, o] (the gradient of P), grad_a1[i, c] = sum_{j, o} mask[o, c]
    a2[j, c] H[i, j, o], and symmetrically for a2."""
    n1, k, o = b1.shape
    n2 = b2.shape[0]
    need_a = need[0] or need[2]
    ga1 = gb1 = ga2 = gb2 = None
    if mode.startswith("diagonal"):
        pd = (a1 * a2) @ mask.T
        if mode == "diagonal":
            g_b1 = torch.bmm(grad, b2)  # sum_l grad[i, k, l] b2[i, l, o]
            g_b2 = torch.bmm(grad.transpose(1, 2), b1)  # sum_k grad[i, k, l] b1[i, k, o]
            gb1 = g_b1 * pd[:, None, :] if need[1] else None
            gb2 = g_b2 * pd[:, None, :] if need[3] else None
            h = (g_b2 * b2).sum(1) if need_a else None
        else:
            gp = grad[:, None, None] * pd[:, None, :]
            gb1 = gp * b2 if need[1] else None
            gb2 = gp * b1 if need[3] else None
            h = grad[:, None] * (b1 * b2).sum(1) if need_a else None
        if need_a:
            hm = h @ mask
            ga1 = hm * a2 if need[0] else None
            ga2 = hm * a1 if need[2] else None
        return ga1, gb1, ga2, gb2
    chunk = _gram_chunk(n2, max(a1.shape[1], k * o))
    ga1_parts, gb1_parts = [], []
    ga2 = a2.new_zeros(a2.shape) if need[2] else None
    gb2 = b2.new_zeros(b2.shape) if need[3] else None
    for i0 in range(0, n1, chunk):
        a, b, g = a1[i0 : i0 + chunk], b1[i0 : i0 + chunk], grad[i0 : i0 + chunk]
        ci = a.shape[0]
        p = _gram_p_chunk(a, a2, mask)  # [ci, N2, O]
        if mode == "full":
            # u[i, j, l, o] = sum_k g[i, j, k, l] b[i, k, o]
            u = torch.bmm(g.transpose(2, 3).reshape(ci, n2 * k, k), b).reshape(ci, n2, k, o)
            if need[1]:
                w = (p[:, :, None, :] * b2[None]).reshape(ci, n2 * k, o)
                gb1_parts.append(torch.bmm(g.permute(0, 2, 1, 3).reshape(ci, k, n2 * k), w))
            if need[3]:
                gb2 += (u * p[:, :, None, :]).sum(0)
            h = (u * b2[None]).sum(2) if need_a else None
        else:
            gp = g[:, :, None] * p  # [ci, N2, O]
            if need[1]:
                gb1_parts.append(torch.einsum("ijo,jko->iko", gp, b2))
            if need[3]:
                gb2 += torch.einsum("ijo,iko->jko", gp, b)
            h = g[:, :, None] * torch.einsum("iko,jko->ijo", b, b2) if need_a else None
        if need_a:
            hm = h @ mask  # [ci, N2, C]
            if need[0]:
                ga1_parts.append((hm * a2[None]).sum(1))
            if need[2]:
                ga2 += (hm * a[:, None, :]).sum(0)
    if need[0]:
        ga1 = torch.cat(ga1_parts) if ga1_parts else torch.zeros_like(a1)
    if need[1]:
        gb1 = torch.cat(gb1_parts) if gb1_parts else torch.zeros_like(b1)
    return ga1, gb1, ga2, gb2


if _GRAM_OPS:

    @torch.library.register_fake("ntkfast::masked_gram")
    def _masked_gram_fake(a1, b1, a2, b2, mask, mode):
        if mode not in _GRAM_MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _GRAM_MODES))}, got {mode!r}")
        return a1.new_empty(_gram_out_shape(a1.shape[0], a2.shape[0], b1.shape[1], mode))

    def _masked_gram_setup_context(ctx, inputs, output):
        a1, b1, a2, b2, mask, mode = inputs
        ctx.save_for_backward(a1, b1, a2, b2, mask)
        ctx.mode = mode

    def _masked_gram_backward(ctx, grad):
        a1, b1, a2, b2, mask = ctx.saved_tensors
        need = [bool(x) for x in ctx.needs_input_grad[:4]]
        ga1, gb1, ga2, gb2 = _gram_backward_math(grad, a1, b1, a2, b2, mask, ctx.mode, need)
        return ga1, gb1, ga2, gb2, None, None

    torch.library.register_autograd("ntkfast::masked_gram", _masked_gram_backward,
                                    setup_context=_masked_gram_setup_context)


def masked_gram(a1: torch.Tensor, b1: torch.Tensor, a2: Optional[torch.Tensor] = None,
                b2: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
                mode: str = "full") -> torch.Tensor:
    """The NTK block of a masked dense layer ``y = (W * mask) a``, weights W [O, C]:

        full[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c]

    for per-sample layer inputs ``a1`` [N1, C], ``a2`` [N2, C] and output cotangents ``b1``
    [N1, K, O], ``b2`` [N2, K, O] (row k of b: the gradient of output k of the network with respect
    to y). ``mask`` [O, C] may hold any real values (0/1 for a pruning mask); ``None`` means all
    ones and uses the cheap factorised formula ``(a1 a2^T) * (b1 b2^T)``. ``a2``/``b2`` default to
    ``a1``/``b1`` (the Gram matrix of one batch; the kernels then compute one half of it).

    ``mode``: ``"full"`` [N1, N2, K, K]; ``"trace"`` [N1, N2], the sum over k of full[:, :, k, k];
    ``"diagonal"`` [N1, K, K], full[i, i] (needs N1 == N2); ``"diagonal_trace"`` [N1].

    float32 or float64, all on one device; runs the compiled kernel (CPU; CUDA where built), else
    :func:`masked_gram_reference`. On the CPU a mask with few nonzeros goes through a sparse path
    (cost proportional to its nonzeros instead of O * C). Differentiable with respect to a1, b1, a2
    and b2 (the backward is GEMM-based PyTorch, so a second order works too); ``mask`` is treated
    as a constant: no gradient flows to it, even if it requires grad.
    """
    a2 = a1 if a2 is None else a2
    b2 = b1 if b2 is None else b2
    _check_gram_args(a1, b1, a2, b2, mask, mode)
    if mask is None:
        return _gram_unmasked(a1, b1, a2, b2, mode)
    if _use_gram_kernel(a1.device):
        return torch.ops.ntkfast.masked_gram(a1, b1, a2, b2, mask, mode)
    return _gram_masked_math(a1, b1, a2, b2, mask, mode)


def masked_gram_reference(a1: torch.Tensor, b1: torch.Tensor, a2: Optional[torch.Tensor] = None,
                          b2: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
                          mode: str = "full") -> torch.Tensor:
    """:func:`masked_gram` in PyTorch ops: P[i, j, o] = sum_c mask[o, c] a1[i, c] a2[j, c] by one GEMM
    per chunk of rows i (intermediates of at most ~2**24 elements), then contracted with b1 and b2
    by batched GEMMs. Differentiable by autograd in every input, mask included."""
    a2 = a1 if a2 is None else a2
    b2 = b1 if b2 is None else b2
    _check_gram_args(a1, b1, a2, b2, mask, mode)
    if mask is None:
        return _gram_unmasked(a1, b1, a2, b2, mode)
    return _gram_masked_math(a1, b1, a2, b2, mask, mode)
# per-sample convolution weight gradients, several cotangents per sample
# ----------------------------------------------------------------------------------------------
#
# For sample n and cotangent k, the gradient of <grad_output[n, k], conv(input[n], weight)> with
# respect to the weight: the rows of the empirical NTK's Jacobian that belong to a conv layer,
# without forming per-sample Jacobians of the whole network.

_CONV_WGRAD_OPS = _EXT is not None and _has_ops("conv_weight_grad_per_sample")
_CONV_WGRAD_WARNED = False


def _use_conv_wgrad_kernel(device: torch.device) -> bool:
    return _gate(device, "_CONV_WGRAD_OPS", "_CONV_WGRAD_WARNED", "conv_weight_grad_per_sample")


def _conv_weight(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K, O, Cg, *kernel] -> the weight [N * G * K * Og, Cg, *kernel] of the grouped convolution
    (groups = N * G) that applies every (sample, cotangent) gradient to its own sample: the output
    channels of convolution group (n, g) are that group's (k, o)."""
    N, K, O = grad.shape[:3]
    G = groups
    rest = grad.shape[3:]
    w = grad.reshape(N, K, G, O // G, *rest).transpose(1, 2)
    return w.reshape(N * G * K * (O // G), *rest)


def _conv_wgrad_grad_output_grad(grad, input, stride, padding, dilation, groups):
    """d<grad, out>/d grad_output: every sample convolved with its own K weights, i.e. conv2d of
    input[n] with grad[n, k], as one grouped convolution over the batch."""
    N, C, H, W = input.shape
    K, O = grad.shape[1:3]
    G = groups
    if N == 0:
        return grad.new_zeros((0, K, O) + tuple(_conv_out_size((H, W), grad.shape[4:], stride, padding, dilation)))
    y = F.conv2d(input.reshape(1, N * C, H, W), _conv_weight(grad, G), stride=stride, padding=padding,
                 dilation=dilation, groups=N * G)
    Ho, Wo = y.shape[-2:]
    return y.reshape(N, G, K, O // G, Ho, Wo).transpose(1, 2).reshape(N, K, O, Ho, Wo)


def _conv_wgrad_input_grad(grad, grad_output, input_shape, stride, padding, dilation, groups):
    """d<grad, out>/d input: sum over k of the transposed convolution of grad_output[n, k] with
    grad[n, k], as one grouped transposed convolution whose input channels are (n, g, k, o)."""
    N, C, H, W = input_shape
    K, O, Ho, Wo = grad_output.shape[1:]
    G = groups
    if N == 0:
        return grad.new_zeros(tuple(input_shape))
    kh, kw = grad.shape[4:]
    out_pad = tuple(size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                    for size, o, s, p, d, k in zip((H, W), (Ho, Wo), stride, padding, dilation, (kh, kw)))
    go = grad_output.reshape(N, K, G, O // G, Ho, Wo).transpose(1, 2).reshape(1, N * G * K * (O // G), Ho, Wo)
    x = F.conv_transpose2d(go, _conv_weight(grad, G), stride=stride, padding=padding, output_padding=out_pad,
                           groups=N * G, dilation=dilation)
    return x.reshape(N, C, H, W)


if _CONV_WGRAD_OPS:

    @torch.library.register_fake("ntkfast::conv_weight_grad_per_sample")
    def _conv_wgrad_fake(input, grad_output, kernel_size, stride, padding, dilation, groups):
        N, C = input.shape[:2]
        K, O = grad_output.shape[1:3]
        return input.new_empty((N, K, O, C // groups, kernel_size[0], kernel_size[1]))

    def _conv_wgrad_setup_context(ctx, inputs, output):
        input, grad_output, kernel_size, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, grad_output)
        ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), groups)

    def _conv_wgrad_backward(ctx, grad):
        input, grad_output = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_input = grad_grad_output = None
        if ctx.needs_input_grad[0]:
            grad_input = _conv_wgrad_input_grad(grad, grad_output, input.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_grad_output = _conv_wgrad_grad_output_grad(grad, input, stride, padding, dilation, groups)
        return grad_input, grad_grad_output, None, None, None, None, None

    torch.library.register_autograd("ntkfast::conv_weight_grad_per_sample", _conv_wgrad_backward,
                                    setup_context=_conv_wgrad_setup_context)


def _conv_tuple(value, d: int, name: str, lowest: int) -> tuple:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,) * d
    try:
        value = tuple(_check_int(v, name) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of {d} ints, got {value!r}") from None
    if len(value) != d:
        raise ValueError(f"{name} must be an int or have {d} entries for a {d}-d convolution, got {value}")
    if any(v < lowest for v in value):
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def _conv_out_size(size, kernel, stride, padding, dilation) -> tuple:
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(size, kernel, stride, padding, dilation))


def _check_conv_wgrad_args(input, grad_output, kernel_size, stride, padding, dilation, groups):
    """Checked and normalised (kernel_size, stride, padding, dilation, groups) as d-tuples."""
    for name, t in (("input", input), ("grad_output", grad_output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if input.dim() not in (3, 4, 5):
        raise ValueError(f"input must be [N, C, L], [N, C, H, W] or [N, C, D, H, W], got shape {tuple(input.shape)}")
    d = input.dim() - 2
    if grad_output.dim() != d + 3:
        raise ValueError(f"grad_output must be [N, K, O, *output size] ({d + 3} dimensions for a {d}-d input), "
                         f"got shape {tuple(grad_output.shape)}")
    if input.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"input must be float32 or float64, got {input.dtype}")
    if grad_output.dtype != input.dtype:
        raise ValueError(f"grad_output has dtype {grad_output.dtype} but input has {input.dtype}")
    if grad_output.device != input.device:
        raise ValueError(f"grad_output is on {grad_output.device} but input is on {input.device}")
    kernel_size = _conv_tuple(kernel_size, d, "kernel_size", 1)
    stride = _conv_tuple(stride, d, "stride", 1)
    padding = _conv_tuple(padding, d, "padding", 0)
    dilation = _conv_tuple(dilation, d, "dilation", 1)
    groups = _check_int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    N, C = input.shape[:2]
    K, O = grad_output.shape[1:3]
    if grad_output.shape[0] != N:
        raise ValueError(f"grad_output has {grad_output.shape[0]} samples but input has {N}")
    if K < 1:
        raise ValueError(f"grad_output must have at least one cotangent per sample (K = size(1)), "
                         f"got shape {tuple(grad_output.shape)}")
    if C < groups or C % groups:
        raise ValueError(f"input's channel count {C} must be a positive multiple of groups = {groups}")
    if O < groups or O % groups:
        raise ValueError(f"grad_output's channel count O = {O} must be a positive multiple of groups = {groups}")
    span = tuple(i + 2 * p - dl * (k - 1) - 1 for i, k, p, dl in zip(input.shape[2:], kernel_size, padding, dilation))
    if any(s < 0 for s in span):
        raise ValueError(f"the input {tuple(input.shape[2:])}, padded by {padding}, is smaller than the dilated "
                         f"kernel_size {kernel_size} (dilation {dilation})")
    want = _conv_out_size(input.shape[2:], kernel_size, stride, padding, dilation)
    if tuple(grad_output.shape[3:]) != want:
        raise ValueError(f"grad_output's spatial size {tuple(grad_output.shape[3:])} must be the convolution's "
                         f"output size {want}")
    return kernel_size, stride, padding, dilation, groups


def _as_2d(input, grad_output, kernel_size, stride, padding, dilation):
    """A 1-d convolution as a 2-d one of unit height."""
    return (input.unsqueeze(2), grad_output.unsqueeze(3), (1,) + kernel_size, (1,) + stride, (0,) + padding,
            (1,) + dilation)


def conv_weight_grad_per_sample(input: torch.Tensor, grad_output: torch.Tensor, kernel_size, stride=1, padding=0,
                                dilation=1, groups: int = 1) -> torch.Tensor:
    """Per-sample weight gradients of a convolution, for K cotangents per sample, by implicit
    im2col (the unfolded input is never built whole).

    ``input``: [N, C, H, W]; ``grad_output``: [N, K, O, Ho, Wo] (K >= 1 cotangents of the conv's
    output per sample); returns [N, K, O, C / groups, kh, kw] with ::

        out[n, k, o, c, r, s] = sum_{y, x} grad_output[n, k, o, y, x]
                                * input[n, g * C / groups + c, y * sh + r * dh - ph, x * sw + s * dw - pw]

    (g = o // (O / groups), the input zero outside the image): the gradient of
    ``<grad_output[n, k], F.conv2d(input[n:n+1], weight, None, stride, padding, dilation, groups)>``
    with respect to ``weight``. ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are ints
    or tuples, as for ``nn.Conv2d`` (padding as numbers only); ``(Ho, Wo)`` must be the convolution's
    output size. float32 or float64. Differentiable with respect to ``input`` and ``grad_output``.

    1-d convolutions too: ``input`` [N, C, L] and ``grad_output`` [N, K, O, Lo] give
    [N, K, O, C / groups, k] (run as 2-d ones of unit height). 3-d inputs ([N, C, D, H, W],
    [N, K, O, Do, Ho, Wo]) have no kernel: they run :func:`conv_weight_grad_per_sample_reference`.
    So do devices without ntkfast kernels, and everything when the extension is not built.
    """
    kernel_size, stride, padding, dilation, groups = _check_conv_wgrad_args(
        input, grad_output, kernel_size, stride, padding, dilation, groups)
    d = len(kernel_size)
    if d == 3 or not _use_conv_wgrad_kernel(input.device):
        return _conv_wgrad_reference(input, grad_output, kernel_size, stride, padding, dilation, groups)
    if d == 1:
        x, go, k, s, p, dl = _as_2d(input, grad_output, kernel_size, stride, padding, dilation)
        out = torch.ops.ntkfast.conv_weight_grad_per_sample(x, go, list(k), list(s), list(p), list(dl), groups)
        return out.squeeze(4)
    return torch.ops.ntkfast.conv_weight_grad_per_sample(input, grad_output, list(kernel_size), list(stride),
                                                         list(padding), list(dilation), groups)


def conv_weight_grad_per_sample_reference(input: torch.Tensor, grad_output: torch.Tensor, kernel_size, stride=1,
                                          padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """:func:`conv_weight_grad_per_sample` in plain PyTorch ops, differentiable by autograd.

    1-d and 2-d: ``F.unfold`` (the whole im2col matrix) and one batched matmul per group; 3-d:
    windows of the padded input as strided views (``Tensor.unfold``) contracted by ``einsum``."""
    args = _check_conv_wgrad_args(input, grad_output, kernel_size, stride, padding, dilation, groups)
    return _conv_wgrad_reference(input, grad_output, *args)


def _conv_wgrad_reference(input, grad_output, kernel_size, stride, padding, dilation, groups):
    d = len(kernel_size)
    if d == 1:
        out = _conv_wgrad_reference(*_as_2d(input, grad_output, kernel_size, stride, padding, dilation), groups)
        return out.squeeze(4)
    if d == 3:
        return _conv_wgrad_reference_3d(input, grad_output, kernel_size, stride, padding, dilation, groups)
    N, C = input.shape[:2]
    K, O, Ho, Wo = grad_output.shape[1:]
    G = groups
    Cg, Og = C // G, O // G
    cols = F.unfold(input, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [N, C * kh * kw, L]
    cols = cols.reshape(N, G, Cg * kernel_size[0] * kernel_size[1], Ho * Wo)
    rows = grad_output.reshape(N, K, G, Og, Ho * Wo).transpose(1, 2).reshape(N, G, K * Og, Ho * Wo)
    out = torch.matmul(rows, cols.transpose(-1, -2))  # [N, G, K * Og, Cg * kh * kw]
    out = out.reshape(N, G, K, Og, Cg, *kernel_size).transpose(1, 2)
    return out.reshape(N, K, O, Cg, *kernel_size)


def _conv_wgrad_reference_3d(input, grad_output, kernel_size, stride, padding, dilation, groups):
    N, C = input.shape[:2]
    K, O = grad_output.shape[1:3]
    G = groups
    Cg, Og = C // G, O // G
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    win = F.pad(input, pad)
    for i, (k, s, dl) in enumerate(zip(kernel_size, stride, dilation)):
        win = win.unfold(2 + i, dl * (k - 1) + 1, s)  # appends the window as a last dimension
    win = win[..., :: dilation[0], :: dilation[1], :: dilation[2]]  # [N, C, Do, Ho, Wo, kd, kh, kw]
    win = win.reshape(N, G, Cg, *win.shape[2:])
    go = grad_output.reshape(N, K, G, Og, *grad_output.shape[3:])
    out = torch.einsum("nkgoxyz,ngcxyzabe->nkgocabe", go, win)
    return out.reshape(N, K, O, Cg, *kernel_size)
