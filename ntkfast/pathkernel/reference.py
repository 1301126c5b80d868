"""Brute force: every input-output path of a small bias-free network, enumerated one by one, and
the path kernel quantities computed from the list. Exponential in depth; for checking the fast
functions on tiny networks only.

The network is read through its own forward: the output of every prunable layer is replaced by a
leaf, and the Jacobians of each layer's input (and of the network's output) with respect to those
leaves and to the network input give the linear connections between layers (pooling
coefficients, residual sums, flattening). Each weight entry's edges come from the layer's
Jacobian with that entry alone set to one. ReLUs must be active (true in the path network, whose
weights and input are positive), and the layers must be bias-free.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from ._network import prunable_module_of
from ..core.batches import resolve_input_shape
from ..core.targets import resolve_targets


class Path(NamedTuple):
    input_unit: int
    output_unit: int
    coefficient: float  # product of the non-weight linear coefficients on the way (pooling)
    edges: Tuple[Tuple[str, int], ...]  # (weight name, flat index), one per prunable layer crossed


def _layer_edges(module: nn.Module, wname: str, a: torch.Tensor, mask: torch.Tensor) -> List[Tuple[int, int, int]]:
    attr = wname.rsplit(".", 1)[-1]
    w = getattr(module, attr)
    edges = []
    state = {k: torch.zeros_like(v) for k, v in module.named_parameters(recurse=False)}
    for e in mask.reshape(-1).nonzero().squeeze(1).tolist():
        one = torch.zeros(w.numel(), dtype=a.dtype)
        one[e] = 1
        state[attr] = one.view(w.shape)
        jac = torch.autograd.functional.jacobian(lambda x: functional_call(module, state, (x,)).reshape(-1), a)
        jac = jac.reshape(-1, a.numel())
        for j, i in jac.nonzero().tolist():
            if float(jac[j, i]) != 1.0:
                raise ValueError(f"{wname}: a weight entry enters with coefficient {float(jac[j, i])}")
            edges.append((i, j, e))
    return edges


def enumerate_paths(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *,
                    input_shape=None) -> Tuple[List[Path], Dict[str, torch.Tensor]]:
    """Every path with a nonzero coefficient through kept weights, and the weights (float64)."""
    model = copy.deepcopy(model).double().eval()
    targets = resolve_targets(model, masks)
    for n, p in model.named_parameters():
        if n.endswith("bias") and p is not None and bool(p.detach().ne(0).any()):
            raise ValueError(f"model: {n} is not zero; paths are enumerated for bias-free networks")
    shape = resolve_input_shape(model, input_shape)
    modules = dict(model.named_modules())
    order: List[str] = []
    leaves: Dict[str, torch.Tensor] = {}
    inputs: Dict[str, torch.Tensor] = {}
    weights = {n: t.param.detach().abs() for n, t in targets.items()}  # positive: every ReLU active

    def tap(wname):
        def hook(module, args, output):
            order.append(wname)
            inputs[wname] = args[0]
            leaf = output.detach().clone().requires_grad_(True)
            leaves[wname] = leaf
            return leaf
        return hook

    x = torch.ones((1,) + tuple(shape), dtype=torch.float64, requires_grad=True)
    handles = [modules[prunable_module_of(n)].register_forward_hook(tap(n)) for n in targets]
    try:
        out = functional_call(model, {t.param_name: weights[n] for n, t in targets.items()}, (x,)).reshape(-1)
    finally:
        for h in handles:
            h.remove()
    sources = ["input"] + order
    src_tensor = {"input": x, **leaves}

    def connections(y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """d y / d source for every source, as [len(y), source units] matrices."""
        y = y.reshape(-1)
        rows = {s: [] for s in sources}
        for j in range(y.numel()):
            gs = torch.autograd.grad(y[j], [src_tensor[s] for s in sources], retain_graph=True, allow_unused=True)
            for s, g in zip(sources, gs):
                rows[s].append(torch.zeros(src_tensor[s].numel(), dtype=torch.float64) if g is None else g.reshape(-1))
        return {s: torch.stack(r) for s, r in rows.items()}

    into = {n: connections(inputs[n]) for n in order}
    into_out = connections(out)
    # partial paths ending at each unit of each source: lists of (input unit, coefficient, edges)
    at: Dict[str, List[list]] = {"input": [[(i, 1.0, ())] for i in range(x.numel())]}

    def arrive(conn: Dict[str, torch.Tensor], units: int) -> List[list]:
        lists = [[] for _ in range(units)]
        for s, c in conn.items():
            if s not in at:
                continue
            for v, u in c.nonzero().tolist():
                coef = float(c[v, u])
                lists[v].extend((i, k * coef, edges) for i, k, edges in at[s][u])
        return lists

    for n in order:
        ins = arrive(into[n], inputs[n].numel())
        outs = [[] for _ in range(leaves[n].numel())]
        for i, j, e in _layer_edges(modules[prunable_module_of(n)], n, inputs[n].detach(), targets[n].mask):
            outs[j].extend((src, k, edges + ((n, e),)) for src, k, edges in ins[i])
        at[n] = outs
    final = arrive(into_out, out.numel())
    paths = [Path(i, k_out, coef, edges) for k_out, lst in enumerate(final) for i, coef, edges in lst]
    theta = OrderedDict((n, t.param.detach().double().reshape(-1)) for n, t in targets.items())
    return paths, theta


def _value(path: Path, theta, g) -> float:
    v = 1.0
    for n, e in path.edges:
        v *= g(float(theta[n][e]))
    return v


class BruteForce:
    """Path kernel quantities from an explicit list of paths."""

    def __init__(self, model: nn.Module, masks=None, *, input_shape=None):
        self.paths, self.theta = enumerate_paths(model, masks, input_shape=input_shape)
        self.index = OrderedDict()
        self.kept = OrderedDict()
        t = resolve_targets(model, masks)
        col = 0
        for n in self.theta:
            for e in t[n].mask.reshape(-1).nonzero().squeeze(1).tolist():
                self.index[(n, e)] = col
                col += 1
        self.shapes = {n: tp.param.shape for n, tp in t.items()}

    def jacobian(self) -> torch.Tensor:
        """J[p, e] = ∂π_p/∂θ_e with π_p = √c_p Π_{e∈p} θ_e, over kept weights."""
        J = torch.zeros(len(self.paths), len(self.index), dtype=torch.float64)
        for r, p in enumerate(self.paths):
            for n, e in p.edges:
                rest = p.coefficient ** 0.5
                for m, f in p.edges:
                    if (m, f) != (n, e):
                        rest *= float(self.theta[m][f])
                J[r, self.index[(n, e)]] += rest
        return J

    def _per_weight(self, contribution) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict((n, torch.zeros(self.theta[n].numel(), dtype=torch.float64)) for n in self.theta)
        for p in self.paths:
            for n, e in p.edges:
                out[n][e] += contribution(p, n, e)
        return OrderedDict((n, v.view(self.shapes[n])) for n, v in out.items())

    def diagonal(self):
        return self._per_weight(lambda p, n, e: p.coefficient * (_value(p, self.theta, abs) / abs(float(self.theta[n][e]))) ** 2)

    def trace(self) -> float:
        return float(sum(d.sum() for d in self.diagonal().values()))

    def eigenvalues(self) -> torch.Tensor:
        J = self.jacobian()
        return torch.linalg.eigvalsh(J.T @ J).flip(0)

    def synflow(self, inputs: Optional[torch.Tensor] = None):
        """S_e = Σ_{p∋e} c_p x_{i(p)} |π_p| (x = ones, or the given input)."""
        x = None if inputs is None else inputs.reshape(-1).double()
        return self._per_weight(lambda p, n, e: p.coefficient * (1.0 if x is None else float(x[p.input_unit]))
                                * _value(p, self.theta, abs))

    def synflow_l2_squared(self):
        """|θ_e| Σ_{p∋e} c_p π_p² / θ_e²."""
        return self._per_weight(lambda p, n, e: p.coefficient * _value(p, self.theta, abs) ** 2
                                / abs(float(self.theta[n][e])))
