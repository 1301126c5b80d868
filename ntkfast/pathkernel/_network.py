"""The path network: the model with every prunable weight replaced by g(θ) ⊙ m (g = |·| for
power 1, (·)² for power 2), every other parameter and buffer passed through the same g (the
authors' SynFlow takes |·| of the whole state dict, BatchNorm statistics included; the public
SynFlow-L2 code squares it), run in eval mode. Its output summed over an all-ones input is the
path sum R_power = Σ_p |π_p|^power of a bias-free network."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from ..scores._common import (functional_forward, model_device, resolve_dtype, resolve_input_shape, resolve_targets,
                              state_copy, substitute)

POWERS = (1, 2)


def check_power(power) -> int:
    if isinstance(power, bool) or power not in POWERS:
        raise ValueError(f"power: expected 1 (|θ|, SynFlow's path sums) or 2 (θ², the path kernel), got {power!r}")
    return int(power)


class PathNetwork:
    """The transformed state of ``model`` (built once; iterative pruning reuses it across rounds)
    and the forward of the masked path network on a given input."""

    def __init__(self, model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]], power: int,
                 dtype: torch.dtype, *, input_shape=None, inputs: Optional[torch.Tensor] = None, data=None):
        self.model = model
        self.power = check_power(power)
        self.g = torch.abs if self.power == 1 else torch.square
        self.targets = resolve_targets(model, masks)
        self.dtype = resolve_dtype(self.targets, dtype)
        self.device = model_device(model)
        self.state = state_copy(model, self.dtype, transform=self.g,
                                skip={t.param_name for t in self.targets.values()})
        self.x = self._input(input_shape, inputs, data)

    def _input(self, input_shape, inputs, data) -> torch.Tensor:
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

    def weights(self, *, requires_grad: bool = True) -> "OrderedDict[str, torch.Tensor]":
        """g(θ) ⊙ m for every scored weight, as fresh leaves."""
        out = OrderedDict()
        for n, t in self.targets.items():
            w = self.g(t.param.detach().to(self.dtype)) * t.mask_as(self.dtype)
            out[n] = w.requires_grad_(requires_grad)
        return out

    def gradient(self) -> "OrderedDict[str, torch.Tensor]":
        """∂R/∂(g(θ) ⊙ m) ⊙ m per scored weight, R = Σ outputs: one forward and one backward."""
        w = self.weights()
        with torch.enable_grad():
            r = self.run(w).sum()
            grads = torch.autograd.grad(r, list(w.values()), allow_unused=True)
        out = OrderedDict()
        for (n, t), g in zip(self.targets.items(), grads):
            out[n] = torch.zeros_like(w[n]) if g is None else (g * t.mask_as(g.dtype)).detach()
        return out

    def run(self, weights: Mapping[str, torch.Tensor], x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The path network's output with ``weights`` in the scored slots (a finite tensor, or an
        OverflowError naming the first module whose output is not finite)."""
        x = self.x if x is None else x
        state = substitute(self.state, self.targets, weights)
        try:
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
            with torch.no_grad():
                functional_forward(self.model, state, x)
        finally:
            for h in handles:
                h.remove()
        where = f"layer {first[0]!r}" if first else "the output"
        return (f"path sums overflow {str(self.dtype).replace('torch.', '')} at {where} "
                f"(power {self.power}); use dtype=torch.float64, or smaller weights")


def prunable_module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""
