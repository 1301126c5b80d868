"""NTK-SAP's perturbed masked weights, forward + backward: ``ntkfast.ops.perturbed_masked`` (one
fused op; the noise is regenerated from Philox in the backward, never stored) against the unfused
PyTorch way.

For every Conv/Linear weight of ``ntkfast.models.resnet20()`` (22 tensors, 270,896 entries) or
``vgg16()`` (14 tensors, 14,715,584 entries), drawn P times (weights ``[P, *shape]`` sharing one
0/1 mask; P = 1: just ``shape``), float32, epsilon 0.01, random upstream gradients ``g``:

    peer:  xi = torch.randn_like(w)                      # per layer, kept alive by autograd
           outs += [w * m, (w + eps * xi) * m]           # every layer first (a network forward)
           torch.autograd.grad(outs, weights + masks, gs)
    ours:  outs += [perturbed_masked(w, m, eps, seed, offset)]   # offset = running numel
           torch.autograd.grad(outs, weights + masks, gs)

Both return the outputs and the gradients. The sides draw different noise, so the check compares
ntkfast with the peer's arithmetic run (untimed) on ntkfast's own noise (``philox_normal``):
``rel_err`` = ||ours - peer|| / ||peer|| over all outputs and gradients. ``grad_weight_rel_err``
compares the timed runs' weight gradients, (g0 + g1) * m, which do not depend on the noise.

    python -m benchmarks.bench_perturbed_masked --device cuda
    python -m benchmarks.bench_perturbed_masked --quick          # channels / 8, for smoke tests
"""
from __future__ import annotations

import math
import sys
from typing import List

import torch
from torch import nn

from .common import Case, Suite, rel_err_norm
from .floor import record, tensor_bytes, traffic_s

EPSILON = 0.01
MODELS = ("resnet20", "vgg16")
DRAWS = (1, 5)


def weight_shapes(model_name: str, channel_div: int = 1) -> List[tuple]:
    """Shapes of the Conv/Linear weights of a zoo model, output and input channels divided by
    ``channel_div`` (for --quick)."""
    from ntkfast import models

    model = models.get(model_name)
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [tuple(max(1, d // channel_div) for d in s[:2]) + s[2:] for s in shapes]


def _forward_peer(ws, ms, noise):
    outs = []
    for w, m, xi in zip(ws, ms, noise):
        outs += [w * m, (w + EPSILON * xi) * m]
    return outs


def peer_perturbed(st):
    outs = _forward_peer(st["w"], st["m"], (torch.randn_like(w) for w in st["w"]))
    grads = torch.autograd.grad(outs, st["w"] + st["m"], [h for g in st["g"] for h in (g[0], g[1])])
    return [torch.stack(outs[i : i + 2]) for i in range(0, len(outs), 2)], list(grads)


def ours_perturbed(st):
    from ntkfast.ops import perturbed_masked

    outs = [perturbed_masked(w, m, EPSILON, st["seed"], off) for w, m, off in zip(st["w"], st["m"], st["offsets"])]
    grads = torch.autograd.grad(outs, st["w"] + st["m"], st["g"])
    return outs, list(grads)


def _make_case(model_name: str, draws: int, quick: bool, seed: int) -> Case:
    channel_div = 8 if quick else 1
    shapes = weight_shapes(model_name, channel_div)
    wshapes = [((draws,) if draws > 1 else ()) + s for s in shapes]
    numel = sum(math.prod(s) for s in wshapes)
    params = {
        "model": model_name + (f" (channels / {channel_div})" if channel_div > 1 else ""),
        "tensors": len(shapes),
        "draws": draws,
        "numel": numel,
        "mask_numel": sum(math.prod(s) for s in shapes),
        "dtype": "float32",
        "epsilon": EPSILON,
        "seed": seed,
    }

    def setup(device):
        gen = torch.Generator(device=device).manual_seed(seed)
        w = [torch.randn(s, device=device, generator=gen).requires_grad_() for s in wshapes]
        m = [(torch.rand(s, device=device, generator=gen) < 0.5).float().requires_grad_() for s in shapes]
        g = [torch.randn((2,) + s, device=device, generator=gen) for s in wshapes]
        offsets = [0]
        for s in wshapes[:-1]:
            offsets.append(offsets[-1] + math.prod(s))
        return {"w": w, "m": m, "g": g, "offsets": offsets, "seed": seed}

    def compare(st, peer_out, ours_out):
        from ntkfast.ops import philox_normal

        L = len(st["w"])
        out = {"grad_weight_rel_err": rel_err_norm(peer_out[1][:L], ours_out[1][:L])}
        del peer_out
        noise = [philox_normal(w.shape, st["seed"], off, device=w.device) for w, off in zip(st["w"], st["offsets"])]
        outs = _forward_peer(st["w"], st["m"], noise)
        grads = torch.autograd.grad(outs, st["w"] + st["m"], [h for g in st["g"] for h in (g[0], g[1])])
        matched = [torch.stack(outs[i : i + 2]) for i in range(0, len(outs), 2)] + list(grads)
        out["rel_err"] = rel_err_norm(matched, list(ours_out[0]) + list(ours_out[1]))
        return out

    def floor(st):
        # forward: read w and m, write both perturbed copies; backward: read the two cotangents,
        # write the gradients of w and m (the noise is regenerated, never stored)
        w_bytes, m_bytes = tensor_bytes(st["w"]), tensor_bytes(st["m"])
        moved = w_bytes + m_bytes + 2 * w_bytes + 2 * w_bytes + w_bytes + m_bytes
        return record(traffic_s(moved, st["w"][0].device), "every tensor the op and its gradient read or write, "
                      "moved once at the copy bandwidth", bytes=moved)

    return Case(name=f"{model_name}-P{draws}", params=params, setup=setup, peer=peer_perturbed, ours=ours_perturbed,
                compare=compare, floor=floor)


def make_cases(args) -> List[Case]:
    return [_make_case(name, p, args.quick, args.seed) for name in MODELS for p in DRAWS]


SUITE = Suite("perturbed_masked", make_cases, seed="the inputs and of the Philox stream",
              peer="torch.randn_like stored xi, w * m and (w + eps * xi) * m per layer, torch.autograd.grad",
              ours="ntkfast.ops.perturbed_masked(w, m, eps, seed, offset) per layer, torch.autograd.grad")

if __name__ == "__main__":
    sys.exit(SUITE.main())
