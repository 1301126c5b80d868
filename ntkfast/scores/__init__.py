"""Scorers: plain functions ``scorer(model, masks, **options) -> OrderedDict[name, Tensor]`` giving
one score per prunable weight (higher = more worth keeping). Each is registered by name for
:func:`ntkfast.prune` and the CLI. A scorer never leaves the model changed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict


@dataclass(frozen=True)
class ScorerInfo:
    name: str
    fn: Callable
    description: str
    needs_data: bool  # needs a labelled batch (inputs, targets)
    raw_data: bool = False  # takes data as the user gave it (a whole dataset), not as labelled batches
    single_shot: bool = False  # runs once from the dense model (no rounds, no start masks)


_REGISTRY: Dict[str, ScorerInfo] = {}


def register(name: str, description: str, *, needs_data: bool = False, raw_data: bool = False,
             single_shot: bool = False):
    """Decorator registering a scorer under ``name`` for prune() and the CLI. A scorer without a
    ``process_group`` argument gets one (:func:`ntkfast.distributed.replicated`: computed on every
    process, rank 0's scores broadcast)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"a scorer named {name!r} is already registered")
        if "process_group" not in inspect.signature(fn).parameters:
            from ..distributed import replicated

            fn = replicated(fn)
        _REGISTRY[name] = ScorerInfo(name, fn, description, needs_data, raw_data, single_shot)
        return fn

    return deco


def get(name: str) -> ScorerInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def available() -> Dict[str, str]:
    """name -> one-line description of every registered scorer."""
    return {n: i.description for n, i in sorted(_REGISTRY.items())}


# Built-in scorers: importing them registers them. Modules are underscore-prefixed so that the
# names below are the functions.
from ._random import random  # noqa: E402, F401
from ._magnitude import magnitude  # noqa: E402, F401
from ._snip import snip, iterative_snip  # noqa: E402, F401
from ._grasp import grasp  # noqa: E402, F401
from ._synflow import synflow  # noqa: E402, F401
from ._ntksap import ntksap, ntksap_trace_estimate  # noqa: E402, F401
from ._synflow_paths import synflow_l2, synflow_l2_squared, synflow_dist, synflow_l2_dist  # noqa: E402, F401
