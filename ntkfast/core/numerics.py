"""Numerics shared by the methods: gradients as dicts, the finiteness test and the float64
fallback it drives, score normalisation, the loss the authors use, and the Lanczos iteration."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .targets import Target, resolve_dtype

__all__ = ["cross_entropy", "grad_dict", "all_finite", "remember_float64", "with_float64_fallback", "divide_by_total",
           "lanczos"]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, as nn.CrossEntropyLoss() in the authors' code. Sequence outputs
    (logits [N, T, classes], a language model's, with targets [N, T]) take the mean over every
    position, classes on the last dimension as Hugging Face models give them; PyTorch's
    [N, classes, T] is read as PyTorch reads it, and a shape that could be either is refused."""
    if logits.dim() == 3 and y.dim() == 2:
        last, middle = logits.shape[1] == y.shape[1], logits.shape[2] == y.shape[1]
        if last and middle:
            raise ValueError(f"data: logits of shape {tuple(logits.shape)} with targets {tuple(y.shape)} can be read "
                             "two ways (classes last, as Hugging Face gives them, or second, as PyTorch's "
                             "cross_entropy takes them); use a sequence length other than the number of classes")
        if last:
            check_classes(logits.shape[-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if logits.dim() >= 2:
        check_classes(logits.shape[1])
    return F.cross_entropy(logits, y)


def check_classes(classes: int, consequence: str = "every loss-based score would be 0") -> None:
    """ValueError naming the model when it gives a single class score."""
    if classes == 1:
        # the softmax of one logit is 1 whatever it is: the loss and every gradient are 0
        raise ValueError(f"model: gives one logit per sample; cross-entropy over a single class is 0 whatever the "
                         f"weights, so {consequence}. Give a binary classifier two logits (targets 0 and 1)")


def lacks_derivative(exc: BaseException) -> bool:
    """``exc`` is PyTorch saying it has no derivative for an operation (not any other
    NotImplementedError: an op missing for a dtype or device, or the user's own code)."""
    return isinstance(exc, NotImplementedError) and "derivative for" in str(exc)


def second_order_refusal(method: str, exc: BaseException, way_out: str) -> str:
    """The message for a second derivative PyTorch does not implement for one of the model's
    operations (e.g. ``EmbeddingBag``'s backward): the operation, and ``way_out``."""
    what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"model: {method} differentiates the network twice, and PyTorch has no second derivative for an "
            f"operation of this model ({what}); {way_out}")


# -- gradients, overflow, normalisation ----------------------------------------------------------
def grad_dict(
    output: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, create_graph: bool = False
) -> "OrderedDict[str, torch.Tensor]":
    """``d output / d inputs[name]`` for every name (zeros where ``output`` does not depend on it)."""
    names = list(inputs)
    tensors = [inputs[n] for n in names]
    if not output.requires_grad:
        return OrderedDict((n, torch.zeros_like(t)) for n, t in zip(names, tensors))
    grads = torch.autograd.grad(output, tensors, create_graph=create_graph, allow_unused=True)
    return OrderedDict(
        (n, g if g is not None else torch.zeros_like(t)) for n, t, g in zip(names, tensors, grads)
    )


def _floating_tensors(objs, out: list) -> list:
    for obj in objs:
        if isinstance(obj, Mapping):
            _floating_tensors(obj.values(), out)
        elif isinstance(obj, (list, tuple)):
            _floating_tensors(obj, out)
        elif isinstance(obj, torch.Tensor) and obj.is_floating_point():
            out.append(obj.detach())
    return out


def all_finite(*objs) -> bool:
    """True when every tensor given (directly, or as values of a mapping, or in a list) is finite.

    Tested through each tensor's sum: an inf or NaN anywhere makes the sum non-finite, and one
    reduction per tensor with a single host sync costs far less than an elementwise isfinite over
    every score each round. A sum can also overflow while every entry is finite; then this says
    False and the caller recomputes in float64, which is merely cautious."""
    tensors = _floating_tensors(objs, [])
    if not tensors:
        return True
    by_device: Dict[torch.device, list] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.sum().double())
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())


def remember_float64(cache: Optional[dict], scorer: str, failed: torch.dtype) -> None:
    """Note in a per-run ``cache`` that ``scorer`` needs float64 on this model, and drop what it
    cached for the ``failed`` dtype (cache keys are ``(scorer, dtype)`` by convention)."""
    if cache is None:
        return
    cache[("float64 fallback", scorer)] = True
    for key in [k for k in cache if isinstance(k, tuple) and len(k) == 2 and k == (scorer, failed)]:
        del cache[key]


def with_float64_fallback(
    compute: Callable[[torch.dtype], Tuple[Mapping[str, torch.Tensor], bool]],
    targets: Mapping[str, Target],
    dtype=None,
    *,
    scorer: str,
    cache: Optional[dict] = None,
):
    """Run ``compute(dt)`` in the computation dtype (see :func:`resolve_dtype`); ``compute`` returns
    ``(scores, finite)`` where ``finite`` says the forward outputs and the raw scores had no inf/nan.
    If they had and ``dt`` is not float64, warn once (RuntimeWarning) and recompute in float64.
    Returns the scores of the last computation."""
    dt = resolve_dtype(targets, dtype)
    remembered = ("float64 fallback", scorer)
    if cache is not None and cache.get(remembered):
        dt = torch.float64  # an earlier call on this model already needed it: skip the retry
    with torch.enable_grad():
        scores, finite = compute(dt)
        if finite or dt == torch.float64:
            return scores
        warnings.warn(
            f"{scorer}: the {str(dt).replace('torch.', '')} computation overflowed (inf/nan in the network "
            "output or the scores); recomputing in float64",
            RuntimeWarning,
            stacklevel=3,
        )
        remember_float64(cache, scorer, dt)
        scores, finite = compute(torch.float64)
    if not finite:
        warnings.warn(f"{scorer}: the scores are not finite even in float64", RuntimeWarning, stacklevel=3)
    return scores


def divide_by_total(
    scores: Mapping[str, torch.Tensor], *, abs_total: bool = False, eps: float = 0.0
) -> "OrderedDict[str, torch.Tensor]":
    """Scores divided by their sum over all tensors (``|sum| + eps`` with ``abs_total``). A zero or
    non-finite total leaves the scores as they are (the authors' code would return nan)."""
    names = list(scores)
    dev = scores[names[0]].device
    total = torch.stack([scores[n].sum().to(dev) for n in names]).sum()
    norm = total.abs() + eps if abs_total else total
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return OrderedDict((n, scores[n]) for n in names)
    return OrderedDict((n, scores[n] / norm.to(scores[n].device)) for n in names)


def lanczos(matvec, n: int, steps: int, *, dtype, device, generator) -> torch.Tensor:
    """Ritz values (ascending) of a symmetric operator after ``steps`` Lanczos steps with full
    reorthogonalisation (the kernel is small next to the network, so the O(n·steps) basis is cheap
    and keeps the Ritz values free of ghosts)."""
    q = torch.randn(n, generator=generator, dtype=dtype, device=device)
    q = q / q.norm()
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[-1])
        alpha = torch.dot(w, basis[-1])
        alphas.append(alpha)
        Q = torch.stack(basis, 1)
        w = w - Q @ (Q.T @ w)
        w = w - Q @ (Q.T @ w)
        beta = w.norm()
        if j == steps - 1 or beta <= 1e-10 * max(abs(float(alpha)), 1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    T = torch.diag(torch.stack(alphas))
    if betas:
        b = torch.stack(betas[: len(alphas) - 1])
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigvalsh(T)
