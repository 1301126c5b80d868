"""The empirical NTK by torch.func, as the official PyTorch NTK tutorial computes it: the oracle of
the tests and the peer of the benchmarks.

- ``jacobian_contraction``: per-sample Jacobians by vmap(jacrev), contracted per parameter.
- ``ntk_vector_products``: the kernel from NTK-vector products, vmap over the basis of outputs
  of vjp followed by jvp.

Masks make the network sparse the same way the engine does: the forward uses ``weight * mask``
and only unmasked entries are differentiated. Both functions form everything the tutorial forms
(the N·K×P Jacobian for the first), which is why they are slow and memory-hungry.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ._plan import build_plan


def _setup(model, masks, params):
    plan = build_plan(model, params, masks)
    values = {n: e.value.detach() for n, e in plan.entries.items()}
    maskd = {n: e.mask for n, e in plan.entries.items()}
    fixed = {k: v.detach() for k, v in plan.forward_values.items() if k not in values}

    def fnet_single(v: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        eff = dict(fixed)
        eff.update({n: (t if maskd[n] is None else t * maskd[n]) for n, t in v.items()})
        return functional_call(model, eff, (x.unsqueeze(0),)).reshape(-1)

    return values, fnet_single


def _finish(full: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "full":
        return full
    if mode == "trace":
        return torch.diagonal(full, dim1=2, dim2=3).sum(-1)
    diag = torch.diagonal(full, dim1=0, dim2=1).permute(2, 0, 1)  # [N, K, K]
    if mode == "diagonal":
        return diag
    return torch.diagonal(diag, dim1=1, dim2=2).sum(-1)


def jacobian_contraction(model, x1, x2=None, *, masks=None, params=None, mode: str = "full") -> torch.Tensor:
    values, fnet_single = _setup(model, masks, params)
    jac1 = vmap(jacrev(fnet_single), (None, 0))(values, x1)
    jac2 = jac1 if x2 is None else vmap(jacrev(fnet_single), (None, 0))(values, x2)
    letters = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM"}
    if mode in letters:
        out = None
        for n in jac1:
            j1 = jac1[n].flatten(2)
            j2 = jac2[n].flatten(2)
            t = torch.einsum(letters[mode], j1, j2)
            out = t if out is None else out + t
        return out
    if x2 is not None and x2.shape[0] != x1.shape[0]:
        raise ValueError("x2: diagonal modes need as many samples as x1")
    out = None
    for n in jac1:
        j1, j2 = jac1[n].flatten(2), jac2[n].flatten(2)
        t = torch.einsum("Naf,Nbf->Nab", j1, j2)
        out = t if out is None else out + t
    return out if mode == "diagonal" else torch.diagonal(out, dim1=1, dim2=2).sum(-1)


def ntk_vector_products(model, x1, x2=None, *, masks=None, params=None, mode: str = "full") -> torch.Tensor:
    values, fnet_single = _setup(model, masks, params)
    x2 = x1 if x2 is None else x2

    def fnet_batch(v, x):
        return vmap(fnet_single, (None, 0))(v, x)

    def single_pair(a, b):
        # a, b: one sample each (with a leading unit dimension)
        def f1(v):
            return fnet_batch(v, a)

        def f2(v):
            return fnet_batch(v, b)

        _, vjp_fn = vjp(f2, values)

        def column(cot):
            (u,) = vjp_fn(cot)
            return jvp(f1, (values,), (u,))[1]

        K = f1(values).shape[-1]
        basis = torch.eye(K, dtype=x1.dtype, device=x1.device).view(K, 1, K)
        return vmap(column)(basis)  # [K(l), 1, K(k)]

    res = vmap(vmap(single_pair, (None, 0)), (0, None))(x1.unsqueeze(1), x2.unsqueeze(1))  # [N1, N2, K, 1, K]
    full = res[:, :, :, 0, :].transpose(2, 3)
    return _finish(full, mode)


def jacobian(model, x, *, masks=None, params=None) -> Dict[str, torch.Tensor]:
    """Per-sample Jacobians {name: [N, K, *shape]} by vmap(jacrev) (masked entries are zero)."""
    values, fnet_single = _setup(model, masks, params)
    return vmap(jacrev(fnet_single), (None, 0))(values, x)


__all__ = ["jacobian_contraction", "ntk_vector_products", "jacobian"]
