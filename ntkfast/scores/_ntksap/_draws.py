"""The random draws of NTK-SAP, shared by every engine so that they score the same thing.

A scoring call is a sum over *pieces* (R repeats x batches per repeat); piece i has
- theta_i: a fresh draw of the model's initialisation (``model.reinitialize()`` or the user's
  ``init_fn``, run on a private copy), every parameter;
- Z_i: standard normal inputs with the shape of a data batch (token ids uniform over the table,
  for a model that looks its input up in an embedding);
- xi_i: one standard normal per prunable weight.
Each depends on (seed, i) only, never on which pass or process computes piece i: theta_i and Z_i
come from the torch generator seeded with mix(seed, i); xi_i of target t is the Philox stream
keyed by mix(seed, "xi", t) from offset i * numel(t), which the fused kernel regenerates instead
of storing it. Explicit ``inputs`` / ``weight_samples`` / ``perturbations`` replace the draws.
"""
from __future__ import annotations


from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ... import ops
from ...core.concurrency import seeded_global_rng
from ...core.state import cast_copy
from ...core.targets import Target

_MASK64 = (1 << 64) - 1


class InitFailed(Exception):
    """The re-initialisation (the user's ``init_fn`` or ``reinitialize()``) raised ``original``: not
    an engine's failure, so no other engine is tried."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def mix(seed: int, *parts) -> int:
    """A 64-bit hash of ``seed`` and ``parts`` (ints or strings), splitmix64 rounds."""
    h = int(seed) & _MASK64
    for p in parts:
        if isinstance(p, str):
            p = int.from_bytes(p.encode(), "little") & _MASK64
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


def _torch_seed(h: int) -> int:
    return h & ((1 << 63) - 1)


class Draws:
    """The pieces of one scoring call.

    ``theta(i)`` -> {parameter name: tensor} (every parameter of the model, names as in
    ``named_parameters()``); ``z(i)`` -> [B, *input_shape]; ``xi(name, i)`` -> the perturbation of
    target ``name``, materialised; ``philox(name, i)`` -> (seed, offset) of the fused kernel's
    stream for it, or None when the perturbations were given explicitly."""

    def __init__(self, model: nn.Module, targets: Mapping[str, Target], *, seed: int, pieces: int,
                 batch_shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 init_fn: Optional[Callable[[nn.Module], object]] = None,
                 inputs: Optional[Sequence[torch.Tensor]] = None,
                 weight_samples: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
                 perturbations: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
                 init_copy: Optional[nn.Module] = None, indices: Optional[range] = None,
                 vocab: Optional[int] = None):
        self.model = model
        self.targets = targets
        self.seed = int(seed)
        self.pieces = pieces
        # the pieces this process evaluates (a contiguous block when the work is split over ranks)
        self.indices = range(pieces) if indices is None else indices
        self.batch_shape = tuple(batch_shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.inputs, self.weight_samples, self.perturbations = inputs, weight_samples, perturbations
        self.init_fn = init_fn
        self.vocab = vocab  # Z: token ids uniform over a table of this size instead of N(0, I)
        self._init_copy = init_copy
        self._index = {n: k for k, n in enumerate(targets)}
        self._own_cache: Optional[Dict[str, torch.Tensor]] = None
        self._cached: Tuple[int, Optional[Dict[str, torch.Tensor]], Optional[torch.Tensor]] = (-1, None, None)

    # -- theta and Z ------------------------------------------------------------------------------
    def _own(self) -> Dict[str, torch.Tensor]:
        """The model's own parameters on the device and in the dtype (cast once per call)."""
        if self._own_cache is None:
            self._own_cache = {n: p.detach().to(self.device, self.dtype if p.is_floating_point() else p.dtype)
                               for n, p in self.model.named_parameters()}
        return self._own_cache

    def _drawn(self, i: int):
        if self._cached[0] == i:
            return self._cached[1], self._cached[2]
        theta = z = None
        need_theta = self.weight_samples is None
        need_z = self.inputs is None
        if need_theta or need_z:
            # the re-initialisation draws from the global RNG (reset_parameters takes no generator):
            # seeded, restored, and exclusive, so concurrent calls never share a stream
            with seeded_global_rng(_torch_seed(mix(self.seed, i)), [self.device]):
                if need_theta:
                    net = self.init_copy()
                    try:
                        self.init_fn(net) if self.init_fn is not None else net.reinitialize()
                    except Exception as exc:
                        raise InitFailed(exc) from exc
                    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
                if need_z:
                    z = (torch.randn(self.batch_shape, dtype=self.dtype, device=self.device) if self.vocab is None
                         else torch.randint(0, self.vocab, self.batch_shape, device=self.device))
        self._cached = (i, theta, z)
        return theta, z

    def init_copy(self) -> nn.Module:
        """The private copy that ``init_fn`` / ``reinitialize()`` re-draws (made once)."""
        if self._init_copy is None:
            self._init_copy = cast_copy(self.model, self.dtype, device=self.device, frozen=False)
        return self._init_copy

    def theta(self, i: int) -> Dict[str, torch.Tensor]:
        if self.weight_samples is not None:
            out = dict(self._own())
            out.update({n: v.detach().to(self.device, self.dtype) for n, v in self.weight_samples[i].items()})
            return out
        return self._drawn(i)[0]

    @property
    def z_dtype(self) -> torch.dtype:
        """What Z holds: token ids (int64), or real inputs in the scoring dtype."""
        if self.vocab is not None:
            return torch.long
        if self.inputs is not None and not self.inputs[0].is_floating_point():
            return torch.long
        return self.dtype

    def z(self, i: int) -> torch.Tensor:
        if self.inputs is not None:
            z = self.inputs[i].detach()
            # token ids stay integers (an Embedding takes them); real inputs take the scoring dtype
            return z.to(self.device, self.dtype) if z.is_floating_point() else z.to(self.device, torch.long)
        return self._drawn(i)[1]

    # -- xi ---------------------------------------------------------------------------------------
    def philox(self, name: str, i: int) -> Optional[Tuple[int, int]]:
        if self.perturbations is not None:
            return None
        return mix(self.seed, "xi", self._index[name]), i * self.targets[name].param.numel()

    def xi(self, name: str, i: int) -> torch.Tensor:
        if self.perturbations is not None:
            return self.perturbations[i][name].detach().to(self.device, self.dtype)
        seed, offset = self.philox(name, i)
        return ops.philox_normal(tuple(self.targets[name].param.shape), seed, offset,
                                 dtype=self.dtype, device=self.device)


def check_explicit(model: nn.Module, targets: Mapping[str, Target], inputs, weight_samples, perturbations,
                   input_shape: Optional[Tuple[int, ...]]) -> Optional[int]:
    """Validate the explicit draws; returns their common length (None when none is given)."""
    n = None
    for arg, val in (("inputs", inputs), ("weight_samples", weight_samples), ("perturbations", perturbations)):
        if val is None:
            continue
        if isinstance(val, (torch.Tensor, Mapping)) or not isinstance(val, Sequence):
            raise ValueError(f"{arg}: expected a list (one entry per repeat and batch), got {type(val).__name__}")
        if len(val) == 0:
            raise ValueError(f"{arg}: empty list")
        if n is not None and len(val) != n:
            raise ValueError(f"{arg}: {len(val)} entries, but another explicit draw list has {n}")
        n = len(val)
    if inputs is not None:
        first = None
        # token ids (integers) for a model that embeds them; real-valued inputs otherwise
        tokens = any(isinstance(m, nn.Embedding) for m in model.modules())
        for k, z in enumerate(inputs):
            real = isinstance(z, torch.Tensor) and (z.is_floating_point() or (tokens and z.dtype in (torch.int64,
                                                                                                       torch.int32)))
            if not real or z.dim() < 2:
                raise ValueError(f"inputs[{k}]: expected a floating tensor [B, ...]"
                                 f"{' or token ids' if tokens else ''}, got "
                                 f"{type(z).__name__ if not isinstance(z, torch.Tensor) else (tuple(z.shape), z.dtype)}")
            if first is None:
                first = tuple(z.shape)
            elif tuple(z.shape) != first:
                raise ValueError(f"inputs[{k}]: shape {tuple(z.shape)} differs from inputs[0]'s {first}")
            if input_shape is not None and tuple(z.shape[1:]) != tuple(input_shape):
                raise ValueError(f"inputs[{k}]: example shape {tuple(z.shape[1:])} but input_shape is {tuple(input_shape)}")
    if weight_samples is not None:
        params = dict(model.named_parameters())
        for k, d in enumerate(weight_samples):
            if not isinstance(d, Mapping):
                raise ValueError(f"weight_samples[{k}]: expected a dict parameter name -> tensor, got {type(d).__name__}")
            for name, v in d.items():
                if name not in params:
                    raise ValueError(f"weight_samples[{k}]: the model has no parameter {name!r}")
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(params[name].shape):
                    raise ValueError(f"weight_samples[{k}][{name!r}]: expected a tensor of shape {tuple(params[name].shape)}")
    if perturbations is not None:
        for k, d in enumerate(perturbations):
            if not isinstance(d, Mapping):
                raise ValueError(f"perturbations[{k}]: expected a dict mask name -> tensor, got {type(d).__name__}")
            for name, t in targets.items():
                v = d.get(name)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(t.param.shape):
                    raise ValueError(f"perturbations[{k}][{name!r}]: expected a tensor of shape {tuple(t.param.shape)}")
            extra = sorted(set(d) - set(targets))
            if extra:
                raise ValueError(f"perturbations[{k}]: names that are not scored weights: {extra}")
    return n


def piece_list(indices: range, per_pass: int) -> List[List[int]]:
    """``indices`` in consecutive chunks of ``per_pass`` (a chunk's Philox streams are contiguous)."""
    idx = list(indices)
    return [idx[s:s + per_pass] for s in range(0, len(idx), per_pass)]
