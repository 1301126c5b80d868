"""The registry of pruning methods, and the contract between a method and the pruning loop.

A method is a function ``fn(model, masks=None, *, data=None, seed=0, **options)``. It declares at
:func:`register` what it needs of the loop and what it gives back:

- ``takes``: which of the loop's own values it receives, by keyword: ``"scope"`` (global or
  layerwise), ``"target_density"`` (the round's density), ``"cache"`` (a dict kept across the
  rounds of one run, for work that does not change between rounds), ``"process_group"`` (the
  group its work is split over; a method that does not take it is run on every process and rank
  0's result is broadcast) and ``"exclude"`` (the names of the weights kept dense, see
  :mod:`ntkfast.core.exclude`; a method returning scores that does not take it is given it by
  :func:`register`, which drops those weights from its scores; a scorer that takes it returns
  no scores for them; one returning masks must take it to be run with ``exclude=``, and keep
  those weights as its start masks have them) and ``"include"`` (the names of the weights that
  ``include=`` made prunable; a scorer sees them among its start masks' names and needs nothing
  more, a method returning masks must take it to be run with ``include=``).
- ``returns``: ``"scores"`` (one score per prunable weight; the loop thresholds them at each
  round's density) or ``"masks"`` (a :class:`MethodResult`: the masks it chose and, for a method
  that also learns weights such as Neural Tangent Transfer, those weights).
- ``needs_data`` (a labelled batch), ``raw_data`` (the data as the user gave it, e.g. a whole
  dataset) and ``single_shot`` (it runs once, from the dense model: no rounds, no start masks).

The loop (:func:`ntkfast.prune`) reads these declarations; nothing probes a method's signature.

Every registered method may be called on a ``torch.compile``'d model: it runs on the original
module, and its scores or masks are keyed by the original names.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Mapping, Optional

import torch

from ._catalog import BUILTIN_METHODS
from .core.compiled import plain_name, unwrap
from .core.concurrency import holds_model
from .core.state import finite_weights

__all__ = ["MethodInfo", "MethodResult", "register", "get", "available", "LOOP_VALUES"]

#: what the loop can hand a method, by keyword
LOOP_VALUES = ("scope", "target_density", "cache", "process_group", "exclude", "include")
_RETURNS = ("scores", "masks")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable
    description: str
    needs_data: bool = False  # needs a labelled batch (inputs, targets)
    raw_data: bool = False  # takes data as the user gave it (a whole dataset), not as labelled batches
    single_shot: bool = False  # runs once from the dense model (no rounds, no start masks)
    takes: FrozenSet[str] = frozenset()  # of LOOP_VALUES
    returns: str = "scores"

    def check_options(self, options: Mapping) -> None:
        """ValueError naming the first of ``options`` that is not an option of this method (a
        ``cache`` is, for a method that takes one)."""
        known = self.options()
        if any(p.kind is p.VAR_KEYWORD for p in known.values()):
            return
        for key in options:
            if key not in known and not (key in ("cache", "process_group") and key in self.takes):
                raise ValueError(f"{key}: not an option of method {self.name!r} (its options: "
                                 f"{', '.join(known) or 'none'})")

    def options(self) -> Dict[str, inspect.Parameter]:
        """The method's own options (what a user may pass through prune), by name: its parameters
        after ``model`` and ``masks`` that the loop does not fill."""
        own = set(LOOP_VALUES) | {"data", "seed"}
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p for p in params
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_KEYWORD) and p.name not in own}


@dataclass
class MethodResult:
    """What a method declared with ``returns="masks"`` gives back: ``masks`` (name -> bool tensor,
    the model's prunable weights) and, where the method learned them, ``weights`` (a state dict of
    the whole model to load before training; None otherwise)."""

    masks: Mapping[str, torch.Tensor]
    weights: Optional[Dict[str, torch.Tensor]] = None
    info: dict = field(default_factory=dict)


_REGISTRY: Dict[str, MethodInfo] = {}
_BUILTINS_LOADED = False


def register(name: str, description: str, *, needs_data: bool = False, raw_data: bool = False,
             single_shot: bool = False, takes=None, returns: str = "scores", runs_network: bool = True):
    """Decorator registering a method under ``name`` for :func:`ntkfast.prune`, the study and the
    CLI (see the module's text for the contract). Refuses a declaration the function does not
    honour: a loop value in ``takes`` it has no parameter for, or a parameter named like a loop
    value it does not declare. A method returning masks must take ``process_group``: every process
    must end with the same masks, and only the method knows how to agree on them.

    ``takes`` left out (scorers written before the contract): read from the function's parameters,
    with a DeprecationWarning asking for the declaration.

    Every method computes on a model whose pruned NaN/inf entries read as 0, and a NaN/inf it
    would compute with is refused by name (:func:`ntkfast.core.state.finite_model`);
    ``runs_network=False`` (a method that reads the weights but never evaluates the network, such
    as random or magnitude pruning) limits that check to the scored weights."""

    declared = takes is not None
    takes = frozenset(takes or ())
    unknown = takes - set(LOOP_VALUES)
    if unknown:
        raise ValueError(f"takes: {sorted(unknown)} are not loop values (those are {', '.join(LOOP_VALUES)})")
    if returns not in _RETURNS:
        raise ValueError(f"returns: expected one of {_RETURNS}, got {returns!r}")

    def deco(fn):
        nonlocal takes
        # a built-in's name is taken even before the built-ins load (on the registry's first use)
        if name in _REGISTRY or (name in BUILTIN_METHODS and not fn.__module__.startswith("ntkfast.")):
            raise ValueError(f"a method named {name!r} is already registered")
        params = inspect.signature(fn).parameters
        if not declared:
            takes = frozenset(v for v in LOOP_VALUES if v in params)
            if takes:
                import warnings

                warnings.warn(f"register({name!r}): declare the loop values it takes, takes={tuple(sorted(takes))}; "
                              "reading them from the signature will go", DeprecationWarning, stacklevel=3)
        if returns == "masks" and "process_group" not in takes:
            raise ValueError(f"{name}: a method returning masks must take process_group (declare it in takes), so "
                             "that every process ends with the same masks")
        missing = sorted(v for v in takes if v not in params)
        if missing:
            raise ValueError(f"{name}: declares takes={sorted(takes)} but has no parameter {missing[0]!r}")
        undeclared = sorted(v for v in LOOP_VALUES if v in params and v not in takes)
        if undeclared:
            raise ValueError(f"{name}: has a parameter {undeclared[0]!r} the loop would fill; declare it in takes")
        run = fn
        if "process_group" not in takes:
            from .distributed import replicated

            run = replicated(fn)
        # a method swaps tensors into the model for its forward passes: one call per model at a time
        # and computes on a model whose pruned NaN/inf entries read as 0 (refused where kept)
        run = finite_weights(_checked_flags(run), weights_only=not runs_network)
        given = set()
        if returns == "scores" and "exclude" not in takes:
            run = _excluding(run)
            given.add("exclude")
        run = holds_model(_on_original_module(run))
        _REGISTRY[name] = MethodInfo(name, run, description, needs_data, raw_data, single_shot,
                                     takes | {"process_group"} | given, returns)
        return run

    return deco


def _on_original_module(fn: Callable) -> Callable:
    """``fn`` run on the original module of a ``torch.compile``'d model: scorers evaluate the
    network functionally, and the masks are keyed by the original names."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if args:
            args = (unwrap(args[0]),) + args[1:]
        elif "model" in kwargs:
            kwargs["model"] = unwrap(kwargs["model"])
        return fn(*args, **kwargs)

    return run


def _excluding(fn: Callable) -> Callable:
    """A scorer taking ``exclude=`` (see :mod:`ntkfast.core.exclude`): it scores the whole
    network as before, and the weights ``exclude`` picks are left out of the scores it returns,
    so that thresholding them leaves those weights as they were."""
    import functools
    from collections import OrderedDict

    from .core.exclude import resolve_exclude
    from .core.targets import prunable_parameters

    @functools.wraps(fn)
    def run(model, masks=None, *args, exclude=None, **kwargs):
        if exclude is None or not isinstance(model, torch.nn.Module) or not (masks is None or isinstance(masks, Mapping)):
            return fn(model, masks, *args, **kwargs)  # the scorer's own checks name a bad model or masks
        names = [plain_name(n) for n in masks] if masks is not None else list(prunable_parameters(model))
        dropped = set(resolve_exclude(model, exclude, names))
        if dropped and dropped.issuperset(names):
            raise ValueError(f"exclude: keeps every scored weight dense ({', '.join(sorted(dropped)[:6])}); "
                             "nothing is left to score")
        scores = fn(model, masks, *args, **kwargs)
        return OrderedDict((n, s) for n, s in scores.items() if n not in dropped)

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("exclude", inspect.Parameter.KEYWORD_ONLY, default=None))
    run.__signature__ = sig.replace(parameters=params)
    return run


def _checked_flags(fn: Callable) -> Callable:
    """``fn`` refusing, by name, a value other than True or False for an option annotated ``bool``:
    ``train_mode="no"`` would otherwise mean True."""
    import functools

    flags = {n for n, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    if not flags:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        for n in flags & kwargs.keys():
            v = kwargs[n]
            if not isinstance(v, bool) and type(v).__name__ != "bool_":  # numpy's bool passes
                raise ValueError(f"{n}: expected True or False, got {v!r}")
        return fn(*args, **kwargs)

    return run


def _load_builtins() -> None:
    """Register the built-in methods (the scorers and NTT) on the registry's first use, so that
    ``import ntkfast`` stays light."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True  # first: their modules register while they load
    import importlib

    for module in ("ntkfast.scores", "ntkfast.ntt"):
        importlib.import_module(module)


def get(name: str) -> MethodInfo:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def available() -> Dict[str, str]:
    """name -> one-line description of every registered method."""
    _load_builtins()
    return {n: i.description for n, i in sorted(_REGISTRY.items())}
