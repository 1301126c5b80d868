"""From a module's captured calls to its parameters' NTK terms, one rule per layer kind."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vjp, vmap

from ..core.state import output_tensor
from . import _kernels
from ._capture import Call, Capture
from ._plan import ModuleRule, ParamEntry, Plan
from ._terms import DenseTerm, LinearTerm, PositionsTerm


def _mask(entry: ParamEntry):
    return None if entry is None else entry.mask


def _nk(b: torch.Tensor) -> torch.Tensor:
    # captured cotangents are [kk, n, ...]; terms want [n, kk, ...]
    return b.transpose(0, 1)


def linear_terms(rule: ModuleRule, calls: List[Call]) -> Dict[str, object]:
    out = OrderedDict()
    w, bias = rule.params.get("weight"), rule.params.get("bias")
    if w is not None:
        a_parts, b_parts = [], []
        for call in calls:
            n = call.a.shape[0]
            C = call.a.shape[-1]
            a_parts.append(call.a.reshape(n, -1, C))
            b = _nk(call.b)
            b_parts.append(b.reshape(n, b.shape[1], -1, b.shape[-1]))
        a = torch.cat(a_parts, 1)
        b = torch.cat(b_parts, 2)
        if a.shape[1] == 1:
            out[w.name] = LinearTerm(a[:, 0], b[:, :, 0], w.mask)
        else:
            out[w.name] = PositionsTerm(lambda a=a: a, b, w.mask, a.shape[1], a.shape[2],
                                        why="dense layer applied at several positions")
    if bias is not None:
        g = None
        for call in calls:
            b = _nk(call.b)
            s = b.reshape(b.shape[0], b.shape[1], -1, b.shape[-1]).sum(2)
            g = s if g is None else g + s
        if bias.mask is not None:
            g = g * bias.mask
        out[bias.name] = DenseTerm(g, "bias: per-sample gradient is the output cotangent")
    return out


def _conv_geometry(module, a: torch.Tensor):
    """The input padded as the module pads it, and the conv hyper-parameters with zero padding
    left, so that every padding mode and padding='same' reduce to one case."""
    dims = a.dim() - 2
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * dims
    else:
        padding = tuple(module.padding)
    return a, tuple(module.kernel_size), tuple(module.stride), padding, tuple(module.dilation), module.groups


def _conv_call_term(module, call: Call, entry: ParamEntry) -> PositionsTerm:
    a, ksize, stride, padding, dilation, groups = _conv_geometry(module, call.a)
    b = _nk(call.b)  # [n, kk, O, *out]
    n, kk, O = b.shape[:3]
    dims = a.dim() - 2
    S = 1
    for s in b.shape[3:]:
        S *= s
    C = a.shape[1]
    D = C // groups
    for k in ksize:
        D *= k
    if dims == 1:
        a4, b5 = a.unsqueeze(2), b.unsqueeze(3)
        ksize4, stride4, pad4, dil4 = (1,) + ksize, (1,) + stride, (0,) + padding, (1,) + dilation
    else:
        a4, b5, ksize4, stride4, pad4, dil4 = a, b, ksize, stride, padding, dilation

    def dense_fn():
        return _kernels.conv_weight_grad_per_sample(a4 if dims <= 2 else a, b5 if dims <= 2 else b,
                                                    ksize4 if dims <= 2 else ksize,
                                                    stride4 if dims <= 2 else stride,
                                                    pad4 if dims <= 2 else padding,
                                                    dil4 if dims <= 2 else dilation, groups)

    def a_fn():
        cols = F.unfold(a4, ksize4, dilation=dil4, padding=pad4, stride=stride4)  # [n, D, S]
        return cols.transpose(1, 2)

    bpos = b.reshape(n, kk, O, S).transpose(2, 3)
    return PositionsTerm(a_fn, bpos, entry.mask, S, D, dense_fn=dense_fn,
                         positions_ok=(dims <= 2 and groups == 1), why="convolution")


def conv_terms(rule: ModuleRule, calls: List[Call]) -> Dict[str, object]:
    out = OrderedDict()
    w, bias = rule.params.get("weight"), rule.params.get("bias")
    if w is not None:
        terms = [_conv_call_term(rule.module, call, w) for call in calls]
        if len(terms) == 1:
            out[w.name] = terms[0]
        elif terms:
            g = sum(t.dense().g for t in terms)
            out[w.name] = DenseTerm(g, "convolution called several times: per-sample gradients summed")
    if bias is not None and calls:
        g = None
        for call in calls:
            b = _nk(call.b)
            s = b.reshape(b.shape[0], b.shape[1], b.shape[2], -1).sum(3)
            g = s if g is None else g + s
        if bias.mask is not None:
            g = g * bias.mask
        out[bias.name] = DenseTerm(g, "bias: cotangents summed over positions")
    return out


def _channel_dot(b: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
    """sum_p b[n, k, c, p] xhat[n, c, p]: one batched product per (sample, channel), not an
    [n, kk, C, positions] temporary. Its gradient is a slow outer product, yet inside an NTT step
    the elementwise form was no faster (benchmarks/explore_ntt_step_variants.py)."""
    return torch.einsum("nkcp,ncp->nkc", b, xhat)


def batchnorm_terms(rule: ModuleRule, calls: List[Call]) -> Dict[str, object]:
    m = rule.module
    out = OrderedDict()
    w, bias = rule.params.get("weight"), rule.params.get("bias")
    gw = gb = None
    for call in calls:
        a = call.a
        b = _nk(call.b)  # [n, kk, C, *spatial]
        n, kk, C = b.shape[:3]
        b3 = b.reshape(n, kk, C, -1)
        if w is not None:
            shape = (1, C) + (1,) * (a.dim() - 2)
            xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
            s = _channel_dot(b3, xhat.reshape(n, C, -1))
            gw = s if gw is None else gw + s
        if bias is not None:
            s = b3.sum(3)
            gb = s if gb is None else gb + s
    if w is not None and gw is not None:
        out[w.name] = DenseTerm(gw if w.mask is None else gw * w.mask, "BatchNorm scale: sum of cotangent x normalised input")
    if bias is not None and gb is not None:
        out[bias.name] = DenseTerm(gb if bias.mask is None else gb * bias.mask, "BatchNorm shift: sum of cotangents")
    return out


def generic_terms(rule: ModuleRule, calls: List[Call]) -> Dict[str, object]:
    """Per-sample gradients of this module's own parameters by torch.func: a vjp per sample of
    the module alone, vmapped over the captured cotangents."""
    module = rule.module
    values = {attr: e.value.detach() if not e.value.requires_grad else e.value for attr, e in rule.params.items()}
    masks = {attr: e.mask for attr, e in rule.params.items()}

    def run(v, a_i):
        eff = dict(rule.inner_values)
        eff.update({k: (t if masks[k] is None else t * masks[k]) for k, t in v.items()})
        return functional_call(module, eff, (a_i.unsqueeze(0),)).squeeze(0)

    def per_sample(a_i, b_i):
        _, fn = vjp(lambda v: run(v, a_i), values)
        return vmap(fn)(b_i)[0]

    total = None
    for call in calls:
        g = vmap(per_sample, in_dims=(0, 1))(call.a, call.b)  # attr -> [n, kk, *shape]
        total = g if total is None else {k: total[k] + g[k] for k in g}
    out = OrderedDict()
    if total is None:
        return out
    for attr, e in rule.params.items():
        t = total[attr]
        out[e.name] = DenseTerm(t.reshape(t.shape[0], t.shape[1], -1), rule.reason)
    return out


def whole_model_terms(model, plan: Plan, cap: Capture) -> Dict[str, object]:
    """Per-sample Jacobians of the tied (or otherwise unreachable) parameters through the whole
    model by torch.func, restricted to the captured outputs."""
    if not plan.whole_model:
        return {}
    names = [e.name for e in plan.whole_model]
    values = {e.name: e.value for e in plan.whole_model}
    masks = {e.name: e.mask for e in plan.whole_model}
    fixed = {k: v for k, v in plan.forward_values.items() if k not in values}
    ks = torch.tensor(cap.ks, device=cap.x.device)

    def single(v, x_i):
        eff = dict(fixed)
        eff.update({k: (t if masks[k] is None else t * masks[k]) for k, t in v.items()})
        out = output_tensor(functional_call(model, eff, (x_i.unsqueeze(0),)))
        return out.reshape(-1).index_select(0, ks)

    try:
        jac = vmap(jacrev(single), in_dims=(None, 0))(values, cap.x)  # name -> [n, kk, *shape]
    except RuntimeError:
        # some modules have no batching rule over samples (nn.LSTM/GRU's fused kernels fail inside
        # vmap) though jacrev of one sample works: one sample at a time, the same numbers, slower
        try:
            per = [jacrev(single)(values, x_i) for x_i in cap.x]
        except RuntimeError:
            # and under create_graph (the NTT loss) even jacrev of one sample fails there: its vmap
            # over the outputs meets the fused kernel's double backward. Plain autograd, row by row.
            per = [_rows_by_autograd(single, values, x_i) for x_i in cap.x]
        jac = {n: torch.stack([j[n] for j in per]) for n in names}
    return OrderedDict((n, DenseTerm(jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1),
                                     plan.whole_model_reason[n])) for n in names)


def _rows_by_autograd(single, values, x_i) -> Dict[str, torch.Tensor]:
    """jacrev(single)(values, x_i) without torch.func: one backward pass per output, through the
    graph of the values that require grad (so the result can be differentiated again)."""
    graph = any(v.requires_grad for v in values.values())
    leaves = {n: v if v.requires_grad else v.detach().requires_grad_(True) for n, v in values.items()}
    with torch.enable_grad():
        out = single(leaves, x_i)
        rows = [torch.autograd.grad(out[k], list(leaves.values()), retain_graph=True, create_graph=graph,
                                    allow_unused=True) for k in range(out.shape[0])]
    return {n: torch.stack([r[i] if r[i] is not None else torch.zeros_like(leaves[n]) for r in rows])
            for i, n in enumerate(leaves)}


RULES = {"linear": linear_terms, "conv": conv_terms, "batchnorm": batchnorm_terms, "generic": generic_terms}

