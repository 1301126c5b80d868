"""Per-sample convolution weight gradients for K cotangents per sample (the conv-layer rows of an
empirical NTK): ``ntkfast.ops.conv_weight_grad_per_sample`` (implicit im2col, no unfolded input)
against the two ways a PyTorch user would write it.

Every convolution of ResNet-20 (CIFAR-10, 32 x 32: the 3 -> 16 stem, the 3x3 layers of the three
stages, the stride-2 3x3 layers and the 1x1 stride-2 shortcuts) and of LeNet-5 (1 -> 6 5x5 with
padding 2 on 28 x 28, 6 -> 16 5x5 on the pooled 14 x 14), batch N = 64, K = 10 cotangents per
sample, float32 and float64; input and grad_output drawn from N(0, 1) once per case:

    ref:   conv_weight_grad_per_sample_reference: F.unfold (the whole im2col matrix) + matmul
    func:  torch.func.vmap over samples of vmap over cotangents of torch.func.vjp of F.conv2d
           with respect to the weight
    ours:  conv_weight_grad_per_sample(input, grad_output, k, stride, padding)

Each case times one peer (named by the case's last part); ``rel_err`` = ||ours - peer|| / ||peer||.

    python -m benchmarks.bench_conv_weight_grad_per_sample --device cpu
    python -m benchmarks.bench_conv_weight_grad_per_sample --quick   # N = 4, channels / 4
"""
from __future__ import annotations

import sys
from typing import List

import torch
import torch.nn.functional as F

from .common import Case, Suite, rel_err_norm
from .floor import macs_s, record, traffic_s

N, K = 64, 10
# name, C, O, image size, kernel, stride, padding
LAYERS = [
    ("resnet20-stem", 3, 16, 32, 3, 1, 1),
    ("resnet20-s1", 16, 16, 32, 3, 1, 1),
    ("resnet20-s2-down", 16, 32, 32, 3, 2, 1),
    ("resnet20-s2-shortcut", 16, 32, 32, 1, 2, 0),
    ("resnet20-s2", 32, 32, 16, 3, 1, 1),
    ("resnet20-s3-down", 32, 64, 16, 3, 2, 1),
    ("resnet20-s3-shortcut", 32, 64, 16, 1, 2, 0),
    ("resnet20-s3", 64, 64, 8, 3, 1, 1),
    ("lenet5-conv1", 1, 6, 28, 5, 1, 2),
    ("lenet5-conv2", 6, 16, 14, 5, 1, 0),
]
DTYPES = {"f32": torch.float32, "f64": torch.float64}
PEERS = ("ref", "func")


def peer_reference(st):
    from ntkfast.ops import conv_weight_grad_per_sample_reference

    k, s, p = st["conv"]
    return conv_weight_grad_per_sample_reference(st["x"], st["go"], k, s, p)


def peer_func(st):
    from torch.func import vjp, vmap

    k, s, p = st["conv"]
    w = st["w"]

    def per_sample(xn, gon):
        _, pull = vjp(lambda weight: F.conv2d(xn.unsqueeze(0), weight, None, s, p).squeeze(0), w)
        return vmap(lambda cot: pull(cot)[0])(gon)

    return vmap(per_sample)(st["x"], st["go"])


def ours(st):
    from ntkfast.ops import conv_weight_grad_per_sample

    k, s, p = st["conv"]
    return conv_weight_grad_per_sample(st["x"], st["go"], k, s, p)


def _make_case(layer, dtype_name: str, peer: str, quick: bool, seed: int) -> Case:
    name, C, O, size, k, s, p = layer
    n = 4 if quick else N
    if quick:
        C, O = max(1, C // 4), max(1, O // 4)
    dtype = DTYPES[dtype_name]
    out = (size + 2 * p - k) // s + 1
    params = {"layer": name, "N": n, "K": K, "C": C, "O": O, "image": f"{size}x{size}", "kernel": k, "stride": s,
              "padding": p, "dtype": str(dtype).replace("torch.", ""), "peer": peer, "seed": seed,
              "output_numel": n * K * O * C * k * k}

    def setup(device):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, C, size, size, device=device, dtype=dtype, generator=gen)
        go = torch.randn(n, K, O, out, out, device=device, dtype=dtype, generator=gen)
        w = torch.randn(O, C, k, k, device=device, dtype=dtype, generator=gen)  # only the vjp's point
        return {"x": x, "go": go, "w": w, "conv": (k, s, p)}

    def compare(st, peer_out, ours_out):
        return {"rel_err": rel_err_norm([peer_out], [ours_out])}

    def floor(st):
        # every entry of the per-sample, per-output weight gradient is a sum over the output
        # positions: the multiply-adds of the batch's weight gradient, K times, and the result written once
        macs = n * K * O * C * k * k * out * out
        out_bytes = params["output_numel"] * st["x"].element_size()
        compute, write = macs_s(macs, dtype, st["x"].device), traffic_s(out_bytes, st["x"].device)
        return record(compute + write, "the multiply-adds at the best matrix-product rate, and writing the result",
                      compute_s=compute, write_s=write)

    return Case(name=f"{name}-{dtype_name}-{peer}", params=params, setup=setup,
                peer=peer_reference if peer == "ref" else peer_func, ours=ours, compare=compare, floor=floor)


def make_cases(args) -> List[Case]:
    return [_make_case(layer, dt, peer, args.quick, args.seed) for peer in PEERS for dt in DTYPES for layer in LAYERS]


SUITE = Suite("conv_weight_grad_per_sample", make_cases, seed="the inputs",
              peer="case suffix -ref: conv_weight_grad_per_sample_reference (F.unfold + matmul); -func: torch.func vmap over "
                   "samples and cotangents of vjp of F.conv2d w.r.t. the weight",
              ours="ntkfast.ops.conv_weight_grad_per_sample (implicit im2col)")

if __name__ == "__main__":
    sys.exit(SUITE.main())
