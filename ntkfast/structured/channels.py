"""Channel (filter) masks from per-weight scores: each output channel of a Conv/Linear layer kept
or pruned whole, tied channels (:mod:`ntkfast.structured.trace`) together.

A channel's score aggregates the scores of its filter, the slice ``[c, :, ...]`` of its layer's
weight; a unit of tied channels (a convolution's channel and the channel of every layer summed
with it) aggregates the filters of all its members at once. Pruning a unit removes its filters
and, with them, the input slices of every layer that reads those channels: those weights would
only ever multiply a dead channel, and a physical removal (:func:`ntkfast.structured.export`)
drops them too, so the masks mark them pruned and the density counts them.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Dict, List, Literal, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..core.checks import check_choice, check_density, check_mask
from ..core.compiled import plain_name, unwrap
from ..core.options import Scope, choices
from ..core.targets import module_param, prunable_parameters
from ..masks import Masks, n_keep
from .trace import ChannelGraph, trace_channels

__all__ = ["Aggregate", "ChannelGroup", "ChannelPlan", "channel_masks", "channel_groups", "example_inputs_for"]

#: how a channel's per-weight scores become one score (see :func:`channel_masks`)
Aggregate = Literal["sum", "mean", "l2", "max"]
_AGGREGATES = choices(Aggregate)


class ChannelGroup(NamedTuple):
    """Layers whose output channels are tied: channel c of each is kept or pruned with channel c
    of the others. ``channels``: how many tied channels they share (the prunable ones; pinned
    channels, such as those that reach the model's output, are not counted); ``norms``: the
    BatchNorm/InstanceNorm modules that normalise those channels."""

    layers: Tuple[str, ...]
    channels: int
    norms: Tuple[str, ...]


def example_inputs_for(model: nn.Module, example_inputs=None):
    """``example_inputs`` as given, or two random examples of ``model.input_shape`` (the zoo's
    models carry it; two, so that BatchNorm-free layers after a batch-dependent squeeze keep
    their shape); ValueError naming ``example_inputs`` when neither is there."""
    if example_inputs is not None:
        if not isinstance(example_inputs, (torch.Tensor, tuple)):
            raise TypeError(f"example_inputs: expected a tensor or a tuple of the model's positional inputs, "
                            f"got {type(example_inputs).__name__}")
        return example_inputs
    shape = getattr(unwrap(model), "input_shape", None)
    if shape is None:
        raise ValueError(f"example_inputs: {type(unwrap(model)).__name__} has no input_shape; pass example inputs "
                         "(a batch the model accepts), from which its channel ties are traced")
    p = next(iter(unwrap(model).parameters()), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *tuple(shape)), generator=g)
    return x.to(device=p.device, dtype=p.dtype if p is not None and p.is_floating_point() else x.dtype) if p is not None else x


def channel_groups(model: nn.Module, example_inputs=None) -> List[ChannelGroup]:
    """The tied channel groups of ``model``, in layer order, as one forward on ``example_inputs``
    (default: random inputs of ``model.input_shape``) finds them. Layers absent from every group
    have no prunable channel (the classifier, whose outputs are the logits)."""
    graph = trace_channels(unwrap(model), example_inputs_for(model, example_inputs))
    return _groups(graph)


def _groups(graph: ChannelGraph) -> List[ChannelGroup]:
    out = []
    for layers, units in graph.families.items():
        unit_set = set(units)
        norms = tuple(n for n, u in graph.norm_units.items() if any(int(x) in unit_set for x in u))
        out.append(ChannelGroup(layers, len(units), norms))
    return out


class _Layer(NamedTuple):
    name: str            # the weight's mask name, <layer>.weight
    out_units: np.ndarray
    in_units: np.ndarray  # -1: not a prunable channel (and every input of a depthwise filter)
    counts: np.ndarray    # kept weights per (output, input) pair, from the start masks (float32)


class ChannelPlan:
    """The channel ties of one model, traced once, to turn scores into channel masks as often as
    needed (:func:`ntkfast.prune` calls :meth:`select` every round)."""

    def __init__(self, model: nn.Module, example_inputs=None, *, aggregate: Aggregate = "sum"):
        check_choice(aggregate, "aggregate", _AGGREGATES)
        self.aggregate = aggregate
        model = unwrap(model)
        self.model_name = type(model).__name__
        self.graph = trace_channels(model, example_inputs_for(model, example_inputs))
        if not self.graph.units:  # said before any scoring, which can be the whole cost of a call
            raise ValueError(f"structure: 'channel' finds no output channel of {self.model_name} that can be removed: "
                             "every prunable layer's outputs are pinned (the logits, or a LayerNorm, GroupNorm or "
                             "other operation over the channel dimension); use the unstructured default or an 'N:M' "
                             "structure")
        self.params = prunable_parameters(model, include_bias=True, include_norm=True)
        self.layer_of_weight = OrderedDict((f"{n}.weight", n) for n in self.graph.layers)
        self.last_metadata: dict = {}
        if self.graph.unreached:
            warnings.warn(f"channel masks: the forward of {self.model_name} never called "
                          f"{', '.join(self.graph.unreached[:6])}{' ...' if len(self.graph.unreached) > 6 else ''}; "
                          "their channels are kept", RuntimeWarning, stacklevel=3)

    @property
    def groups(self) -> List[ChannelGroup]:
        return _groups(self.graph)

    # -- checks ------------------------------------------------------------------------------------
    def _check_scores(self, scores) -> "OrderedDict[str, torch.Tensor]":
        if not isinstance(scores, Mapping):
            raise TypeError(f"scores: expected a mapping name -> tensor of per-weight scores, got {type(scores).__name__}")
        ranked: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for given, s in scores.items():
            name = plain_name(given) if isinstance(given, str) else given
            if name not in self.params:
                raise ValueError(f"scores: {given!r} is not a prunable weight of {self.model_name}")
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(self.params[name].shape):
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"scores[{given!r}]: expected a tensor of shape {tuple(self.params[name].shape)}, got {got}")
            if name not in self.layer_of_weight:
                if self.params[name].dim() > 1:
                    raise ValueError(f"scores: {given!r} is not the weight of a Conv or Linear layer; it has no "
                                     "output channels to prune whole")
                continue  # a bias or a norm's weight: it follows its channel, it does not vote
            s = s.detach()
            if s.is_floating_point() and not bool(torch.isfinite(s).all()):
                raise ValueError(f"scores[{given!r}]: holds NaN or infinite values")
            ranked[name] = s
        if not ranked:
            raise ValueError("scores: none is the weight of a Conv or Linear layer; channel masks rank the output "
                             "channels of those")
        return ranked

    def _check_keep(self, keep, scored) -> "OrderedDict[str, torch.Tensor]":
        if keep is None:
            names = set(self.layer_of_weight) | set(scored)
            return OrderedDict((n, torch.ones(self.params[n].shape, dtype=torch.bool)) for n in self.params if n in names)
        if not isinstance(keep, Mapping):
            raise TypeError(f"keep: expected a mapping name -> bool tensor (e.g. ntkfast.Masks), got {type(keep).__name__}")
        given_masks: Dict[str, torch.Tensor] = {}
        for given, m in keep.items():
            name = plain_name(given) if isinstance(given, str) else given
            if name not in self.params:
                raise ValueError(f"keep: {given!r} is not a prunable weight of {self.model_name}")
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(self.params[name].shape):
                raise ValueError(f"keep[{given!r}]: expected a mask of shape {tuple(self.params[name].shape)}")
            given_masks[name] = check_mask(m, f"keep[{given!r}]").cpu()
        # every layer's weight is in the result, so that the readers of a pruned channel lose
        # their slices even where keep did not name them
        names = set(given_masks) | set(self.layer_of_weight) | set(scored)
        return OrderedDict((n, given_masks[n] if n in given_masks else torch.ones(self.params[n].shape, dtype=torch.bool))
                           for n in self.params if n in names)

    # -- selection ---------------------------------------------------------------------------------
    def select(self, scores: Mapping[str, torch.Tensor], density: float, *, keep=None,
               aggregate: Optional[Aggregate] = None, scope: Scope = "global", invert: bool = False) -> Masks:
        """Channel masks keeping the highest-scoring channels at ``density`` (see :func:`channel_masks`);
        ``aggregate`` None: the plan's own."""
        density = check_density(density)
        aggregate = self.aggregate if aggregate is None else aggregate
        check_choice(aggregate, "aggregate", _AGGREGATES)
        check_choice(scope, "scope", choices(Scope))
        if not isinstance(invert, bool):
            raise TypeError(f"invert: expected True or False, got {type(invert).__name__}")
        ranked = self._check_scores(scores)
        keep = self._check_keep(keep, [plain_name(n) for n in scores])
        g = self.graph
        n_units = len(g.units)
        layers = [self._layer(w, keep) for w in ranked]
        total = sum(int(np.prod(self.params[lay.name].shape)) for lay in layers)

        # a unit votes only when every one of its layers was scored: an unscored layer (exclude=)
        # keeps its channels, and tied channels share its fate
        scored_layers = {self.layer_of_weight[w] for w in ranked}
        fixed = np.zeros(n_units, dtype=bool)
        alive = np.zeros(n_units, dtype=bool)
        for u, members in enumerate(g.units):
            fixed[u] = any(n not in scored_layers for n, _ in members)
        for w, layer in self.layer_of_weight.items():
            m = keep.get(w)
            units = g.out_units[layer]
            rows = m.reshape(m.shape[0], -1).any(1).numpy() if m is not None else np.ones(len(units), dtype=bool)
            hit = units >= 0
            np.logical_or.at(alive, units[hit], rows[hit])  # dead only once every member's filter is
        value = self._aggregate(ranked, keep, aggregate, n_units)
        if invert:
            value = -value

        candidates = np.flatnonzero(alive & ~fixed)
        layer_alive = {n: int(((u < 0) | alive[np.maximum(u, 0)]).sum()) for n, u in g.out_units.items()}

        def kept_fraction(dead: np.ndarray) -> float:
            on = alive & ~dead
            kept = 0
            for lay in layers:
                ao = (lay.out_units < 0) | on[np.maximum(lay.out_units, 0)]
                ai = (lay.in_units < 0) | on[np.maximum(lay.in_units, 0)]
                # float32 row sums are exact (a row holds far fewer than 2**24 weights); the
                # total is summed in float64, exact too
                rows = lay.counts @ ai.astype(np.float32)
                kept += int(round(float(ao.astype(np.float64) @ rows.astype(np.float64))))
            return kept / total if total else 1.0

        if scope == "global":
            order = candidates[np.lexsort((candidates, value[candidates]))]
            sequence = self._walk(order, layer_alive)
            fractions = _nearest_prefix(len(sequence), density,
                                        lambda k: kept_fraction(_dead(n_units, sequence[:k])))
            k, achieved, least = fractions
            dead = _dead(n_units, sequence[:k])
        else:
            k, achieved, least, dead = self._layerwise(candidates, value, layer_alive, density, kept_fraction, n_units)
        if density < least * (1 - 1e-12):
            raise ValueError(f"density: {density:.6g} is below {least:.6g}, the least fraction of the weights that "
                             f"pruning whole channels of {self.model_name} can keep (every layer keeps at least one "
                             "channel, and pinned channels such as the logits stay); ask for a higher density")
        masks = self._masks(keep, alive & ~dead)
        self.last_metadata = {"structure": "channel", "channel_aggregate": aggregate, "channel_scope": scope,
                              "target_density": density, "achieved_density": achieved,
                              "channels": int(n_units), "channels_kept": int((alive & ~dead).sum())}
        masks.metadata = dict(self.last_metadata)
        return masks

    def _layer(self, weight: str, keep) -> _Layer:
        layer = self.layer_of_weight[weight]
        m = keep.get(weight)
        shape = self.params[weight].shape
        if m is None:
            m = torch.ones(shape, dtype=torch.bool)
        if layer in self.graph.depthwise:  # its one input per filter is tied to the filter itself
            counts = m.reshape(shape[0], 1, -1).sum(-1)
            in_units = np.full(1, -1, dtype=np.int64)
        else:
            counts = m if m.dim() == 2 else m.reshape(shape[0], shape[1], -1).sum(-1)
            in_units = self.graph.in_units[layer]
        counts = counts.to(torch.float32).numpy()
        return _Layer(weight, self.graph.out_units[layer], in_units, counts)

    def _aggregate(self, ranked, keep, aggregate: str, n_units: int) -> np.ndarray:
        """Each unit's aggregate over the kept entries of its members' filters."""
        total = np.zeros(n_units)
        count = np.zeros(n_units)
        top = np.full(n_units, -np.inf)
        for w, s in ranked.items():
            units = self.graph.out_units[self.layer_of_weight[w]]
            m = keep.get(w)
            s = s.double().cpu().reshape(s.shape[0], -1)
            m = torch.ones_like(s, dtype=torch.bool) if m is None else m.reshape(s.shape[0], -1)
            hit = units >= 0
            if aggregate == "max":
                rows = s.masked_fill(~m, -math.inf).amax(1).numpy()
                np.maximum.at(top, units[hit], rows[hit])
                continue
            rows = (s.square() if aggregate == "l2" else s).masked_fill(~m, 0).sum(1).numpy()
            np.add.at(total, units[hit], rows[hit])
            np.add.at(count, units[hit], m.sum(1).numpy()[hit])
        if aggregate == "max":
            return top
        if aggregate == "l2":
            return np.sqrt(total)
        if aggregate == "mean":
            return np.divide(total, count, out=np.zeros(n_units), where=count > 0)
        return total

    def _walk(self, order: np.ndarray, layer_alive: Dict[str, int]) -> np.ndarray:
        """``order`` less the units whose pruning would leave a layer without any channel: those
        stay, so that no layer is cut out of the network."""
        left = dict(layer_alive)
        out = []
        for u in order.tolist():
            per_layer: Dict[str, int] = {}
            for n, _ in self.graph.units[u]:
                per_layer[n] = per_layer.get(n, 0) + 1
            if all(left[n] > c for n, c in per_layer.items()):
                for n, c in per_layer.items():
                    left[n] -= c
                out.append(u)
        return np.asarray(out, dtype=np.int64)

    def _layerwise(self, candidates, value, layer_alive, density, kept_fraction, n_units):
        """The same fraction of every tied group's channels pruned (its lowest-scoring ones), the
        fraction chosen so that the weights kept come nearest ``density``."""
        families: Dict[Tuple[str, ...], List[int]] = OrderedDict()
        cand = set(candidates.tolist())
        for key, units in self.graph.families.items():
            units = [u for u in units if u in cand]
            if units:
                families[key] = sorted(units, key=lambda u: (value[u], u))
        ratios = sorted({k / len(us) for us in families.values() for k in range(len(us) + 1)})

        def dead_at(r: float) -> np.ndarray:
            order = []
            for us in families.values():
                order.extend(us[:len(us) - n_keep(r, len(us))])
            return _dead(n_units, self._walk(np.asarray(order, dtype=np.int64), layer_alive))

        # ratios ascend, so the kept fraction does: index i = len - 1 - k maps the prefix search on it
        k, achieved, least = _nearest_prefix(len(ratios) - 1, density,
                                             lambda k: kept_fraction(dead_at(ratios[len(ratios) - 1 - k])))
        return k, achieved, least, dead_at(ratios[len(ratios) - 1 - k])

    # -- masks -------------------------------------------------------------------------------------
    def _masks(self, keep, on: np.ndarray) -> Masks:
        g = self.graph

        def alive_of(units: np.ndarray) -> torch.Tensor:
            return torch.from_numpy((units < 0) | on[np.maximum(units, 0)])

        out = OrderedDict()
        for name, m in keep.items():
            owner, _, attr = name.rpartition(".")
            if owner in g.layers:
                rows = alive_of(g.out_units[owner])
                if attr == "weight":
                    m = m & rows.reshape(-1, *([1] * (m.dim() - 1)))
                    if owner not in g.depthwise:
                        m = m & alive_of(g.in_units[owner]).reshape(1, -1, *([1] * (m.dim() - 2)))
                else:  # the bias: one entry per output channel
                    m = m & rows
            elif owner in g.norm_units and m.dim() == 1:
                m = m & alive_of(g.norm_units[owner])
            out[name] = m.to(self.params[name].device)
        return Masks(out)


def _dead(n: int, units: np.ndarray) -> np.ndarray:
    d = np.zeros(n, dtype=bool)
    d[units] = True
    return d


def _nearest_prefix(n: int, density: float, fraction) -> Tuple[int, float, float]:
    """The k in [0, n] whose ``fraction(k)`` (non-increasing in k) is nearest ``density``, the
    denser one on a tie; with that fraction and the least one, ``fraction(n)``."""
    cache: Dict[int, float] = {}

    def f(k: int) -> float:
        if k not in cache:
            cache[k] = fraction(k)
        return cache[k]

    lo, hi = 0, n  # the first k with f(k) <= density, by bisection
    if f(n) > density:
        return n, f(n), f(n)
    while lo < hi:
        mid = (lo + hi) // 2
        if f(mid) <= density:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    if k > 0 and f(k - 1) - density <= density - f(k):
        k -= 1
    return k, f(k), f(n)


def channel_masks(model: nn.Module, scores: Mapping[str, torch.Tensor], density: float, *,
                  aggregate: Aggregate = "sum", scope: Scope = "global", keep: Optional[Mapping[str, torch.Tensor]] = None,
                  example_inputs=None, invert: bool = False) -> Masks:
    """Channel (filter) masks of ``model`` from per-weight ``scores`` (any scorer's, e.g.
    ``ntkfast.scores.compute``, or your own): whole output channels of its Conv/Linear layers
    kept or pruned, tied channels together, keeping about ``density`` of the scored weights.

    ``aggregate``: how a channel's scores become one, over its filter (the weight slice
    ``[c, ...]``) and the filters of the channels tied to it: ``"sum"`` (default), ``"mean"``,
    ``"l2"`` (root of the sum of squares: by magnitude, a score's sign is lost) or ``"max"``.
    ``"sum"`` is the default because the scorers' per-weight scores are first-order estimates of
    what removing a weight costs (SNIP's |g w|, SynFlow's and NTK-SAP's saliencies), and the
    estimate for removing a set of weights is the sum of theirs: the sum is the scorer's own
    verdict on the whole channel. It favours keeping large filters; ``"mean"`` ranks by score per
    weight instead.

    ``scope="global"``: all channels ranked together, lowest pruned first; a channel whose
    pruning would leave its layer without any channel is passed over, so no layer is ever emptied.
    ``"layerwise"``: the same fraction of every group of tied layers' channels pruned (each
    group's lowest), that fraction chosen to bring the kept weights nearest ``density``.

    ``density`` is the fraction kept of the scored Conv/Linear weights, counting as pruned both
    the filters of pruned channels and the input slices of the layers that read them. Whole
    channels move it in steps (one channel of a tied group weighs all its filters and readers),
    so the result is the reachable density nearest the target, in ``masks.metadata
    ["achieved_density"]`` (``"target_density"`` beside it). A target below what is reachable
    with one channel left in every layer raises ValueError naming ``density``.

    Never pruned: the output channels of layers that reach the model's output (the classifier's
    logits), and channels pinned by the trace (:mod:`ntkfast.structured.trace`). Layers left out
    of ``scores`` keep their channels, and so do the channels tied to them; they still lose the
    input slices that read pruned channels.

    ``keep``: start masks (pruned entries stay pruned; a channel all of whose filters are
    pruned there counts as pruned). The result holds every Conv/Linear weight of the model and
    the other names of ``keep`` and ``scores``: biases and the
    weights of BatchNorm/InstanceNorm modules, where present, are pruned with their channel.

    ``example_inputs``: a batch the model accepts, for the one forward that finds the ties
    (default: random inputs of ``model.input_shape``). ``invert=True`` keeps the lowest
    aggregates (the inverted-scores sanity check). The model is never changed.
    """
    check_choice(aggregate, "aggregate", _AGGREGATES)  # before the trace's work
    plan = ChannelPlan(model, example_inputs)
    return plan.select(scores, density, keep=keep, aggregate=aggregate, scope=scope, invert=invert)
