"""Which parameters the NTK differentiates, which rule contracts each one, and why.

A rule is chosen per module that owns parameters: Linear, Conv1d/2d/3d and eval-mode BatchNorm are
contracted by structure (their per-sample gradients are products of the layer's input and output
cotangent); any other module is differentiated by torch.func on that module alone; a parameter
that two modules share (tied weights) is differentiated by torch.func through the whole model.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from ..core.targets import attribute_name

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ParamEntry:
    """One differentiated parameter: its name in ``model.named_parameters()``, the value the
    forward uses (before masking), and its effective 0/1 mask (None: dense)."""

    name: str
    attr: str
    value: torch.Tensor
    mask: Optional[torch.Tensor]

    def masked_value(self) -> torch.Tensor:
        return self.value if self.mask is None else self.value * self.mask

    @property
    def numel(self) -> int:
        return self.value.numel()


@dataclass
class ModuleRule:
    """How the parameters of one module are contracted."""

    module_name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "batchnorm" | "generic"
    params: "OrderedDict[str, ParamEntry]"  # attr (without _orig) -> entry
    reason: str
    # masked values of the module's descendants, by names relative to it (generic rule: the
    # module is re-run on its own and must see the same sparse weights as the whole forward)
    inner_values: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Plan:
    rules: List[ModuleRule]
    whole_model: List[ParamEntry]  # differentiated through the whole model by torch.func
    whole_model_reason: Dict[str, str]
    forward_values: Dict[str, torch.Tensor]  # overrides for functional_call (masked values)
    entries: "OrderedDict[str, ParamEntry]" = field(default_factory=OrderedDict)

    def explain(self) -> "OrderedDict[str, str]":
        out: "OrderedDict[str, str]" = OrderedDict()
        for rule in self.rules:
            for entry in rule.params.values():
                out[entry.name] = rule.reason
        for entry in self.whole_model:
            out[entry.name] = self.whole_model_reason[entry.name]
        return out


def _forward_overridden(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def check_modes(model: nn.Module) -> None:
    """Refuse modules whose training mode couples or randomises samples: the NTK of such a
    network is not a function of one sample pair."""
    for name, module in model.named_modules():
        label = name or type(module).__name__
        if isinstance(module, _BN):
            if module.training:
                raise ValueError(
                    f"model: BatchNorm {label!r} is in training mode, where each sample's output depends "
                    "on the whole batch; call model.eval() (the NTK uses its running statistics)"
                )
            if module.running_mean is None:
                raise ValueError(
                    f"model: BatchNorm {label!r} has track_running_stats=False, so it normalises by batch "
                    "statistics even in eval mode; the per-sample NTK is undefined for it"
                )
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(f"model: dropout {label!r} is in training mode (random outputs); call model.eval()")


def _resolve_selection(model: nn.Module, params) -> "OrderedDict[str, torch.Tensor]":
    named = OrderedDict(model.named_parameters())
    if params is None:
        sel = OrderedDict((n, p) for n, p in named.items() if p.requires_grad)
        if not sel:
            raise ValueError("model: no trainable parameters (none requires grad); pass params= to choose some")
        return sel
    if isinstance(params, Mapping):
        sel = OrderedDict()
        for n, v in params.items():
            if n not in named:
                raise ValueError(f"params: the model has no parameter {n!r}")
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"params[{n!r}]: expected a tensor, got {type(v).__name__}")
            if tuple(v.shape) != tuple(named[n].shape):
                raise ValueError(f"params[{n!r}]: shape {tuple(v.shape)}, the parameter has {tuple(named[n].shape)}")
            sel[n] = v
    else:
        if isinstance(params, str):
            params = [params]
        sel = OrderedDict()
        for n in params:
            if not isinstance(n, str) or n not in named:
                raise ValueError(f"params: the model has no parameter {n!r}")
            sel[n] = named[n]
    if not sel:
        raise ValueError("params: empty selection")
    return sel


def _resolve_masks(model: nn.Module, masks, named: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mask name -> bool mask, keyed by parameter name (``<attr>_orig`` under prune hooks)."""
    out: Dict[str, torch.Tensor] = {}
    if masks is None:
        return out
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks: expected a mapping name -> tensor (e.g. ntkfast.Masks), got {type(masks).__name__}")
    for name, m in masks.items():
        pname = name if name in named else name + "_orig"  # as core.targets.parameter_name, within ``named``
        if pname not in named:
            raise ValueError(f"masks: the model has no parameter for mask {name!r}")
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"masks[{name!r}]: expected a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(named[pname].shape):
            raise ValueError(f"masks[{name!r}]: shape {tuple(m.shape)}, the parameter has {tuple(named[pname].shape)}")
        out[pname] = m.detach().to(named[pname].device) != 0
    return out


def _prune_buffer_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """torch.nn.utils.prune re-parametrisations: ``<attr>_orig`` param name -> its ``<attr>_mask``."""
    out = {}
    for mname, module in model.named_modules():
        for pname in list(module._parameters):
            if pname.endswith("_orig"):
                buf = module._buffers.get(attribute_name(pname) + "_mask")
                if buf is not None:
                    out[f"{mname}.{pname}" if mname else pname] = buf.detach() != 0
    return out


def _kind(module: nn.Module) -> (str, str):
    if isinstance(module, nn.Linear) and not _forward_overridden(module, nn.Linear):
        return "linear", "structure: dense layer, Gram of inputs times Gram of output cotangents"
    for base in _CONV:
        if isinstance(module, base) and not _forward_overridden(module, base):
            return "conv", "structure: convolution"
    if isinstance(module, _BN) and not _forward_overridden(module, type(module)):
        return "batchnorm", "structure: eval-mode BatchNorm affine, per-sample gradients from normalised inputs"
    if isinstance(module, (nn.Linear, _BN) + _CONV):
        why = f"{type(module).__name__} overrides forward"
    else:
        why = f"no structural rule for {type(module).__name__}"
    return "generic", f"torch.func per-sample vjp of this module ({why})"


def build_plan(model: nn.Module, params=None, masks=None) -> Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_modes(model)
    named = OrderedDict(model.named_parameters())
    selected = _resolve_selection(model, params)
    bool_masks = _resolve_masks(model, masks, named)
    buffer_masks = _prune_buffer_masks(model)

    owners: Dict[int, list] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), [])
                if (mname, attr) not in owners[id(p)]:
                    owners[id(p)].append((mname, attr))
    modules = dict(model.named_modules(remove_duplicate=False))

    forward_values: Dict[str, torch.Tensor] = {}
    entries: "OrderedDict[str, ParamEntry]" = OrderedDict()
    for pname, p in named.items():
        value = selected.get(pname, p)
        user = bool_masks.get(pname)
        if user is not None or pname in selected:
            # The effective mask of the derivative is the user's AND the prune buffer's; the
            # buffer is already applied by the module's own pre-hook in the forward.
            eff = user
            buf = buffer_masks.get(pname)
            if buf is not None:
                eff = buf if eff is None else eff & buf
            mask_f = None if eff is None else eff.to(value.dtype)
            forward_mask = None if user is None else user.to(value.dtype)
            if forward_mask is not None:
                forward_values[pname] = value * forward_mask
            elif value is not p:
                forward_values[pname] = value
            if pname in selected:
                attr = pname.rsplit(".", 1)[-1]
                entries[pname] = ParamEntry(pname, attr, value, mask_f)

    rules: List[ModuleRule] = []
    by_module: "OrderedDict[str, OrderedDict]" = OrderedDict()
    whole: List[ParamEntry] = []
    whole_reason: Dict[str, str] = {}
    for pname, entry in entries.items():
        own = owners[id(named[pname])]
        if len(own) > 1:
            whole.append(entry)
            whole_reason[pname] = ("torch.func through the whole model: shared by "
                                   + ", ".join(f"{m or '<root>'}.{a}" for m, a in own))
            continue
        mname, attr = own[0]
        by_module.setdefault(mname, OrderedDict())[attr] = entry
    for mname, attrs in by_module.items():
        module = modules[mname]
        kind, reason = _kind(module)
        keyed = OrderedDict()
        for attr, entry in attrs.items():
            key = attr[: -len("_orig")] if attr.endswith("_orig") else attr
            if kind != "generic" and key not in ("weight", "bias"):
                kind, reason = "generic", f"torch.func per-sample vjp of this module (extra parameter {attr!r})"
            keyed[key] = entry
        inner = {}
        if kind == "generic":
            keyed = OrderedDict((e.attr, e) for e in attrs.values())
            prefix = mname + "." if mname else ""
            inner = {k[len(prefix):]: v for k, v in forward_values.items() if k.startswith(prefix)}
        rules.append(ModuleRule(mname, module, kind, keyed, reason, inner))
    return Plan(rules, whole, whole_reason, forward_values, entries)
