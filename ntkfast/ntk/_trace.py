"""tr Θ(x, x): exactly by structure, or estimated without forming any per-layer Gram."""
from __future__ import annotations

import torch

from ..core.checks import check_int
from ._empirical import check_batch, empirical_ntk_impl, forward_of
from ._plan import build_plan
from ._products import Linearised

from ..core.options import TraceMethod, choices

METHODS = choices(TraceMethod)


def ntk_trace_impl(model, x, *, masks, method, params, n_probes, epsilon, seed, memory_budget):
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "exact":
        return empirical_ntk_impl(model, x, None, masks=masks, mode="diagonal_trace", params=params,
                                  memory_budget=memory_budget, create_graph=False, explain=False).sum()
    n_probes = check_int(n_probes, "n_probes", lo=1)
    check_batch(x, "x")
    gen = torch.Generator(device=x.device)
    gen.manual_seed(0 if seed is None else int(seed))
    lin = Linearised(model, build_plan(model, params, masks), x)
    with forward_of(x, "x"):
        shape = lin.outputs().shape
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    chunk = 16
    done = 0
    if method == "hutchinson":
        # E ||J^T v||^2 = tr(J J^T) for Rademacher v; probes vmapped over one forward pass.
        while done < n_probes:
            c = min(chunk, n_probes - done)
            v = torch.randint(0, 2, (c,) + tuple(shape), generator=gen, device=x.device).to(x.dtype) * 2 - 1
            g = lin.vjp_many(v)
            total = total + sum((t * t).sum() for t in g.values())
            done += c
        return total / n_probes
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon: expected a positive number, got {epsilon!r}")
    # E ||J xi||^2 = tr(J J^T) for xi ~ N(0, I); J xi by a central difference (error O(eps^2)).
    while done < n_probes:
        c = min(chunk, n_probes - done)
        xi = {n: torch.randn((c,) + tuple(t.shape), generator=gen, device=x.device, dtype=t.dtype)
              for n, t in lin.values.items()}
        d = (lin.perturbed_many(xi, epsilon) - lin.perturbed_many(xi, -epsilon)) / (2 * epsilon)
        total = total + (d * d).sum()
        done += c
    return total / n_probes
