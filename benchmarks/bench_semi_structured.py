"""2:4 masks the GPU runs faster (issue 28): a transformer's Linear layers pruned 2:4 and stored
semi-structured (:func:`ntkfast.structured.to_semi_structured`) against the same masked network
kept dense, same batch, float16.

Cases, each a forward pass (no grad) and a training step's passes (forward and backward):

- ``vit-b16``: the zoo's ``vit`` at ViT-B/16 size (224x224 images, 16x16 patches, width 768, 12
  blocks of 12 heads, MLP 3072; batch 64);
- ``gpt2-small``: a GPT-2-small-shaped stack of the same pre-norm blocks (width 768, 12 blocks of 12
  heads, MLP 3072) over 512 token embeddings (batch 8), built from the zoo's blocks so that every
  projection is an ``nn.Linear`` (transformers' GPT-2 uses its own Conv1D, which the format does
  not take). The causal mask changes nothing in the matrix products, so it is left out.

The masks: magnitude 2:4 on every block Linear (the patch embedding and the head stay dense). The
issue's target on an H200: >= 1.3x dense forward speed. Where torch refuses the format (the CPU,
a GPU below compute capability 8.0, a backward pass it cannot take) the case runs the
dense network on both sides and its record says why in ``unsupported``.

    python -m benchmarks.bench_semi_structured [--quick] [--device cuda]
"""
from __future__ import annotations

import copy
import sys
from typing import List

import torch

from .common import Case, Suite
from .floor import network_s, record


def _vit(quick):
    from ntkfast import models

    if quick:
        return models.vit(input_shape=(3, 32, 32), num_classes=10, patch=8, dim=64, depth=2, heads=2, mlp=128), \
            (8, 3, 32, 32)
    return models.vit(input_shape=(3, 224, 224), num_classes=1000, patch=16, dim=768, depth=12, heads=12,
                      mlp=3072), (64, 3, 224, 224)


class _Decoder(torch.nn.Module):
    """GPT-2-small's shape from the zoo ViT's blocks: token embeddings in, next-token logits out."""

    def __init__(self, vocab, dim, depth, heads, mlp, seq):
        super().__init__()
        from ntkfast.models.sequence import _Block

        self.seq = seq
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = torch.nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos)))


def _gpt2(quick):
    if quick:
        return _Decoder(128, 64, 2, 2, 128, 32), (4, 32)
    return _Decoder(50257, 768, 12, 12, 3072, 512), (8, 512)


def _setup(build, quick, train):
    def setup(device):
        import ntkfast
        from ntkfast.structured import to_semi_structured

        torch.manual_seed(0)
        net, shape = build(quick)
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        net = net.to(device, dtype)
        x = (torch.randn(*shape, device=device, dtype=dtype) if len(shape) == 4
             else torch.randint(0, net.tok.num_embeddings, shape, device=device))
        blocks = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
        masks = ntkfast.prune(net, "magnitude", None, structure="2:4",
                              exclude=lambda name, module: name.rpartition(".")[0] not in blocks, progress=False)
        dense = masks.apply(copy.deepcopy(net))
        st = {"x": x, "dense": dense, "train": train, "unsupported": None}
        try:
            fast, left = to_semi_structured(net, masks)
            st["left_dense"] = sorted(n for n in left if n.startswith("blocks."))
            _run(fast, st)  # the first call says whether torch takes it
            st["fast"] = fast
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            st["unsupported"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            st["fast"] = dense
        return st
    return setup


def _run(net, st):
    if not st["train"]:
        with torch.no_grad():
            return net(st["x"]).float()
    net.zero_grad(set_to_none=True)
    out = net(st["x"])
    out.float().square().mean().backward()  # the optimiser's step is the same on both sides: left out
    return out.detach().float()


def _compare(st, peer_out, ours_out):
    err = float((peer_out - ours_out).norm() / peer_out.norm().clamp_min(1e-12))
    rec = {"rel_err": err, "unsupported": st["unsupported"]}
    if "left_dense" in st:
        rec["block_linears_left_dense"] = len(st["left_dense"])
    return rec


def _floor(st):
    # the dense network's linear calls, each 2:4 block layer at half its multiply-adds: what the
    # sparse tensor cores could at best save; attention's own products are not counted
    blocks = {id(m) for n, m in st["dense"].named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}
    train = st["train"]
    net = network_s(st["dense"], st["x"], input_grad=train, weight_grad=train,
                    scale=lambda m: 0.5 if id(m) in blocks else 1.0)
    return record(net["seconds"], "the linear calls alone, the 2:4 block layers' at half their time",
                  forward_s=net["forward_s"], backward_s=net["backward_s"])


def make_cases(args) -> List[Case]:
    cases = []
    for name, build in (("vit-b16", _vit), ("gpt2-small", _gpt2)):
        for train in (False, True):
            what = "train-step" if train else "forward"
            cases.append(Case(name=f"{name}-2:4-{what}", params={"model": name, "pass": what, "structure": "2:4"},
                              setup=_setup(build, args.quick, train),
                              peer=lambda st: _run(st["dense"], st), ours=lambda st: _run(st["fast"], st),
                              compare=_compare, floor=_floor))
    return cases


SUITE = Suite("semi_structured", make_cases, runs=(5, 1),
              peer="the 2:4-masked network with dense float16 weights",
              ours="the same network with its block Linear weights semi-structured (ntkfast.structured.to_semi_structured)")

main = SUITE.main


if __name__ == "__main__":
    sys.exit(main())
