"""Eigenvalues of the (N·K)×(N·K) empirical NTK: formed and diagonalised when it fits, else the
top of the spectrum by Lanczos on kernel-vector products Θ v = J (J^T v)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.checks import check_int
from ..core.options import SpectrumMethod, choices
from ..core.numerics import lanczos
from ._empirical import _default_budget, check_batch, empirical_ntk_impl, forward_of
from ._plan import build_plan
from ._products import Linearised


class NTKSpectrum(NamedTuple):
    """``eigenvalues``: descending (the top ``k`` when k was given); ``condition_number``:
    λ_max / λ_min of the kernel (from Lanczos: λ_max over the smallest Ritz value, a lower
    bound); ``method``: "dense" or "lanczos"."""

    eigenvalues: torch.Tensor
    condition_number: float
    method: str


def _condition(top: float, bottom: float) -> float:
    return float("inf") if bottom <= 0 else top / bottom


def ntk_spectrum_impl(model, x, *, masks, k, params, method, memory_budget, steps, seed) -> NTKSpectrum:
    if method not in choices(SpectrumMethod):
        raise ValueError(f"method: expected one of {', '.join(map(repr, choices(SpectrumMethod)))}, got {method!r}")
    k = check_int(k, "k", lo=1, allow_none=True)
    check_batch(x, "x")
    plan = build_plan(model, params, masks)
    lin = Linearised(model, plan, x)
    with forward_of(x, "x"):
        n = lin.outputs().numel()
    if k is not None and k > n:
        raise ValueError(f"k: {k} eigenvalues asked of a {n}x{n} kernel")
    budget = memory_budget if memory_budget is not None else _default_budget(x.device)
    if method == "auto":
        method = "dense" if (k is None or 3 * n * n * x.element_size() <= budget) else "lanczos"
    if method == "dense":
        theta = empirical_ntk_impl(model, x, None, masks=masks, mode="full", params=params,
                                   memory_budget=memory_budget, create_graph=False, explain=False)
        mat = theta.permute(0, 2, 1, 3).reshape(n, n)
        ev = torch.linalg.eigvalsh(mat).flip(0)
        cond = _condition(float(ev[0]), float(ev[-1]))
        return NTKSpectrum(ev if k is None else ev[:k], cond, "dense")
    if k is None:
        raise ValueError("k: the Lanczos method returns the top k eigenvalues; pass k")
    steps = min(n, steps if steps is not None else max(2 * k + 20, 40))
    gen = torch.Generator(device=x.device)
    gen.manual_seed(0 if seed is None else int(seed))
    shape = (x.shape[0], n // x.shape[0])

    def matvec(v):
        u = lin.vjp(v.view(shape))
        return lin.jvp(u).reshape(-1).detach()

    ritz = lanczos(matvec, n, steps, dtype=x.dtype, device=x.device, generator=gen).flip(0)
    return NTKSpectrum(ritz[:k], _condition(float(ritz[0]), float(ritz[-1])), "lanczos")

