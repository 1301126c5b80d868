"""The NTK block of a masked dense layer: ``ntkfast.ops.masked_gram`` (compiled kernel) against
``ntkfast.ops.masked_gram_reference`` (GEMM-based PyTorch: P = (a1[i] * a2[j]) @ mask^T by one
matmul per chunk of rows i, then batched matmuls with b1 and b2), on the same inputs.

    full[i, j, k, l] = sum_{o, c} mask[o, c] b1[i, k, o] b2[j, l, o] a1[i, c] a2[j, c]

N1 = N2 = 256 samples, K = 10 outputs, layers (C, O) = (784, 300) (every mode, float32 and
float64), (300, 100) and (100, 10) (float32); masks 0/1, dense (1.0) or 10% of the entries kept at
random; a1, b1, a2, b2 normal. Case names: ``<mode>-<C>x<O>-d<density>-<dtype>``, with ``-self``
where a2 is a1 and b2 is b1 (the Gram matrix of one batch, which the kernel halves by symmetry).
``rel_err`` = ||ours - peer|| / ||peer||.

    python -m benchmarks.bench_masked_gram --device cpu
    python -m benchmarks.bench_masked_gram --quick                 # N = 32, (C, O) / 4
    python -m benchmarks.bench_masked_gram --case full-784x300-d0.1-float32
"""
from __future__ import annotations

import sys
from typing import List

import torch

from .common import Case, Suite, rel_err_norm
from .floor import macs_s, record

N = 256
K = 10
MODES = ("full", "trace", "diagonal", "diagonal_trace")
# (C, O, dtypes, modes, with the a2 = a1 variant)
LAYERS = [
    (784, 300, ("float32", "float64"), MODES, True),
    (300, 100, ("float32",), MODES, False),
    (100, 10, ("float32",), MODES, False),
]
DENSITIES = (1.0, 0.1)


def _make_case(c: int, o: int, dtype_name: str, mode: str, density: float, self_gram: bool, quick: bool,
               seed: int) -> Case:
    n, cc, oo = (32, max(1, c // 4), max(1, o // 4)) if quick else (N, c, o)
    dtype = getattr(torch, dtype_name)
    name = f"{mode}-{c}x{o}-d{density:g}-{dtype_name}" + ("-self" if self_gram else "")
    params = {"N1": n, "N2": n, "C": cc, "O": oo, "K": K, "mode": mode, "dtype": dtype_name,
              "mask_density": density, "a2_is_a1": self_gram, "seed": seed}

    def setup(device):
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*shape):
            return torch.randn(shape, generator=gen, dtype=dtype).to(device)

        a1, b1 = randn(n, cc), randn(n, K, oo)
        a2, b2 = (a1, b1) if self_gram else (randn(n, cc), randn(n, K, oo))
        mask = (torch.rand((oo, cc), generator=gen) < density).to(device=device, dtype=dtype)
        return {"a1": a1, "b1": b1, "a2": a2, "b2": b2, "mask": mask, "mode": mode}

    def peer(st):
        from ntkfast.ops import masked_gram_reference

        return masked_gram_reference(st["a1"], st["b1"], st["a2"], st["b2"], st["mask"], mode=st["mode"])

    def ours(st):
        from ntkfast.ops import masked_gram

        return masked_gram(st["a1"], st["b1"], st["a2"], st["b2"], st["mask"], mode=st["mode"])

    def compare(st, peer_out, ours_out):
        return {"rel_err": rel_err_norm([peer_out], [ours_out]),
                "mask_nonzero_fraction": float((st["mask"] != 0).double().mean())}

    def floor(st):
        # pairs of samples that must be formed (the kernel halves a self Gram by symmetry), each
        # needing the mask's nonzero entries once (an all-ones mask factorises: a1[i] . a2[j], C
        # per pair), then the product with b1 and b2 per output pair
        n1, n2 = st["a1"].shape[0], st["a2"].shape[0]
        pairs = n1 if mode.startswith("diagonal") else (n1 * (n1 + 1) // 2 if self_gram else n1 * n2)
        outer = K * K if mode in ("full", "diagonal") else K
        nnz = int((st["mask"] != 0).sum())
        per_pair = st["mask"].shape[1] if nnz == st["mask"].numel() else nnz
        macs = pairs * (per_pair + outer * st["mask"].shape[0])
        return record(macs_s(macs, dtype, st["a1"].device), "the multiply-adds of the nonzero mask entries per pair "
                      "of samples and of the output contraction, at the best matrix-product rate", macs=macs)

    return Case(name=name, params=params, setup=setup, peer=peer, ours=ours, compare=compare, floor=floor)


def make_cases(args) -> List[Case]:
    cases = []
    for c, o, dtypes, modes, with_self in LAYERS:
        for dtype_name in dtypes:
            for density in DENSITIES:
                for mode in modes:
                    cases.append(_make_case(c, o, dtype_name, mode, density, False, args.quick, args.seed))
                    if with_self and dtype_name == "float32" and mode in ("full", "trace"):
                        cases.append(_make_case(c, o, dtype_name, mode, density, True, args.quick, args.seed))
    return cases


SUITE = Suite("masked_gram", make_cases, seed="the inputs",
              peer="ntkfast.ops.masked_gram_reference: (a1[i] * a2[j]) @ mask^T per chunk of rows, batched matmuls with b",
              ours="ntkfast.ops.masked_gram (compiled kernel)")

if __name__ == "__main__":
    sys.exit(SUITE.main())
