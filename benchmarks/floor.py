"""The least work an exact method must do, measured on the machine at hand.

A peer ratio says how we compare with other code; it does not say how much is left to gain. A
floor does: it times only the arithmetic and memory traffic that any exact implementation of a
workload must perform, each as one large library call with nothing around it:

- :func:`network_s`: the convolution and linear layers of a network, one call each (oneDNN /
  BLAS on the CPU, cuDNN / cuBLAS on CUDA; a 2-D convolution in whichever layout, contiguous or
  channels-last, is faster) for the forward pass, the input gradients and the weight gradients
  that the workload needs, at its batch size;
- :func:`gemm_s`: one matrix product of given shape; :func:`macs_s`: a count of multiply-adds at
  the best rate one large matrix product reaches here (for work no single library call does);
- :func:`traffic_s`: bytes that must be read and written once, at the copy bandwidth this
  machine measures (:func:`copy_bandwidth`).

Everything else a method does (normalisation, activations, element-wise work that could fuse
into the calls, Python, autograd bookkeeping) counts as overhead over the floor. A suite adds a
``floor(state) -> dict`` to its cases (see :func:`record`); the results JSON and README then carry
``floor_s`` and ``ours / floor`` beside the peer ratio.

    python -m benchmarks.floor --model resnet20 --batch 1       # one network's floor, printed
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .common import synchronize, time_once

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def timed(fn, device: torch.device, runs: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls after one untimed call (CUDA: events)."""
    device = torch.device(device)
    fn()
    synchronize(device)
    return statistics.median(time_once(fn, (), device) for _ in range(max(1, runs)))


def copy_bandwidth(device="cpu") -> float:
    """Bytes per second one copy moves on ``device``, reads and writes counted (a copy of n bytes
    moves 2n). Measured once per process on a buffer far larger than the caches."""
    return _copy_bandwidth(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _copy_bandwidth(device: str, nbytes: int = 256 * 2**20, runs: int = 5) -> float:
    dev = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), dev, runs)


def traffic_s(nbytes: float, device="cpu") -> float:
    """Seconds to move ``nbytes`` (reads plus writes) at the measured copy bandwidth."""
    return float(nbytes) / copy_bandwidth(device)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def gemm_s(m: int, k: int, n: int, dtype=torch.float32, device="cpu", runs: int = 5, batch: int = 1) -> float:
    """Seconds of one (batched) matrix product [batch, m, k] @ [batch, k, n]."""
    dev = torch.device(device)
    a = torch.randn(batch, m, k, dtype=dtype, device=dev)
    b = torch.randn(batch, k, n, dtype=dtype, device=dev)
    if batch == 1:
        a, b = a[0], b[0]
    out = torch.empty(*(a.shape[:-1] + b.shape[-1:]), dtype=dtype, device=dev)
    return timed(lambda: torch.matmul(a, b, out=out), dev, runs)


def gemm_rate(dtype=torch.float32, device="cpu") -> float:
    """Multiply-adds per second of one large square matrix product on ``device``: the machine's
    best dense rate, against which a count of multiply-adds becomes seconds."""
    return _gemm_rate(dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _gemm_rate(dtype, device: str, runs: int = 5) -> float:
    n = 2048 if torch.device(device).type == "cuda" else 1024
    return n ** 3 / gemm_s(n, n, n, dtype, device, runs)


def macs_s(macs: float, dtype=torch.float32, device="cpu") -> float:
    """Seconds of ``macs`` multiply-adds at the machine's best dense matrix-product rate."""
    return float(macs) / gemm_rate(dtype, device)


def layer_calls(model: nn.Module, x) -> List[Tuple[nn.Module, torch.Tensor, torch.Tensor, bool]]:
    """(module, input, output, input_is_network_input) of every convolution and linear call in
    one forward pass of ``model`` on ``x``, in eval mode and without gradients, so that nothing of
    the model (BatchNorm's running statistics) changes."""
    calls = []
    xs = x if isinstance(x, (tuple, list)) else (x,)
    ptrs = {t.data_ptr() for t in xs if isinstance(t, torch.Tensor)}

    def hook(m, args, out):
        a = args[0]
        calls.append((m, a.detach(), out.detach(), a.data_ptr() in ptrs))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, _CONVS + (nn.Linear,)) and m.weight is not None]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*xs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return calls


def _conv_fns(m, a, y, w, repeat, layout=torch.contiguous_format):
    if isinstance(m.padding, str):  # "same"/"valid": not timed rather than guessed
        return None
    a = a.repeat(repeat, *([1] * (a.dim() - 1))) if repeat > 1 else a
    g = torch.randn(repeat * y.shape[0], *y.shape[1:], dtype=y.dtype, device=y.device)
    a, g, w = (t.contiguous(memory_format=layout) for t in (a, g, w))
    geometry = (list(m.stride), list(m.padding), list(m.dilation), False, [0] * len(m.stride), m.groups)

    def forward():
        return torch.ops.aten.convolution(a, w, None, *geometry)

    def backward(mask):
        # one call for both gradients, as autograd makes it: oneDNN shares its layout work between them
        return lambda: torch.ops.aten.convolution_backward(g, a, w, None, *geometry, mask)

    return forward, backward, g.numel() * w[0].numel()


def _layouts(m) -> list:
    # a 2-D convolution may run faster channels-last (oneDNN's NHWC kernels; the trainer uses it on
    # the CPU): the floor takes whichever layout is faster for each call
    return [torch.contiguous_format, torch.channels_last] if isinstance(m, nn.Conv2d) else [torch.contiguous_format]


def _linear_fns(a, y, w, repeat):
    a2 = a.reshape(-1, a.shape[-1])
    a2 = a2.repeat(repeat, 1) if repeat > 1 else a2
    g = torch.randn(a2.shape[0], w.shape[0], dtype=y.dtype, device=y.device)
    wt = w.t()

    def backward(mask):
        calls = [f for f, wanted in ((lambda: g @ w, mask[0]), (lambda: g.t() @ a2, mask[1])) if wanted]
        return lambda: [f() for f in calls]

    return (lambda: a2 @ wt), backward, g.numel() * w.shape[1]


def network_s(model: nn.Module, x, *, forward: bool = True, input_grad: bool = True, weight_grad: bool = True,
              repeat: int = 1, runs: int = 5, scale=None) -> dict:
    """Seconds of the convolution and linear calls alone of one pass of ``model`` on ``x``:
    the forward calls, and the backward calls for the input gradients (not of the network's
    input) and the weight gradients, per layer one call as autograd makes it, with the batch
    ``repeat`` times larger (``repeat`` = outputs per sample for per-output passes).
    ``scale(module)``, where given, multiplies a layer's time (a 2:4 sparse layer does half the
    multiply-adds). Returns ``forward_s``, ``backward_s``, the multiply-adds and ``seconds``."""
    out = {"forward_s": 0.0, "backward_s": 0.0, "macs": 0, "layers": 0, "skipped": []}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for m, a, y, is_input in layer_calls(model, x):
        w = m.weight.detach()
        if isinstance(m, nn.Linear):
            variants = [_linear_fns(a, y, w, repeat)]
        else:
            variants = [_conv_fns(m, a, y, w, repeat, layout) for layout in _layouts(m)]
        if variants[0] is None:
            out["skipped"].append(type(m).__name__)
            continue
        macs = variants[0][2]
        out["layers"] += 1
        factor = 1.0 if scale is None else float(scale(m))
        if forward:
            out["forward_s"] += factor * min(timed(fwd, device, runs) for fwd, _, _ in variants)
            out["macs"] += int(factor * macs)
        mask = [input_grad and not is_input, weight_grad, False]
        if any(mask):
            out["backward_s"] += factor * min(timed(back(mask), device, runs) for _, back, _ in variants)
            out["macs"] += int(factor * macs) * sum(mask)
    out["seconds"] = out["forward_s"] + out["backward_s"]
    return out


def record(seconds: float, what: str, **parts) -> dict:
    """The fields a case's ``floor(state)`` returns: ``floor_s``, ``floor_what`` (in words) and
    any named parts (seconds), which the results JSON keeps under ``floor_parts``."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"floor: expected a positive finite number of seconds, got {seconds!r}")
    return {"floor_s": float(seconds), "floor_what": what,
            "floor_parts": {k: float(v) for k, v in parts.items()}}


def selection_floor(scores: Sequence[torch.Tensor], keep: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """A mask chosen from scores: every score (and keep flag) read once, one bool written per entry."""
    device = scores[0].device
    read = tensor_bytes(scores) + (tensor_bytes(keep) if keep is not None else 0)
    written = sum(s.numel() for s in scores)
    return record(traffic_s(read + written, device), "read the scores (and keep) once, write the bool mask",
                  traffic_s=traffic_s(read + written, device))


def path_floor(model: nn.Module, rounds: int = 1, select: bool = True, runs: int = 5) -> dict:
    """Data-free path scores (SynFlow and its variants, tr Pi): per round one forward and one
    backward of the network on a single all-ones input (convolution and linear calls; the |theta|
    and the mask fold into the weights), and where ``select``, one selection over the weights."""
    p = next(model.parameters())
    x = torch.ones((1,) + tuple(model.input_shape), dtype=p.dtype, device=p.device)
    net = network_s(model, x, runs=runs)
    weights = [m.weight for m, *_ in layer_calls(model, x)]
    pick = (traffic_s(tensor_bytes(weights) + sum(w.numel() for w in weights), p.device) if select else 0.0)
    what = "one forward and backward on a ones input (convolution and linear calls alone)"
    what += " and one selection over the weights, per round" if select else ""
    return record(rounds * (net["seconds"] + pick), what, network_s=rounds * net["seconds"], selection_s=rounds * pick)


def adam_traffic_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes one Adam step must move: read the weight, its gradient and two moments, write the
    weight and the two moments."""
    return 7 * tensor_bytes(params)


def training_floor(model: nn.Module, x: torch.Tensor, steps: int, networks: int = 1, optimizer: str = "adam",
                   masks=None, runs: int = 5) -> dict:
    """``steps`` training steps of ``networks`` copies of ``model`` on batches shaped like ``x``:
    per step the forward, input-gradient and weight-gradient calls (dense: what the layers
    run), and the optimiser's memory traffic (Adam: 7 passes over the parameters; SGD with
    momentum: 5) over the entries that can change: a pruned entry's weight, gradient and moments
    stay zero, so with ``masks`` ({parameter name: bool mask}) only the kept ones count."""
    net = network_s(model, x, runs=runs)
    masks = masks or {}
    entries = sum(int(masks[n].sum()) if n in masks else p.numel()
                  for n, p in model.named_parameters() if p.requires_grad)
    passes = {"adam": 7, "sgd": 5}[optimizer]
    elsize = next(model.parameters()).element_size()
    update = traffic_s(passes * entries * elsize, x.device)
    n = steps * networks
    return record(n * (net["seconds"] + update), f"per step and network: the convolution and linear calls of "
                  f"forward and backward, and the {optimizer} update's memory traffic",
                  network_s=n * net["seconds"], update_s=n * update)


def ntksap_floor(model: nn.Module, batch: int, pieces: int, stats_pass: bool, runs: int = 5, x=None) -> dict:
    """NTK-SAP over ``pieces`` batches (rounds x repeats): per batch the unperturbed and the
    perturbed network forward and backward (input and weight gradients: the mask's gradient
    needs both), and where ``stats_pass`` one more forward for the batch's BatchNorm statistics.
    ``x``: one input batch (token ids for a token model); default Gaussian of the model's shape."""
    p = next(model.parameters())
    if x is None:
        x = torch.randn(batch, *model.input_shape, device=p.device, dtype=p.dtype)
    net = network_s(model, x, runs=runs)
    forwards = 3 if stats_pass else 2
    per = forwards * net["forward_s"] + 2 * net["backward_s"]
    what = (f"per batch, {forwards} forward passes ({'statistics, ' if stats_pass else ''}unperturbed, perturbed) "
            "and 2 backward passes, convolution and linear calls alone")
    return record(pieces * per, what, per_batch_s=per)


def ntt_floor(teacher: nn.Module, student: nn.Module, x: torch.Tensor, outputs: int, runs: int = 5) -> dict:
    """One Neural Tangent Transfer step: the teacher's and the student's empirical NTK on the
    batch (as :func:`ntk_floor`), and once more the student's per-output calls for the gradient
    of the kernel term; the second-order work that gradient also needs is not counted."""
    t = ntk_floor(teacher, x, outputs, runs)["floor_s"]
    st = ntk_floor(student, x, outputs, runs)["floor_s"]
    return record(t + 2 * st, "the teacher's and the student's NTK calls (as ntk), and the student's once more for "
                  "the gradient; second-order terms not counted", teacher_s=t, student_s=2 * st)


def ntk_floor(model: nn.Module, x: torch.Tensor, outputs: int, runs: int = 5) -> dict:
    """An exact empirical NTK: one forward, then the cotangent of every layer and its weight
    gradient for every sample and output (input- and weight-gradient calls at batch N x outputs).
    Forming the kernel from them is not counted."""
    fwd = network_s(model, x, input_grad=False, weight_grad=False, runs=runs)
    back = network_s(model, x, forward=False, repeat=outputs, runs=runs)
    return record(fwd["seconds"] + back["seconds"], "one forward, and per sample and output the input- and "
                  "weight-gradient calls (batch N x outputs); forming the kernel not counted",
                  forward_s=fwd["seconds"], backward_s=back["seconds"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ntkfast import models

    p = argparse.ArgumentParser(description="Print a zoo network's floor: its convolution and linear calls alone")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="outputs per sample (per-output passes)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = models.get(args.model).eval()
    x = torch.randn(args.batch, *model.input_shape)
    f = network_s(model, x, repeat=args.repeat, runs=args.runs)
    bw = copy_bandwidth()
    print(f"# {args.model}, batch {args.batch} x {args.repeat}, {torch.get_num_threads()} threads; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    for k in ("forward_s", "backward_s", "seconds"):
        print(f"{k:14s} {f[k] * 1e3:9.3f} ms")
    print(f"{'macs':14s} {f['macs']:>9d} ({f['macs'] / f['seconds'] / 1e9:.1f} GMAC/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
