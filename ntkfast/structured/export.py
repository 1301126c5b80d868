"""Physical removal of pruned channels with Torch-Pruning (VainF/Torch-Pruning, ``pip install
torch-pruning``), an optional dependency.

Channel masks only zero weights: the network keeps its shapes and its cost. Removing a channel
for real means cutting the filter, its bias, its BatchNorm entry and the input slice of every
layer that reads the channel, through residual sums, concatenations and flattens; resolving that
web of dependencies is Torch-Pruning's whole job (its DependencyGraph), so ntkfast hands the
removal to it rather than keeping a second implementation. ntkfast still checks the masks first:
every channel Torch-Pruning would cut together must be pruned in the masks, and every weight it
would cut must be pruned there, so the smaller model computes exactly what the masked one does.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core.compiled import unwrap
from ..core.state import copy_model
from ..masks import Masks
from .trace import channel_layers

__all__ = ["export_torch_pruning", "import_torch_pruning"]


def import_torch_pruning():
    """The torch_pruning module, or ImportError saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise ImportError("export_torch_pruning needs Torch-Pruning: pip install torch-pruning "
                          "(or pip install 'ntkfast[export]')") from None
    return torch_pruning


def _dead_rows(mask: torch.Tensor) -> list:
    return torch.nonzero(~mask.reshape(mask.shape[0], -1).any(1)).flatten().tolist()


def _bake_prune_hooks(model: nn.Module) -> None:
    """torch.nn.utils.prune's re-parametrisation made permanent (weight = weight_orig * mask), on
    the copy, since Torch-Pruning cuts plain parameters."""
    import torch.nn.utils.prune as tprune

    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tprune.remove(m, hook._tensor_name)


def export_torch_pruning(model: nn.Module, masks: Mapping[str, torch.Tensor], example_inputs) -> nn.Module:
    """A smaller copy of ``model`` with the pruned channels of ``masks`` removed physically.

    ``masks``: channel masks (:func:`ntkfast.structured.channel_masks`, or :func:`ntkfast.prune`
    with ``structure="channel"``); ``example_inputs``: a batch the model accepts (a tensor or a
    tuple of positional inputs), for Torch-Pruning's trace. The copy gets the masks applied (so
    unstructured zeros inside kept channels stay zero), then every output channel whose filter is
    all pruned is cut, with whatever Torch-Pruning ties to it: the matching bias entries,
    BatchNorm channels, tied layers' channels and the input slices of the layers that read them.
    In eval mode its outputs equal ``masks.apply(copy.deepcopy(model))``'s.

    ValueError naming ``masks`` when they are not channel masks: a channel pruned in one layer but
    kept in a layer tied to it, or a layer still reading (with kept weights) a channel that is cut.
    ImportError when torch-pruning is not installed. ``model`` itself is not changed.
    """
    tp = import_torch_pruning()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Masks):
        masks = Masks(masks)
    model = unwrap(model)
    masks._check_model(model)  # names and shapes, before any work
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs: expected a tensor or a tuple of tensors")

    small = copy_model(model)  # deepcopy, also of a model under torch.nn.utils.prune hooks
    _bake_prune_hooks(small)
    masks.apply(small)
    flags = {m: m.training for m in small.modules()}
    wanted = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in small.parameters():  # Torch-Pruning follows the autograd graph
            p.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(small, example_inputs=inputs, verbose=False)
        layers = channel_layers(small)
        by_module = {m: n for n, m in layers.items()}
        plan = []
        done = set()
        for name, module in layers.items():
            weight = f"{name}.weight"
            if weight not in masks or module in done:
                continue
            dead = _dead_rows(masks[weight])
            if not dead:
                continue
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, dead)
            _check_group(group, graph, masks, by_module, name)
            for item in group:
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    done.add(item.dep.target.module)
            plan.append(group)
        # each group cuts the output channels of its own layers alone, so the indices of the
        # others, taken before any cut, stay right
        for group in plan:
            group.prune()
    finally:
        for m, t in flags.items():
            m.training = t
        # the cut parameters are new ones: they take the model's own setting back by name
        for n, p in small.named_parameters():
            p.requires_grad_(wanted.get(n, True))
    return small


def _check_group(group, graph, masks, by_module, root: str) -> None:
    """Every cut that ``group`` makes on a Conv/Linear weight of ``masks`` must only remove
    weights the masks already pruned: first the tied channels, then the readers' inputs."""
    cuts = []
    for item in group:
        name = by_module.get(item.dep.target.module)
        if name is not None and f"{name}.weight" in masks:
            cuts.append((name, masks[f"{name}.weight"], item.dep.handler, list(item.idxs)))
    for name, m, handler, idxs in cuts:
        if graph.is_out_channel_pruning_fn(handler):
            kept = [i for i in idxs if bool(m[i].any())]
            if kept:
                raise ValueError(f"masks: output channels {kept[:8]} of {name} are tied to pruned channels of {root} "
                                 "but kept; these are not channel masks (make them with "
                                 "ntkfast.structured.channel_masks)")
    for name, m, handler, idxs in cuts:
        if graph.is_in_channel_pruning_fn(handler) and m.dim() > 1 and m.shape[1] > 1:
            reading = [i for i in idxs if bool(m[:, i].any())]
            if reading:
                raise ValueError(f"masks: {name} keeps weights on its inputs {reading[:8]}, which read pruned channels "
                                 f"of {root}; removing them would change its outputs (make the masks with "
                                 "ntkfast.structured.channel_masks)")
