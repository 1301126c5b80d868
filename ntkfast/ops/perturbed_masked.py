"""Counter-based normal numbers (``philox_normal``) and NTK-SAP's two weight sets in one pass
(``perturbed_masked`` and its backward, which regenerates the noise instead of storing it):
csrc/philox.h, csrc/cpu/perturbed_masked_cpu.cpp, csrc/cuda/perturbed_masked.cu; their fake and
autograd functions, and bit-level references of the stream."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ..core.checks import check_int
from .loader import Family

# The stream (csrc/philox.h): normal number j of a 64-bit seed is lane j % 4 of Philox4x32-10 with
# counter (lo(j // 4), hi(j // 4), 0, 0) and key (lo(seed), hi(seed)); Box-Muller on the word
# pairs (x0, x1) and (x2, x3), in float32 (float64 for float64 outputs). The kernels read
# (seed, offset) from an int64 tensor ``philox`` of shape [2] on the device where they run.

_U32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MAX_OFFSET = 2**62
_NORMAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# An extension built before these ops must not break the import (registering a fake for a
# missing op raises): they then run as their references.
FAMILY = Family("philox_normal / perturbed_masked", "philox_normal", "perturbed_masked", "perturbed_masked_backward")


if FAMILY.defined:

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


def _check_seed(seed) -> int:
    """The seed as the int64 bit pattern the kernels take."""
    seed = check_int(seed, "seed", type_error=True)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64) (a negative seed is read as its int64 bit pattern), "
                         f"got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def _check_offset(offset) -> int:
    offset = check_int(offset, "offset", type_error=True)
    if not 0 <= offset < _MAX_OFFSET:
        raise ValueError(f"offset must be in [0, 2**62), got {offset}")
    return offset


def _check_epsilon(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
    try:
        epsilon = float(epsilon)
    except OverflowError:  # an int beyond any float, e.g. 10**400
        raise ValueError(f"epsilon must be finite, got an int of {len(str(abs(int(epsilon))))} digits") from None
    if not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite, got {epsilon}")
    return epsilon


def _check_size(size) -> tuple:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size,)
    try:
        size = tuple(check_int(s, "size", type_error=True) for s in size)
    except TypeError:
        raise TypeError(f"size must be an int or a sequence of ints, got {size!r}") from None
    if any(s < 0 for s in size):
        raise ValueError(f"size must not have negative entries, got {size}")
    if math.prod(size) >= 2**62:  # beyond the stream's int64 offsets (and any memory)
        raise ValueError(f"size {size} asks for {math.prod(size):.3g} numbers; at most 2**62 can be drawn")
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
    if FAMILY.use(device):
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

    A weight under a zero mask entry contributes nothing, whatever it holds (NaN and infinities
    included): both outputs are exactly 0 there (a select, not a product) and its weight gradient
    is exactly 0. The mask's gradient at such an entry is still the derivative of the product,
    ``sum over draws of grad[0] * w + grad[1] * (w + epsilon * xi)``: what un-pruning it would
    change, which depends on its weight, and is not finite where that weight is not.

    The stream's start is given either as ``seed`` (int in [0, 2**64), negative int64 bit patterns
    accepted) and ``offset`` (int in [0, 2**62)), or as ``philox=``: an int64 tensor of shape [2]
    = (seed bits, offset) on weight's device. The kernels read that tensor on the device (no host
    sync), so a call can be captured in a CUDA graph and given new numbers between replays by
    writing to the tensor; writing to it between forward and backward makes autograd raise.
    """
    _check_perturbed_args(weight, mask)
    epsilon = _check_epsilon(epsilon)
    source = _philox_source(seed, offset, philox, weight.device)
    if FAMILY.use(weight.device):
        return torch.ops.ntkfast.perturbed_masked(weight, mask, epsilon, _philox_tensor(source, weight.device))
    xi = philox_normal_reference(source, weight.shape, weight.dtype, weight.device)
    return _perturbed_masked_math(weight, mask, epsilon, xi)


def perturbed_masked_reference(weight: torch.Tensor, mask: torch.Tensor, epsilon: float, seed: Optional[int] = None,
                               offset: int = 0, *, philox: Optional[torch.Tensor] = None,
                               xi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`perturbed_masked` in plain PyTorch ops, differentiable by autograd, with xi stored.
    The products with the mask are selects with the kernels' gradients (``_MaskedProduct``), so a
    zero mask entry gives exactly 0 whatever the weight holds, as in the kernels.

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


class _MaskedProduct(torch.autograd.Function):
    """x * mask, mask broadcast over x's leading dimensions, as the kernels compute it: a select,
    exactly 0 where mask is 0 whatever x holds there (x * 0 would be NaN for an infinite x).

    Gradients, as the kernels': x's is grad * mask where mask != 0 and exactly 0 where it is 0 (the
    output there is a constant); mask's is the derivative of the product, grad * x summed over the
    leading dimensions, everywhere: at a pruned entry that is what un-pruning it would change, so it
    does depend on x there (and is not finite where x is not). First order, as the kernels
    promise: the backward is made of differentiable ops, but the second derivative of the weight's
    gradient with respect to the mask at a zero entry is the select's (0), not the product's."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(x, mask)
        return torch.where(mask != 0, x * mask, 0)

    @staticmethod
    def backward(ctx, grad):
        x, mask = ctx.saved_tensors
        grad_x = grad_mask = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(mask != 0, grad * mask, 0)
        if ctx.needs_input_grad[1]:
            grad_mask = grad * x
            lead = x.dim() - mask.dim()
            if lead:
                grad_mask = grad_mask.sum(tuple(range(lead)))
        return grad_x, grad_mask


def _perturbed_masked_math(weight, mask, epsilon: float, xi: torch.Tensor) -> torch.Tensor:
    return torch.stack([_MaskedProduct.apply(weight, mask), _MaskedProduct.apply(weight + epsilon * xi, mask)])
