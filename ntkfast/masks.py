"""Which weights are prunable, the Masks object, and thresholding scores into masks."""
from __future__ import annotations

import math
import numbers
import os
import re
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.checks import check_choice, check_mask
from .core.files import atomic_write, check_in_path, check_out_path, plain_data
from .core.compiled import plain_name, unwrap
from .core.exclude import last_linear
from .core.options import KeepRule, NmLayout, Schedule, Scope, choices
from .core.targets import module_param, parameter_name, prunable_parameters, unpruned_weights
from .ops import nm_mask, topk_mask, topk_mask_layerwise

__all__ = ["Masks", "prunable_parameters", "unpruned_weights", "parameter_name", "last_linear", "density_schedule",
           "round_density", "n_keep", "n_keep_authors", "threshold", "nm_masks", "nm_misfit", "parse_structure"]


class Masks(Mapping[str, torch.Tensor]):
    """An ordered mapping name -> bool tensor (True = kept), with metadata.

    Names are those of ``model.named_parameters()``; the order is the prunable order of the model.
    For a model compiled with ``torch.compile`` they are the original module's names: a
    ``_orig_mod.`` in a given name is dropped, and the masks apply to the compiled model and to
    the plain one alike.

    A mask may cover only some of a model's weights: the others are left as they are.
    ``metadata["exclude"]`` (set by :func:`ntkfast.prune` and :func:`ntkfast.transfer`) lists the
    weights kept dense by ``exclude=``: they count as kept in :attr:`density` and are marked in
    :meth:`report`; :attr:`pruned_density` is the density over the other tensors.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], metadata: Optional[dict] = None):
        self._m: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a mapping name -> bool tensor, got {type(masks).__name__}")
        for given, m in masks.items():
            if not isinstance(given, str):
                raise TypeError(f"masks: names must be str, got {type(given).__name__} {given!r}")
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"masks[{given!r}] must be a tensor, got {type(m).__name__}")
            name = plain_name(given)  # a torch.compile'd model's _orig_mod.<name>: one key for both
            if name in self._m:
                raise ValueError(f"masks: {given!r} and another key name the same weight {name!r}")
            self._m[name] = check_mask(m, f"masks[{given!r}]")
        self.metadata: dict = dict(metadata or {})
        # set by methods that learn weights with their masks (NTT): a state dict of the whole model,
        # to load before training; None for score-based methods. Not saved by save().
        self.learned_weights: Optional[Dict[str, torch.Tensor]] = None

    # -- mapping protocol ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._m[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, density={self.density:.6g}, metadata={self.metadata})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping) or list(self.keys()) != list(other.keys()):
            return False
        return all(torch.equal(self[n], other[n].to(self[n].device)) for n in self)

    __hash__ = None  # mutable-content container

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, *, include_bias: bool = False, include_norm: bool = False,
             include=None) -> "Masks":
        params = prunable_parameters(model, include_bias=include_bias, include_norm=include_norm, include=include)
        if not params:
            raise ValueError(
                "model: no prunable weights found (expected Linear or Conv1d/2d/3d modules, "
                f"or include_norm=True, or include=); model is {type(model).__name__}"
            )
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})

    @classmethod
    def from_model(cls, model: nn.Module) -> "Masks":
        """Read the ``<attr>_mask`` buffers that torch.nn.utils.prune (or to_prune_hooks) registered.
        Keyed by the original module's names for a ``torch.compile``'d model."""
        out = OrderedDict()
        for mname, module in unwrap(model).named_modules():
            for bname, buf in module._buffers.items():
                if buf is None or not bname.endswith("_mask"):
                    continue
                attr = bname[: -len("_mask")]
                if module_param(module, attr) is None:
                    continue
                name = f"{mname}.{attr}" if mname else attr
                out[name] = check_mask(buf, f"model: buffer {mname + '.' if mname else ''}{bname}").clone()
        if not out:
            raise ValueError("model: no *_mask buffers found (prune it with torch.nn.utils.prune or to_prune_hooks)")
        return cls(out)

    def clone(self) -> "Masks":
        out = Masks({n: m.clone() for n, m in self._m.items()}, dict(self.metadata))
        if self.learned_weights is not None:
            out.learned_weights = OrderedDict((n, t.clone()) for n, t in self.learned_weights.items())
        return out

    def to(self, device) -> "Masks":
        out = Masks({n: m.to(device) for n, m in self._m.items()}, dict(self.metadata))
        if self.learned_weights is not None:
            out.learned_weights = OrderedDict((n, t.to(device)) for n, t in self.learned_weights.items())
        return out

    # -- statistics ------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self._m.values())

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self._m.values())

    @property
    def density(self) -> float:
        """Fraction of prunable weights kept, over all tensors (those kept dense by ``exclude=``
        included, every weight of them kept)."""
        n = self.numel
        return self.kept / n if n else 1.0

    @property
    def excluded(self) -> tuple:
        """Names of the tensors that ``exclude=`` kept dense (``metadata["exclude"]``)."""
        names = self.metadata.get("exclude") or ()
        return tuple(n for n in names if isinstance(n, str) and n in self._m)

    @property
    def pruned_density(self) -> float:
        """Fraction kept of the weights that were pruned: every tensor but the :attr:`excluded`
        ones. The density ``prune(..., exclude=...)`` reaches; equal to :attr:`density` when
        nothing is excluded."""
        skip = set(self.excluded)
        rest = [m for n, m in self._m.items() if n not in skip]
        n = sum(m.numel() for m in rest)
        return sum(int(m.sum()) for m in rest) / n if n else 1.0

    def layer_density(self) -> "OrderedDict[str, float]":
        return OrderedDict((n, (float(m.sum()) / m.numel()) if m.numel() else 1.0) for n, m in self._m.items())

    def empty_layers(self) -> list:
        """Names of tensors that lost every entry."""
        return [n for n, m in self._m.items() if m.numel() and not bool(m.any())]

    def report(self) -> str:
        """A per-layer table: name, shape, kept / total, density. Tensors kept dense by
        ``exclude=`` are marked "(excluded)" and count as kept in the total; a last row gives the
        density of the pruned tensors alone."""
        skip = set(self.excluded)
        rows = [("layer", "shape", "kept", "total", "density")]
        for n, m in self._m.items():
            k = int(m.sum())
            rows.append((f"{n} (excluded)" if n in skip else n, "x".join(map(str, m.shape)), str(k), str(m.numel()),
                         f"{k / max(m.numel(), 1):.4%}"))
        rows.append(("total", "", str(self.kept), str(self.numel), f"{self.density:.4%}"))
        if skip:
            rest = [m for n, m in self._m.items() if n not in skip]
            kept, numel = sum(int(m.sum()) for m in rest), sum(m.numel() for m in rest)
            rows.append(("pruned (not excluded)", "", str(kept), str(numel), f"{self.pruned_density:.4%}"))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = []
        for i, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [r[c].rjust(widths[c]) for c in (2, 3, 4)]
            lines.append("  ".join(cells))
            if i == 0 or i == len(rows) - (3 if skip else 2):
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # -- applying to a model ---------------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        model = unwrap(model)  # a compiled model's weights are its original module's
        params = {}
        for name, m in self._m.items():
            module_name, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(module_name) if module_name else model
            except AttributeError:
                raise ValueError(f"model: has no module {module_name!r} for mask {name!r}") from None
            p = module_param(module, attr)
            if p is None:
                raise ValueError(f"model: has no parameter {name!r} for this mask")
            if p.shape != m.shape:
                raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)} but the parameter has {tuple(p.shape)}")
            params[name] = p
        return params

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place; returns the model."""
        params = self._check_model(model)
        for name, p in params.items():  # masked_fill, not mul: a pruned NaN/inf becomes 0, not NaN
            p.masked_fill_(~self._m[name].to(p.device), 0)
        return model

    def to_prune_hooks(self, model: nn.Module) -> nn.Module:
        """Re-parametrise ``model`` the way torch.nn.utils.prune does (``weight_orig`` parameter,
        ``weight_mask`` buffer, a forward pre-hook); a weight already re-parametrised gets its mask
        combined, as prune does. Returns the model."""
        import torch.nn.utils.prune as tprune

        self._check_model(model)
        root = unwrap(model)
        # a tied weight (GPT-2's output layer sharing the embedding table) is masked under its first
        # name; every module holding it is re-parametrised, or the others would keep computing with
        # the dense tensor
        holders: dict = {}
        for _, mod in root.named_modules(remove_duplicate=False):
            for attr, q in list(mod._parameters.items()):
                if q is not None:
                    holders.setdefault(id(q), [])
                    if attr.endswith("_orig") and attr[:-5] + "_mask" in mod._buffers:
                        attr = attr[:-5]  # already re-parametrised: prune combines the masks
                    if not any(h is mod and a == attr for h, a in holders[id(q)]):
                        holders[id(q)].append((mod, attr))
        plan = []
        for name, m in self._m.items():
            module_name, _, attr = name.rpartition(".")
            module = unwrap(root.get_submodule(module_name) if module_name else root)
            p = module_param(module, attr)
            tied = holders.get(id(p), [])
            plan.append((m.to(device=p.device, dtype=p.dtype),
                         [(module, attr)] + [(h, a) for h, a in tied if not (h is module and a == attr)]))
        for mask, places in plan:
            for module, attr in places:
                tprune.custom_from_mask(module, attr, mask)
        return model

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """torch.save the masks with their metadata (method, density, seed, package version, ...),
        written to a temporary file and renamed into place. Metadata values that are not plain
        numbers, strings, lists or dicts are stored as their text, so that :meth:`load` (which reads
        nothing but tensors and plain values) can read every file this writes."""
        from ._version import __version__

        meta = plain_data(dict(self.metadata))
        meta.setdefault("version", __version__)
        meta["final_density"] = self.density
        obj = {"format": "ntkfast.masks/1", "masks": OrderedDict((n, m.cpu()) for n, m in self._m.items()),
               "metadata": meta}
        atomic_write(check_out_path(path, "path"), lambda f: torch.save(obj, f))

    @classmethod
    def load(cls, path, map_location="cpu") -> "Masks":
        """The masks of a file written by :meth:`save` (or a plain name -> bool/0-1 tensor dict).
        Read with ``weights_only=True``: a file asking to run code is refused unread. ValueError
        naming the file for anything that is not masks."""
        try:
            path = check_in_path(path, "path")
        except FileNotFoundError:
            raise FileNotFoundError(f"path: no masks file at {os.fspath(path)!r}") from None
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # a cut, corrupt, foreign or hostile file: never the loader's traceback
            msg = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
            raise ValueError(f"path: {os.fspath(path)!r} is not a readable masks file ({type(e).__name__}: "
                             f"{msg})") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith("ntkfast.masks/"):
            if obj["format"] != "ntkfast.masks/1":
                raise ValueError(f"path: {os.fspath(path)!r} is in format {obj['format']!r}, which this ntkfast "
                                 "(it reads ntkfast.masks/1) does not know; upgrade ntkfast")
            masks, meta = obj.get("masks"), obj.get("metadata", {})
            if not isinstance(masks, Mapping) or not masks or not isinstance(meta, Mapping):
                raise ValueError(f"path: {os.fspath(path)!r} is a damaged ntkfast masks file (no masks or metadata)")
            try:
                return cls(masks, meta)
            except (TypeError, ValueError) as e:
                raise ValueError(f"path: {os.fspath(path)!r}: {e}") from None
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            # a plain name -> mask dict; refuse anything else (a state_dict's weights would all
            # silently read as True)
            try:
                return cls(obj)
            except (TypeError, ValueError) as e:
                raise ValueError(f"path: {os.fspath(path)!r} holds tensors that are not masks: {e}") from None
        raise ValueError(f"path: {os.fspath(path)!r} does not hold ntkfast masks")


def round_density(density: float, t: int, rounds: int, schedule: Schedule = "exponential") -> float:
    """Target density of round ``t`` of ``rounds`` (1-based): exponential d_t = d^(t/T), linear
    d_t = 1 - (1 - d) t / T, or NTK-SAP's expinv d_t = 1 - (1 - d)^(T/t) (its prune.py), which
    reaches d at t = T by another path: at high sparsity it prunes more in the first rounds than
    the exponential schedule does, at low sparsity less."""
    if schedule == "exponential":
        return density ** (t / rounds)
    if schedule == "linear":
        return 1.0 - (1.0 - density) * t / rounds
    if schedule == "expinv":
        return 1.0 - (1.0 - density) ** (rounds / t)
    check_choice(schedule, "schedule", choices(Schedule))
    raise AssertionError(f"schedule {schedule!r} has no formula")


def density_schedule(density: float, rounds: int, schedule: Schedule = "exponential") -> list:
    """Target densities d_1..d_T (see :func:`round_density`)."""
    return [round_density(density, t, rounds, schedule) for t in range(1, rounds + 1)]


def n_keep(density: float, numel: int) -> int:
    """k = round(d * numel), halves rounded up, clipped to [0, numel]."""
    return max(0, min(numel, int(math.floor(density * numel + 0.5))))


_KEEP_RULES = choices(KeepRule)


def n_keep_authors(density: float, numel: int) -> int:
    """The count the Synaptic-Flow / NTK-SAP code keeps before ties: numel - int((1 - d) * numel)."""
    return numel - int((1.0 - density) * numel)


def threshold(
    scores: Mapping[str, torch.Tensor],
    density: float,
    *,
    keep: Optional[Mapping[str, torch.Tensor]] = None,
    scope: Scope = "global",
    keep_rule: KeepRule = "exact",
) -> "OrderedDict[str, torch.Tensor]":
    """Masks keeping the highest scores, over all tensors (``scope="global"``) or per tensor
    ("layerwise"). Entries whose keep is False never come back.

    ``keep_rule="exact"`` (default) keeps exactly k = round(density * numel), or every alive entry
    if fewer remain; ties at the threshold are broken by position (see
    :func:`ntkfast.ops.topk_mask`). ``keep_rule="authors"`` reproduces the Synaptic-Flow / NTK-SAP
    masking step: k = numel - int((1 - density) * numel), and every entry tied with the
    highest-scoring entry left out is dropped too (their ``score <= kthvalue`` rule), so fewer
    than k may be kept. The one difference from their code: pruned entries rank below every alive
    one instead of by their own score, so when k reaches the number alive all of them stay.
    """
    check_choice(keep_rule, "keep_rule", _KEEP_RULES)
    check_choice(scope, "scope", choices(Scope))
    names = list(scores.keys())
    s = [scores[n].detach() for n in names]
    kp = [keep[n].to(s[i].device) for i, n in enumerate(names)] if keep is not None else None
    count = n_keep if keep_rule == "exact" else n_keep_authors
    drop = keep_rule == "authors"
    # clamp: when fewer than k entries are alive, all of them stay (nothing comes back)
    if scope == "global":
        out = topk_mask(s, count(density, sum(x.numel() for x in s)), kp, drop_ties=drop, clamp=True,
                             names=names)
    else:
        out = topk_mask_layerwise(s, [count(density, x.numel()) for x in s], kp, drop_ties=drop, clamp=True,
                                       names=names)
    return OrderedDict(zip(names, out))



# -- N:M semi-structured masks ------------------------------------------------------------------

_NM_LAYOUTS = choices(NmLayout)


def parse_structure(structure) -> Tuple[int, int]:
    """``(n, m)`` of an N:M structure written ``"N:M"`` (``"2:4"``: 2 kept in every 4), with
    ``1 <= N <= M``."""
    if not isinstance(structure, str):
        raise TypeError(f"structure: expected a string 'N:M' such as '2:4', got {type(structure).__name__}")
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if found is None:
        raise ValueError(f"structure: expected 'N:M' with whole numbers N and M, such as '2:4' (or, in prune, "
                         f"'channel'), got {structure!r}")
    n, m = int(found.group(1)), int(found.group(2))
    if not 1 <= n <= m:
        raise ValueError(f"structure: {structure!r} needs 1 <= N <= M")
    return n, m


def _nm_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` with the dimension the groups run along last (a view where one exists)."""
    if t.dim() >= 3:
        return t.movedim(1, -1) if layout == "channels" else t.reshape(t.shape[0], -1)
    return t


def _nm_unview(mask: torch.Tensor, shape: torch.Size, layout: str) -> torch.Tensor:
    if len(shape) >= 3 and layout == "channels":
        return mask.movedim(-1, 1).contiguous()
    return mask.reshape(shape)


def nm_misfit(shape: Sequence[int], m: int, layout: NmLayout = "channels") -> Optional[str]:
    """Why groups of ``m`` do not fit a weight of this shape (the length they run along, in
    words), or None when they fit. See :func:`nm_masks` for the layout."""
    check_choice(layout, "layout", _NM_LAYOUTS)
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return "a 0-d tensor has no dimension for the groups to run along"
    if len(shape) == 1:
        length, what = shape[0], f"{shape[0]} entries"
    elif len(shape) == 2:
        length, what = shape[1], f"{shape[1]} inputs"
    elif layout == "channels":
        length, what = shape[1], f"{shape[1]} input channels"
    else:
        length = math.prod(shape[1:])
        what = f"{length} = {shape[1]} input channels x {math.prod(shape[2:])} kernel positions"
    return None if length % m == 0 else f"shape {shape}: {what}, not a multiple of {m}"


def nm_masks(
    scores: Mapping[str, torch.Tensor],
    n: int,
    m: int,
    *,
    keep: Optional[Mapping[str, torch.Tensor]] = None,
    layout: NmLayout = "channels",
) -> "OrderedDict[str, torch.Tensor]":
    """N:M semi-structured masks: in every group of ``m`` consecutive weights along a weight's
    input dimension, keep the ``n`` highest-scoring (``n=2, m=4``: 2:4 sparsity).

    Where the groups run:

    - a Linear weight ``[out, in]``: along ``in``, each row apart: the layout
      ``torch.sparse.to_sparse_semi_structured`` and cuSPARSELt take for the weight of ``x @ W.T``;
    - a convolution weight ``[out, in, *kernel]``: ``layout="channels"`` (default) along the input
      channels at each kernel position and output channel, i.e. the weight seen as
      ``[out, *kernel, in]``: the layout TensorRT's sparse convolutions require and NVIDIA's ASP
      produces (channels-last implicit GEMM). ``layout="flat"``: along the flattened
      ``in * prod(kernel)`` of ``weight.reshape(out, -1)``, the matrix a convolution written as
      ``F.unfold`` + matmul multiplies (and what ``to_sparse_semi_structured`` would be given);
    - a 1-D tensor (a bias or norm weight, with ``include_bias`` / ``include_norm``): along it.

    That length must be a multiple of ``m``; a weight where it is not is refused with ValueError
    naming every such weight, before any work.

    Each group keeps its ``n`` highest scores among the entries ``keep`` allows (entries whose keep
    is False never come back and take no part, whatever their score); a group with fewer than ``n``
    such entries keeps all it has, so the masks have at most ``n`` per group and exactly ``n``
    wherever ``keep`` leaves ``n`` or more (always, without ``keep``). Ties go to the lower index in
    the group; a NaN score where keep allows it raises ValueError naming the weight. The selection
    is :func:`ntkfast.ops.nm_mask`, one call per tensor. Returns name -> bool mask, in the order of
    ``scores``, each shaped like its scores and contiguous.
    """
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (n, m)):
        raise TypeError(f"n, m: expected ints, got {type(n).__name__} and {type(m).__name__}")
    n, m = int(n), int(m)
    if not 1 <= n <= m:
        raise ValueError(f"n, m: need 1 <= n <= m, got n={n}, m={m}")
    check_choice(layout, "layout", _NM_LAYOUTS)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores: expected a mapping name -> tensor, got {type(scores).__name__}")
    misfits = [f"{name!r} ({why})" for name, s in scores.items()
               if (why := nm_misfit(s.shape, m, layout)) is not None]
    if misfits:
        raise ValueError(f"nm_masks: {n}:{m} groups run along each weight's input dimension ({layout} layout), whose "
                         f"length must be a multiple of {m}; not so for {', '.join(misfits)}")
    if keep is not None:
        missing = [name for name in scores if name not in keep]
        if missing:
            raise ValueError(f"keep: has no mask for {', '.join(map(repr, missing))}")
    out = OrderedDict()
    for name, s in scores.items():
        kp = None
        if keep is not None:
            kp = keep[name].to(s.device)
            if kp.shape != s.shape:
                raise ValueError(f"keep[{name!r}] has shape {tuple(kp.shape)} but the scores have {tuple(s.shape)}")
            kp = _nm_view(kp, layout)
        out[name] = _nm_unview(nm_mask(_nm_view(s.detach(), layout), n, m, kp, name=name), s.shape, layout)
    return out


def _nm_short_groups(mask: torch.Tensor, n: int, m: int, layout: NmLayout) -> int:
    """How many groups of ``mask`` keep fewer than ``n``."""
    return int((_nm_view(mask, layout).reshape(-1, m).sum(1) < n).sum())


def _nm_round(
    scores: Mapping[str, torch.Tensor],
    density: float,
    n: int,
    m: int,
    *,
    keep: Mapping[str, torch.Tensor],
    structured: List[str],
    scope: Scope,
    layout: NmLayout,
    last: bool,
) -> "OrderedDict[str, torch.Tensor]":
    """One round of :func:`ntkfast.prune` with an N:M structure, to ``density``. The ``structured``
    tensors keep their N:M selection (the floor) every round: the last round exactly that, an
    earlier one the floor plus the highest-scoring other alive entries up to the round's density,
    over all structured tensors (global) or per tensor. No group ever falls below ``n`` alive, so
    the last round can take ``n`` from each. The other tensors (those the structure does not fit)
    are thresholded among themselves, as an ordinary round would, so that they too end at
    ``density``."""
    names = list(scores)
    out = {}
    if structured:
        floor = nm_masks({k: scores[k] for k in structured}, n, m, keep={k: keep[k] for k in structured},
                         layout=layout)
        if last:
            out.update(floor)
        else:
            s = [scores[k].detach() for k in structured]
            rest = [keep[k].to(x.device) & ~floor[k] for k, x in zip(structured, s)]
            taken = [int(floor[k].sum()) for k in structured]
            if scope == "global":
                fill = topk_mask(s, max(0, n_keep(density, sum(x.numel() for x in s)) - sum(taken)), rest,
                                 clamp=True, names=structured)
            else:
                fill = topk_mask_layerwise(s, [max(0, n_keep(density, x.numel()) - t) for x, t in zip(s, taken)],
                                           rest, clamp=True, names=structured)
            out.update((k, f | floor[k]) for k, f in zip(structured, fill))
    loose = [k for k in names if k not in out]
    if loose:
        out.update(threshold({k: scores[k] for k in loose}, density, keep={k: keep[k] for k in loose}, scope=scope))
    return OrderedDict((k, out[k]) for k in names)
