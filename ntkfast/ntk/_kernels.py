"""The compiled contractions the NTK engine calls (ntkfast._ops), behind one import."""
from __future__ import annotations

import torch

from .. import _ops


def _masked_gram_fallback(a1, b1, a2, b2, mask, *, mode="full"):
    # Until the compiled op lands: the same contraction by einsum (small inputs only).
    p = torch.einsum("oc,ic,jc->oij", mask, a1, a2)
    if mode == "full":
        return torch.einsum("iko,jlo,oij->ijkl", b1, b2, p)
    if mode == "trace":
        return torch.einsum("iko,jko,oij->ij", b1, b2, p)
    d = torch.diagonal(p, dim1=1, dim2=2)  # [O, N]
    if mode == "diagonal":
        return torch.einsum("iko,ilo,oi->ikl", b1, b2, d)
    return torch.einsum("iko,iko,oi->i", b1, b2, d)


def _conv_psg_fallback(input, grad_output, kernel_size, stride, padding, dilation, groups):
    n, c = input.shape[:2]
    kk, o = grad_output.shape[1], grad_output.shape[2]
    cols = torch.nn.functional.unfold(input, kernel_size, dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(n, groups, c // groups * kernel_size[0] * kernel_size[1], -1)
    gy = grad_output.reshape(n, kk, groups, o // groups, -1)
    out = torch.einsum("nkgos,ngds->nkgod", gy, cols)
    return out.reshape(n, kk, o, c // groups, *kernel_size)


masked_gram = getattr(_ops, "masked_gram", _masked_gram_fallback)
conv_weight_grad_per_sample = getattr(_ops, "conv_weight_grad_per_sample", _conv_psg_fallback)
