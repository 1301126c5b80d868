"""Iterative SynFlow (100 rounds, exponential schedule, density 0.01, global scope) on CIFAR
ResNet-20 and VGG-16: ``ntkfast.prune(model, "synflow", ...)`` against a plain-PyTorch loop.

The peer is written from the algorithm the way the Synaptic-Flow authors' code runs it (not
copied): ``weight_mask`` buffers on every Conv/Linear; each round, with the model in eval mode,
``abs_()`` of every tensor of ``model.state_dict()`` in place (signs kept to restore them), an
all-ones input of batch 1, ``sum(output).backward()``, score = |grad * weight|, signs restored,
``torch.cat`` of all scores + ``torch.kthvalue`` for the round's threshold, mask =
``where(score <= threshold, 0, 1)``, ``weight.mul_(mask)``. Both sides start from the same
weights (a deepcopy of one model per run).

Masking rule: by default both sides use the authors' rule (the peer natively; ntkfast with
``keep_rule="authors"``): prune int((1 - d_t) * numel) by kthvalue and every entry tied at the
threshold, so the masks must be identical bit for bit. ``--peer-k round`` makes the peer prune
numel - round(d_t * numel) and runs ntkfast's default exact-k rule: then the masks can differ
where scores tie at a threshold (the benchmark reports both kept counts and the differing
fraction).

    python -m benchmarks.bench_synflow --device cpu            # full size
    python -m benchmarks.bench_synflow --device cuda
    python -m benchmarks.bench_synflow --quick                 # 5 rounds, for smoke tests
"""
from __future__ import annotations

import copy
import importlib
import math
import sys
from collections import OrderedDict
from typing import List

import torch
from torch import nn

from .common import Case, Suite, compare_masks, rel_err_norm
from .floor import path_floor

INPUT_SHAPE = (3, 32, 32)  # CIFAR
NUM_CLASSES = 10
MODELS = ("resnet20", "vgg16")
_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ----------------------------------------------------------------------------------------------
# the peer: a plain-PyTorch loop in the style of the authors' code
# ----------------------------------------------------------------------------------------------


def prunable_layers(model: nn.Module) -> List[tuple]:
    """(name of the weight, module) for every Conv/Linear, in module order."""
    return [(f"{n}.weight" if n else "weight", m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]


def peer_synflow_scores(model: nn.Module, layers: List[tuple], x: torch.Tensor) -> List[torch.Tensor]:
    """One SynFlow scoring pass, state-dict style: abs of everything, ones in, sum out, backward."""
    with torch.no_grad():
        signs = {}
        for name, t in model.state_dict().items():
            signs[name] = torch.sign(t)
            t.abs_()
    model.zero_grad(set_to_none=True)
    torch.sum(model(x)).backward()
    with torch.no_grad():
        scores = [(m.weight.grad * m.weight).abs_() for _, m in layers]
        for name, t in model.state_dict().items():
            t.mul_(signs[name])
    model.zero_grad(set_to_none=True)
    return scores


def peer_synflow(model: nn.Module, density: float, rounds: int, k_rule: str = "round",
                 score_fn=peer_synflow_scores) -> "OrderedDict[str, torch.Tensor]":
    """Iterative SynFlow, exponential schedule, global scope; prunes ``model`` in place and
    returns its masks (name -> bool tensor). ``score_fn`` scores one round (a variant's peer)."""
    layers = prunable_layers(model)
    for _, m in layers:
        m.register_buffer("weight_mask", torch.ones_like(m.weight))
    model.eval()
    p = layers[0][1].weight
    x = torch.ones((1,) + INPUT_SHAPE, device=p.device, dtype=p.dtype)
    zero = torch.tensor([0.0], device=p.device, dtype=p.dtype)
    one = torch.tensor([1.0], device=p.device, dtype=p.dtype)
    for t in range(1, rounds + 1):
        scores = score_fn(model, layers, x)
        d = density ** (t / rounds)
        with torch.no_grad():
            flat = torch.cat([torch.flatten(s) for s in scores])
            numel = flat.numel()
            if k_rule == "authors":
                n_prune = int((1.0 - d) * numel)
            else:
                n_prune = numel - max(0, min(numel, int(math.floor(d * numel + 0.5))))
            if n_prune >= 1:
                threshold, _ = torch.kthvalue(flat, n_prune)
                for (_, m), s in zip(layers, scores):
                    m.weight_mask.copy_(torch.where(s <= threshold, zero, one))
            del flat, scores
            for _, m in layers:
                m.weight.mul_(m.weight_mask)
    return OrderedDict((name, m.weight_mask.bool()) for name, m in layers)


# ----------------------------------------------------------------------------------------------
# ntkfast
# ----------------------------------------------------------------------------------------------


def ours_synflow(model: nn.Module, density: float, rounds: int, k_rule: str = "authors"):
    """ntkfast's loop; with k_rule "authors" it uses the authors' masking rule (their count, ties at
    the threshold pruned), so the two sides must agree bit for bit."""
    import ntkfast

    return ntkfast.prune(model, "synflow", density, rounds=rounds, schedule="exponential", scope="global",
                         progress=False, on_empty_layer="ignore",
                         keep_rule="authors" if k_rule == "authors" else "exact")


def _ntkfast_scorer():
    """ntkfast's registered SynFlow scorer, or None if it is not there."""
    from ntkfast import scores

    try:
        importlib.import_module("ntkfast.scores.synflow")
    except ImportError:
        pass
    try:
        return scores.get("synflow").fn
    except ValueError:
        return None


def build_model(name: str, device: torch.device, seed: int) -> nn.Module:
    from ntkfast import models

    ctor = getattr(models, name, None)
    if ctor is None:
        raise SystemExit(f"ntkfast.models.{name} does not exist (yet)")
    torch.manual_seed(seed)
    model = ctor().to(device)
    with torch.no_grad():
        out = model.eval()(torch.ones((1,) + INPUT_SHAPE, device=device))
    if tuple(out.shape) != (1, NUM_CLASSES):
        raise SystemExit(f"ntkfast.models.{name}() gives output shape {tuple(out.shape)} for a CIFAR input, "
                         f"expected (1, {NUM_CLASSES})")
    return model


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def _make_case(model_name: str, args) -> Case:
    rounds, density, k_rule, seed = args.rounds, args.density, args.peer_k, args.seed
    params = {"model": model_name, "input": list(INPUT_SHAPE), "classes": NUM_CLASSES, "rounds": rounds,
              "density": density, "schedule": "exponential", "scope": "global", "peer_k": k_rule, "seed": seed}

    def setup(device):
        model = build_model(model_name, device, seed)
        params["prunable"] = sum(m.weight.numel() for _, m in prunable_layers(model))
        return {"model": model}

    def prepare(st):
        return (copy.deepcopy(st["model"]),)

    def peer(model):
        return peer_synflow(model, density, rounds, k_rule)

    def ours(model):
        return ours_synflow(model, density, rounds, k_rule)

    def compare(st, peer_masks, ours_masks):
        names = list(peer_masks.keys())
        if set(ours_masks.keys()) != set(names):
            raise SystemExit(f"ntkfast.prune returned masks for {sorted(ours_masks.keys())}, the peer for {sorted(names)}")
        out = compare_masks([peer_masks[n] for n in names], [ours_masks[n] for n in names], names)
        numel = out["numel"]
        if k_rule == "authors":  # both sides keep at most k: entries tied at the threshold are pruned
            out["k"] = numel - int((1.0 - density) * numel)
        else:
            out["k"] = max(0, min(numel, int(math.floor(density * numel + 0.5))))
            out["ours_keeps_k"] = out["ours_kept"] == out["k"]
        return out

    def checks(st):
        """Round 1 scores of both sides on the dense model (ntkfast's registered scorer)."""
        scorer = _ntkfast_scorer()
        if scorer is None:
            return {"score_rel_err": None, "score_check": "ntkfast has no 'synflow' scorer registered"}
        from ntkfast import Masks

        m_peer, m_ours = copy.deepcopy(st["model"]), copy.deepcopy(st["model"])
        layers = prunable_layers(m_peer)
        p = layers[0][1].weight
        m_peer.eval()
        ref = peer_synflow_scores(m_peer, layers, torch.ones((1,) + INPUT_SHAPE, device=p.device, dtype=p.dtype))
        got = scorer(m_ours, Masks.ones(m_ours), input_shape=INPUT_SHAPE)
        names = [n for n, _ in layers]
        missing = [n for n in names if n not in got]
        if missing:
            return {"score_rel_err": None, "score_check": f"scorer gave no score for {missing[:3]}"}
        return {"score_rel_err": rel_err_norm(ref, [got[n] for n in names]),
                "score_check": "round-1 SynFlow scores, ||ours - peer|| / ||peer||"}

    return Case(name=f"{model_name}-r{rounds}-d{density}", params=params, setup=setup, prepare=prepare, peer=peer,
                ours=ours, compare=compare, checks=checks, floor=lambda st: path_floor(st["model"], rounds))


def make_cases(args) -> List[Case]:
    if args.rounds is None:
        args.rounds = 5 if args.quick else 100
    return [_make_case(m, args) for m in args.models.split(",") if m]


def _add_args(p):
    p.add_argument("--rounds", type=int, default=None, help="pruning rounds (default 100; --quick 5)")
    p.add_argument("--density", type=float, default=0.01, help="final density (default 0.01)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated ntkfast.models names (default {','.join(MODELS)})")
    p.add_argument("--peer-k", choices=["round", "authors"], default="authors",
                   help="masking rule of both sides: 'authors' (default; their count n - int((1-d)*n), ties at "
                        "the threshold pruned; ntkfast runs with keep_rule='authors' and must match bit for bit) "
                        "or 'round' (peer prunes n - round(d*n) by kthvalue, ntkfast keeps exactly round(d*n): "
                        "masks may differ on ties)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")


def _option_argv(args) -> List[str]:
    out = []
    if args.rounds != (5 if args.quick else 100):
        out += ["--rounds", str(args.rounds)]
    if args.density != 0.01:
        out += ["--density", repr(args.density)]
    if args.models != ",".join(MODELS):
        out += ["--models", args.models]
    if args.peer_k != "authors":
        out += ["--peer-k", args.peer_k]
    if args.seed != 0:
        out += ["--seed", str(args.seed)]
    return out


SUITE = Suite("synflow", make_cases, runs=(3, 1), add_args=_add_args, option_argv=_option_argv,
              peer="plain-PyTorch iterative SynFlow in the authors' style (state-dict abs_ in place, ones input, "
                   "backward, torch.cat + torch.kthvalue per round, where(score <= thr, 0, 1), weight.mul_(mask))",
              ours='ntkfast.prune(model, "synflow", density, rounds=rounds, keep_rule="authors", progress=False)')

if __name__ == "__main__":
    sys.exit(SUITE.main())
