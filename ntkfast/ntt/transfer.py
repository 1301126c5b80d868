"""Neural Tangent Transfer (Liu & Zenke, ICML 2020): train a sparse student, without labels, so
that its outputs and its empirical NTK match those of the dense teacher.

Per step, on a batch X of B inputs split into X1 = X[:B//2] and X2 = X[B//2:]:

    L = λ_ker ‖Θ_s(X1, X2) − Θ_t(X1, X2)‖² / (n1 n2 K²) + ‖f_s(X) − f_t(X)‖² / (B K) + (λ_L2 / d) Σ ‖m ⊙ W‖²

with Θ the full cross-NTK [n1, n2, K, K] (the student's differentiated through, by
``ntkfast.ntk.empirical_ntk(create_graph=True)``), f_s the student with weights W ⊙ m, d the
density and the L2 sum over the masked weights (biases excluded). Adam. Every
``mask_update_every`` steps the mask is re-selected by the magnitude of the student's dense
weights (pruned entries keep their stale values and may come back), except in the last
``mask_update_every`` steps.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.batchnorm import BN_MODES, BNMode, batchnorm_layers, calibrate_module
from ..core.checks import check_choice, check_int, check_number, check_seed
from ..core.compiled import unwrap, without_compiled_submodules
from ..core.exclude import ExcludeSpec, resolve_exclude
from ..core.options import InitMask, Scope, TransferKernel, choices
from ..core.tokens import embeds_tokens
from ..core.unlabelled import Unlabelled, split_validation, total_steps
from ..distributed import Shard, resolve as resolve_shard
from ..masks import Masks, prunable_parameters, threshold
from ..ntk import empirical_ntk
from . import _checkpoint as _ckpt
from ..core.concurrency import holds_model
from ..core.numerics import lacks_derivative, second_order_refusal
from ..core.state import finite_model, output_tensor
from ..core.progress import check_progress, progress_bar

__all__ = ["transfer", "transfer_loss", "TransferResult", "KERNELS", "INIT_MASKS"]

KERNELS = choices(TransferKernel)
INIT_MASKS = choices(InitMask)
_SCOPES = choices(Scope)

_log = logging.getLogger(__name__)

_LOGIT_SNIP_SAMPLES = 128  # the authors score the first 128 training inputs
_CALIBRATION_BATCHES = 16  # bn="calibrate": the training batches whose mean statistics BatchNorm takes


class TransferResult(tuple):
    """``(masks, state_dict)``, so that ``masks, state = transfer(...)`` works, plus ``history``:
    {"step", "loss", "kernel_distance", "target_distance", "l2", "seconds"} lists of the
    validation losses (at step 0, every ``log_every`` steps and at the end; "l2" is the unweighted
    Σ ‖m ⊙ W‖²), and "train_loss" per logged step (the mean over the steps since the last log)."""

    def __new__(cls, masks: Masks, state_dict, history: Dict[str, list]):
        obj = super().__new__(cls, (masks, state_dict))
        obj.history = history
        return obj

    def __reduce__(self):  # pickle / deepcopy: rebuild with the history
        return (TransferResult, (self[0], self[1], self.history))

    @property
    def masks(self) -> Masks:
        return self[0]

    @property
    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return self[1]


def _flat_outputs(out: torch.Tensor, n: int) -> torch.Tensor:
    out = output_tensor(out)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"model: expected an output tensor with a batch dimension of {n}, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out.reshape(n, -1)


def _halves(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    h = x.shape[0] // 2
    return x[:h], x[h:]


def _rows(n: int, part: Optional[Tuple[int, int]]) -> slice:
    """Rows of ``part`` = (index, count): the index-th of count contiguous blocks of range(n)."""
    if part is None:
        return slice(0, n)
    rows = Shard(rank=part[0], size=part[1]).block(n)
    return slice(rows.start, rows.stop)


def teacher_targets(teacher: nn.Module, x: torch.Tensor, params=None,
                    part: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's outputs on x [B, K] and its full cross-NTK between the halves of x, with
    respect to ``params`` (names; default: all of the teacher's parameters, frozen or not).
    With ``part`` (see :func:`transfer_loss`) only that part's rows of both."""
    x1, x2 = _halves(x)
    r1, rx = _rows(x1.shape[0], part), _rows(x.shape[0], part)
    if params is None:
        params = [n for n, _ in teacher.named_parameters()]
    with torch.no_grad():
        out = _flat_outputs(teacher(x[rx]), rx.stop - rx.start) if rx.stop > rx.start else None
    if r1.stop > r1.start:
        ntk = empirical_ntk(teacher, x1[r1], x2, mode="full", params=params, process_group=False)
    else:
        ntk = None
    return out, ntk


def transfer_loss(student: nn.Module, masks: Mapping[str, torch.Tensor], x: torch.Tensor,
                  teacher_out: torch.Tensor, teacher_ntk: torch.Tensor, *, density: float,
                  lambda_ker: float = 1e-3, lambda_l2: float = 1e-4, kernel: TransferKernel = "sparse",
                  create_graph: bool = True,
                  part: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The NTT loss of ``student`` (weights W ⊙ masks) on the batch ``x`` against the teacher's
    outputs and cross-NTK (see :func:`teacher_targets`). Returns (loss, {"kernel_distance",
    "target_distance", "l2"}), differentiable with respect to the student's parameters.

    kernel: "sparse" (default, the NTK of the sparse network: only unmasked weight entries are
    differentiated) or "authors_code" (as the authors' JAX code: the Jacobian over every weight
    entry, evaluated at the masked weights W ⊙ m, so pruned entries' derivatives count too).

    part: (index, count) for a loss split over processes: this part's share, the kernel term over
    its contiguous block of the rows of X1, the target term over its block of the rows of X, the
    L2 term in part 0 only; the count shares add up to the whole loss (each normalised by the whole
    batch's sizes). ``teacher_out`` / ``teacher_ntk`` are then that part's rows
    (``teacher_targets(..., part=part)``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    # the loss holds the student's NTK, so its gradient is a second derivative: attention is recorded
    # on PyTorch's math kernel, as the fused kernels have none
    with sdpa_kernel([SDPBackend.MATH]):
        return _transfer_loss(student, masks, x, teacher_out, teacher_ntk, density, lambda_ker, lambda_l2, kernel,
                              create_graph, part)


def _transfer_loss(student, masks, x, teacher_out, teacher_ntk, density, lambda_ker, lambda_l2, kernel, create_graph,
                   part):
    x1, x2 = _halves(x)
    r1, rx = _rows(x1.shape[0], part), _rows(x.shape[0], part)
    every = OrderedDict(student.named_parameters())
    named = OrderedDict((n, p) for n, p in every.items() if p.requires_grad)
    masked = OrderedDict((n, every[n] * masks[n].to(every[n].dtype)) for n in masks)
    zero = next(iter(masked.values())).new_zeros(())
    ker = target = zero
    if r1.stop > r1.start:
        if kernel == "sparse":
            theta = empirical_ntk(student, x1[r1], x2, masks=masks, mode="full", create_graph=create_graph,
                                  process_group=False)
        else:
            values = OrderedDict((n, masked.get(n, p)) for n, p in named.items())
            theta = empirical_ntk(student, x1[r1], x2, params=values, mode="full", create_graph=create_graph,
                                  process_group=False)
        k = theta.shape[-1]
        ker = (theta - teacher_ntk).square().sum() / (x1.shape[0] * x2.shape[0] * k * k)
    if rx.stop > rx.start:
        out = _flat_outputs(functional_call(student, masked, (x[rx],)), rx.stop - rx.start)
        target = (out - teacher_out).square().sum() / (x.shape[0] * out.shape[1])
    l2 = sum(w.square().sum() for w in masked.values()) if part is None or part[0] == 0 else zero
    loss = lambda_ker * ker + target + (lambda_l2 / density) * l2
    return loss, {"kernel_distance": ker, "target_distance": target, "l2": l2}


def select_masks(weights: Mapping[str, torch.Tensor], density: float, scope: Scope) -> Masks:
    """Keep the round(density · n) largest |W| (per tensor, or over all of them)."""
    return Masks(threshold({n: w.detach().abs() for n, w in weights.items()}, density, scope=scope))


def logit_snip_masks(model: nn.Module, names, x: torch.Tensor, density: float, scope: str) -> Masks:
    """|θ ⊙ ∂Σ f(x)²/∂θ| on the inputs x, thresholded like the magnitude masks."""
    # detached copies, so that frozen weights are scored too
    weights = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if n in set(names)}
    with torch.enable_grad():
        out = functional_call(model, weights, (x,))
        grads = torch.autograd.grad(out.square().sum(), [weights[n] for n in names])
    return Masks(threshold({n: (weights[n].detach() * g).abs() for n, g in zip(names, grads)}, density,
                           scope=scope))


def _check_fits(model: nn.Module, x: torch.Tensor, name: str) -> None:
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{name}: the model cannot take these inputs (sample shape {tuple(x.shape[1:])}, "
                         f"{x.dtype}): {exc}") from None
    _flat_outputs(out, x.shape[0])


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only; elsewhere nothing).

    Each step allocates and frees differently sized NTK temporaries; glibc keeps the freed pages
    in a fragmented heap, and a CPU transfer of LeNet-5 grew by about 0.7 MB per step (6 GB after
    5,700 steps) until trimmed: with a trim every 100 steps it stays under 1 GB."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _callback_stops(shard, callback, info) -> bool:
    """The user's callback, on every process; the transfer stops when it returns False on any
    (and stops everywhere when it raises on any)."""
    _, (stops,) = shard.all_sum(lambda: ([], [1.0 if callback(info) is False else 0.0]), [], flags=1)
    return stops > 0


def _model_info(model: nn.Module):
    """Device and dtype of the teacher, refused by name where NTT cannot run: no parameters, meta
    tensors, NaN/inf anywhere (the teacher is dense: every weight is kept), or a half dtype (the
    NTK blocks are computed in float32 or float64)."""
    p = next(iter(model.parameters()), None)
    if p is None:
        raise ValueError("model: has no parameters to transfer")
    finite_model(model)  # meta tensors and non-finite values, by name
    if p.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"model: NTT computes in float32 or float64, the model is {p.dtype}; convert it first "
                         "(model.float()) and back after, if you must")
    return p.device, p.dtype


@holds_model
def transfer(
    model: nn.Module,
    density: float,
    data,
    *,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    batch_size: int = 64,
    lambda_ker: float = 1e-3,
    lambda_l2: float = 1e-4,
    lr: float = 5e-4,
    mask_update_every: Optional[int] = 100,
    init_mask: InitMask = "magnitude",
    scope: Scope = "layerwise",
    seed: int = 0,
    progress: Optional[bool] = None,
    callback: Optional[Callable[[dict], Optional[bool]]] = None,
    validation=None,
    log_every: int = 100,
    kernel: TransferKernel = "sparse",
    checkpoint=None,
    checkpoint_every: Optional[int] = None,
    process_group=None,
    exclude: Optional[ExcludeSpec] = None,
    bn: Optional[BNMode] = None,
    include: Optional[ExcludeSpec] = None,
) -> TransferResult:
    """Neural Tangent Transfer: a sparse student of ``model`` whose outputs and empirical NTK
    mimic the dense ``model``'s, learned without labels.

    Args:
        model: the teacher (dense, frozen; used as given). The student starts from its weights.
            Both are run in eval mode (BatchNorm on its running statistics, dropout off; see
            ``bn``); the user's model is not changed. The trainable parameters (requires_grad) are learned and
            span both NTKs; frozen ones stay as they are.
        density: fraction of the prunable weights (Linear and Conv weights) kept, in (0, 1].
            Biases are never masked; they and any other parameter are trained.
        data: unlabelled inputs: a tensor [N, ...], a pair (inputs, targets) whose targets are
            ignored, an ntkfast dataset, a torch Dataset or an iterable of batches.
        steps / epochs: how long (give at most one; default 20 epochs, as the authors). An epoch
            is one pass over the training part of ``data`` in batches of ``batch_size``; a last
            batch of one sample is dropped.
        batch_size: B; each batch is split into its first B//2 and last B - B//2 inputs for the
            cross-NTK.
        lambda_ker, lambda_l2, lr: the loss weights and Adam's learning rate (the authors use
            lambda_l2 = 1e-4 for MLPs and 1e-5 for CNNs).
        mask_update_every: re-select the mask by layerwise (or global) magnitude of the dense
            student weights every this many steps, except in the last this many steps; None
            never updates it.
        init_mask: "magnitude" (|W| of the teacher) or "logit_snip" (|W ⊙ ∂Σf(x)²/∂W| on the
            first 128 training inputs).
        scope: "layerwise" (each tensor keeps the density) or "global".
        seed: the order of the batches.
        progress: a bar of the steps (rate, ETA, the step's loss and the last validation's).
            None (default): on a terminal at once, elsewhere only once the transfer has run a
            couple of seconds; True: always; False: none. Each validation is also logged
            (``logging.getLogger("ntkfast")``: INFO with ``progress=False``, DEBUG otherwise).
        callback: called after every step with a dict: step, loss, kernel_distance,
            target_distance, l2; "masks" (the mask the step trained with), "student" (the
            student module; read it, do not change it), "masks_updated" (the mask is re-selected
            right after this call), and "validation" when one was logged. Returning False stops
            the transfer (without that step's re-selection).
        validation: an int holds out that many inputs from the end of ``data``; a tensor gives
            the validation inputs; 0 turns validation off. Default: ``batch_size`` inputs (the
            authors' validation batch) when the data has at least 4 batches, else a quarter.
        log_every: steps between validation evaluations (the authors: 100).
        kernel: "sparse" or "authors_code", see :func:`transfer_loss`.
        bn: the BatchNorm statistics of teacher and student: "calibrate" (default on a network
            with BatchNorm: set, in the copies, to the mean statistics of the first 16 training
            batches before the transfer starts, so the teacher's kernel is that of a normalised
            network) or "eval" (the running statistics as they are; a fresh network's are
            (0, 1), and on ResNet-20 the kernel term then outweighs the output term ~50,000-fold,
            against ~30-fold calibrated: benchmarks/ntt_batchnorm_terms.py). "train" is refused:
            in train mode a sample's output depends on the rest of its batch, and the per-sample
            NTK is not defined. Without BatchNorm layers both mean the same and "eval" is recorded.
        checkpoint: a file path. The transfer's whole state (student, Adam, mask, position in
            the data, history) is written there every ``checkpoint_every`` steps and at the end;
            when the file exists, the transfer resumes from it and gives the same result as an
            uninterrupted run. A checkpoint made with other settings, data or teacher is refused.
        checkpoint_every: steps between checkpoints (default ``log_every``).
        process_group: split every step over the group's processes (default: the world group when
            torch.distributed is initialised; False: none). Each process computes its block of
            the rows of the batch (of X1 for the kernel term, of X for the target term) and the
            gradients of the one student are all-reduced, so every process takes the same Adam
            steps and the result is the single-process one up to floating-point summation order.
            Every process passes the same model and data (checked); rank 0 alone prints and writes
            the checkpoint (which every process must be able to read to resume).
        exclude: weights the student keeps dense: names, module types, modules or a predicate, as
            for :func:`ntkfast.prune`. They are trained like the others (and count in the L2 term)
            but never masked; ``density`` is the fraction kept of the other prunable weights, and
            the masks returned hold the excluded ones all kept (``masks.metadata["exclude"]``).
        include: weights the student masks besides the Linear and Conv weights (an embedding
            table, transformers' ``Conv1D``, recurrent weights), picked as for
            :func:`ntkfast.prune`; ``exclude`` acts after it.

    Returns:
        a :class:`TransferResult`: ``(masks, state_dict)`` (the learned weights, zero where
        masked, keyed as ``model.state_dict()``) with ``.history``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    # a torch.compile'd model (or submodule): the original modules, whose names the masks take
    model = without_compiled_submodules(unwrap(model))
    density = check_number(density, "density", lo=0.0, lo_open=True)
    if density > 1.0:
        raise ValueError(f"density: expected a fraction in (0, 1], got {density!r}")
    if steps is not None and epochs is not None:
        raise ValueError("steps, epochs: give one of them, not both")
    steps = check_int(steps, "steps", lo=1, allow_none=True)
    epochs = check_number(epochs, "epochs", lo=0.0, lo_open=True, allow_none=True)
    if steps is None and epochs is None:
        epochs = 20.0
    batch_size = Unlabelled.check_batch_size(batch_size)
    lambda_ker = check_number(lambda_ker, "lambda_ker", lo=0.0)
    lambda_l2 = check_number(lambda_l2, "lambda_l2", lo=0.0)
    lr = check_number(lr, "lr", lo=0.0, lo_open=True)
    mask_update_every = check_int(mask_update_every, "mask_update_every", lo=1, allow_none=True)
    log_every = check_int(log_every, "log_every", lo=1)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", lo=1, allow_none=True)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint: expected a file path or None, got {type(checkpoint).__name__}")
    seed = check_seed(seed)
    check_progress(progress)
    check_choice(init_mask, "init_mask", INIT_MASKS)
    check_choice(scope, "scope", _SCOPES)
    check_choice(kernel, "kernel", KERNELS)
    if bn == "train":
        raise ValueError("bn: 'train' is not supported by NTT (in train mode a sample's output depends on the rest of "
                         "its batch, so the per-sample NTK is not defined); use 'eval' or 'calibrate'")
    if bn is not None:
        check_choice(bn, "bn", BN_MODES)
    # the mode a checkpoint and the result record: what actually ran
    bn = ("calibrate" if bn in (None, "calibrate") else "eval") if batchnorm_layers(model) else "eval"
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected a callable or None, got {type(callback).__name__}")
    device, dtype = _model_info(model)
    hooked = [n for n, _ in model.named_parameters() if n.endswith("_orig")]
    if hooked:
        raise ValueError(f"model: has torch.nn.utils.prune re-parametrisations ({', '.join(hooked[:3])}); NTT "
                         "learns its own mask from a dense model: pass the model without them")
    renormed = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
    if renormed:
        raise ValueError(f"model: the embedding {renormed[0]!r} has max_norm, which rewrites its rows in place on "
                         "every lookup; the NTK's per-sample derivatives (torch.func) cannot pass through that. "
                         "Build the embedding without max_norm for the transfer")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model: no parameter requires grad, so the student has nothing to learn")
    every_name = list(prunable_parameters(model, include=include))
    if not every_name:
        raise ValueError("model: no prunable weights (Linear or Conv modules) to mask; include= adds others")
    default = set(prunable_parameters(model)) if include is not None else set(every_name)
    included = [n for n in every_name if n not in default]
    excluded = resolve_exclude(model, exclude, every_name)
    names = [n for n in every_name if n not in excluded]  # the masked ones
    if not names:
        raise ValueError(f"exclude: keeps every prunable weight dense ({', '.join(excluded[:6])}); "
                         "nothing is left to mask")
    frozen = [n for n in every_name if n not in trainable]
    if frozen and kernel == "authors_code":
        raise ValueError(f"kernel: 'authors_code' differentiates every masked weight, but {frozen[0]!r} is frozen; "
                         "use kernel='sparse' or unfreeze it")

    shard = resolve_shard(process_group)
    part = (shard.rank, shard.size) if shard.split else None
    # what depends on each process's own data is agreed on (shard.run), so that no process goes on
    # into a collective that another has left
    # token ids are inputs like any other: the NTK is taken with respect to the weights only
    ids = embeds_tokens(model)
    source = shard.run(lambda: Unlabelled(data, ids=ids))
    if validation is None:  # the authors' validation batch, when the data can spare it
        validation = batch_size if len(source) >= 4 * batch_size else (len(source) // 4 if len(source) >= 8 else 0)
    train_idx, val_x = shard.run(lambda: split_validation(source, validation, ids=ids))
    n_train = len(train_idx)
    if Unlabelled.batches_per_epoch(n_train, batch_size) == 0:
        raise ValueError(f"data: {n_train} training inputs, too few for one batch of two")
    total = total_steps(n_train, batch_size, steps, epochs)

    def prepare(x):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

    # Everything that can fail is checked before the transfer starts; only copies are touched.
    teacher = copy.deepcopy(model).eval()

    def check_inputs():
        _check_fits(teacher, prepare(source.take(train_idx[:2])), "data")
        if val_x is not None:
            _check_fits(teacher, prepare(val_x[:2]), "validation")
            if val_x.is_floating_point() and not bool(torch.isfinite(val_x).all()):
                raise ValueError("validation: the validation inputs hold NaN/inf values")

    shard.run(check_inputs)
    if val_x is not None:
        val_x = prepare(val_x)
    if shard.split:
        shard.check_same_model(model)
        # about a thousand inputs spread over the data, and the validation inputs
        sample = train_idx[::max(1, n_train // 1024)]
        shard.check_same("data", {"training inputs": shard.run(lambda: source.take(sample)),
                                  **({"validation inputs": val_x} if val_x is not None else {})})
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(model).eval()  # keeps the user's requires_grad: frozen stays frozen
    if bn == "calibrate":
        calibration = [prepare(source.take(train_idx[i:i + batch_size]))
                       for i in range(0, min(n_train, _CALIBRATION_BATCHES * batch_size), batch_size)]
        calibrate_module(teacher, calibration)
        calibrate_module(student, calibration)
    sparams = dict(student.named_parameters())
    dense = {n: torch.ones_like(sparams[n], dtype=torch.bool) for n in excluded}

    def with_dense(chosen: Mapping[str, torch.Tensor]) -> Masks:
        """Every prunable weight's mask, in the model's order: the excluded ones all kept."""
        return Masks(OrderedDict((n, chosen[n].to(device) if n in chosen else dense[n]) for n in every_name))

    if init_mask == "magnitude":
        masks = with_dense(select_masks({n: sparams[n] for n in names}, density, scope))
    else:
        snip_x = prepare(source.take(train_idx[:_LOGIT_SNIP_SAMPLES]))
        masks = with_dense(logit_snip_masks(student, names, snip_x, density, scope))  # = the teacher, differentiable

    if val_x is not None:
        val_t_out, val_t_ntk = teacher_targets(teacher, val_x, trainable, part=part)

    opts = dict(density=density, lambda_ker=lambda_ker, lambda_l2=lambda_l2, kernel=kernel)
    history: Dict[str, List] = {k: [] for k in ("step", "loss", "kernel_distance", "target_distance", "l2",
                                               "train_loss", "seconds")}
    t_start = time.perf_counter()
    pending: List[float] = []

    def validate(step):
        if val_x is None:
            return None

        def local():
            loss, parts = transfer_loss(student, masks, val_x, val_t_out, val_t_ntk, create_graph=False, part=part,
                                        **opts)
            return [], [float(loss.detach())] + [float(v.detach()) for v in parts.values()]

        # the parts' losses add up to the whole (see transfer_loss)
        _, (loss, ker, target, l2) = shard.all_sum(local, [], flags=4)
        rec = {"step": step, "loss": loss, "kernel_distance": ker, "target_distance": target, "l2": l2,
               "train_loss": (sum(pending) / len(pending)) if pending else float("nan"),
               "seconds": time.perf_counter() - t_start}
        for k, v in rec.items():
            history[k].append(v)
        pending.clear()
        return rec

    learned = [p for p in student.parameters() if p.requires_grad]
    like = [p.detach() for p in learned]
    optimizer = torch.optim.Adam(learned, lr=lr)
    step, epoch, in_epoch, stopped = 0, 0, 0, False
    if checkpoint is not None:
        settings = dict(opts, steps=total, batch_size=batch_size, lr=lr, mask_update_every=mask_update_every,
                        init_mask=init_mask, scope=scope, seed=seed, log_every=log_every)
        if excluded:  # (only then: checkpoints made before exclude= existed still resume)
            settings["exclude"] = list(excluded)
        if included:
            settings["include"] = included
        if bn != "eval":
            settings["bn"] = bn
        expected = _ckpt.fingerprint(teacher, settings, source.take(train_idx[:batch_size]), n_train, val_x)
        saved = shard.run(lambda: _ckpt.load(checkpoint, expected))
        if shard.split:  # every process must resume from the same point (a file they all read)
            where = [-1, 0, 0] if saved is None else [saved["step"], saved["epoch"], saved["in_epoch"]]
            shard.check_same("checkpoint", {"resumed step, epoch and batch": torch.tensor(where)})
        if saved is not None:
            student.load_state_dict(saved["student"])
            optimizer.load_state_dict(saved["optimizer"])
            masks = Masks(OrderedDict((n, m.to(device)) for n, m in saved["masks"].items()))
            history = saved["history"]
            pending[:] = saved["pending"]
            step, epoch, in_epoch = saved["step"], saved["epoch"], saved["in_epoch"]
            t_start = time.perf_counter() - saved["elapsed"]
        every = checkpoint_every or log_every

    def save_checkpoint():
        # rank 0 writes; the others wait to hear whether it could
        shard.run(lambda: write_checkpoint() if shard.rank == 0 else None)

    def write_checkpoint():
        _log.debug("transfer: checkpoint at step %d written to %s", step, checkpoint)
        _ckpt.save(checkpoint, {
            "fingerprint": expected, "step": step, "epoch": epoch, "in_epoch": in_epoch,
            "student": student.state_dict(), "optimizer": optimizer.state_dict(),
            "masks": OrderedDict((n, m.cpu()) for n, m in masks.items()), "history": history,
            "pending": list(pending), "elapsed": time.perf_counter() - t_start})

    if step and shard.rank == 0:
        _log.info("transfer: resuming from %s at step %d of %d", checkpoint, step, total)
    bar = progress_bar(total, "transfer", progress=progress, active=shard.rank == 0, unit="step", initial=step)
    # rank 0 alone reports; at INFO where no bar is wanted
    log_level = None if shard.rank else logging.INFO if bar.silenced else logging.DEBUG

    def report(rec):
        bar.update(0, val_loss=rec["loss"], ker=rec["kernel_distance"], target=rec["target_distance"])
        if log_level is not None:
            _log.log(log_level, "transfer: step %d of %d: validation loss %.4g (kernel %.4g, target %.4g)",
                     rec["step"], total, rec["loss"], rec["kernel_distance"], rec["target_distance"])

    last_update_limit = total - (mask_update_every or 0)
    try:
        if step == 0:
            first = validate(0)
            if first is not None:
                report(first)
        while step < total and not stopped:
            for xb in source.epoch(train_idx, batch_size, (seed * 100_003 + epoch) % 2**63, skip=in_epoch):
                in_epoch += 1
                xb = prepare(xb)
                if xb.is_floating_point() and not bool(torch.isfinite(xb).all()):
                    raise ValueError(f"data: a batch at step {step + 1} holds NaN/inf inputs")

                def local():
                    t_out, t_ntk = teacher_targets(teacher, xb, trainable, part=part)
                    with torch.enable_grad():
                        loss, parts = transfer_loss(student, masks, xb, t_out, t_ntk, part=part, **opts)
                        grads = (torch.autograd.grad(loss, learned, allow_unused=True) if loss.requires_grad
                                 else [None] * len(learned))
                    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, learned)]
                    return grads, [float(loss.detach())] + [float(v.detach()) for v in parts.values()]

                optimizer.zero_grad(set_to_none=True)
                try:
                    grads, (loss, ker, target, l2) = shard.all_sum(local, like, flags=4)
                except NotImplementedError as exc:  # the loss's gradient differentiates the NTK again
                    if not lacks_derivative(exc):
                        raise
                    raise ValueError(second_order_refusal(
                        "transfer", exc, "freeze that layer's weights (requires_grad_(False)) so that the "
                        "student does not learn them")) from None
                if not math.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads):
                    # said here, before the step writes it into the student: later checks would
                    # find NaN weights and could only blame the model the student was copied from
                    raise ValueError(f"transfer: the loss or its gradient is not finite at step {step + 1} "
                                     f"(loss {loss:.4g}, kernel term {ker:.4g}, output term {target:.4g}); the "
                                     "student diverged or a layer's forward is not finite under the masks: try a "
                                     "smaller lr, or float64")
                for p, g in zip(learned, grads):
                    p.grad = g
                optimizer.step()
                step += 1
                pending.append(loss)
                bar.update(1, loss=loss)
                update = bool(mask_update_every) and step % mask_update_every == 0 and step < last_update_limit
                info = {"step": step, "loss": loss, "kernel_distance": ker, "target_distance": target, "l2": l2,
                        "masks_updated": update, "masks": masks, "student": student}
                # as the authors: the validation at a multiple of 100 steps sees the mask trained
                # with; the re-selection comes after it
                if step % log_every == 0 or step == total:
                    _release_free_memory()
                    rec = validate(step)
                    if rec is not None:
                        info["validation"] = rec
                        report(rec)
                if callback is not None and _callback_stops(shard, callback, info):
                    stopped = True  # and the mask stays the one the student was trained with
                if update and not stopped:
                    masks = with_dense(select_masks({n: sparams[n] for n in names}, density, scope))
                if stopped or step >= total:
                    break
                if checkpoint is not None and step % every == 0:
                    save_checkpoint()
            else:
                epoch, in_epoch = epoch + 1, 0
    finally:
        bar.close()
    if stopped and (not history["step"] or history["step"][-1] != step):
        validate(step)
    if checkpoint is not None:
        save_checkpoint()

    with torch.no_grad():
        state = OrderedDict((k, v.detach().clone()) for k, v in student.state_dict().items())
        for n in names:
            state[n].mul_(masks[n].to(state[n].dtype))
    out_masks = Masks(OrderedDict((n, m.cpu()) for n, m in masks.items()), metadata={
        "method": "ntt", "density": density, "scope": scope, "init_mask": init_mask, "steps": step,
        "batch_size": batch_size, "lambda_ker": lambda_ker, "lambda_l2": lambda_l2, "lr": lr,
        "mask_update_every": mask_update_every, "seed": seed, "kernel": kernel,
        **({"exclude": list(excluded)} if excluded else {}), **({"include": included} if included else {}),
        **({"bn": bn} if bn != "eval" else {}),
    })
    return TransferResult(out_masks, state, history)
