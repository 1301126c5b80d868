"""``masked_gram``: the NTK block of a masked dense layer (csrc/cpu/masked_gram_cpu.cpp,
csrc/cuda/masked_gram.cu), its fake function, its GEMM-based backward and the reference."""
from __future__ import annotations

from typing import Optional

import torch

from ..core.options import GramMode, choices
from .loader import Family

#
# For y = (W * mask) a with per-sample inputs a [N, C] and output cotangents b [N, K, O], the NTK
# block of W is  full[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c].
# Every formula below goes through P[i, j, o] = sum_c mask[o, c] a1[i, c] a2[j, c], computed a chunk
# of rows i at a time so that no intermediate grows past _GRAM_CHUNK_ELEMENTS.

_GRAM_MODES = choices(GramMode)
_GRAM_DTYPES = (torch.float32, torch.float64)
_GRAM_CHUNK_ELEMENTS = 2**24
FAMILY = Family("masked_gram", "masked_gram")


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
        # named by its dtype, not by a1 alone: callers several layers up (an NTK of a float16 model)
        # can act on the dtype, and every input must share it
        raise ValueError(f"masked_gram computes in float32 or float64 only, got {a1.dtype} inputs (the dtype of "
                         f"a1, which b1, a2, b2 and mask must share); convert them, e.g. with .float()")
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


def _gram_dead_zeroed(a1, b1, a2, b2, mask) -> tuple:
    """a1, b1, a2, b2 with zeros where only zero mask entries read them: a1[:, c] and a2[:, c] for a
    column c of the mask that is all zero, b1[:, :, o] and b2[:, :, o] for an all-zero row o.

    The formula multiplies those entries by zero mask entries only, so they contribute nothing;
    but in the GEMMs below they would meet the zeros as products (inf * 0 = NaN), and even finite
    ones could overflow (a1 * a2, b1 * b2) before they do. Replaced by zeros (a select, not a
    product), the result and the gradients of a1, b1, a2, b2 are exactly those with zeros there,
    whatever they held; the gradient of the mask at those rows and columns is then 0 too.

    Always four input-sized copies (N * C and N * K * O values, against the N1 * N2 * O * (C + K)
    multiply-adds that follow), with no test for whether any row or column is dead: that test
    would be a host sync on a GPU, and a data-dependent branch that tracing (torch.compile,
    opcheck) cannot follow."""
    zero = mask == 0
    dead_c, dead_o = zero.all(0), zero.all(1)
    a1_ = torch.where(dead_c, 0, a1)
    a2_ = a1_ if a2 is a1 else torch.where(dead_c, 0, a2)
    b1_ = torch.where(dead_o, 0, b1)
    b2_ = b1_ if b2 is b1 else torch.where(dead_o, 0, b2)
    return a1_, b1_, a2_, b2_


def _gram_p_chunk(a, a2, mask) -> torch.Tensor:
    """P[i, j, o] = sum_c mask[o, c] a[i, c] a2[j, c] for the rows of a chunk: [ci, N2, O], one GEMM."""
    return (a[:, None, :] * a2[None]) @ mask.T


def _gram_masked_math(a1, b1, a2, b2, mask, mode: str) -> torch.Tensor:
    n1, k, o = b1.shape
    n2 = b2.shape[0]
    a1, b1, a2, b2 = _gram_dead_zeroed(a1, b1, a2, b2, mask)
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
    # the forward (kernel or reference) ignores what only zero mask entries read; so must its
    # gradients: with zeros there, every product with a zero mask entry is an exact 0
    a1, b1, a2, b2 = _gram_dead_zeroed(a1, b1, a2, b2, mask)
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


if FAMILY.defined:

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
                mode: GramMode = "full") -> torch.Tensor:
    """The NTK block of a masked dense layer ``y = (W * mask) a``, weights W [O, C]:

        full[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c]

    for per-sample layer inputs ``a1`` [N1, C], ``a2`` [N2, C] and output cotangents ``b1``
    [N1, K, O], ``b2`` [N2, K, O] (row k of b: the gradient of output k of the network with respect
    to y). ``mask`` [O, C] may hold any real values (0/1 for a pruning mask); ``None`` means all
    ones and uses the cheap factorised formula ``(a1 a2^T) * (b1 b2^T)``. ``a2``/``b2`` default to
    ``a1``/``b1`` (the Gram matrix of one batch; the kernels then compute one half of it).

    ``mode``: ``"full"`` [N1, N2, K, K]; ``"trace"`` [N1, N2], the sum over k of full[:, :, k, k];
    ``"diagonal"`` [N1, K, K], full[i, i] (needs N1 == N2); ``"diagonal_trace"`` [N1].

    A zero mask entry contributes nothing, and so does what only zero entries read: a1[:, c] and
    a2[:, c] when column c of the mask is all zero, b1[:, :, o] and b2[:, :, o] when row o is. Their
    values, NaN and infinities included, change neither the result nor the gradients (those
    entries' gradients are exactly 0), on every path.

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
    if FAMILY.use(a1.device):
        return torch.ops.ntkfast.masked_gram(a1, b1, a2, b2, mask, mode)
    return _gram_masked_math(a1, b1, a2, b2, mask, mode)


def masked_gram_reference(a1: torch.Tensor, b1: torch.Tensor, a2: Optional[torch.Tensor] = None,
                          b2: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
                          mode: GramMode = "full") -> torch.Tensor:
    """:func:`masked_gram` in PyTorch ops: P[i, j, o] = sum_c mask[o, c] a1[i, c] a2[j, c] by one GEMM
    per chunk of rows i (intermediates of at most ~2**24 elements), then contracted with b1 and b2
    by batched GEMMs. Differentiable by autograd in every input, mask included; the values only zero
    mask entries read (see :func:`masked_gram`) are replaced by zeros first, so the gradient of the
    mask is 0 on its all-zero rows and columns."""
    a2 = a1 if a2 is None else a2
    b2 = b1 if b2 is None else b2
    _check_gram_args(a1, b1, a2, b2, mask, mode)
    if mask is None:
        return _gram_unmasked(a1, b1, a2, b2, mode)
    return _gram_masked_math(a1, b1, a2, b2, mask, mode)
