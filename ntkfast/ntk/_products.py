"""Jacobian-vector products of the (masked) network for the estimators that never form the
kernel: J^T v by a backward pass, J u by forward-mode AD."""
from __future__ import annotations

from typing import Dict

import torch
from torch.func import functional_call, jvp, vjp, vmap

from ..core.state import output_tensor
from ._capture import model_outputs
from ._plan import Plan


class Linearised:
    """f(theta) on a fixed batch as a function of the selected parameters (masks applied)."""

    def __init__(self, model, plan: Plan, x: torch.Tensor):
        self.model, self.plan, self.x = model, plan, x
        self.values = {n: e.value.detach() for n, e in plan.entries.items()}
        self.masks = {n: e.mask for n, e in plan.entries.items()}
        self.fixed = {k: v.detach() for k, v in plan.forward_values.items() if k not in self.values}

    def f(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        eff = dict(self.fixed)
        eff.update({n: (t if self.masks[n] is None else t * self.masks[n]) for n, t in v.items()})
        out = output_tensor(functional_call(self.model, eff, (self.x,)))
        return out.reshape(out.shape[0], -1)

    def outputs(self) -> torch.Tensor:
        with torch.no_grad():
            return model_outputs(self.model, self.plan, self.x)

    def vjp(self, cot: torch.Tensor) -> Dict[str, torch.Tensor]:
        _, fn = vjp(self.f, self.values)
        return fn(cot)[0]

    def vjp_many(self, cots: torch.Tensor) -> Dict[str, torch.Tensor]:
        """J^T v for a stack of cotangents [c, N, K]: one forward pass, vmapped backward."""
        _, fn = vjp(self.f, self.values)
        return vmap(fn)(cots)[0]

    def perturbed_many(self, directions: Dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """f(θ + scale·u) for a stack of directions {name: [c, *shape]} -> [c, N, K]."""
        with torch.no_grad():
            return vmap(lambda u: self.f({n: t + scale * u[n] for n, t in self.values.items()}))(directions)

    def jvp(self, u: Dict[str, torch.Tensor]) -> torch.Tensor:
        return jvp(self.f, (self.values,), (u,))[1]

    def perturbed(self, u: Dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        with torch.no_grad():
            return self.f({n: t + scale * u[n] for n, t in self.values.items()})
