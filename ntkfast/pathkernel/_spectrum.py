"""Top eigenvalues of the path kernel Π through products with G = J_θ^πᵀ J_θ^π (the nonzero
eigenvalues of the two are the same), never enumerating paths.

F(θa, θb) = Σ_p π_p(θa) π_p(θb) is the squared path network evaluated with weights θa ⊙ θb (a
path's value is a product over its weights, so the product of two paths' values is the path
value of the elementwise products). Then ∂F/∂θb = Σ_p π_p(θa) ∇π_p(θb), and the gradient in θa
of its inner product with v is Σ_p ∇π_p(θa) (∇π_p(θb)·v) = G v at θa = θb = θ: one backward
pass through a graph built once.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from ..core.checks import check_int
from ..core.numerics import lanczos
from ._network import PathNetwork, token_feed
from ..core.concurrency import holds_model
from ..core.state import finite_weights


@holds_model
@finite_weights
def spectrum(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, k: int = 10, *,
             steps: Optional[int] = None, seed: int = 0, input_shape=None, dtype=torch.float64) -> torch.Tensor:
    """The top ``k`` eigenvalues of Π (descending), by Lanczos with full reorthogonalisation on
    G v products (``steps`` of them; default max(2k + 20, 40), at most the number of kept
    weights). ``seed`` draws the starting vector."""
    k = check_int(k, "k", lo=1)
    steps = check_int(steps, "steps", lo=1, allow_none=True)
    net = PathNetwork(model, masks, 2, dtype, input_shape=input_shape, feed=token_feed(model, input_shape, "spectrum"))
    keep = {n: t.mask.reshape(-1).nonzero().squeeze(1) for n, t in net.targets.items()}
    sizes = [int(i.numel()) for i in keep.values()]
    n = sum(sizes)
    if k > n:
        raise ValueError(f"k: {k} eigenvalues asked, but the pruned network has {n} weights")
    theta = {name: t.param.detach().to(net.dtype) * t.mask_as(net.dtype) for name, t in net.targets.items()}
    with torch.enable_grad():
        wa = {name: v.clone().requires_grad_(True) for name, v in theta.items()}
        wb = {name: v.clone().requires_grad_(True) for name, v in theta.items()}
        out = net.run({name: wa[name] * wb[name] for name in theta})
        gb = torch.autograd.grad(out.sum(), list(wb.values()), create_graph=True, allow_unused=True)
    names = list(theta)
    live = [(name, g) for name, g in zip(names, gb) if g is not None and g.requires_grad]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, torch.split(v, sizes)))
        with torch.enable_grad():
            s = sum((g.reshape(-1).index_select(0, keep[name]) * parts[name]).sum() for name, g in live)
            if not isinstance(s, torch.Tensor) or not s.requires_grad:
                return torch.zeros_like(v)
            ga = torch.autograd.grad(s, [wa[name] for name in names], retain_graph=True, allow_unused=True)
        return torch.cat([torch.zeros(sizes[i], dtype=v.dtype, device=v.device) if g is None
                          else g.reshape(-1).index_select(0, keep[name]) for i, (name, g) in enumerate(zip(names, ga))])

    steps = min(n, steps if steps is not None else max(2 * k + 20, 40))
    gen = torch.Generator(device=net.device)
    gen.manual_seed(int(seed))
    ritz = lanczos(matvec, n, steps, dtype=net.dtype, device=net.device, generator=gen).flip(0)
    if ritz.numel() < k:  # the Krylov space closed early: the rest of the spectrum is 0
        ritz = torch.cat([ritz, ritz.new_zeros(k - ritz.numel())])
    return ritz[:k].clamp_min(0)
