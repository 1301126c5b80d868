"""Every compiled op x dtype x direction (forward, backward where the op has one), as small cases
whose shapes span several blocks and tiles of the CUDA kernels: the shared input of the GPU
smoke test (smoke_ops.py: CUDA against the CPU kernel) and the sanitizer driver (sanitize_ops.py).

A case makes its inputs on the CPU from a seeded generator (random, never zeros), and runs on
whatever device the inputs are moved to. Forward cases call ``torch.ops.ntkfast.*`` directly, so
the dispatcher picks the kernel of the inputs' device and no Python fallback can stand in for it;
backward cases go through autograd (the Python wrappers register it) or the explicit backward op.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_FLOAT = (F16, BF16, F32, F64)
F32_F64 = (F32, F64)

#: ops that have no backward of their own (not differentiable, or integer-valued)
NO_BACKWARD = {"topk_mask", "topk_mask_layerwise", "nm_mask", "philox_normal", "path_chain", "path_score"}


@dataclass
class Case:
    op: str            # the torch.ops.ntkfast name it exercises
    variant: str       # what distinguishes it from the op's other cases
    dtype: torch.dtype
    direction: str     # "forward" or "backward"
    make: Callable     # (generator, dtype) -> dict of CPU tensors and plain values
    run: Callable      # (inputs on the target device) -> list of tensors
    exact: bool = False

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant},{str(self.dtype).replace('torch.', '')},{self.direction}]"


def gen_for(case_name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_name.encode()))


def to_device(inputs: dict, device) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, list):
            out[k] = [t.to(device) if isinstance(t, torch.Tensor) else t for t in v]
        else:
            out[k] = v
    return out


def _randn(g, *shape, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _mask(g, *shape, dtype=F64, density=0.6):
    return (torch.rand(*shape, generator=g) < density).to(dtype)


def _philox(g):
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    offset = int(torch.randint(0, 2**20, (1,), generator=g))
    return torch.tensor([seed, offset], dtype=torch.int64)


# --- top-k ---------------------------------------------------------------------------------------


def _topk_inputs(g, dtype):
    # three tensors across several 4096-element chunks, one of a single entry, with ties (values
    # rounded to a coarse grid) so that the tie-break by position is exercised
    shapes = [(10007,), (1,), (57, 301)]
    scores = [(torch.randn(*s, generator=g, dtype=F64) * 8).round().to(dtype) for s in shapes]
    keep = [torch.rand(*s, generator=g) < 0.9 for s in shapes]
    return {"scores": scores, "keep": keep}


def _topk_run(drop_ties):
    def run(x):
        total = sum(s.numel() for s in x["scores"])
        return list(torch.ops.ntkfast.topk_mask(x["scores"], total // 3, x["keep"], drop_ties, False))
    return run


def _topk_layer_run(drop_ties):
    def run(x):
        ks = [s.numel() // 4 for s in x["scores"]]
        return list(torch.ops.ntkfast.topk_mask_layerwise(x["scores"], ks, x["keep"], drop_ties, False))
    return run


def _nm_inputs(g, dtype):
    # 2-d and 4-d scores over several 256-thread blocks, ties (a coarse grid), a keep mask
    shapes = [(67, 96), (5, 3, 2, 32)]
    scores = [(torch.randn(*s, generator=g, dtype=F64) * 4).round().to(dtype) for s in shapes]
    keep = [torch.rand(*s, generator=g) < 0.8 for s in shapes]
    return {"scores": scores, "keep": keep}


def _nm_run(n, m, with_keep):
    def run(x):
        return [torch.ops.ntkfast.nm_mask(s, n, m, kp if with_keep else None) for s, kp in zip(x["scores"], x["keep"])]
    return run


# --- Philox, perturbed_masked ---------------------------------------------------------------------


def _philox_normal_run(dtype):
    def run(x):
        return [torch.ops.ntkfast.philox_normal(x["philox"], [3, 1031], dtype)]
    return run


def _perturbed_inputs(g, dtype):
    return {"weight": _randn(g, 3, 70, 131, dtype=dtype), "mask": _mask(g, 70, 131, dtype=dtype),
            "grad": _randn(g, 2, 3, 70, 131, dtype=dtype), "philox": _philox(g)}


def _perturbed_fwd(x):
    return [torch.ops.ntkfast.perturbed_masked(x["weight"], x["mask"], 0.1, x["philox"])]


def _perturbed_bwd(output_mask):
    def run(x):
        gw, gm = torch.ops.ntkfast.perturbed_masked_backward(x["grad"], x["weight"], x["mask"], 0.1, x["philox"],
                                                             output_mask)
        return [t for t, want in zip((gw, gm), output_mask) if want]
    return run


# --- masked_gram ----------------------------------------------------------------------------------


def _gram_inputs(n1, n2):
    def make(g, dtype):
        c, k, o = 150, 3, 131
        return {"a1": _randn(g, n1, c, dtype=dtype), "b1": _randn(g, n1, k, o, dtype=dtype),
                "a2": _randn(g, n2, c, dtype=dtype), "b2": _randn(g, n2, k, o, dtype=dtype),
                "mask": _mask(g, o, c, dtype=dtype), "cot": _randn(g, 4096, dtype=dtype)}
    return make


def _gram_fwd(mode, same):
    def run(x):
        a2, b2 = (x["a1"], x["b1"]) if same else (x["a2"], x["b2"])
        return [torch.ops.ntkfast.masked_gram(x["a1"], x["b1"], a2, b2, x["mask"], mode)]
    return run


def _gram_bwd(mode):
    def run(x):
        from ntkfast.ops import masked_gram

        a1, b1 = x["a1"].clone().requires_grad_(), x["b1"].clone().requires_grad_()
        out = masked_gram(a1, b1, x["a2"], x["b2"], x["mask"], mode=mode)
        cot = x["cot"].repeat(out.numel() // x["cot"].numel() + 1)[: out.numel()].reshape(out.shape)
        ga1, gb1 = torch.autograd.grad((out * cot).sum(), (a1, b1))
        return [ga1, gb1]
    return run


# --- conv_weight_grad_per_sample ------------------------------------------------------------------

# (name, input [N, C, H, W], K, O, kernel, stride, padding, dilation, groups): strided, dilated and
# grouped; and one with many output positions per sample (the split-over-positions path)
_CONV = [
    ("strided-grouped", (3, 6, 13, 11), 2, 8, (3, 3), (2, 1), (1, 2), (1, 2), 2),
    ("many-positions", (2, 4, 40, 40), 1, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1),
]


def _out_size(size, k, s, p, d):
    return tuple((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _conv_inputs(spec):
    _, shape, k_cot, o, kern, stride, pad, dil, groups = spec

    def make(g, dtype):
        ho, wo = _out_size(shape[2:], kern, stride, pad, dil)
        return {"input": _randn(g, *shape, dtype=dtype), "go": _randn(g, shape[0], k_cot, o, ho, wo, dtype=dtype),
                "cot": _randn(g, shape[0], k_cot, o, shape[1] // groups, *kern, dtype=dtype)}
    return make


def _conv_fwd(spec):
    _, _, _, _, kern, stride, pad, dil, groups = spec

    def run(x):
        return [torch.ops.ntkfast.conv_weight_grad_per_sample(x["input"], x["go"], list(kern), list(stride),
                                                              list(pad), list(dil), groups)]
    return run


def _conv_bwd(spec):
    _, _, _, _, kern, stride, pad, dil, groups = spec

    def run(x):
        from ntkfast.ops import conv_weight_grad_per_sample

        inp, go = x["input"].clone().requires_grad_(), x["go"].clone().requires_grad_()
        out = conv_weight_grad_per_sample(inp, go, kern, stride, pad, dil, groups)
        return list(torch.autograd.grad((out * x["cot"]).sum(), (inp, go)))
    return run


# --- path ops -------------------------------------------------------------------------------------


def _chain_inputs(g, dtype):
    dims = [200, 300, 150, 10]
    weights = [_randn(g, dims[i + 1], dims[i], dtype=dtype) for i in range(3)]
    masks = [_mask(g, dims[i + 1], dims[i], dtype=dtype) for i in range(3)]
    biases = [_randn(g, dims[1], dtype=dtype), None, _randn(g, dims[3], dtype=dtype)]
    return {"weights": weights, "masks": masks, "biases": biases,
            "input": torch.rand(5, dims[0], generator=g, dtype=F64).to(dtype)}


def _chain_run(power):
    def run(x):
        fwd, bwd = torch.ops.ntkfast.path_chain(x["weights"], x["masks"], x["biases"], x["input"], power)
        return list(fwd) + list(bwd)
    return run


def _score_dense_inputs(g, dtype):
    return {"weight": _randn(g, 131, 70, dtype=dtype), "mask": _mask(g, 131, 70, dtype=dtype),
            "a": torch.rand(5, 70, generator=g, dtype=F64).to(dtype), "b": torch.rand(5, 131, generator=g, dtype=F64).to(dtype)}


def _score_conv_inputs(g, dtype):
    # weight [O, C / groups, kh, kw] = [8, 3, 3, 3], input [2, 6, 9, 9], stride 2, padding 1 -> 5 x 5
    return {"weight": _randn(g, 8, 3, 3, 3, dtype=dtype), "mask": _mask(g, 8, 3, 3, 3, dtype=dtype),
            "a": torch.rand(2, 6, 9, 9, generator=g, dtype=F64).to(dtype),
            "b": torch.rand(2, 8, 5, 5, generator=g, dtype=F64).to(dtype)}


def _score_run(power, conv):
    def run(x):
        if conv:
            return [torch.ops.ntkfast.path_score(x["weight"], x["mask"], x["a"], x["b"], power, [2, 2], [1, 1],
                                                 [1, 1], 2)]
        return [torch.ops.ntkfast.path_score(x["weight"], x["mask"], x["a"], x["b"], power, [], [], [], 1)]
    return run


def all_cases() -> list:
    cases = []
    for dt in ALL_FLOAT:
        for drop in (False, True):
            tag = "drop_ties" if drop else "exact_k"
            cases.append(Case("topk_mask", tag, dt, "forward", _topk_inputs, _topk_run(drop), exact=True))
            cases.append(Case("topk_mask_layerwise", tag, dt, "forward", _topk_inputs, _topk_layer_run(drop),
                              exact=True))
        # m = 4 and 16: unrolled kernels; 3:32 the generic loop, and with keep
        for n, m, kp in ((2, 4, False), (2, 4, True), (5, 16, True), (3, 32, True)):
            cases.append(Case("nm_mask", f"{n}:{m}{',keep' if kp else ''}", dt, "forward", _nm_inputs, _nm_run(n, m, kp),
                              exact=True))
        cases.append(Case("philox_normal", "3x1031", dt, "forward", lambda g, d: {"philox": _philox(g)},
                          _philox_normal_run(dt)))
        cases.append(Case("perturbed_masked", "3x70x131", dt, "forward", _perturbed_inputs, _perturbed_fwd))
        for om, tag in (([True, True], "both"), ([True, False], "weight"), ([False, True], "mask")):
            cases.append(Case("perturbed_masked_backward", tag, dt, "backward", _perturbed_inputs, _perturbed_bwd(om)))
    for dt in F32_F64:
        for mode in ("full", "trace", "diagonal", "diagonal_trace"):
            n2 = 70 if mode.startswith("diagonal") else 67
            cases.append(Case("masked_gram", f"{mode},distinct", dt, "forward", _gram_inputs(70, n2),
                              _gram_fwd(mode, False)))
            cases.append(Case("masked_gram", f"{mode},symmetric", dt, "forward", _gram_inputs(70, 70),
                              _gram_fwd(mode, True)))
            cases.append(Case("masked_gram", mode, dt, "backward", _gram_inputs(70, n2), _gram_bwd(mode)))
        for spec in _CONV:
            cases.append(Case("conv_weight_grad_per_sample", spec[0], dt, "forward", _conv_inputs(spec),
                              _conv_fwd(spec)))
            cases.append(Case("conv_weight_grad_per_sample", spec[0], dt, "backward", _conv_inputs(spec),
                              _conv_bwd(spec)))
        for power in (1, 2):
            cases.append(Case("path_chain", f"power{power}", dt, "forward", _chain_inputs, _chain_run(power)))
        for power in (0, 1, 2):
            cases.append(Case("path_score", f"dense,power{power}", dt, "forward", _score_dense_inputs,
                              _score_run(power, False)))
            cases.append(Case("path_score", f"conv,power{power}", dt, "forward", _score_conv_inputs,
                              _score_run(power, True)))
    return cases


def registered_ops() -> list:
    """The names of every op in the ntkfast namespace (the schemas of csrc/ntkfast.cpp)."""
    import ntkfast.ops  # noqa: F401  (loads the extension, which registers them)

    return sorted(n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("ntkfast::"))


def uncovered_ops(cases) -> list:
    covered = {c.op for c in cases}
    return [op for op in registered_ops() if op not in covered]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


#: largest relative error (Frobenius norm) accepted between devices, by dtype
TOLERANCE = {F16: 2e-2, BF16: 2e-2, F32: 1e-4, F64: 1e-10}
