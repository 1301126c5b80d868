"""How fast can an exact trace NTK of a convolutional network be on this machine?

Any exact method needs, per sample and output, the cotangent of every layer (one backward pass
through the input gradients) and that layer's weight gradient (or Grams of the same cost). This
script times exactly those convolution calls as single large oneDNN calls, batch N*K, with
nothing else around them: a floor for the convolution work alone. It prints it beside
torch.func's Jacobian contraction, ntkfast, and ntkfast's cotangent pass, so the attainable
speed-up over torch.func (peer / floor) can be read off.

    python -m benchmarks.explore_ntk_floor [--model resnet20] [--n 64] [--runs 3]
"""
from __future__ import annotations

import argparse

import torch

from .common import median_time


def _conv_calls(model, x):
    """(input, module) of every Conv2d call in one forward pass."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append((a[0].detach(), o.detach(), m)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def conv_floor(model, x, K: int, runs: int) -> dict:
    """Seconds of the input-gradient and weight-gradient convolutions at batch N*K."""
    out = {"input_grad_s": 0.0, "weight_grad_s": 0.0, "macs": 0}
    for i, (a, y, m) in enumerate(_conv_calls(model, x)):
        ar = a.repeat(K, *([1] * (a.dim() - 1)))
        g = torch.randn(K * y.shape[0], *y.shape[1:])
        w = m.weight.detach()

        def call(mask, first=(i == 0)):
            if mask[0] and first:
                return None  # nobody needs the gradient of the network's input
            return torch.ops.aten.convolution_backward(g, ar, w, None, m.stride, m.padding, m.dilation, False,
                                                       [0, 0], m.groups, mask)

        out["input_grad_s"] += median_time(lambda: call([True, False, False]), runs)
        out["weight_grad_s"] += median_time(lambda: call([False, True, False]), runs)
        out["macs"] += 2 * g[0].numel() * w[0].numel() * g.shape[0]
    return out


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
    floor = conv_floor(model, x, K, args.runs)
    peer = median_time(lambda: reference.jacobian_contraction(model, x, mode="trace"), args.runs)
    ours = median_time(lambda: empirical_ntk(model, x, mode="trace"), args.runs)
    cot = median_time(lambda: capture(model, plan, x, range(K), create_graph=False), args.runs)
    total = floor["input_grad_s"] + floor["weight_grad_s"]
    print(f"# {args.model}, trace NTK, N = {args.n}, K = {K}, float32, {torch.get_num_threads()} threads")
    print(f"torch.func Jacobian contraction : {peer:.3f} s")
    print(f"ntkfast empirical_ntk           : {ours:.3f} s  ({peer / ours:.2f}x)")
    print(f"  of which the cotangent pass   : {cot:.3f} s")
    print(f"floor, convolutions only        : {total:.3f} s  (input grads {floor['input_grad_s']:.3f} s, "
          f"weight grads {floor['weight_grad_s']:.3f} s, {floor['macs'] / total / 1e9:.1f} GFLOP/s)")
    print(f"best speed-up over torch.func   : {peer / total:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
