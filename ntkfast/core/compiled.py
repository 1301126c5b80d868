"""Models wrapped by ``torch.compile``: one naming of their weights.

``torch.compile(model)`` returns an ``OptimizedModule`` holding the original module as
``_orig_mod``, so its ``named_parameters()`` read ``_orig_mod.<name>``, and a submodule compiled on
its own puts ``_orig_mod`` in the middle of the names below it. Masks are keyed by the names of the
original (uncompiled) modules, so that masks made from either apply to both: :func:`plain_name`
drops the ``_orig_mod`` segments, :func:`unwrap` gives the module a compiled model wraps (it
shares its parameters, so scoring it reads and masks the same tensors).
"""
from __future__ import annotations

from typing import Dict, Iterable

from torch import nn

__all__ = ["plain_name", "unwrap", "is_compiled", "real_names", "without_compiled_submodules"]

_SEGMENT = "_orig_mod"


def is_compiled(module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile`` returns for a module."""
    # by attribute, not by class: the wrapper's class lives in a private torch module that moves
    return isinstance(module, nn.Module) and isinstance(module._modules.get(_SEGMENT), nn.Module) \
        and type(module).__name__ == "OptimizedModule"


def unwrap(module):
    """The original module of a ``torch.compile``'d one (through several compilations); anything
    else as given."""
    while is_compiled(module):
        module = module._modules[_SEGMENT]
    return module


def without_compiled_submodules(model: nn.Module) -> nn.Module:
    """``model`` itself, or, where a module inside it is compiled on its own, a copy with the
    original modules in their places: for code that looks its tensors up by their original
    names throughout (the model given is never changed)."""
    if not any(is_compiled(m) for m in model.modules()):
        return model
    import copy

    dup = copy.deepcopy(model)
    for parent in list(dup.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and is_compiled(child):
                parent._modules[name] = unwrap(child)
    return dup


def plain_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments compiling adds: ``_orig_mod.fc.weight`` and
    ``block._orig_mod.conv.weight`` read ``fc.weight`` and ``block.conv.weight``."""
    if _SEGMENT not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _SEGMENT)


def real_names(names: Iterable[str]) -> Dict[str, str]:
    """plain name -> the name as given, for names as a (possibly compiled) model reports them."""
    return {plain_name(n): n for n in names}
