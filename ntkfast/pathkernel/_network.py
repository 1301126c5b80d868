"""The path network: the model with every prunable weight replaced by g(θ) ⊙ m (g = |·| for
power 1, (·)² for power 2), every other parameter and buffer passed through the same g (the
authors' SynFlow takes |·| of the whole state dict, BatchNorm statistics included; the public
SynFlow-L2 code squares it), run in eval mode. Its output summed over an all-ones input is the
path sum R_power = Σ_p |π_p|^power of a bias-free network."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..ops import path_score
from ..core.batches import resolve_input_shape
from ..core.state import functional_forward, output_tensor, private_copy, state_copy, substitute
from ..core.targets import model_device, resolve_dtype, resolve_targets
from ..core.tokens import all_tokens_feed, embeds_tokens

POWERS = (1, 2)


def check_power(power) -> int:
    if isinstance(power, bool) or power not in POWERS:
        raise ValueError(f"power: expected 1 (|θ|, SynFlow's path sums) or 2 (θ², the path kernel), got {power!r}")
    return int(power)


class PathNetwork:
    """The transformed state of ``model`` (built once; iterative pruning reuses it across rounds)
    and the forward of the masked path network on a given input.

    ``reuse=True`` (iterative pruning, which scores the same network every round with new masks):
    :meth:`scores` runs a private transformed copy of the model whose scored weights are written
    in place each round (g(θ) ⊙ m into the copy's own tensors), instead of a functional call that
    swaps every parameter and buffer in and out and rebuilds the transformed weights per round.
    The arithmetic is the same; it costs a second copy of the model's state.

    ``feed`` (a model that embeds token ids): installs, on the network it is given, the forward
    hooks that make its embeddings output what the path network feeds them (see
    :mod:`ntkfast.core.tokens`), and returns their handles; the input is then token ids of
    ``input_shape`` (all 0, which those hooks replace)."""

    def __init__(self, model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]], power: int,
                 dtype: torch.dtype, *, input_shape=None, inputs: Optional[torch.Tensor] = None, data=None,
                 reuse: bool = False, feed: Optional[Callable[[nn.Module], list]] = None):
        self.model = model
        self.power = check_power(power)
        self.g = torch.abs if self.power == 1 else torch.square
        self.modules = dict(model.named_modules())
        self.targets = resolve_targets(model, masks)  # through the setter: which layers keep every weight
        self.dtype = resolve_dtype(self.targets, dtype)
        self.device = model_device(model)
        self.feed = feed
        self._state = None if reuse else self._state_copy()
        self.x = self._input(input_shape, inputs, data)
        self.total: Optional[float] = None
        self.reuse = reuse
        self._copy = None  # reuse: (module, its named modules, slots, g(θ), θ in dtype), built on first use

    def _state_copy(self):
        return state_copy(self.model, self.dtype, transform=self.g, skip={t.param_name for t in self.targets.values()})

    @property
    def state(self):
        if self._state is None:
            self._state = self._state_copy()
        return self._state

    def _private(self):
        """The reused copy (see the class), or None without ``reuse`` or when the model cannot be
        deep-copied (then the functional route serves)."""
        if not self.reuse:
            return None
        if self._copy is None:
            made = private_copy(self.model, self.targets, self.dtype, transform=self.g)
            if made is None:
                self.reuse = False
                return None
            dup, slots = made
            self._copy = (dup, dict(dup.named_modules()), slots,
                          {n: p.detach().clone() for n, p in slots.items()},
                          {n: t.param.detach().to(self.dtype) for n, t in self.targets.items()})
        return self._copy

    def _private_run(self, x: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        """The reused copy's output on ``x`` with this round's g(θ) ⊙ m in its scored slots (leaves
        requiring grad with ``requires_grad``)."""
        dup, _, slots, gw, _ = self._copy
        with torch.no_grad():
            for n, t in self.targets.items():
                # the bool mask multiplied in, as weights() does: the same values, into the same buffer
                torch.mul(gw[n], t.mask, out=slots[n].data)
        for p in slots.values():
            p.requires_grad_(requires_grad)
        try:
            with self._fed(dup):
                out = output_tensor(dup(x))
        except RuntimeError as exc:
            raise ValueError(f"input_shape: the forward failed for an input of shape {tuple(x.shape[1:])}: {exc}") \
                from exc
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected the forward to return a tensor, got {type(out).__name__}")
        if not bool(torch.isfinite(out).all()):
            raise OverflowError(self._overflow_message(self.state, x))
        return out

    @contextmanager
    def _fed(self, net: nn.Module):
        handles = self.feed(net) if self.feed is not None else []
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _input(self, input_shape, inputs, data) -> torch.Tensor:
        if self.feed is not None:  # token ids; the feed's hooks replace what the embeddings look up
            shape = resolve_input_shape(self.model, input_shape, data)
            return torch.zeros((1,) + tuple(shape), dtype=torch.long, device=self.device)
        if inputs is None:
            shape = resolve_input_shape(self.model, input_shape, data)
            return torch.ones((1,) + tuple(shape), dtype=self.dtype, device=self.device)
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise ValueError(f"inputs: expected a floating-point tensor (one input, no batch dimension), "
                             f"got {type(inputs).__name__ if not isinstance(inputs, torch.Tensor) else inputs.dtype}")
        x = inputs.detach().to(self.device, self.dtype)
        if bool((x < 0).any()) or not bool(torch.isfinite(x).all()):
            raise ValueError("inputs: path sums need a finite, non-negative input (an un-normalised mean input, "
                             "or ones)")
        return x.unsqueeze(0)

    @property
    def targets(self) -> "OrderedDict":
        return self._targets

    @targets.setter
    def targets(self, targets) -> None:
        # iterative pruning sets new masks each round; whether a layer is dense is read once per set
        self._targets = targets
        self.dense = {n: bool(t.mask.all()) for n, t in targets.items()}
        # path_score's arguments per layer; None for a layer scored through autograd
        self.geometry = {n: score_geometry(self.modules.get(prunable_module_of(n)), t) for n, t in targets.items()}
        self.op_route = all(g is not None for g in self.geometry.values())

    def weights(self, *, requires_grad: bool = True) -> "OrderedDict[str, torch.Tensor]":
        """g(θ) ⊙ m for every scored weight, as fresh leaves (the bool mask applied in place: no
        float copy of it, and none at all where every entry is kept)."""
        out = OrderedDict()
        for n, t in self.targets.items():
            w = self.g(t.param.detach().to(self.dtype))
            if not self.dense[n]:
                w = w.mul_(t.mask)
            out[n] = w.requires_grad_(requires_grad)
        return out

    def gradient(self) -> "OrderedDict[str, torch.Tensor]":
        """∂R/∂(g(θ) ⊙ m) ⊙ m per scored weight, R = Σ outputs: one forward and one backward."""
        return self.scores(0)

    def scores(self, weight_power: int) -> "OrderedDict[str, torch.Tensor]":
        """|θ|^weight_power ⊙ m ⊙ ∂R/∂(g(θ) ⊙ m) per scored weight, in one forward and one backward
        pass. Dense and convolution layers get it from the path sums at their input and output
        (ntkfast.ops path_score: the backward pass computes no weight gradient); other layers from
        autograd."""
        if not self.op_route:
            return self._autograd_scores(weight_power)
        out = OrderedDict()
        for n, calls in self.layer_sums().items():
            score = None
            for a, b in calls:
                s = self.layer_score(n, a, b, weight_power)
                score = s if score is None else score + s
            out[n] = torch.zeros_like(self.targets[n].param, dtype=self.dtype) if score is None else score
        return out

    def layer_score(self, name: str, a: torch.Tensor, b: torch.Tensor, weight_power: int) -> torch.Tensor:
        """path_score of one call of layer ``name`` from its path sums (a, b) of :meth:`layer_sums`."""
        t, geometry = self.targets[name], self.geometry[name]
        if not geometry:  # dense: every leading dimension is a sample
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        mask = None if self.dense[name] else t.mask_as(self.dtype)
        weight = self._copy[4][name] if self._copy is not None else t.param.detach().to(self.dtype)
        return path_score(weight, a, b, mask=mask, weight_power=weight_power, **geometry)

    def _autograd_scores(self, weight_power: int) -> "OrderedDict[str, torch.Tensor]":
        private = self._private()
        with torch.enable_grad():
            if private is not None:
                w = private[2]
                r = self._private_run(self.x, True).sum()
            else:
                w = self.weights()
                r = self.run(w).sum()
            grads = torch.autograd.grad(r, list(w.values()), allow_unused=True)
        out = OrderedDict()
        for (n, t), g in zip(self.targets.items(), grads):
            if g is None:
                out[n] = torch.zeros_like(w[n].detach())
                continue
            g = g * t.mask_as(g.dtype)
            if weight_power:
                g = g * t.param.detach().to(g.dtype).abs() ** weight_power
            out[n] = g.detach()
        return out

    def layer_sums(self) -> "dict[str, list]":
        """For every scored layer, one (a, b) per call of its module in the forward: a its input in
        the path network (the forward path sums, batch dimension kept), b = ∂R/∂(its output) (the
        backward path sums; zeros if the output does not reach R). One forward pass and one
        backward pass through the activations only."""
        by_module: dict = {}
        for n in self.targets:
            by_module.setdefault(prunable_module_of(n), []).append(n)
        taps: "dict[str, list]" = {n: [] for n in self.targets}

        def tap(names):
            def hook(module, args, output):
                # a call on constants (an RNN's zero initial state, a buffer) gives an output outside
                # the graph: as a leaf of its own it still gets its path sum dR/d(output)
                fresh = not output.requires_grad
                if fresh:
                    output = output.detach().requires_grad_(True)
                for n in names:
                    taps[n].append((args[0], output))
                return output.clone() if fresh else None
            return hook

        handles = []
        private = self._private()
        modules = private[1] if private is not None else self.modules
        try:
            for mname, names in by_module.items():
                handles.append(modules[mname].register_forward_hook(tap(names)))
            with torch.enable_grad():
                # so that every layer's output is in the graph (token ids cannot be: see tap)
                x = self.x.clone().requires_grad_(True) if self.x.is_floating_point() else self.x
                out = self._private_run(x, False) if private is not None else self.run(self.weights(requires_grad=False), x)
                outputs = [y for n in self.targets for _, y in taps[n]]
                live = [y for y in outputs if y.requires_grad]  # all of them (see tap)
                found = iter(torch.autograd.grad(out.sum(), live, allow_unused=True) if live else [])
                grads = [next(found) if y.requires_grad else None for y in outputs]
        finally:
            for h in handles:
                h.remove()
        self.total = float(out.detach().sum())
        it = iter(grads)
        return {n: [(a.detach(), torch.zeros_like(y).detach() if (g := next(it)) is None else g.detach())
                    for a, y in taps[n]] for n in self.targets}

    def run(self, weights: Mapping[str, torch.Tensor], x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The path network's output with ``weights`` in the scored slots (a finite tensor, or an
        OverflowError naming the first module whose output is not finite)."""
        x = self.x if x is None else x
        state = substitute(self.state, self.targets, weights)
        try:
            with self._fed(self.model):
                out = functional_forward(self.model, state, x)
        except RuntimeError as exc:
            raise ValueError(f"input_shape: the forward failed for an input of shape {tuple(x.shape[1:])}: {exc}") \
                from exc
        if not bool(torch.isfinite(out).all()):
            raise OverflowError(self._overflow_message(state, x))
        return out

    def _overflow_message(self, state, x) -> str:
        first = []

        def hook(name):
            def fn(module, args, output):
                if not first and isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
                    first.append(name)
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n]
        try:
            with torch.no_grad(), self._fed(self.model):
                functional_forward(self.model, state, x)
        finally:
            for h in handles:
                h.remove()
        where = f"layer {first[0]!r}" if first else "the output"
        return (f"path sums overflow {str(self.dtype).replace('torch.', '')} at {where} "
                f"(power {self.power}); use dtype=torch.float64, or smaller weights")


def token_feed(model: nn.Module, input_shape, caller: str):
    """``feed`` for a model whose input is token ids: every embedding fed all its tokens at once
    (see :mod:`ntkfast.core.tokens`); None for a real-valued input."""
    if not embeds_tokens(model):
        return None
    return all_tokens_feed(model, caller, resolve_input_shape(model, input_shape, None))


def prunable_module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def score_geometry(module, target) -> Optional[dict]:
    """path_score's layer arguments for a plain dense or 1-d/2-d convolution weight; None for
    anything else (scored through autograd instead)."""
    if module is None or target.param_name.rsplit(".", 1)[-1] != "weight" or target.mask_buffer is not None:
        return None
    if type(module) is nn.Linear:
        return {}
    if type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        return dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    return None
