"""The Path Kernel's ops ``path_chain`` / ``path_score`` (csrc/cpu/path_cpu.cpp, csrc/cuda/path.cu):
thin wrappers with argument checks, their fake functions, and the pure-PyTorch references used
when the extension is absent and in tests."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .loader import Family

# An extension built before these ops must not break the import: they then run as references.
FAMILY = Family("path_chain / path_score", "path_chain", "path_score")


if FAMILY.defined:

    @torch.library.register_fake("ntkfast::path_chain")
    def _path_chain_fake(weights, masks, biases, input, power):
        n = input.shape[0]
        return ([input.new_empty((n, w.shape[0])) for w in weights], [input.new_empty((w.shape[1],)) for w in weights])

    @torch.library.register_fake("ntkfast::path_score")
    def _path_score_fake(weight, mask, a, b, weight_power, stride, padding, dilation, groups):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _g(power: int):
    return torch.abs if power == 1 else torch.square


def _check_power(power, name: str, allowed: Sequence[int]) -> int:
    if isinstance(power, bool) or power not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {power!r}")
    return int(power)


def _as_list(x, name: str) -> list:
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(x).__name__}")
    return list(x)


def _chain_args(weights, input, masks, biases, power):
    weights = _as_list(weights, "weights")
    if not weights:
        raise ValueError("weights: expected at least one layer")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"weights[{i}]: expected a floating [O, C] tensor, got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    w0 = weights[0]
    if input is None:
        input = torch.ones(w0.shape[1], dtype=w0.dtype, device=w0.device)
    if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
        raise ValueError("input: expected a [C_0] or [N, C_0] tensor")
    masks = [] if masks is None else _as_list(masks, "masks")
    biases = [None] * len(weights) if biases is None else _as_list(biases, "biases")
    return weights, input, masks, biases, _check_power(power, "power", (1, 2))


def path_chain(weights, input: Optional[torch.Tensor] = None, *, masks=None, biases=None,
               power: int = 2) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Path sums of a chain of dense layers with weights g(W_l ⊙ M_l), g = |·| (``power`` 1) or
    (·)² (``power`` 2), applied on the fly (no transformed copy of a weight is made).

    ``weights``: [O_l, C_l] per layer, C_l = O_{l-1}; ``input``: [C_0] or [N, C_0] (default: ones;
    path sums take a non-negative input, but the chain is linear in it, so any real values are
    summed as given and not refused); ``masks``: None or one per layer; ``biases``: None or one entry
    (tensor or None) per layer, added as g(bias) to the forward sums.

    Returns ``(forward, backward)``: ``forward[l]`` = a_{l+1} = a_l g(W ⊙ M)ᵀ + g(bias), the sums
    at layer l's output ([O_l], or [N, O_l] for a batched input); ``backward[l]`` = the sums at
    layer l's input from an all-ones output, b_{l} = g(W_{l+1} ⊙ M_{l+1})ᵀ b_{l+1} ([C_l]).

    A weight under a zero mask entry contributes nothing, whatever it holds (NaN and infinities
    included), and neither does an input feature that only such weights read (its column of
    ``masks[0]`` all zero): the sums are those with zeros there.
    """
    weights, input, masks, biases, power = _chain_args(weights, input, masks, biases, power)
    single = input.dim() == 1
    x = input.unsqueeze(0) if single else input
    if FAMILY.use(x.device):
        try:
            fwd, bwd = torch.ops.ntkfast.path_chain(weights, masks, biases, x, power)
        except RuntimeError as exc:  # the kernel's ValueErrors arrive as such; keep their text short
            raise ValueError(str(exc).split("\nException raised from")[0]) from None
    else:
        fwd, bwd = _path_chain_reference(weights, x, masks, biases, power)
    if single:
        fwd = [f.squeeze(0) for f in fwd]
    return list(fwd), list(bwd)


def path_chain_reference(weights, input: Optional[torch.Tensor] = None, *, masks=None, biases=None,
                         power: int = 2) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """:func:`path_chain` in plain PyTorch ops (the transformed weights formed whole)."""
    weights, input, masks, biases, power = _chain_args(weights, input, masks, biases, power)
    single = input.dim() == 1
    fwd, bwd = _path_chain_reference(weights, input.unsqueeze(0) if single else input, masks, biases, power)
    return ([f.squeeze(0) for f in fwd] if single else fwd), bwd


def _path_chain_reference(weights, x, masks, biases, power):
    g = _g(power)
    # selects, not products: a pruned weight is exactly 0 whatever it holds (g(inf * 0) is NaN)
    gw = [g(torch.where(masks[i] != 0, w * masks[i], 0)) if masks else g(w) for i, w in enumerate(weights)]
    if masks:
        # an input feature that only pruned weights read contributes nothing either (its column of
        # the first mask is all zero: in the product below it would meet those zeros as 0 * inf)
        x = torch.where((masks[0] == 0).all(0), 0, x)
    fwd, a = [], x
    for w, b in zip(gw, biases):
        a = a @ w.t()
        if b is not None:
            a = a + g(b)
        fwd.append(a)
    bwd = [None] * len(gw)
    z = torch.ones(gw[-1].shape[0], dtype=x.dtype, device=x.device)
    for i in range(len(gw) - 1, -1, -1):
        z = gw[i].t() @ z
        bwd[i] = z
    return fwd, bwd


def _score_args(weight, a, b, mask, weight_power, stride, padding, dilation, groups):
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3, 4):
        raise ValueError("weight: expected a dense [O, C] or a 1-d / 2-d convolution weight")
    weight_power = _check_power(weight_power, "weight_power", (0, 1, 2))
    sd = weight.dim() - 2

    def tup(v, name):
        if sd == 0:
            return []
        v = (v,) * sd if isinstance(v, int) else tuple(v)
        if len(v) != sd:
            raise ValueError(f"{name}: expected {sd} entries for a weight of shape {tuple(weight.shape)}, got {v}")
        return [int(i) for i in v]

    stride, padding, dilation = tup(stride, "stride"), tup(padding, "padding"), tup(dilation, "dilation")
    if sd and isinstance(a, torch.Tensor) and a.dim() == weight.dim():
        # checked here, naming the sizes: the kernels would otherwise compute a negative output size
        # and torch's gradient a message about its own internals
        size, kernel = tuple(a.shape[2:]), tuple(weight.shape[2:])
        span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        if any(i + 2 * p < s for i, p, s in zip(size, padding, span)):
            raise ValueError(f"a: its spatial size {size}, padded by {tuple(padding)}, is smaller than the weight's "
                             f"dilated kernel {span} (kernel {kernel}, dilation {tuple(dilation)}; weight of shape "
                             f"{tuple(weight.shape)}, a of shape {tuple(a.shape)})")
    return weight_power, stride, padding, dilation, int(groups)


def path_score(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
               weight_power: int = 1, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """The per-weight outer-product score of one layer of the path network,
    ``|weight|^weight_power ⊙ mask ⊙ G``, with G the gradient of Σ_n ⟨b_n, layer(a_n)⟩ with
    respect to the layer's weight: b[n, o]·a[n, c] summed over n for a dense weight [O, C]
    (a [N, C], b [N, O]); the convolution's weight gradient for a Conv1d/Conv2d weight (a the
    layer's input [N, C, (H,) W], b the gradient at its output [N, O, (Ho,) Wo]; ``stride``,
    ``padding`` (numbers), ``dilation`` and ``groups`` as for the layer). With a the forward path
    sums at the layer's input and b the backward ones at its output, ``weight_power`` 1 gives the
    SynFlow score, 0 the path-kernel diagonal ∂R/∂g(θ) ⊙ m.

    The score is exactly 0 under a zero mask entry, whatever the weight, a or b hold there (a
    select, not a product: inf * 0 would be NaN); values that only such entries read (a's channels
    or features, b's outputs whose weights are all pruned) reach no other entry. An input ``a``
    smaller than the dilated kernel (after padding) raises a ValueError naming both sizes."""
    weight_power, stride, padding, dilation, groups = _score_args(weight, a, b, mask, weight_power, stride, padding,
                                                                  dilation, groups)
    if FAMILY.use(weight.device):
        try:
            return torch.ops.ntkfast.path_score(weight, mask, a, b, weight_power, stride, padding, dilation, groups)
        except RuntimeError as exc:
            raise ValueError(str(exc).split("\nException raised from")[0]) from None
    return _path_score_reference(weight, a, b, mask, weight_power, stride, padding, dilation, groups)


def path_score_reference(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                         mask: Optional[torch.Tensor] = None, weight_power: int = 1, stride=1, padding=0, dilation=1,
                         groups: int = 1) -> torch.Tensor:
    """:func:`path_score` in plain PyTorch ops (``torch.nn.grad`` for the convolution gradient)."""
    args = _score_args(weight, a, b, mask, weight_power, stride, padding, dilation, groups)
    return _path_score_reference(weight, a, b, mask, *args)


def _path_score_reference(weight, a, b, mask, weight_power, stride, padding, dilation, groups):
    if weight.dim() == 2:
        grad = b.t() @ a
    elif weight.dim() == 3:
        grad = torch.nn.grad.conv1d_weight(a, weight.shape, b, stride, padding, dilation, groups)
    else:
        grad = torch.nn.grad.conv2d_weight(a, weight.shape, b, stride, padding, dilation, groups)
    scale = weight.abs() ** weight_power if weight_power else torch.ones_like(weight)
    out = scale * grad
    # a select: a pruned entry is exactly 0 even where |weight|^q or the gradient is not finite
    return torch.where(mask != 0, out * mask, 0) if mask is not None else out
