"""N:M semi-structured masking: ``ntkfast.ops.nm_mask`` against reshape + ``torch.topk`` + scatter.

The score lists have the shapes of real networks' weights, each viewed as the matrix whose rows
the N:M groups run along (the dimension the op groups over is the last):

- ``resnet50``: torchvision's ResNet-50 convolutions and classifier, each weight as
  ``[out, in * kh * kw]`` (``nm_masks(..., layout="flat")``: no copy), without the stem
  (3 * 7 * 7 = 147 inputs, which no M > 1 of 2, 4, 8 divides): 53 tensors, 25,493,504 entries;
- ``vitb``: ViT-B/16's Linear weights (12 blocks of qkv [2304, 768], proj [768, 768],
  fc1 [3072, 768], fc2 [768, 3072], and the head [1000, 768]): 49 tensors, 85,702,656 entries.

Random normal scores: in float32 no group has a tie, so both sides must agree exactly; in bfloat16
(8 significant bits) some groups do, where ``topk`` may keep either entry and ntkfast keeps the
lower index, so a difference is allowed only where both sides kept the same values
(``diff_only_ties``). The peer is what one would write
in plain PyTorch, per tensor:

    idx = s.reshape(-1, m).topk(n, dim=1).indices          # (+ forbidden entries set to -inf)
    mask = zeros_like(s, bool).reshape(-1, m).scatter_(1, idx, True).reshape(s.shape)

    python -m benchmarks.bench_nm_mask --device cpu          # full size
    python -m benchmarks.bench_nm_mask --quick               # tiny, for smoke tests
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional

import torch

from .bench_topk_mask import resnet50_weight_shapes
from .common import Case, Suite, compare_masks
from .floor import selection_floor


def resnet50_rows(width_div: int = 1) -> List[tuple]:
    """ResNet-50's weights as [out, in * kh * kw], the stem left out."""
    return [(s[0], math.prod(s[1:])) for s in resnet50_weight_shapes(width_div)[1:]]


def vitb_rows(width_div: int = 1, num_classes: int = 1000) -> List[tuple]:
    """ViT-B/16's Linear weights [out, in] (12 blocks, width 768, MLP 3072), then the head."""
    d, hidden = 768 // width_div, 3072 // width_div
    shapes = []
    for _ in range(12):
        shapes += [(3 * d, d), (d, d), (hidden, d), (d, hidden)]
    return shapes + [(num_classes, d)]


assert sum(math.prod(s) for s in resnet50_rows()) == 25_493_504 and len(resnet50_rows()) == 53
assert sum(math.prod(s) for s in vitb_rows()) == 85_702_656 and len(vitb_rows()) == 49


def peer_nm(scores: List[torch.Tensor], n: int, m: int, keep: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    out = []
    for i, s in enumerate(scores):
        g = s.reshape(-1, m)
        if keep is not None:  # forbidden entries rank last (on ties with -inf, topk may still pick one: & keep)
            g = g.masked_fill(~keep[i].reshape(-1, m), float("-inf"))
        idx = g.topk(n, dim=1).indices
        mask = torch.zeros(g.shape, dtype=torch.bool, device=s.device).scatter_(1, idx, True).reshape(s.shape)
        out.append(mask & keep[i] if keep is not None else mask)
    return out


def _same_values_kept(scores: torch.Tensor, peer: torch.Tensor, ours: torch.Tensor, m: int) -> bool:
    """In every group where the masks differ, the two sides kept as many entries, of the same values."""
    p, o = peer.reshape(-1, m).to(ours.device), ours.reshape(-1, m)
    rows = (p != o).any(1)
    if not bool(rows.any()):
        return True
    s = scores.reshape(-1, m)[rows].float()
    low = torch.tensor(float("-inf"), device=s.device)
    kept_p = torch.where(p[rows], s, low).sort(1).values
    kept_o = torch.where(o[rows], s, low).sort(1).values
    return torch.equal(p[rows].sum(1), o[rows].sum(1)) and torch.equal(kept_p, kept_o)


def ours_nm(scores: List[torch.Tensor], n: int, m: int, keep: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    from ntkfast.ops import nm_mask

    return [nm_mask(s, n, m, None if keep is None else keep[i]) for i, s in enumerate(scores)]


def _make_case(name: str, net: str, dtype: torch.dtype, n: int, m: int, keep_density: Optional[float], quick: bool,
               seed: int) -> Case:
    width_div = 8 if quick else 1
    shapes = resnet50_rows(width_div) if net == "resnet50" else vitb_rows(width_div)
    params = {
        "shapes": f"{net} weights as [out, -1]" + (f" (channels / {width_div})" if width_div > 1 else ""),
        "tensors": len(shapes),
        "numel": sum(math.prod(s) for s in shapes),
        "dtype": str(dtype).replace("torch.", ""),
        "structure": f"{n}:{m}",
        "keep_density": keep_density,
        "scores": "torch.randn",
        "seed": seed,
    }

    def setup(device):
        gen = torch.Generator(device=device).manual_seed(seed)
        scores = [torch.randn(s, dtype=dtype, device=device, generator=gen) for s in shapes]
        keep = None
        if keep_density is not None:
            keep = [torch.rand(s, device=device, generator=gen) < keep_density for s in shapes]
        return {"scores": scores, "keep": keep}

    def prepare(st):
        return (st["scores"], n, m, st["keep"])

    def compare(st, peer_masks, ours_masks):
        out = compare_masks(peer_masks, ours_masks)
        if not out["identical"]:
            # bfloat16 has 8 significant bits: randn scores tie inside some groups, where topk may pick
            # either entry; a difference is only a tie if both sides kept the same values in that group
            out["diff_only_ties"] = all(_same_values_kept(sc, p, o, m) for sc, p, o in
                                        zip(st["scores"], peer_masks, ours_masks))
        per_group = [o.reshape(-1, m).sum(1) for o in ours_masks]
        if st["keep"] is None:
            out["ours_exactly_n_per_group"] = all(bool((g == n).all()) for g in per_group)
        else:
            out["ours_exactly_min_n_alive"] = all(
                torch.equal(g, kp.reshape(-1, m).sum(1).clamp(max=n)) for g, kp in zip(per_group, st["keep"]))
        return out

    return Case(name=name, params=params, setup=setup, prepare=prepare, peer=peer_nm, ours=ours_nm, compare=compare,
                floor=lambda st: selection_floor(st["scores"], st["keep"]))


def make_cases(args) -> List[Case]:
    q, s = args.quick, args.seed
    return [
        _make_case("resnet50-f32-2:4", "resnet50", torch.float32, 2, 4, None, q, s),
        _make_case("resnet50-f32-keep0.8-2:4", "resnet50", torch.float32, 2, 4, 0.8, q, s),
        _make_case("resnet50-f32-4:8", "resnet50", torch.float32, 4, 8, None, q, s),
        _make_case("vitb-f32-2:4", "vitb", torch.float32, 2, 4, None, q, s),
        _make_case("vitb-bf16-2:4", "vitb", torch.bfloat16, 2, 4, None, q, s),
    ]


SUITE = Suite("nm_mask", make_cases, seed="the random scores",
              peer="per tensor: reshape(-1, m).topk(n, dim=1) + scatter_ into a bool mask (forbidden entries -inf, then & keep)",
              ours="ntkfast.ops.nm_mask(scores, n, m, keep), per tensor")

if __name__ == "__main__":
    sys.exit(SUITE.main())
