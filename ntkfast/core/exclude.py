"""Which prunable weights a caller keeps dense: the ``exclude=`` argument of :func:`ntkfast.prune`,
:func:`ntkfast.transfer`, the study and every registered method.

An entry of ``exclude`` is one of

- a name: a mask name (``"fc3.weight"``), or a module name (``"fc3"``, or a container such as
  ``"classifier"``, which takes every prunable weight below it); a name holding ``*``, ``?`` or
  ``[`` is a shell-style pattern (:mod:`fnmatch`) matched against both (``"classifier.*"``,
  ``"layer4.*.conv2"``). Names as ``named_parameters()`` reads them: the ``_orig`` of
  torch.nn.utils.prune and the ``_orig_mod`` of ``torch.compile`` may be written or left out;
- a module type (``nn.Linear``): every prunable weight of a module of that type (subclasses too);
- a module of the model: its prunable weights and those of the modules inside it;
- a predicate ``f(name, module) -> bool``, called with each prunable weight's mask name and the
  module owning it;

or a list (tuple, set) of these. Every entry must pick at least one prunable weight: a typo or a
type the model does not have is refused by name, never read as "keep nothing dense".
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Iterable, List, Sequence, Tuple, Type, Union

from torch import nn

from .compiled import plain_name, unwrap

__all__ = ["ExcludeSpec", "resolve_exclude", "resolve_spec", "last_linear", "describe"]

#: what ``exclude=`` takes (see the module's text)
ExcludeSpec = Union[str, Type[nn.Module], nn.Module, Callable[[str, nn.Module], bool],
                    Iterable[Union[str, Type[nn.Module], nn.Module, Callable[[str, nn.Module], bool]]]]

_GLOB = set("*?[")
_EXPECTED = "a layer name, a module type, a module, a predicate (name, module) -> bool, or a list of these"


def _entries(exclude) -> List:
    if isinstance(exclude, (list, tuple, set, frozenset)):
        out: List = []
        for e in exclude:
            if isinstance(e, (list, tuple, set, frozenset)):
                out.extend(_entries(e))
            else:
                out.append(e)
        return out
    return [exclude]


def describe(entry) -> str:
    """How an entry is named in a message."""
    if isinstance(entry, str):
        return repr(entry)
    if isinstance(entry, type):
        return f"type {entry.__name__}"
    if isinstance(entry, nn.Module):
        return f"the {type(unwrap(entry)).__name__} module given"
    return f"predicate {getattr(entry, '__qualname__', type(entry).__name__)}"


def _owner_name(mask_name: str) -> str:
    return mask_name.rpartition(".")[0]


def _name_matches(pattern: str, mask_names: Sequence[str]) -> List[str]:
    pattern = plain_name(pattern)
    module, _, attr = pattern.rpartition(".")
    if attr.endswith("_orig"):  # the torch.nn.utils.prune spelling of a weight
        pattern = f"{module}.{attr[:-len('_orig')]}" if module else attr[:-len("_orig")]
    if _GLOB & set(pattern):
        return [n for n in mask_names
                if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(_owner_name(n), pattern)]
    return [n for n in mask_names if n == pattern or _owner_name(n) == pattern
            or _owner_name(n).startswith(pattern + ".")]


def _check_flag(value, entry, name: str, arg: str) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool passes
        return bool(value)
    raise TypeError(f"{arg}: {describe(entry)} returned {value!r} for {name!r}; expected True or False")


def resolve_exclude(model: nn.Module, exclude, names: Sequence[str]) -> Tuple[str, ...]:
    """The names among ``names`` (mask names of ``model``'s prunable weights) that ``exclude``
    picks, in the order of ``names``; () for None. TypeError naming ``exclude`` for an entry of
    another kind, ValueError for one that picks no weight (with the nearest names, for a typo)."""
    return resolve_spec(model, exclude, names, "exclude", "prunable weight")


def resolve_spec(model: nn.Module, exclude, names: Sequence[str], arg: str, noun: str) -> Tuple[str, ...]:
    """:func:`resolve_exclude` for any argument of that form (``include=`` too): the names among
    ``names`` it picks; messages name ``arg`` and call the candidates ``noun``."""
    if exclude is None:
        return ()
    model = unwrap(model)
    names = list(names)
    owners = {}

    def owner(n: str) -> nn.Module:
        if n not in owners:
            mname = _owner_name(n)
            owners[n] = unwrap(model.get_submodule(mname)) if mname else model
        return owners[n]

    # a tied tensor (GPT-2's output layer sharing the embedding table) is keyed by one name, and
    # may be picked by any of its names, owners and their types
    also = _other_names(model, names)

    def forms(n: str) -> List[str]:
        return [n] + also.get(n, [])

    chosen = set()
    for entry in _entries(exclude):
        if isinstance(entry, str):
            if not entry.strip():
                raise ValueError(f"{arg}: an empty name; give a layer name such as 'fc3' or 'fc3.weight'")
            aliases = {a: n for n in names for a in also.get(n, [])}
            hit = list(dict.fromkeys(aliases.get(h, h) for h in _name_matches(entry.strip(), names + list(aliases))))
            if not hit:
                near = difflib.get_close_matches(entry, names + sorted({_owner_name(n) for n in names} - {""}), n=3)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else \
                    f"; its {noun}s: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                raise ValueError(f"{arg}: {entry!r} names no {noun} of the model{hint}")
        elif isinstance(entry, type):
            if not issubclass(entry, nn.Module):
                raise TypeError(f"{arg}: expected {_EXPECTED}; got the type {entry.__name__}, which is not a module type")
            hit = [n for n in names if any(isinstance(owner(f), entry) for f in forms(n))]
            if not hit:
                raise ValueError(f"{arg}: the model has no {noun} in a {entry.__name__} module")
        elif isinstance(entry, nn.Module):
            inside = {id(m) for m in unwrap(entry).modules()}
            if not any(m is unwrap(entry) for m in model.modules()):
                raise ValueError(f"{arg}: {describe(entry)} is not a module of the model")
            hit = [n for n in names if any(id(owner(f)) in inside for f in forms(n))]
            if not hit:
                raise ValueError(f"{arg}: {describe(entry)} ({type(unwrap(entry)).__name__}) holds no {noun}")
        elif callable(entry):
            hit = [n for n in names if any(_check_flag(entry(f, owner(f)), entry, f, arg) for f in forms(n))]
            if not hit:
                raise ValueError(f"{arg}: {describe(entry)} picks no {noun} (it returned False for all "
                                 f"{len(names)})")
        else:
            raise TypeError(f"{arg}: expected {_EXPECTED}; got {type(entry).__name__} {entry!r}")
        chosen.update(hit)
    return tuple(n for n in names if n in chosen)


def _other_names(model: nn.Module, names: Sequence[str]) -> dict:
    """name -> the tensor's other names in the model (tied parameters), for the names that have any."""
    ids: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        n = plain_name(n[: -len("_orig")] if n.endswith("_orig") else n)
        ids.setdefault(id(p), []).append(n)
    out = {}
    for group in ids.values():
        if len(group) > 1:
            for n in group:
                if n in names:
                    out[n] = [a for a in group if a != n]
    return out


def last_linear(model: nn.Module) -> str:
    """The name of the last ``nn.Linear`` of ``model`` in module order: the classifier of the
    model zoo's networks and of most image classifiers, which Synaptic-Flow's ``--dense-classifier``
    keeps dense. ValueError naming ``model`` when it has none."""
    model = unwrap(model)
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = name
    if found is None:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear layer to keep dense as its classifier")
    if found == "":
        raise ValueError("model: the model is itself the Linear layer; nothing would be left to prune")
    return plain_name(found)
