"""Global top-k masking: ``ntkfast.ops.topk_mask`` against torch.cat + torch.kthvalue.

The score list has the shapes of ResNet-50's prunable weights (every conv and the classifier of
the torchvision ImageNet model: 25,502,912 entries in 54 tensors), filled with random normal
scores. The peer is the way pruning code usually masks (the Synaptic-Flow authors' code):

    flat = torch.cat([s.flatten() for s in scores])       # (+ pruned entries set to -inf)
    threshold = torch.kthvalue(flat, numel - k).values     # the largest score that is pruned
    masks = [s > threshold for s in scores]                # their code: where(s <= thr, 0, 1)

On ties at the threshold this keeps fewer than k entries; ntkfast keeps exactly k. With
continuous random scores the masks agree unless a score ties the threshold value; the benchmark
checks identity and, where the masks differ, whether every difference sits on the tied value.

    python -m benchmarks.bench_topk_mask --device cpu          # full size
    python -m benchmarks.bench_topk_mask --quick               # tiny, for smoke tests
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional

import torch

from .common import Case, Suite, compare_masks
from .floor import selection_floor

# ----------------------------------------------------------------------------------------------
# ResNet-50's prunable weights, derived from the architecture (no model is built)
# ----------------------------------------------------------------------------------------------

RESNET50_PRUNABLE = 25_502_912  # conv + fc weights of torchvision's resnet50 (25,557,032 params - BN - fc bias)


def resnet50_weight_shapes(width_div: int = 1, num_classes: int = 1000) -> List[tuple]:
    """Shapes of the conv/linear weights of ResNet-50 (bottleneck blocks 3-4-6-3, expansion 4,
    1x1 projection shortcut in the first block of each stage), in the model's module order.
    ``width_div`` divides every channel count (for --quick)."""
    c = lambda n: max(1, n // width_div)  # noqa: E731
    shapes = [(c(64), 3, 7, 7)]  # stem
    inp = c(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w, out = c(width), c(width * 4)
        for b in range(blocks):
            shapes += [(w, inp, 1, 1), (w, w, 3, 3), (out, w, 1, 1)]
            if b == 0:
                shapes.append((out, inp, 1, 1))  # downsample
            inp = out
    shapes.append((num_classes, inp))  # fc
    return shapes


assert sum(math.prod(s) for s in resnet50_weight_shapes()) == RESNET50_PRUNABLE
assert len(resnet50_weight_shapes()) == 54


def n_keep(density: float, numel: int) -> int:
    """k = round(density * numel), halves up (ntkfast's rule, see ntkfast.masks.n_keep)."""
    return max(0, min(numel, int(math.floor(density * numel + 0.5))))


# ----------------------------------------------------------------------------------------------
# the two sides
# ----------------------------------------------------------------------------------------------


def peer_topk_mask(scores: List[torch.Tensor], k: int, keep: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """torch.cat + torch.kthvalue + per-tensor compare (keeps <= k on ties)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    if keep is not None:  # already-pruned entries get the lowest score
        flat.masked_fill_(~torch.cat([kp.reshape(-1) for kp in keep]), float("-inf"))
    n_prune = flat.numel() - k
    if n_prune < 1:
        masks = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    else:
        threshold = torch.kthvalue(flat, n_prune).values
        del flat
        masks = [s > threshold for s in scores]
    if keep is not None:
        for m, kp in zip(masks, keep):
            m.logical_and_(kp)
    return masks


def ours_topk_mask(scores: List[torch.Tensor], k: int, keep: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    from ntkfast.ops import topk_mask

    return topk_mask(scores, k, keep)


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def _make_case(name: str, dtype: torch.dtype, density: float, keep_density: Optional[float], quick: bool,
               seed: int) -> Case:
    width_div = 8 if quick else 1
    shapes = resnet50_weight_shapes(width_div)
    numel = sum(math.prod(s) for s in shapes)
    params = {
        "shapes": "resnet50" + (f" (channels / {width_div})" if width_div > 1 else ""),
        "tensors": len(shapes),
        "numel": numel,
        "dtype": str(dtype).replace("torch.", ""),
        "density": density,
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
        alive = sum(int(kp.sum()) for kp in keep) if keep is not None else numel
        k = min(n_keep(density, numel), alive)  # as ntkfast.masks.threshold: k over all entries, capped
        return {"scores": scores, "keep": keep, "k": k, "alive": alive}

    def prepare(st):
        return (st["scores"], st["k"], st["keep"])

    def compare(st, peer_masks, ours_masks):
        out = compare_masks(peer_masks, ours_masks)
        out["k"] = st["k"]
        out["alive"] = st["alive"]
        out["ours_keeps_k"] = out["ours_kept"] == st["k"]
        # the value both sides cut at, and how many entries that may be kept share it
        flat = torch.cat([s.reshape(-1) for s in st["scores"]])
        alive = torch.cat([kp.reshape(-1) for kp in st["keep"]]) if st["keep"] is not None else None
        if alive is not None:
            flat = flat.masked_fill(~alive, float("-inf"))
        n_prune = flat.numel() - st["k"]
        if n_prune >= 1:
            thr = torch.kthvalue(flat, n_prune).values
            at_thr = flat == thr
            out["ties_at_threshold"] = int(at_thr.sum())
            if not out["identical"]:
                diff = torch.cat([(p != o.to(p.device)).reshape(-1) for p, o in zip(peer_masks, ours_masks)])
                out["diff_only_ties"] = bool((diff <= at_thr).all())
        return out

    return Case(name=name, params=params, setup=setup, prepare=prepare, peer=peer_topk_mask, ours=ours_topk_mask,
                compare=compare,
                floor=lambda st: selection_floor(st["scores"], st["keep"]))


def make_cases(args) -> List[Case]:
    cases = []
    for dtype, tname in ((torch.float32, "f32"), (torch.float64, "f64")):
        for d in (0.01, 0.5):
            cases.append(_make_case(f"resnet50-{tname}-d{d}", dtype, d, None, args.quick, args.seed))
    # half the entries already pruned; density 0.25 of all entries = half of the survivors
    for d in (0.01, 0.25):
        cases.append(_make_case(f"resnet50-f32-keep0.5-d{d}", torch.float32, d, 0.5, args.quick, args.seed))
    return cases


SUITE = Suite("topk_mask", make_cases, seed="the random scores",
              peer="torch.cat + torch.kthvalue, then score > threshold per tensor (the Synaptic-Flow authors' masking)",
              ours="ntkfast.ops.topk_mask(scores, k, keep)")

if __name__ == "__main__":
    sys.exit(SUITE.main())
