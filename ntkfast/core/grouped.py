"""Evaluate one network at G weight sets in a single pass.

NTK-SAP needs the same architecture evaluated at 2R different weight sets (R fresh draws, each
unperturbed and perturbed). Instead of R * 2 model copies and calls, :class:`GroupedNetwork` keeps
one private copy of the model whose parameterised leaf modules take a *group-stacked* batch: the
input is ``[G * B, ...]`` (group g owns rows ``g*B .. g*B+B-1``) and every parameter a leaf uses is
given as ``[G, *shape]``. Modules without parameters (activations, pooling, flatten, dropout in
eval mode) and the model's own forward code (residual sums, reshapes) run unchanged, because they
treat the rows of a batch independently.

Per leaf type:
- Linear: one batched matmul over the groups.
- Conv1d/2d/3d: one grouped convolution (groups x G) on CUDA, a loop over the groups' contiguous
  row blocks on CPU (measured faster there: the grouped layout needs two transposing copies).
- BatchNorm: statistics by :class:`BatchNormPlan` (see there); the affine part per group.
- LayerNorm / GroupNorm: normalised without affine, then the per-group affine.
- any other leaf with parameters: evaluated group by group with :func:`torch.func.functional_call`
  (correct for any module that treats rows independently, only slower); :meth:`GroupedNetwork.explain`
  lists which leaves take that path.
A parameter owned by a module that has children (used directly in a custom forward) cannot differ
between groups: :meth:`GroupedNetwork.check_shared` tells whether the given values agree.
"""
from __future__ import annotations


import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .state import cast_copy, output_tensor
from .targets import attribute_name

__all__ = ["GroupedNetwork", "BatchNormPlan", "NotGroupable"]


class NotGroupable(ValueError):
    """The model cannot be evaluated group-stacked (the caller falls back to per-copy evaluation)."""


@dataclass
class BatchNormPlan:
    """How BatchNorm layers get their statistics in one grouped call.

    ``mode``:
    - "single_pass": groups ``0..P-1`` (the unperturbed branches) are normalised with the mean and
      unbiased variance of their own input, computed in the pass without gradient; group g uses the
      statistics of group ``g % P``. This is eval mode with running statistics taken from the same
      inputs, in the same pass.
    - "record": train-mode normalisation (biased variance, the statistics of each group's own input,
      no gradient through them); the mean and unbiased variance are recorded in ``stats``. This is
      the authors' separate statistics pass.
    - "stored": every group g uses ``stats[layer]`` of group ``g % P`` (recorded before).
    - "train": training, as ``F.batch_norm`` in train mode does it for each group on its own: the
      biased statistics of the group's own input, with gradient through them, and the running
      statistics ``running[layer]`` (``[G, C]`` mean and variance, updated in place with the
      module's momentum, unbiased variance) and ``tracked[layer]`` (batches counted) moved on.
      After training, ``BatchNormPlan("stored", G, stats=running)`` evaluates every group with
      its own running statistics (eval mode).
    BatchNorm layers without running statistics (``track_running_stats=False``) always normalise
    each group by its own biased batch statistics, with gradient, as PyTorch does in eval mode.
    """

    mode: str = "single_pass"
    pieces: int = 1
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    running: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tracked: Dict[str, int] = field(default_factory=dict)


class _Context:
    """What the wrapped leaves read during one grouped call."""

    def __init__(self):
        self.values: Mapping[str, torch.Tensor] = {}
        self.groups = 1
        self.bn = BatchNormPlan()
        self.grouped_conv = False
        # inside a _Generic leaf's call for one group: that group's index (the leaves below it
        # then compute one network, with that group's values)
        self.group: Optional[int] = None
        self.rows = 0  # rows of the stacked input: G x the samples of one group


def _per_group(t: torch.Tensor, ctx: _Context) -> torch.Tensor:
    """``[G*B, ...] -> [G, B, ...]`` (a view when possible)."""
    return t.reshape(ctx.groups, t.shape[0] // ctx.groups, *t.shape[1:])


def _no_fused_path(module, args):
    return None


class _Leaf(nn.Module):
    """Base of the wrappers: holds the original module (for its configuration) and the context."""

    def __init__(self, name: str, module: nn.Module, ctx: _Context):
        super().__init__()
        self.name = name
        self.inner = [module]  # a list, so the module is not registered (its parameters are unused)
        self.ctx = ctx
        self.keys: Dict[str, str] = {}  # attr -> key of its value (a tied parameter: its first name)

        # a parent may read a layer's configuration (TransformerEncoderLayer reads norm1.eps and
        # self_attn.in_proj_bias before choosing its fused path); a hook on every wrapper keeps that
        # fused path, which would compute with the layers' own weights, from being chosen at all
        self.register_forward_pre_hook(_no_fused_path)

    @property
    def module(self) -> nn.Module:
        return self.inner[0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            d = self.__dict__
            if "inner" not in d or name.startswith("__"):
                raise
        # what the wrapped layer has: a parameter reads as this call's value where one network is
        # evaluated; where G are, the caller would compute one network with G weight sets
        # (a norm or a sum of them passes silently), so the copy is refused as not groupable
        key = d["keys"].get(name)
        ctx = d["ctx"]
        if key is not None and key in ctx.values:
            if ctx.groups > 1:
                raise NotGroupable(f"the forward reads {d['name']}.{name} outside that layer's own call")
            return self.v(name)[0]
        return getattr(d["inner"][0], name)

    def v(self, attr: str) -> Optional[torch.Tensor]:
        key = self.keys.get(attr)
        if key is None:
            return None
        v = self.ctx.values[key]
        g = self.ctx.group
        return v if g is None else v[g:g + 1]


class _Linear(_Leaf):
    path = "batched matmul"

    def forward(self, x):
        G = self.ctx.groups
        w, b = self.v("weight"), self.v("bias")
        if G == 1:
            return F.linear(x, w[0], None if b is None else b[0])
        lead = x.shape[:-1]
        x3 = x.reshape(G, -1, x.shape[-1])
        wt = w.transpose(1, 2)
        y = torch.baddbmm(b.unsqueeze(1), x3, wt) if b is not None else torch.bmm(x3, wt)
        return y.reshape(*lead, y.shape[-1])


# what cuDNN says when it has no engine for a convolution (seen with groups x G groups in float64)
_NO_ENGINE = ("unable to find an engine", "CUDNN_STATUS_NOT_SUPPORTED", "no valid convolution algorithm",
              "CUDNN_BACKEND_EXECUTION_PLAN")


def _no_engine(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(s.lower() in str(exc).lower() for s in _NO_ENGINE)


class _Conv(_Leaf):
    @property
    def path(self):
        if not self.ctx.grouped_conv:
            return "convolution per group"
        if False in self.__dict__.get("_grouped_probe", {}).values():
            return "convolution per group (no cuDNN engine for the grouped one)"
        return "grouped convolution"

    def _grouped_ok(self, conv, x, w, b, stride, padding, dilation, groups) -> bool:
        """Whether the grouped convolution runs here, forward and backward: probed once per shape
        and dtype (a missing engine shows in the backward too, where the pass could not catch it);
        when it does not, the layer falls back to one convolution per group, with a warning."""
        cache = self.__dict__.setdefault("_grouped_probe", {})
        key = (tuple(x.shape), tuple(w.shape), x.dtype, str(x.device))
        if key in cache:
            return cache[key]
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return True  # not probed inside a CUDA graph's capture; a failure there turns graphs off
        try:
            with torch.enable_grad():
                xp, wp = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
                y = conv(xp, wp, None if b is None else b.detach(), stride, padding, dilation, groups)
                torch.autograd.grad(y.sum(), (xp, wp))
            cache[key] = True
        except RuntimeError as exc:
            if not _no_engine(exc):
                raise
            cache[key] = False
            warnings.warn(f"{self.name}: no cuDNN engine for its grouped convolution ({groups} groups, {x.dtype}, "
                          f"input {tuple(x.shape)}): it runs one convolution per weight set instead, which is slower "
                          f"({str(exc).splitlines()[0][:120]})", RuntimeWarning, stacklevel=2)
        return cache[key]

    def forward(self, x):
        m: _ConvNd = self.module
        ctx, G = self.ctx, self.ctx.groups
        w, b = self.v("weight"), self.v("bias")
        nd = w.dim() - 3
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        padding = m.padding
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = (0,) * nd
        if G == 1:
            return conv(x, w[0], None if b is None else b[0], m.stride, padding, m.dilation, m.groups)
        grouped = ctx.grouped_conv
        if grouped:
            xg = _per_group(x, ctx)  # [G, B, C, *S]
            B = xg.shape[1]
            xi = xg.transpose(0, 1).reshape(B, G * xg.shape[2], *xg.shape[3:])
            wi = w.reshape(G * w.shape[1], *w.shape[2:])
            bi = None if b is None else b.reshape(-1)
            grouped = self._grouped_ok(conv, xi, wi, bi, m.stride, padding, m.dilation, m.groups * G)
        if not grouped:
            # split/unbind, not indexing: their backward is one cat, where each index's backward
            # would allocate and fill a zero gradient of the whole stack
            xs = x.split(x.shape[0] // G)
            ws = w.unbind(0)
            bs = b.unbind(0) if b is not None else [None] * G
            outs = [conv(xg, wg, bg, m.stride, padding, m.dilation, m.groups) for xg, wg, bg in zip(xs, ws, bs)]
            return torch.cat(outs, 0)
        y = conv(xi, wi, bi, m.stride, padding, m.dilation, m.groups * G)
        y = y.reshape(B, G, w.shape[1], *y.shape[2:]).transpose(0, 1)
        return y.reshape(G * B, *y.shape[2:])


def _channel_view(t: torch.Tensor, G: int, dims: int) -> torch.Tensor:
    """``[G, C] -> [G, 1, C, 1, ...]`` broadcasting against ``[G, B, C, *S]`` with ``dims`` spatial dims."""
    return t.reshape(G, 1, t.shape[1], *([1] * dims))


class _BN(_Leaf):
    path = "batchnorm (statistics per plan)"

    def forward(self, x):
        m: _BatchNorm = self.module
        ctx, G = self.ctx, self.ctx.groups
        plan = ctx.bn
        if G == 1 and m.track_running_stats and plan.mode != "train":
            return self._single(x, m, plan)
        xg = _per_group(x, ctx)  # [G, B, C, *S]
        S = xg.dim() - 3
        red = [1] + list(range(3, xg.dim()))
        C = xg.shape[2]
        w, b = self.v("weight"), self.v("bias")
        if w is None:
            w = x.new_ones(G, C)
        if b is None:
            b = x.new_zeros(G, C)
        if not m.track_running_stats:
            var, mean = torch.var_mean(xg, dim=red, unbiased=False, keepdim=True)
            y = (xg - mean) * torch.rsqrt(var + m.eps)
            return (y * _channel_view(w, G, S) + _channel_view(b, G, S)).reshape(x.shape)
        if plan.mode == "train":
            if not x.is_cuda:
                return self._train_per_group(x, m, plan, w, b)
            var, mean = torch.var_mean(xg, dim=red, unbiased=False)
            self._update_running(plan, m, mean.detach(), var.detach(), xg.numel() // (G * C))
        elif plan.mode == "record":
            with torch.no_grad():
                var_b, mean = torch.var_mean(xg, dim=red, unbiased=False)
                n = xg.numel() // (G * C)
                plan.stats[self.name] = (mean, var_b * (n / max(n - 1, 1)))
            var = var_b
        else:
            if plan.mode == "single_pass":
                with torch.no_grad():
                    P = plan.pieces
                    var_u, mean_u = torch.var_mean(xg[:P], dim=red, unbiased=True)
                    plan.stats[self.name] = (mean_u, var_u)
            mean, var = plan.stats[self.name]
            reps = G // mean.shape[0]
            if reps != 1:
                mean, var = mean.repeat(reps, 1), var.repeat(reps, 1)
        scale = w * torch.rsqrt(var + m.eps)
        shift = b - mean * scale
        return torch.addcmul(_channel_view(shift, G, S), xg, _channel_view(scale, G, S)).reshape(x.shape)


    def _train_per_group(self, x, m, plan, w, b):
        """Train mode on the CPU: PyTorch's own batch_norm on each group's row block (oneDNN's
        kernel, measured several times faster there than the stacked reduction), each updating
        its group's row of the running statistics in place."""
        G = self.ctx.groups
        running_mean, running_var = plan.running[self.name]
        tracked = plan.tracked[self.name] = plan.tracked.get(self.name, 0) + 1
        momentum = 1.0 / tracked if m.momentum is None else m.momentum
        xs = x.split(x.shape[0] // G)
        outs = [F.batch_norm(xs[g], running_mean[g], running_var[g], w[g], b[g], True, momentum, m.eps)
                for g in range(G)]
        return torch.cat(outs, 0)

    @torch.no_grad()
    def _update_running(self, plan, m, mean, var_b, n):
        """PyTorch's running-statistics update, per group (momentum None: the cumulative mean)."""
        running_mean, running_var = plan.running[self.name]
        tracked = plan.tracked[self.name] = plan.tracked.get(self.name, 0) + 1
        f = 1.0 / tracked if m.momentum is None else m.momentum
        running_mean.lerp_(mean.to(running_mean.dtype), f)
        running_var.lerp_((var_b * (n / max(n - 1, 1))).to(running_var.dtype), f)

    def _single(self, x, m, plan):
        """One group: PyTorch's own batch_norm, the very arithmetic of the authors' code."""
        w, b = self.v("weight"), self.v("bias")
        w = None if w is None else w[0]
        b = None if b is None else b[0]
        if plan.mode == "record":
            C = x.shape[1]
            mean, var = x.new_zeros(C), x.new_ones(C)
            with torch.no_grad():
                y = F.batch_norm(x, mean, var, w, b, True, 1.0, m.eps)
            plan.stats[self.name] = (mean.unsqueeze(0), var.unsqueeze(0))
            return y
        if plan.mode == "single_pass":
            C = x.shape[1]
            mean, var = x.new_zeros(C), x.new_ones(C)
            with torch.no_grad():  # (several times faster than torch.var_mean over N, H, W)
                torch.batch_norm_update_stats(x, mean, var, 1.0)
            plan.stats[self.name] = (mean.unsqueeze(0), var.unsqueeze(0))
        mean, var = plan.stats[self.name]
        return F.batch_norm(x, mean[0], var[0], w, b, False, 0.0, m.eps)


class _LayerNorm(_Leaf):
    path = "layer norm + affine per group"

    def forward(self, x):
        m: nn.LayerNorm = self.module
        G = self.ctx.groups
        y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        w, b = self.v("weight"), self.v("bias")
        if w is None and b is None:
            return y
        yg = _per_group(y, self.ctx)
        ns = tuple(m.normalized_shape)
        shape = (G,) + (1,) * (yg.dim() - 1 - len(ns)) + ns
        if w is not None:
            yg = yg * w.reshape(shape)
        if b is not None:
            yg = yg + b.reshape(shape)
        return yg.reshape(x.shape)


class _GroupNorm(_Leaf):
    path = "group norm + affine per group"

    def forward(self, x):
        m: nn.GroupNorm = self.module
        G = self.ctx.groups
        y = F.group_norm(x, m.num_groups, None, None, m.eps)
        w, b = self.v("weight"), self.v("bias")
        if w is None:
            return y
        yg = _per_group(y, self.ctx)
        S = yg.dim() - 3
        return (yg * _channel_view(w, G, S) + _channel_view(b, G, S)).reshape(x.shape)


class _Generic(_Leaf):
    path = "functional_call per group (no batched rule)"

    def __init__(self, name, module, ctx, params):
        super().__init__(name, module, ctx)
        self.params = params  # the module's own parameter names (``weight_orig`` under prune hooks)

    def forward(self, *args, **kwargs):
        G, rows = self.ctx.groups, self.ctx.rows
        if G > 1 and (not isinstance(args[0], torch.Tensor) or args[0].dim() == 0 or args[0].shape[0] != rows):
            # (a position embedding on arange(T), a sequence-first layer): its rows are not the
            # groups' samples, so they cannot be split by group
            got = tuple(args[0].shape) if isinstance(args[0], torch.Tensor) else type(args[0]).__name__
            raise NotGroupable(f"layer {self.name!r} ({type(self.module).__name__}) is called on {got}, whose first "
                               f"dimension is not the {rows} stacked samples")
        B = rows // G
        # every tensor argument with the samples as rows is split by group (attention's key, value)
        split = [a.split(B) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows and G > 1 else None
                 for a in args]
        xs = args[0].split(args[0].shape[0] // G)
        # passed under the parameters' own names, so that a hook recomputing ``weight`` from
        # ``weight_orig`` (torch.nn.utils.prune) sees the group's value
        per = {n: self.v(attribute_name(n)).unbind(0) for n in self.params}
        ctx, outer = self.ctx, self.ctx.group
        outs = []
        try:
            # the wrapped layers below this one (called, or read as MultiheadAttention reads its
            # out_proj) compute one network with this group's values
            ctx.groups, ctx.rows = 1, B
            for g in range(G):
                ctx.group = g if outer is None else outer
                call = (xs[g],) + tuple(a if p is None else p[g] for a, p in zip(args[1:], split[1:]))
                outs.append(torch.func.functional_call(self.module, {n: v[g] for n, v in per.items()}, call, kwargs))
        finally:
            ctx.groups, ctx.group, ctx.rows = G, outer, rows
        if G > 1 and not isinstance(outs[0], torch.Tensor):
            # a recurrent layer's (output, h_n): h_n holds the samples on its second dimension, so
            # no one rule stacks the groups' results
            raise NotGroupable(f"layer {self.name!r} ({type(self.module).__name__}) returns a "
                               f"{type(outs[0]).__name__}, whose groups cannot be stacked")
        return torch.cat(outs, 0) if G > 1 else outs[0]


def _base_forward(module: nn.Module, base) -> bool:
    """The module computes what ``base`` computes (its class does not override forward)."""
    return type(module).forward is base.forward


def _check_groupable(model: nn.Module) -> None:
    """NotGroupable, naming the layer, for an InstanceNorm keeping running statistics (its
    eval-mode output reads statistics the grouped copy neither sets nor shares between the two
    branches) and for an embedding with max_norm."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and mod.track_running_stats:
            raise NotGroupable(f"the {type(mod).__name__} {name!r} keeps running statistics")
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.max_norm is not None:
            # renormalising rows in place, inside the groups' batched values, is what autograd refuses
            raise NotGroupable(f"the {type(mod).__name__} {name!r} has max_norm (it rewrites its rows in place)")


def _user_hooks(mod: nn.Module) -> bool:
    """``mod`` has forward hooks of the user's (torch.nn.utils.prune's own, whose masks the caller
    applies, are not)."""
    from torch.nn.utils.prune import BasePruningMethod

    return bool(mod._forward_hooks) or any(not isinstance(h, BasePruningMethod)
                                           for h in mod._forward_pre_hooks.values())


class GroupedNetwork:
    """A private copy of ``model`` (cast to ``dtype``, moved to ``device``, eval mode, parameters
    frozen) whose parameterised leaves evaluate G weight sets at once.

    Call with the group-stacked input ``x`` ``[G*B, ...]`` and ``values``: for every parameter
    attribute of every leaf, keyed ``"<module>.<attr>"`` (``weight`` also for a parameter that
    torch.nn.utils.prune stores as ``weight_orig``), the effective value per group ``[G, *shape]``.
    ``ones_buffers``: names of ``<attr>_mask`` buffers set to ones in the copy (the caller's values
    already carry those masks).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, device, ones_buffers=()):
        _check_groupable(model)
        try:
            net = cast_copy(model, dtype, device=device, ones_buffers=ones_buffers)
        except Exception as exc:
            raise NotGroupable(f"model: {type(model).__name__} cannot be deep-copied ({exc})") from exc
        net.eval()
        self.net = net
        self.ctx = _Context()
        self.ctx.grouped_conv = torch.device(device).type == "cuda"
        self.leaves: "OrderedDict[str, _Leaf]" = OrderedDict()
        # parameters used outside a wrapped leaf: (name, module attr path) -> must agree across groups
        self.shared: List[str] = []
        self._wrap()

    # -- building -------------------------------------------------------------------------------
    def _wrap(self):
        ctx = self.ctx
        # the first name of every parameter (tied parameters share one value)
        first: Dict[int, str] = {}
        for n, p in self.net.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), n)
        wrappers: Dict[int, _Leaf] = {}
        places = []
        for name, mod in self.net.named_modules(remove_duplicate=False):
            own = list(mod.named_parameters(recurse=False))
            if id(mod) in wrappers:
                places.append((name, wrappers[id(mod)]))
                continue
            is_leaf = len(list(mod.children())) == 0
            if isinstance(mod, _BatchNorm):
                w = _BN(name, mod, ctx)
            elif not own:
                continue
            elif not is_leaf:
                self.shared += [first[id(p)] for _, p in own if first[id(p)] not in self.shared]
                continue
            elif not {attribute_name(n) for n, _ in own} <= {"weight", "bias"}:
                # extra parameters (e.g. hook-based weight_norm's weight_g / weight_v)
                w = _Generic(name, mod, ctx, [n for n, _ in own])
            elif isinstance(mod, nn.Linear) and _base_forward(mod, nn.Linear):
                w = _Linear(name, mod, ctx)
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and any(
                    _base_forward(mod, c) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                w = _Conv(name, mod, ctx)
            elif type(mod) is nn.LayerNorm:
                w = _LayerNorm(name, mod, ctx)
            elif type(mod) is nn.GroupNorm:
                w = _GroupNorm(name, mod, ctx)
            else:
                w = _Generic(name, mod, ctx, [n for n, _ in own])
            if not isinstance(w, _Generic) and _user_hooks(mod):
                # the wrapper computes the layer itself, so the hook would silently not run
                raise NotGroupable(f"the layer {name!r} has a forward hook, which the grouped copy would not run")
            w.keys = {attribute_name(n): attribute_name(first[id(p)]) for n, p in own}
            wrappers[id(mod)] = w
            places.append((name, w))
            self.leaves[name] = w
        for name, wrapper in places:
            if name == "":
                raise NotGroupable(f"model: {type(self.net).__name__} is itself a single layer; nothing to wrap")
            parent_name, _, child = name.rpartition(".")
            parent = self.net.get_submodule(parent_name) if parent_name else self.net
            setattr(parent, child, wrapper)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(w, _BN) for w in self.leaves.values())

    def explain(self) -> "OrderedDict[str, str]":
        """leaf name -> how it is evaluated (and parameters that must be shared across groups)."""
        out = OrderedDict((n, f"{type(w.module).__name__}: {w.path}") for n, w in self.leaves.items())
        for n in self.shared:
            out[n] = "parameter used outside a leaf module: must be equal in every group"
        return out

    def value_names(self) -> List[str]:
        """Every key the wrapped leaves read, plus the shared parameters' names."""
        names = []
        for w in self.leaves.values():
            names += [k for k in w.keys.values() if k not in names]
        return names + [n for n in self.shared if n not in names]

    def set_shared(self, values: Mapping[str, torch.Tensor]) -> None:
        """Put the (group-independent) value of every shared parameter into the copy; NotGroupable
        if ``values[name]`` (``[G, *shape]``) differs between groups."""
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for n in self.shared:
                v = values[n]
                if v.shape[0] > 1 and not bool((v == v[:1]).all()):
                    raise NotGroupable(f"parameter {n!r} is used outside a leaf module and differs between weight draws")
                params[n].copy_(v[0])

    # -- evaluation -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, values: Mapping[str, torch.Tensor], groups: int,
                 bn: Optional[BatchNormPlan] = None) -> torch.Tensor:
        if x.shape[0] % groups:
            raise ValueError(f"x: {x.shape[0]} rows is not a multiple of {groups} groups")
        ctx = self.ctx
        ctx.values, ctx.groups, ctx.bn = values, groups, bn if bn is not None else BatchNormPlan()
        ctx.rows = x.shape[0]
        try:
            out = self.net(x)
        finally:
            ctx.values = {}
        out = output_tensor(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected the forward to return a tensor, got {type(out).__name__}")
        return out
