"""What makes ntkfast's public calls safe to make from several threads.

Two things in a scorer are shared with other threads whatever the code does:

- **the model**: :func:`torch.func.functional_call` evaluates a model on other tensors by swapping
  them into the module's attributes for the call and swapping the originals back afterwards, and
  :func:`~ntkfast.core.state.scoring_mode` sets and restores the train/eval flags. Two calls on one
  model interleaving their swaps leave one call's tensors behind in the model. Every public
  function taking a model therefore holds that model's lock (:func:`model_lock`, re-entrant, so
  ``prune`` may call a scorer that takes it again): calls on one model run one after the other,
  calls on different models run side by side.
- **torch's global RNG**: a model's own ``reset_parameters`` / ``reinitialize()`` draws from it and
  takes no generator, so NTK-SAP's fresh initialisations (the authors' semantics) seed it, draw,
  and restore it. :func:`seeded_global_rng` does this under one process-wide lock, so two NTK-SAP
  calls never draw from each other's stream. A thread of the user's drawing from the global RNG at
  the same moment is outside that lock; such code can hold :data:`GLOBAL_RNG_LOCK` itself.
"""
from __future__ import annotations

import functools
import inspect
import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

from .compiled import unwrap

__all__ = ["model_lock", "holds_model", "keeps_renormed_tables", "GLOBAL_RNG_LOCK", "seeded_global_rng"]

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()

#: held while ntkfast seeds and draws from torch's global generators (CPU and the current GPU)
GLOBAL_RNG_LOCK = threading.RLock()


def model_lock(model) -> threading.RLock:
    """The re-entrant lock of ``model`` (one per module object, made on first use, dropped with the
    module)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def holds_model(fn: Optional[Callable] = None, *, mutates: bool = False) -> Callable:
    """Decorator: ``fn(model, ...)`` runs holding ``model_lock(model)`` when ``model`` (the first
    positional argument, or the keyword ``model``) is a module; anything else passes through to
    ``fn``'s own argument checks.

    Unless ``mutates`` (training, whose job is to change the model), the lookup tables that a
    forward rewrites in place are restored afterwards (:func:`keeps_renormed_tables`), so that a
    scorer's forward passes leave the user's model as they found it."""
    if fn is None:
        return functools.partial(holds_model, mutates=mutates)
    first = next(iter(inspect.signature(fn).parameters), None)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        model = args[0] if args else kwargs.get(first)
        if not isinstance(model, torch.nn.Module):
            return fn(*args, **kwargs)
        # a torch.compile'd model shares its original module's tensors: one lock for both
        with model_lock(unwrap(model)):
            if mutates:
                return fn(*args, **kwargs)
            with keeps_renormed_tables(unwrap(model)):
                return fn(*args, **kwargs)

    locked.__ntkfast_holds_model__ = True
    return locked


@contextmanager
def keeps_renormed_tables(model: torch.nn.Module) -> Iterator[None]:
    """``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they look up
    in place, in every forward and whatever the grad mode (``embedding_renorm_``), and the scorers'
    forward passes reach those tables through tensors sharing their storage. Inside: every such
    table is copied; after: the rows of any table written to meanwhile (its version counter moved)
    that differ are written back.

    Only the model's lock is held, not one per table: a table shared with another model, or
    trained by another thread of the user's during the call, would have that thread's rows
    restored too."""
    tables = [m.weight for m in model.modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.max_norm is not None
              and isinstance(m.weight, torch.Tensor) and m.weight.device.type != "meta"]
    if not tables:
        yield
        return
    saved = [(t.detach().clone(), t._version) for t in tables]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, (s, version) in zip(tables, saved):
                if t._version != version and t.shape == s.shape:
                    rows = (t != s).reshape(t.shape[0], -1).any(1)
                    t[rows] = s[rows]


@contextmanager
def seeded_global_rng(seed: int, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Inside: torch's CPU generator (and each CUDA device's in ``devices``) seeded with ``seed``;
    after: every one of them as it was. Process-wide exclusive, so concurrent callers never share a
    stream."""
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=cuda):
        # only the generators fork_rng restores: torch.manual_seed would reseed every GPU
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield
