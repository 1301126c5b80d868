"""ntkfast: fast NTK-based pruning at initialisation for PyTorch.

Every public name and subpackage is reachable from here (``ntkfast.prune``,
``ntkfast.pathkernel.trace``, ...) and loaded on first use: ``import ntkfast`` itself imports
neither torch nor the compiled extension, so that the ``ntkfast`` command answers ``--help`` at
once and a program pays only for what it uses.
"""
from __future__ import annotations

import importlib
import logging as _logging
import sys
import types
from typing import TYPE_CHECKING

# a library's convention: its messages go nowhere until the application configures logging
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from ._version import __version__

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and editors
    from . import (augment, connectivity, core, data, distributed, flops, masks, methods, models, ntk, ntt, ops,
                   pathkernel, plots, presets, report, reproduce, sanity, scores, structured, study, training,
                   training_grouped)
    from .masks import Masks, prunable_parameters
    from .ntt import TransferResult, transfer
    from .ops import build_info
    from .prune import prune
    from .training import train
    from .training_grouped import train_grouped

#: public subpackages and modules, imported on first access as attributes
_SUBMODULES = ("methods", "masks", "ops", "scores", "ntt", "ntk", "pathkernel", "connectivity", "models", "data",
               "training", "study", "report", "distributed", "plots", "core", "augment", "flops", "sanity", "presets", "reproduce",
               "training_grouped", "structured")
#: public functions and classes: the module each comes from
_NAMES = {"Masks": "masks", "prunable_parameters": "masks", "prune": "prune", "transfer": "ntt",
          "TransferResult": "ntt", "build_info": "ops", "train": "training",
          "train_grouped": "training_grouped"}

__all__ = ["Masks", "prunable_parameters", "prune", "build_info", "methods", "ops", "scores", "ntt", "models", "data",
           "train", "train_grouped", "transfer", "TransferResult", "ntk", "pathkernel", "connectivity", "study", "report",
           "distributed", "training", "augment", "flops", "sanity", "presets", "reproduce", "training_grouped", "structured",
           "__version__"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ntkfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``ntkfast.prune`` binds it as the
    package's attribute ``prune``, as every submodule import does; the package's ``prune`` is
    the function of that name, whichever import comes first."""

    def __setattr__(self, name, value):
        if name == "prune" and isinstance(value, types.ModuleType) and hasattr(value, "prune"):
            value = value.prune
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
