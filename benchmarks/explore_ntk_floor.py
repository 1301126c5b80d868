"""How fast can an exact trace NTK of a convolutional network be on this machine?

Any exact method needs, per sample and output, the cotangent of every layer (one backward pass
through the input gradients) and that layer's weight gradient (or Grams of the same cost). This
script times exactly those calls as single large oneDNN calls, batch N*K, with nothing else
around them (``benchmarks.floor.ntk_floor``, the floor the ntk suite records): a floor for the
convolution work alone. It prints it beside
torch.func's Jacobian contraction, ntkfast, and ntkfast's cotangent pass, so the attainable
speed-up over torch.func (peer / floor) can be read off.

    python -m benchmarks.explore_ntk_floor [--model resnet20] [--n 64] [--runs 3]
"""
from __future__ import annotations

import argparse

import torch

from .common import median_time
from .floor import network_s, ntk_floor


def main(argv=None) -> int:
    from ntkfast import models
    from ntkfast.ntk import empirical_ntk, reference
    from ntkfast.ntk._capture import capture
    from ntkfast.ntk._plan import build_plan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = models.get(args.model).eval()
    x = torch.randn(args.n, *model.input_shape)
    with torch.no_grad():
        K = model(x[:1]).shape[1]
    plan = build_plan(model, None, None)
    floor = ntk_floor(model, x, K, args.runs)["floor_parts"]
    peer = median_time(lambda: reference.jacobian_contraction(model, x, mode="trace"), args.runs)
    ours = median_time(lambda: empirical_ntk(model, x, mode="trace"), args.runs)
    cot = median_time(lambda: capture(model, plan, x, range(K), create_graph=False), args.runs)
    total = floor["backward_s"]
    macs = network_s(model, x, forward=False, repeat=K, runs=1)["macs"]
    print(f"# {args.model}, trace NTK, N = {args.n}, K = {K}, float32, {torch.get_num_threads()} threads")
    print(f"torch.func Jacobian contraction : {peer:.3f} s")
    print(f"ntkfast empirical_ntk           : {ours:.3f} s  ({peer / ours:.2f}x)")
    print(f"  of which the cotangent pass   : {cot:.3f} s")
    print(f"floor, convolutions only        : {total:.3f} s  (input and weight gradients, "
          f"{macs / total / 1e9:.1f} GMAC/s)")
    print(f"best speed-up over torch.func   : {peer / total:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
