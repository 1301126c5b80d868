"""Which tensors are pruned and under which masks: the prunable parameters of a model, the one
resolution of torch.nn.utils.prune's re-parametrisation (a mask for ``<module>.weight`` applies to
``weight_orig`` when the module carries a ``weight_mask`` buffer, and acts together with it), and
the :class:`Target` of each scored tensor.

The masked network. Each scored tensor (a :class:`Target`) has an *effective mask*: the caller's
mask AND, when its module carries one, the module's own ``<attr>_mask`` buffer (torch.nn.utils.prune
hooks, or masked layers in the style of Synaptic-Flow that compute ``weight_mask * weight``). A
scorer decides the effective weight the module must use (typically ``theta * mask``) and
:func:`ntkfast.core.state.substitute` puts it into the parameter's slot of the state while setting
the module's own mask buffer to ones, so that whatever masking mechanism the module has, it
computes with exactly that weight. The mask therefore acts once, whichever way it is stored.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, NamedTuple, Optional

import torch
from torch import nn

from .checks import check_mask
from .compiled import plain_name, real_names, unwrap

__all__ = ["prunable_parameters", "unpruned_weights", "parameter_name", "module_param", "attribute_name", "mask_buffer_name",
           "Target", "resolve_targets", "resolve_dtype", "model_device", "finish"]

_CONV_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)


def module_param(module: nn.Module, attr: str):
    """The tensor a mask for ``module.<attr>`` applies to: the parameter itself, or ``<attr>_orig``
    when torch.nn.utils.prune has re-parametrised it (of the original module, for a compiled one)."""
    module = unwrap(module)
    p = module._parameters.get(attr)
    if p is None:
        p = module._parameters.get(attr + "_orig")
    return p


def prunable_parameters(
    model: nn.Module, *, include_bias: bool = False, include_norm: bool = False, include=None
) -> "OrderedDict[str, nn.Parameter]":
    """Prunable tensors of ``model``, keyed by their names as in ``model.named_parameters()``.

    By default: the ``weight`` of every Linear and Conv1d/2d/3d module (subclasses included).
    ``include_bias`` adds those modules' biases; ``include_norm`` adds the affine weights of
    normalisation layers (and their biases with ``include_bias``). ``include`` adds other weight
    tensors of two or more dimensions (embeddings, transposed convolutions, the ``weight_ih_l*`` /
    ``weight_hh_l*`` of recurrent layers, ``nn.MultiheadAttention``'s fused ``in_proj_weight``...),
    picked as ``exclude=`` picks (names or patterns, module types, modules, a predicate, a list;
    see :mod:`ntkfast.core.exclude`); every entry must pick one. Where torch.nn.utils.prune has
    re-parametrised a weight, the key stays ``<module>.weight`` and the tensor is ``weight_orig``.
    Keys are the original module's names for a ``torch.compile``'d model (no ``_orig_mod.``).
    """
    out: "OrderedDict[str, nn.Parameter]" = OrderedDict()
    seen = set()
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        # a lazy module (nn.LazyLinear, LazyConv2d...) has no shape until its first forward
        raise ValueError(f"model: {lazy[0]!r} is not initialised yet (a lazy module); run one forward pass on an "
                         "example input first, so that its weights take their shapes")
    # a tied weight (a language model's output layer sharing the embedding table) is keyed by its
    # first name in named_parameters(), the one masks and optimisers see
    canonical = {id(p): n for n, p in model.named_parameters()}
    for mname, module in model.named_modules():
        attrs = []
        if isinstance(module, _CONV_LINEAR):
            attrs = ["weight"] + (["bias"] if include_bias else [])
        elif include_norm and isinstance(module, _NORM):
            attrs = ["weight"] + (["bias"] if include_bias else [])
        for attr in attrs:
            p = module_param(module, attr)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = canonical.get(id(p))
            out[plain_name(attribute_name(name) if name else (f"{mname}.{attr}" if mname else attr))] = p
    if include is None:
        return out
    return _with_included(model, out, include)


def _weight_tensors(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """Every parameter of two or more dimensions, in module order, keyed as masks are (a
    torch.nn.utils.prune ``<attr>_orig`` under ``<attr>``), each tensor once."""
    out: "OrderedDict[str, nn.Parameter]" = OrderedDict()
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p is None or p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            out[plain_name(attribute_name(f"{mname}.{pname}" if mname else pname))] = p
    return out


def _with_included(model: nn.Module, default: "OrderedDict[str, nn.Parameter]", include):
    from .exclude import resolve_spec

    every = _weight_tensors(model)
    picked = set(resolve_spec(model, include, list(every), "include", "weight tensor"))
    out = OrderedDict((n, p) for n, p in every.items() if n in default or n in picked)
    out.update((n, p) for n, p in default.items() if n not in out)  # biases and norms (1-D), in their order
    return out


def unpruned_weights(model: nn.Module, prunable: Mapping[str, torch.Tensor]) -> "OrderedDict[str, str]":
    """Parameters of two or more dimensions that are not among ``prunable`` (transposed
    convolutions, embeddings, bilinear layers, attention projections...): name -> module type, so
    that a caller can say by name what is left dense."""
    chosen = {id(p) for p in prunable.values()}
    out: "OrderedDict[str, str]" = OrderedDict()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p is not None and p.dim() >= 2 and id(p) not in chosen:
                out[plain_name(f"{mname}.{pname}" if mname else pname)] = type(module).__name__
    return out


def parameter_name(model: nn.Module, mask_name: str) -> str:
    """The name in ``model.named_parameters()`` of the tensor that mask ``mask_name`` applies to;
    a model compiled with ``torch.compile`` and its original module take masks keyed either way."""
    real = real_names(n for n, _ in model.named_parameters())
    name = plain_name(mask_name)
    for candidate in (name, name + "_orig"):
        if candidate in real:
            return real[candidate]
    raise KeyError(f"model has no parameter for mask {mask_name!r}")


def attribute_name(param_name: str) -> str:
    """The attribute a module computes with for a parameter name: ``a.b.weight_orig`` (torch.nn.utils.prune)
    -> ``a.b.weight``; other names unchanged."""
    return param_name[: -len("_orig")] if param_name.endswith("_orig") else param_name


def mask_buffer_name(buffers: Mapping[str, torch.Tensor], name: str, shape) -> Optional[str]:
    """The name of the ``<name>_mask`` buffer masking parameter ``name`` (an attribute name, e.g.
    ``a.b.weight``), if ``buffers`` has one of ``shape``; else None."""
    bname = name + "_mask"
    buf = buffers.get(bname)
    return bname if buf is not None and tuple(buf.shape) == tuple(shape) else None


# -- what is scored ------------------------------------------------------------------------------
class Target(NamedTuple):
    """One scored tensor.

    ``name``: the mask name (``<module>.weight``); ``param_name``: the name of the tensor in
    ``model.named_parameters()`` (``<module>.weight_orig`` under torch.nn.utils.prune hooks);
    ``param``: the model's parameter itself (read, never written); ``mask``: the effective bool mask
    (caller's mask AND the module's own mask buffer), on the parameter's device; ``mask_buffer``:
    the name in ``model.named_buffers()`` of the module's own ``<attr>_mask`` buffer, or None.
    """

    name: str
    param_name: str
    param: torch.Tensor
    mask: torch.Tensor
    mask_buffer: Optional[str]

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective mask as 0/1 values of ``dtype``."""
        return self.mask.to(dtype)


def resolve_targets(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None) -> "OrderedDict[str, Target]":
    """The tensors to score, in the order of ``masks`` (default: all ones over
    :func:`ntkfast.masks.prunable_parameters`), with their effective masks.

    Raises ValueError naming ``masks`` for unknown names, wrong shapes or non-tensors, and naming
    ``model`` when it has no prunable weight."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if masks is None:
        params = prunable_parameters(model)
        if not params:
            raise ValueError(
                f"model: no prunable weights found in {type(model).__name__} "
                "(expected Linear or Conv1d/2d/3d modules)"
            )
        masks = OrderedDict((n, torch.ones_like(p, dtype=torch.bool)) for n, p in params.items())
    elif not isinstance(masks, Mapping):
        raise ValueError(f"masks: expected a mapping name -> bool tensor (e.g. ntkfast.Masks), got {type(masks).__name__}")
    if len(masks) == 0:
        raise ValueError("masks: empty; nothing to score")
    named_params = dict(model.named_parameters())
    named_buffers = dict(model.named_buffers())
    real = real_names(named_params)
    out: "OrderedDict[str, Target]" = OrderedDict()
    for given, m in masks.items():
        name = plain_name(given)  # masks of a compiled model and of its original module are one
        if name in out:
            raise ValueError(f"masks: {given!r} and another key name the same weight {name!r}")
        if name in real:
            pname = real[name]
        elif name + "_orig" in real:
            pname = real[name + "_orig"]
        else:
            raise ValueError(f"masks: the model has no parameter for mask {given!r}")
        p = named_params[pname]
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"masks[{name!r}]: expected a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"masks[{name!r}]: shape {tuple(m.shape)} but the parameter has shape {tuple(p.shape)}")
        mask = check_mask(m, f"masks[{name!r}]").to(device=p.device)
        bname = mask_buffer_name(named_buffers, attribute_name(pname), p.shape)
        if bname is not None:
            mask = mask & check_mask(named_buffers[bname], f"model: buffer {bname}").to(p.device)
        out[name] = Target(name, pname, p, mask, bname)
    return out


def remask(model: nn.Module, targets: Mapping[str, Target], masks: Mapping[str, torch.Tensor]) -> "OrderedDict[str, Target]":
    """What ``resolve_targets(model, masks)`` gives when ``targets`` came from it for the same,
    unchanged model and ``masks`` names the same weights in the same order (each round of iterative
    pruning): the parameters and mask buffers are not looked up again, only the new masks checked
    and combined with the buffers. Anything else is handed to resolve_targets (its errors)."""
    if not isinstance(masks, Mapping) or len(masks) != len(targets):
        return resolve_targets(model, masks)
    out: "OrderedDict[str, Target]" = OrderedDict()
    for (given, m), t in zip(masks.items(), targets.values()):
        if (given != t.name and plain_name(given) != t.name) or not isinstance(m, torch.Tensor) \
                or m.shape != t.param.shape:
            return resolve_targets(model, masks)
        mask = check_mask(m, f"masks[{t.name!r}]").to(device=t.param.device)
        if t.mask_buffer is not None:
            mask = mask & check_mask(model.get_buffer(t.mask_buffer), f"model: buffer {t.mask_buffer}").to(t.param.device)
        out[t.name] = t._replace(mask=mask)
    return out


def resolve_dtype(targets: Mapping[str, Target], dtype=None) -> torch.dtype:
    """The computation dtype: ``dtype`` (a floating torch.dtype or its name, e.g. "float64"), or
    None for the dtype of the first scored parameter."""
    if dtype is None:
        first = next(iter(targets.values())).param
        return first.dtype if first.is_floating_point() else torch.get_default_dtype()
    given = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype such as torch.float64, got {given!r}")
    return dtype


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def finish(scores: Mapping[str, torch.Tensor], targets: Mapping[str, Target]) -> "OrderedDict[str, torch.Tensor]":
    """Detached scores in the order of ``targets``, each on its parameter's device and of its shape."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for n, t in targets.items():
        s = scores[n].detach()
        out[n] = s.to(t.param.device).reshape(t.param.shape)
    return out
