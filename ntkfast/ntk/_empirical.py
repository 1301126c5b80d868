"""The empirical NTK by structure: capture per-layer inputs and output cotangents, contract per
parameter, sum; chunked over samples and outputs to respect a memory budget."""
from __future__ import annotations

import os
from contextlib import contextmanager
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from ..core.checks import check_bytes
from ..core.progress import progress_bar
from ._capture import Capture, _Untappable, capture, read_outside_their_module
from ._layers import RULES, whole_model_terms
from ._plan import Plan, build_plan
from ._terms import MODES, DenseTerm, as_dense, pair

_DEFAULT_FRACTION = 0.25


def _check_values(x, name):
    if x.is_meta:
        raise ValueError(f"{name}: a meta tensor has no values")
    if x.is_complex():
        raise ValueError(f"{name}: expected real inputs, got dtype {x.dtype}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: holds {int((~torch.isfinite(x)).sum())} NaN/inf value(s); the kernel would not be finite")


def _check_inputs(x1, x2, mode):
    check_batch(x1, "x1")
    if x2 is not None:
        if not isinstance(x2, torch.Tensor):
            raise TypeError(f"x2: expected a tensor or None, got {type(x2).__name__}")
        if x2.dim() == 0 or x2.shape[0] == 0 or x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x2: shape {tuple(x2.shape)} does not match x1's sample shape {tuple(x1.shape[1:])}")
        if x2.dtype != x1.dtype or x2.device != x1.device:
            raise ValueError(f"x2: dtype/device {x2.dtype}/{x2.device} differ from x1's {x1.dtype}/{x1.device}")
        _check_values(x2, "x2")
        if mode.startswith("diagonal") and x2.shape[0] != x1.shape[0]:
            raise ValueError(f"x2: mode={mode!r} pairs x1[i] with x2[i], so both need the same number of samples "
                             f"(got {x1.shape[0]} and {x2.shape[0]})")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(total * _DEFAULT_FRACTION)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Engine:
    """Holds the plan and does the captures and contractions for one model and sample set."""

    def __init__(self, model, plan: Plan, create_graph: bool):
        self.model, self.plan, self.create_graph = model, plan, create_graph
        self._reads_checked = False

    def capture(self, x: torch.Tensor, ks) -> Capture:
        if not self._reads_checked:  # once per engine, on the first (probe) capture
            self._reads_checked = True
            for name in read_outside_their_module(self.model, self.plan, x[:1]):
                self._demote(name, "has its weights read outside its own calls as well")
        while True:
            try:
                # (a module neither called nor read contributes nothing: it has no calls to contract)
                return capture(self.model, self.plan, x, ks, create_graph=self.create_graph)
            except _Untappable as exc:
                self._demote(exc.module_name, "is not called as tensor -> tensor with the samples as rows")

    def _demote(self, name: str, why: str) -> None:
        # A module that cannot be tapped: its parameters go through the whole-model torch.func path instead.
        for rule in list(self.plan.rules):
            if rule.module_name == name:
                self.plan.rules.remove(rule)
                for entry in rule.params.values():
                    self.plan.whole_model.append(entry)
                    self.plan.whole_model_reason[entry.name] = f"torch.func through the whole model: module {name!r} {why}"
                return
        raise RuntimeError(f"internal: cannot demote module {name!r}")

    def terms_by_module(self, cap: Capture):
        for rule in self.plan.rules:
            calls = cap.calls.get(rule.module_name, [])
            if calls:
                yield rule, RULES[rule.kind](rule, calls)
        if self.plan.whole_model:
            yield None, whole_model_terms(self.model, self.plan, cap)

    def block(self, cap1: Capture, cap2: Capture, mode: str, paths: Optional[dict] = None) -> torch.Tensor:
        total = None
        gen2 = None if cap2 is cap1 else self.terms_by_module(cap2)
        for rule, terms1 in self.terms_by_module(cap1):
            terms2 = terms1 if gen2 is None else next(gen2)[1]
            for name, t1 in terms1.items():
                t2 = terms2[name]
                value = pair(t1, t2, mode)
                total = value if total is None else total + value
                if paths is not None and name not in paths:
                    paths[name] = (rule.reason if rule is not None else self.plan.whole_model_reason[name],
                                   getattr(t1, "path", ""), getattr(t1, "why", ""))
        if total is None:
            raise ValueError("model: none of the selected parameters is used by the forward pass")
        return total

    def probe(self, x: torch.Tensor) -> Tuple[int, int, int, int]:
        """K, and bytes per sample of activations, per (sample, output) of cotangents, and per
        (sample, output) of the largest materialised per-sample gradient."""
        cap = self.capture(x[:1], [0])
        act = cot = 0
        for calls in cap.calls.values():
            for c in calls:
                act += 2 * _tensor_bytes(c.a) + _tensor_bytes(c.b)  # input, output and its clone
                cot += _tensor_bytes(c.b)
        big = 0
        item = x.element_size() if x.is_floating_point() else 4
        for rule in self.plan.rules:
            big = max(big, sum(e.numel for e in rule.params.values()) * item)
        for e in self.plan.whole_model:
            big = max(big, e.numel * item)
        return cap.outputs, act, cot, big


def _chunks(total: int, size: int) -> List[Tuple[int, int]]:
    return [(i, min(i + size, total)) for i in range(0, total, size)]


def _plan_chunks(N1, N2, K, act, cot, big, item, mode, budget) -> Tuple[int, int]:
    """Samples and outputs per capture such that two captures and one block fit the budget."""
    nc, kc = max(N1, N2), K

    def need(nc, kc):
        cap = nc * (act + kc * (cot + big))
        out = nc * nc * (kc * kc if mode in ("full",) else 1) * item
        return 2 * cap + out

    while need(nc, kc) > budget and nc > 1:
        nc = (nc + 1) // 2
    while need(nc, kc) > budget and kc > 1:
        kc = (kc + 1) // 2
    return nc, kc


@contextmanager
def forward_of(x, name: str):
    """A first forward on ``x`` that fails is the input's fault (a wrong width, dtype or device):
    the error names the argument ``name``."""
    try:
        yield
    except (RuntimeError, TypeError, IndexError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        raise ValueError(f"{name}: the model's forward fails on it (samples of shape {tuple(x.shape[1:])}, "
                         f"{x.dtype}, {x.device}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def check_batch(x, name: str) -> None:
    """A batch of at least one real, finite sample, with values (not meta)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a batch of at least one sample, got shape {tuple(x.shape)}")
    _check_values(x, name)


def probe(engine, x1):
    """The engine's probe on one sample, its failure named as x1's."""
    with forward_of(x1, "x1"):
        return engine.probe(x1)


def empirical_ntk_impl(model, x1, x2, *, masks, mode, params, memory_budget, create_graph, explain):
    _check_inputs(x1, x2, mode)
    budget = check_bytes(memory_budget)
    plan = build_plan(model, params, masks)
    engine = Engine(model, plan, create_graph)
    sym = x2 is None
    xb = x1 if sym else x2
    N1, N2 = x1.shape[0], xb.shape[0]
    with torch.set_grad_enabled(create_graph):
        K, act, cot, big = probe(engine, x1)
        item = x1.element_size()
        if budget is None:
            budget = _default_budget(x1.device)
        nc, kc = _plan_chunks(N1, N2, K, act, cot, big, item, mode, budget)
        paths: Dict[str, tuple] = OrderedDict()
        out = _assemble(engine, x1, xb, sym, mode, N1, N2, K, nc, kc, paths)
    if not create_graph:
        out = out.detach()
    if explain:
        report = plan.explain()
        for name, (reason, path, why) in paths.items():
            report[name] = f"{reason}; path: {path}" + (f" ({why})" if why else "")
        return out, report
    return out


def _assemble(engine: Engine, x1, x2, sym: bool, mode: str, N1, N2, K, nc, kc, paths) -> torch.Tensor:
    s1 = _chunks(N1, nc)
    s2 = s1 if sym else _chunks(N2, nc)
    kcs = _chunks(K, kc)
    if len(s1) == 1 and len(s2) == 1 and len(kcs) == 1:
        cap1 = engine.capture(x1, range(K))
        cap2 = cap1 if sym else engine.capture(x2, range(K))
        return engine.block(cap1, cap2, mode, paths)
    dtype, device = x1.dtype, x1.device
    if mode == "full":
        out = torch.zeros(N1, N2, K, K, dtype=dtype, device=device)
    elif mode == "trace":
        out = torch.zeros(N1, N2, dtype=dtype, device=device)
    elif mode == "diagonal":
        out = torch.zeros(N1, K, K, dtype=dtype, device=device)
    else:
        out = torch.zeros(N1, dtype=dtype, device=device)

    def pairs_of(bi, i, ki):
        if mode.startswith("diagonal"):
            return [(bi, i, kj, kr) for kj, kr in enumerate(kcs) if mode == "diagonal" or kj == ki]
        return [(bj, sr, kj, kr) for bj, sr in enumerate(s2) for kj, kr in enumerate(kcs)
                if (mode == "full" or kj == ki) and not (sym and (bj, kj) < (bi, ki))]

    blocks = sum(len(pairs_of(bi, i, ki)) for bi, i in enumerate(s1) for ki in range(len(kcs)))
    # an inner bar: shown only when the blocks take a while (a scorer computes many small kernels)
    with progress_bar(blocks, "NTK blocks", inner=True, unit="block") as bar:
        for bi, (i0, i1) in enumerate(s1):
            for ki, (k0, k1) in enumerate(kcs):
                cap1 = engine.capture(x1[i0:i1], range(k0, k1))
                for bj, (j0, j1), kj, (l0, l1) in pairs_of(bi, (i0, i1), ki):
                    _block_into(out, engine, cap1, x2, sym, mode, paths, bi, ki, (i0, i1), (k0, k1), bj, kj,
                                (j0, j1), (l0, l1))
                    bar.update(1)
    return out


def _block_into(out, engine, cap1, x2, sym, mode, paths, bi, ki, rows, outs, bj, kj, cols, outs2) -> None:
    """Compute the block of rows x cols (outputs outs x outs2) and write it, with its mirror image
    where the kernel is symmetric, into ``out``."""
    (i0, i1), (k0, k1), (j0, j1), (l0, l1) = rows, outs, cols, outs2
    if sym and (bj, kj) == (bi, ki):
        cap2 = cap1
    else:
        cap2 = engine.capture(x2[j0:j1], range(l0, l1))
    blk = engine.block(cap1, cap2, mode, paths)
    if mode == "full":
        out[i0:i1, j0:j1, k0:k1, l0:l1] = blk
        if sym and (bj, kj) != (bi, ki):
            out[j0:j1, i0:i1, l0:l1, k0:k1] = blk.permute(1, 0, 3, 2)
    elif mode == "trace":
        out[i0:i1, j0:j1] += blk
        if sym and bj != bi:
            out[j0:j1, i0:i1] += blk.T
    elif mode == "diagonal":
        out[i0:i1, k0:k1, l0:l1] = blk
    else:
        out[i0:i1] += blk


def per_sample_jacobian_impl(model, x, *, masks, params, create_graph) -> "OrderedDict[str, torch.Tensor]":
    _check_inputs(x, None, "full")
    plan = build_plan(model, params, masks)
    engine = Engine(model, plan, create_graph)
    with torch.set_grad_enabled(create_graph):
        cap = engine.capture(x, range(probe(engine, x)[0]))
        out = OrderedDict()
        for _, terms in engine.terms_by_module(cap):
            for name, t in terms.items():
                g = t.g if isinstance(t, DenseTerm) else as_dense(t).g
                shape = plan.entries[name].value.shape
                out[name] = g.reshape(g.shape[0], g.shape[1], *shape)
    order = [n for n in plan.entries if n in out]
    res = OrderedDict((n, out[n] if create_graph else out[n].detach()) for n in order)
    for n, e in plan.entries.items():
        if n not in res:  # not used by the forward pass
            res[n] = torch.zeros(x.shape[0], cap.outputs, *e.value.shape, dtype=e.value.dtype, device=e.value.device)
    return res
