"""Train K masked copies of one architecture at once: one pass of a K-times stacked batch.

    from ntkfast.training_grouped import train_grouped

    nets = [models.resnet20() for _ in methods]        # same architecture, own weights
    masks = [prune(net, m, 0.1) for net, m in zip(nets, methods)]
    results = train_grouped(nets, masks, train_set, test_set, epochs=160, lr_milestones=[80, 120])

A pruning study trains many small networks that differ only in their weights and masks. One at a
time, a GPU runs ResNet-20's small kernels far below its capacity; here every parameter is held
as one ``[K, *shape]`` tensor and the network runs once on the batch repeated K times (the
:class:`~ntkfast.core.grouped.GroupedNetwork` NTK-SAP uses for its weight draws): linear layers
become batched matmuls, convolutions grouped convolutions on CUDA (one per network on CPU), and
BatchNorm normalises each network's rows by their own statistics and keeps its own running ones.

What each network computes is what :func:`ntkfast.training.train` computes for it with the same
arguments: the same batches in the same order and augmentation (one ``seed`` for all K), its own
mean cross-entropy (the K losses are summed, so each network's gradient is its own), and an
element-wise optimiser (SGD, Adam, and any other that updates each element from its own
gradient) on the stacked tensors updates each network as its own optimiser would. Checked in
float64 against K separate ``train`` runs (``tests/test_training_grouped.py``). Dropout draws
differ from separate runs (one stream for the stacked batch).

Models the grouped network cannot run (a parameter used outside a leaf module, buffers that
differ between the K models other than BatchNorm statistics, torch.nn.utils.prune
re-parametrisations, a model that is a single layer) are trained one after the other by
:func:`~ntkfast.training.train` instead, with a warning that says why.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LRScheduler

from .core.checks import check_device, check_int, check_number, check_seed
from .core.concurrency import model_lock
from .core.grouped import BatchNormPlan, GroupedNetwork, NotGroupable
from .core.options import Amp, Optimizer
from .core.progress import check_progress, progress_bar
from .core.sources import as_source
from .core.state import finite_model
from .core.targets import model_device
from .train_engine import autocast, check_engine, device_flags, resident_source
from .training import (DEFAULT_LR, TrainResult, _check_augment, _check_fits, _check_masks, _check_optimizer,
                       _check_scheduler, _epoch_seed, _iterate, _make_scheduler, _step_per_epoch, train)

__all__ = ["train_grouped"]


def _check_models(models) -> List[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise TypeError(f"models: expected a non-empty list of torch.nn.Module (one per network), got "
                        f"{type(models).__name__}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}]: expected a torch.nn.Module, got {type(m).__name__}")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("models: the same module appears twice; give each network its own copy")
    first = models[0]
    shapes = [(n, tuple(p.shape), p.dtype, p.device) for n, p in first.named_parameters()]
    bufs = [(n, tuple(b.shape), b.dtype) for n, b in first.named_buffers()]
    for i, m in enumerate(models[1:], 1):
        if type(m) is not type(first):
            raise ValueError(f"models[{i}]: a {type(m).__name__}, but models[0] is a {type(first).__name__}; "
                             "the networks trained together share one architecture")
        if [(n, tuple(p.shape), p.dtype, p.device) for n, p in m.named_parameters()] != shapes or \
                [(n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()] != bufs:
            raise ValueError(f"models[{i}]: its parameters or buffers (names, shapes, dtypes, devices) differ from "
                             "models[0]'s; the networks trained together share one architecture")
    return list(models)


def _why_not_grouped(models: List[nn.Module]) -> Optional[str]:
    """Why the stacked network cannot stand for these models, or None."""
    names = [n for n, _ in models[0].named_parameters()]
    if any(n.endswith("_orig") for n in names):
        return "its weights are torch.nn.utils.prune re-parametrisations (weight_orig)"
    if not any(p.is_floating_point() for p in models[0].parameters()):
        return "it has no floating-point parameters"
    bn_buffers = {f"{mn}.{b}" for mn, mod in models[0].named_modules() if isinstance(mod, _BatchNorm)
                  for b in ("running_mean", "running_var", "num_batches_tracked")}
    for n, b in models[0].named_buffers():
        if n in bn_buffers:
            continue
        for i, m in enumerate(models[1:], 1):
            if not torch.equal(m.get_buffer(n), b):
                return f"its buffer {n!r} differs between models[0] and models[{i}]"
    for mn, mod in models[0].named_modules():
        if isinstance(mod, _BatchNorm) and mod.track_running_stats and mod.momentum is None:
            counts = {int(m.get_submodule(mn).num_batches_tracked) for m in models}
            if len(counts) > 1:
                return f"{mn}: a cumulative-average BatchNorm whose batch counts differ between the models"
    return None


@torch.no_grad()
def _stack(models: List[nn.Module], net: GroupedNetwork, device, dtype) -> Dict[str, torch.Tensor]:
    """{value key: the K networks' values stacked [K, *shape]}, leaves of their own."""
    out = {}
    for key in net.value_names():
        ps = [m.get_parameter(key) for m in models]
        v = torch.stack([p.detach().to(device=device, dtype=dtype) for p in ps])
        out[key] = v.requires_grad_(ps[0].requires_grad)
    return out


def _bn_layers(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _running_stats(models, device, dtype) -> BatchNormPlan:
    plan = BatchNormPlan(mode="train", pieces=len(models))
    for name in _bn_layers(models[0]):
        mods = [m.get_submodule(name) for m in models]
        plan.running[name] = (torch.stack([b.running_mean.to(device, dtype) for b in mods]),
                              torch.stack([b.running_var.to(device, dtype) for b in mods]))
        plan.tracked[name] = int(mods[0].num_batches_tracked)
    return plan


@torch.no_grad()
def _write_back(models, values: Mapping[str, torch.Tensor], plan: BatchNormPlan) -> None:
    """Each model's trained weights and BatchNorm statistics, into its own tensors."""
    for k, m in enumerate(models):
        for key, v in values.items():
            p = m.get_parameter(key)
            p.copy_(v[k].to(p.device, p.dtype))
        for name, (mean, var) in plan.running.items():
            bn = m.get_submodule(name)
            bn.running_mean.copy_(mean[k])
            bn.running_var.copy_(var[k])
            bn.num_batches_tracked.fill_(plan.tracked.get(name, 0))


def _make_optimizer(optimizer, params: List[torch.Tensor], lr, momentum, weight_decay) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=DEFAULT_LR["sgd"] if lr is None else lr,
                               momentum=0.9 if momentum is None else momentum, weight_decay=weight_decay or 0.0)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=DEFAULT_LR["adam"] if lr is None else lr, weight_decay=weight_decay or 0.0)
    opt = optimizer(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer: the callable returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def net_dtype(values: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next(iter(values.values())).dtype


@torch.no_grad()
def _evaluate(net: GroupedNetwork, values, plan: BatchNormPlan, dataset, K: int, batch_size: int, device,
              max_batches, engine):
    """Per network: (mean loss, accuracy, top-5 accuracy) in eval mode (own running statistics)."""
    net.net.eval()
    stored = BatchNormPlan(mode="stored", pieces=K, stats=dict(plan.running))
    loss = torch.zeros(K, dtype=torch.float64, device=device)
    correct = torch.zeros(K, dtype=torch.int64, device=device)
    correct5 = torch.zeros(K, dtype=torch.int64, device=device)
    n = 0
    for x, y in _iterate(dataset, batch_size, False, 0, device, max_batches, dtype=net_dtype(values)):
        B = y.shape[0]
        with autocast(engine, device):
            out = net(x.repeat(K, *([1] * (x.dim() - 1))), values, K, stored)
        out = out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
        yk = y.repeat(K)
        loss += F.cross_entropy(out, yk, reduction="none").view(K, B).sum(1).to(torch.float64)
        correct += (out.argmax(1) == yk).view(K, B).sum(1)
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct5 += (top == yk.unsqueeze(1)).any(1).view(K, B).sum(1)
        n += B
    if n == 0:
        raise ValueError(f"{dataset.name} gave no batches to evaluate")
    return (loss / n).tolist(), (correct.double() / n).tolist(), (correct5.double() / n).tolist()


def train_grouped(
    models: Sequence[nn.Module],
    masks: Sequence[Optional[Mapping[str, torch.Tensor]]],
    train_set,
    test_set,
    epochs: int,
    optimizer: Union[Optimizer, Callable[..., torch.optim.Optimizer]] = "sgd",
    lr: Optional[float] = None,
    momentum: Optional[float] = None,
    weight_decay: Optional[float] = None,
    batch_size: int = 128,
    lr_milestones: Optional[Sequence[int]] = None,
    lr_gamma: float = 0.1,
    device=None,
    seed: int = 0,
    progress: Optional[bool] = None,
    max_batches: Optional[int] = None,
    scheduler=None,
    scheduler_interval: str = "epoch",
    augment=None,
    *,
    amp: Optional[Amp] = None,
    tf32: bool = False,
    resident: Optional[bool] = None,
    stacked: Optional[bool] = None,
) -> List[TrainResult]:
    """Train ``models[k]`` with ``masks[k]`` for every k, all in one stacked network; returns one
    :class:`~ntkfast.training.TrainResult` per model, in order.

    The arguments are :func:`~ntkfast.training.train`'s, for all K networks at once, except:
    ``optimizer`` is "sgd", "adam" or a callable taking the list of stacked ``[K, *shape]``
    tensors (an optimiser already made over one model's parameters cannot apply); ``scheduler``
    likewise a callable optimizer -> scheduler; ``compile`` and ``channels_last`` are not offered.
    The models must share one architecture (names, shapes, dtypes, device of their parameters).
    Each model's weights and BatchNorm statistics are written back when training ends (an error
    midway leaves every model as it was); the models stay on their own device, ``device``
    (default: theirs) is where the training runs.

    ``stacked``: run the K networks as one stacked network (True) or one after the other with
    :func:`~ntkfast.training.train` (False; the same results). None (default): stacked on CUDA,
    where small networks leave the GPU idle; one after the other on the CPU, where the arithmetic
    is the same either way and the stacked pass measured 0.5-0.7x (``benchmarks/bench_fast_train.py``:
    the per-network convolutions and the concatenations of their outputs).
    """
    models = _check_models(models)
    with contextlib.ExitStack() as held:
        for m in sorted(models, key=id):  # one order for every caller: no two wait on each other
            held.enter_context(model_lock(m))
        return _checked_train(models, masks, train_set, test_set, epochs, optimizer, lr, momentum, weight_decay,
                              batch_size, lr_milestones, lr_gamma, device, seed, progress, max_batches, scheduler,
                              scheduler_interval, augment, amp, tf32, resident, stacked)


def _checked_train(models, masks, train_set, test_set, epochs, optimizer, lr, momentum, weight_decay, batch_size,
                   lr_milestones, lr_gamma, device, seed, progress, max_batches, scheduler, scheduler_interval,
                   augment, amp, tf32, resident, stacked) -> List[TrainResult]:
    K = len(models)
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence) or len(masks) != K:
        raise ValueError(f"masks: expected a list of {K} masks (a mapping or None per model), got "
                         f"{type(masks).__name__}" + (f" of {len(masks)}" if isinstance(masks, Sequence) else ""))
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer: an optimiser made over one model's parameters cannot train the stacked networks; "
                        "give 'sgd', 'adam' or a callable params -> optimizer (e.g. torch.optim.AdamW)")
    if isinstance(scheduler, LRScheduler):
        raise TypeError("scheduler: give a callable optimizer -> scheduler; the stacked networks' optimiser is made here")
    _check_optimizer(optimizer, lr, momentum, weight_decay)
    epochs = check_int(epochs, "epochs", lo=1)
    batch_size = check_int(batch_size, "batch_size", lo=1)
    max_batches = check_int(max_batches, "max_batches", lo=1, allow_none=True)
    lr = check_number(lr, "lr", lo=0.0, lo_open=True, allow_none=True)
    momentum = check_number(momentum, "momentum", lo=0.0, allow_none=True)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0, allow_none=True)
    lr_gamma = check_number(lr_gamma, "lr_gamma", lo=0.0, lo_open=True)
    if isinstance(lr_milestones, (str, bytes)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in (lr_milestones or [])):
        raise ValueError(f"lr_milestones: expected a sequence of epoch numbers >= 1, got {lr_milestones!r}")
    milestones = sorted(int(m) for m in (lr_milestones or []))
    _check_scheduler(scheduler, scheduler_interval, milestones)
    seed = check_seed(seed)
    check_progress(progress)
    engine = check_engine(amp, tf32, False, resident)
    param_masks = []
    for k, (m, mk) in enumerate(zip(models, masks)):
        try:
            param_masks.append(_check_masks(m, mk))
        except ValueError as exc:
            raise ValueError(f"masks[{k}]: {exc}") from None
        finite_model(m, mk or None)
    train_source = as_source(train_set, "train_set")
    if train_source.sized() and len(train_source) == 0:
        raise ValueError("train_set is empty")
    test_source = as_source(test_set, "test_set") if test_set is not None else None
    augment = _check_augment(augment, train_source)
    device = model_device(models[0]) if device is None else check_device(device)
    _check_fits(models[0], train_source)
    if test_source is not None:
        _check_fits(models[0], test_source)

    if stacked is not None and not isinstance(stacked, bool):
        raise TypeError(f"stacked: expected True, False or None, got {type(stacked).__name__}")
    if stacked is None:
        stacked = device.type == "cuda"
    why = _why_not_grouped(models) if stacked else None
    net = None
    if stacked and why is None:
        try:
            dtype = next(p.dtype for p in models[0].parameters() if p.is_floating_point())
            net = GroupedNetwork(models[0], dtype=dtype, device=device)
            if net.shared:
                why = f"its parameter {net.shared[0]!r} is used outside a leaf module"
        except NotGroupable as exc:
            why = str(exc)
    if why is not None:
        warnings.warn(f"train_grouped: {type(models[0]).__name__} cannot run as one stacked network ({why}); "
                      f"training the {K} models one after the other", RuntimeWarning, stacklevel=3)
    if not stacked or why is not None:
        kw = dict(epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                  batch_size=batch_size, lr_milestones=lr_milestones, lr_gamma=lr_gamma, device=device, seed=seed,
                  progress=progress, max_batches=max_batches, scheduler=scheduler,
                  scheduler_interval=scheduler_interval, augment=augment, amp=amp, tf32=tf32, resident=resident)
        return [train(m, mk, train_set, test_set, **kw) for m, mk in zip(models, masks)]

    return _train(models, param_masks, net, dtype, train_source, test_source, epochs, optimizer, lr, momentum,
                  weight_decay, batch_size, milestones, lr_gamma, scheduler, scheduler_interval, device, seed,
                  progress, max_batches, augment, engine)


def _train(models, param_masks, net, dtype, train_source, test_source, epochs, optimizer, lr, momentum, weight_decay,
           batch_size, milestones, lr_gamma, scheduler, scheduler_interval, device, seed, progress, max_batches,
           augment, engine) -> List[TrainResult]:
    K = len(models)
    values = _stack(models, net, device, dtype)
    plan = _running_stats(models, device, dtype)
    # a mask per stacked tensor: ones for the networks that leave it dense
    stacked_masks = {}
    for key, v in values.items():
        per = [pm.get(key) for pm in param_masks]
        if any(m is not None for m in per):
            stacked_masks[key] = torch.stack([torch.ones(v.shape[1:], dtype=torch.bool) if m is None else m.cpu()
                                              for m in per]).to(device=device, dtype=dtype)
    with torch.no_grad():
        for key, m in stacked_masks.items():  # masked_fill: a pruned NaN/inf becomes 0
            values[key].masked_fill_(m == 0, 0)
    trainable = [v for v in values.values() if v.requires_grad]
    opt = _make_optimizer(optimizer, trainable, lr, momentum, weight_decay)
    sched = _make_scheduler(scheduler, opt, milestones, lr_gamma)
    per_step = sched is not None and scheduler_interval == "step"
    hooks = [values[k].register_hook(lambda g, m=m: g * m) for k, m in stacked_masks.items() if values[k].requires_grad]

    train_source, on_device = resident_source(train_source, device, engine)
    if test_source is not None:
        test_source, _ = resident_source(test_source, device, engine)
    results = [TrainResult() for _ in range(K)]
    record = engine.record(device, on_device, False)
    record["grouped"] = K
    for r in results:
        r.engine = dict(record)
    bar = progress_bar(epochs, f"train x{K}", progress=progress, unit="epoch")
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device_flags(engine, device):
            torch.manual_seed(seed)
            for epoch in range(epochs):
                epoch_start = time.perf_counter()
                for r in results:
                    r.lr.append(float(opt.param_groups[0]["lr"]))
                net.net.train()
                loss_acc = torch.zeros(K, device=device, dtype=torch.float64)
                correct_acc = torch.zeros(K, device=device, dtype=torch.int64)
                n = 0
                for x, y in _iterate(train_source, batch_size, True, _epoch_seed(seed, epoch), device, max_batches,
                                     augment=augment, dtype=dtype):
                    B = y.shape[0]
                    yk = y.repeat(K)
                    with autocast(engine, device):
                        out = net(x.repeat(K, *([1] * (x.dim() - 1))), values, K, plan)
                        losses = F.cross_entropy(out, yk, reduction="none").view(K, B)
                    # the sum of the K mean losses: each network's gradient is its own mean loss's
                    loss = losses.sum() / B
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if per_step:
                        sched.step()
                    with torch.no_grad():
                        for key, m in stacked_masks.items():
                            values[key].mul_(m)
                        loss_acc += losses.detach().sum(1).to(torch.float64)
                        correct_acc += (out.detach().argmax(1) == yk).view(K, B).sum(1)
                    n += B
                if n == 0:
                    raise ValueError("train_set gave no batches")
                tl = (loss_acc / n).tolist()
                ta = (correct_acc.double() / n).tolist()
                for k, r in enumerate(results):
                    r.train_loss.append(tl[k])
                    r.train_accuracy.append(ta[k])
                if test_source is not None:
                    el, ea, ea5 = _evaluate(net, values, plan, test_source, K, batch_size, device, max_batches, engine)
                    for k, r in enumerate(results):
                        r.test_loss.append(el[k])
                        r.test_accuracy.append(ea[k])
                        r.test_top5_accuracy.append(ea5[k])
                if sched is not None and not per_step:
                    _step_per_epoch(sched, _MeanResult(results))
                seconds = time.perf_counter() - epoch_start
                for r in results:
                    r.epochs = epoch + 1
                    r.epoch_seconds.append(seconds)
                fields = {"epoch": epoch + 1, "loss": sum(tl) / K, "acc": sum(ta) / K}
                if test_source is not None:
                    fields["test_acc"] = sum(r.test_accuracy[-1] for r in results) / K
                bar.update(1, **fields)
        _write_back(models, values, plan)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    seconds = time.perf_counter() - start
    for r in results:
        r.seconds = seconds
        r.final_test_accuracy = r.test_accuracy[-1] if r.test_accuracy else None
    return results


class _MeanResult:
    """What a plateau scheduler reads (the last epoch's loss), averaged over the K networks."""

    def __init__(self, results: List[TrainResult]):
        K = len(results)
        self.test_loss = [sum(r.test_loss[-1] for r in results) / K] if results[0].test_loss else []
        self.train_loss = [sum(r.train_loss[-1] for r in results) / K]
