"""The Path Kernel: tr Π and iterative SynFlow-L2, ntkfast against the way the authors' code
computes them, in the same process, on fresh zoo models in eval mode.

tr Π (ResNet-20, VGG-16 on CIFAR inputs; ResNet-50 on ImageNet inputs): the peer copies the model,
squares every floating tensor of its state dict in place, feeds an all-ones input of batch 1, runs
``sum(output).backward()`` and sums the gradients of the prunable weights (Σ_θ ∂R₂/∂(θ²)).
ntkfast: ``ntkfast.pathkernel.trace`` (one forward and one backward pass through the activations
only; an unmasked layer's Σ b[j]·a[i] from channel sums).

Iterative SynFlow-L2 (the Path Kernel authors' score |θ|·|θ ⊙ ∂R₁/∂θ|), 100 rounds, exponential
schedule to density 0.01, global scope, ResNet-20 and VGG-16: the peer is the Synaptic-Flow
authors' loop (as in ``bench_synflow``: ``abs_()`` of the state dict in place, ones input,
backward, signs restored, ``torch.cat`` + ``kthvalue``, ``weight.mul_(mask)``) with the L2 score;
ntkfast: ``ntkfast.prune(model, "synflow_l2", ..., keep_rule="authors")``. Both sides in the
same dtype (``--dtype``, default float32, the peer's natural one); the masks must be identical.

    python -m benchmarks.bench_pathkernel [--dtype float64] [--quick]
"""
from __future__ import annotations

import copy
import math
import sys
from collections import OrderedDict
from typing import List

import torch
from torch import nn

from .bench_synflow import peer_synflow, peer_synflow_scores, prunable_layers
from .common import Case, Suite, compare_masks
from .floor import path_floor

TRACE_MODELS = ("resnet20", "vgg16", "resnet50")
SYNFLOW_MODELS = ("resnet20", "vgg16")


def _model(name: str, device, dtype, seed: int = 0) -> nn.Module:
    from ntkfast import models

    torch.manual_seed(seed)
    return models.get(name).to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------
# tr Π
# ----------------------------------------------------------------------------------------------


def peer_trace(model: nn.Module) -> float:
    """The authors' way: a squared copy of the model, ones in, backward, Σ of the weights' gradients."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.square_()
    layers = prunable_layers(m)
    p = layers[0][1].weight
    x = torch.ones((1,) + tuple(model.input_shape), dtype=p.dtype, device=p.device)
    m.zero_grad(set_to_none=True)
    m(x).sum().backward()
    return float(sum(mod.weight.grad.sum() for _, mod in layers))


def ours_trace(model: nn.Module) -> float:
    from ntkfast import pathkernel

    return pathkernel.trace(model, dtype=next(model.parameters()).dtype)


def _trace_case(model_name: str, dtype: torch.dtype) -> Case:
    params = {"work": "trace", "model": model_name, "dtype": str(dtype).replace("torch.", ""), "batch": 1}

    def setup(device):
        model = _model(model_name, device, dtype)
        params["input"] = list(model.input_shape)
        params["prunable"] = sum(m.weight.numel() for _, m in prunable_layers(model))
        return {"model": model}

    def compare(st, peer_out, ours_out):
        return {"rel_err": abs(ours_out - peer_out) / abs(peer_out), "trace": ours_out}

    return Case(name=f"trace-{model_name}", params=params, setup=setup, prepare=lambda st: (st["model"],),
                peer=peer_trace, ours=ours_trace, compare=compare,
                floor=lambda st: path_floor(st["model"], select=False))


# ----------------------------------------------------------------------------------------------
# iterative SynFlow-L2
# ----------------------------------------------------------------------------------------------


def peer_synflow_l2_scores(model: nn.Module, layers: List[tuple], x: torch.Tensor) -> List[torch.Tensor]:
    """One SynFlow-L2 scoring pass in the authors' style: |θ| · |θ ⊙ ∂R₁/∂θ|."""
    return [s.mul_(m.weight.detach().abs()) for s, (_, m) in zip(peer_synflow_scores(model, layers, x), layers)]


def peer_synflow_l2(model: nn.Module, density: float, rounds: int) -> "OrderedDict[str, torch.Tensor]":
    """Iterative SynFlow-L2, exponential schedule, global scope, the authors' masking step; prunes
    ``model`` in place and returns its masks."""
    return peer_synflow(model, density, rounds, "authors", score_fn=peer_synflow_l2_scores)


def ours_synflow_l2(model: nn.Module, density: float, rounds: int):
    import ntkfast

    return ntkfast.prune(model, "synflow_l2", density, rounds=rounds, schedule="exponential", scope="global",
                         progress=False, on_empty_layer="ignore", keep_rule="authors",
                         dtype=next(model.parameters()).dtype)


def _synflow_case(model_name: str, dtype: torch.dtype, rounds: int, density: float) -> Case:
    params = {"work": "iterative synflow_l2", "model": model_name, "dtype": str(dtype).replace("torch.", ""),
              "rounds": rounds, "density": density, "schedule": "exponential", "scope": "global",
              "keep_rule": "authors"}

    def setup(device):
        model = _model(model_name, device, dtype)
        params["prunable"] = sum(m.weight.numel() for _, m in prunable_layers(model))
        return {"model": model}

    def compare(st, peer_masks, ours_masks):
        names = list(peer_masks.keys())
        out = compare_masks([peer_masks[n] for n in names], [ours_masks[n] for n in names], names)
        out["k"] = out["numel"] - int((1.0 - density) * out["numel"])
        return out

    return Case(name=f"synflow_l2-{model_name}-r{rounds}", params=params, setup=setup,
                prepare=lambda st: (copy.deepcopy(st["model"]),),
                peer=lambda m: peer_synflow_l2(m, density, rounds), ours=lambda m: ours_synflow_l2(m, density, rounds),
                compare=compare, floor=lambda st: path_floor(st["model"], rounds))


def make_cases(args) -> List[Case]:
    dtype = getattr(torch, args.dtype)
    rounds = 5 if args.quick and args.rounds is None else (args.rounds or 100)
    trace_models = ("resnet20",) if args.quick else TRACE_MODELS
    synflow_models = ("resnet20",) if args.quick else SYNFLOW_MODELS
    return ([_trace_case(m, dtype) for m in trace_models]
            + [_synflow_case(m, dtype, rounds, args.density) for m in synflow_models])


def _add_args(p):
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="dtype of both sides (default float32, the peer's)")
    p.add_argument("--rounds", type=int, default=None, help="SynFlow-L2 rounds (default 100; --quick 5)")
    p.add_argument("--density", type=float, default=0.01, help="SynFlow-L2 final density (default 0.01)")


def _option_argv(args) -> List[str]:
    out = []
    if args.dtype != "float32":
        out += ["--dtype", args.dtype]
    if args.rounds is not None:
        out += ["--rounds", str(args.rounds)]
    if not math.isclose(args.density, 0.01):
        out += ["--density", repr(args.density)]
    return out


SUITE = Suite("pathkernel", make_cases, runs=(3, 1), add_args=_add_args, option_argv=_option_argv,
              peer="the authors' way: tr Π from a squared model copy, ones input, backward, sum of gradients; iterative "
                   "SynFlow-L2 as the Synaptic-Flow loop (state-dict abs_, ones, backward, cat + kthvalue) with |θ|·SynFlow",
              ours="ntkfast.pathkernel.trace; ntkfast.prune(model, 'synflow_l2', ..., keep_rule='authors')")

if __name__ == "__main__":
    sys.exit(SUITE.main())
