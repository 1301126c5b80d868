"""Train a (pruned) network with its masks held fixed: the standard check of a pruning method.

    from ntkfast import models, data
    from ntkfast.training import train

    model = models.lenet300_100()
    result = train(model, masks, data.load_mnist(root), data.load_mnist(root, train=False), epochs=10)
    print(result.final_test_accuracy)

Pruned weights are zeroed before training and stay exactly zero: their gradients are masked by
tensor hooks and, after every optimiser step, they are zeroed again, so neither weight decay nor
momentum (nor Adam's running moments) can bring them back. Unpruned tensors (biases, BatchNorm)
train normally.

On CPU, a network with 2-D convolutions trains in the channels-last layout (its weights and the
batches) if its forward runs so (one that calls ``.view`` on a convolution's output does not, and
trains as it is), and the model's layout is restored afterwards: oneDNN's NHWC kernels are faster
there (LeNet-5 and ResNet-20: about 1.2x a step, ``benchmarks/bench_train.py``). The values are
the same; the float rounding may differ.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .core.checks import check_choice, check_device, check_int, check_mask, check_number, check_seed
from .core.options import Optimizer, choices
from .core.progress import Progress
from .core.targets import model_device
from .masks import parameter_name
from .core.concurrency import holds_model
from .core.state import finite_model, scoring_mode

__all__ = ["train", "evaluate", "TrainResult"]

OPTIMIZERS = choices(Optimizer)
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


@dataclass
class TrainResult:
    """Per-epoch history of :func:`train` (losses are mean cross-entropies, accuracies in [0, 1]).

    The train metrics are running averages over the epoch's batches (in train mode). Without a
    test set the test lists stay empty and ``final_test_accuracy`` is None.
    """

    train_loss: List[float] = field(default_factory=list)
    train_accuracy: List[float] = field(default_factory=list)
    test_loss: List[float] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    final_test_accuracy: Optional[float] = None
    epochs: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "train_loss": list(self.train_loss), "train_accuracy": list(self.train_accuracy),
            "test_loss": list(self.test_loss), "test_accuracy": list(self.test_accuracy),
            "final_test_accuracy": self.final_test_accuracy, "epochs": self.epochs, "seconds": self.seconds,
        }


# -- argument checks -----------------------------------------------------------------------------

def _check_masks(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """{parameter name in model.named_parameters(): bool mask}, or ValueError naming ``masks``."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a mapping name -> bool tensor (or None), got {type(masks).__name__}")
    params = dict(model.named_parameters())
    out: Dict[str, torch.Tensor] = {}
    for name, m in masks.items():
        try:
            pname = parameter_name(model, name)
        except KeyError:
            raise ValueError(f"masks: the model has no parameter {name!r} (nor {name + '_orig'!r})") from None
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"masks[{name!r}] must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(params[pname].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)} but the parameter "
                             f"{pname!r} has {tuple(params[pname].shape)}")
        if pname in out:
            raise ValueError(f"masks: two masks apply to the parameter {pname!r}")
        out[pname] = check_mask(m, f"masks[{name!r}]")
    return out


# -- batches -------------------------------------------------------------------------------------

def _iterate(dataset, batch_size: int, shuffle: bool, seed: int, device, max_batches: Optional[int],
             channels_last: bool = False):
    if hasattr(dataset, "batches") and callable(dataset.batches):
        it = dataset.batches(batch_size, shuffle=shuffle, seed=seed, device=device)
    else:
        g = torch.Generator()
        g.manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)
        it = ((x.to(device), y.to(device)) for x, y in loader)
    for i, (x, y) in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def _check_fits(model: nn.Module, dataset, name: str = "train_set") -> None:
    """The model's forward on the first sample of ``dataset``, before the model is touched: a
    dataset of another input shape or dtype, or with labels beyond the model's outputs, is refused
    by name, not found failing in a later step."""
    if isinstance(dataset, torch.Tensor) or not (hasattr(dataset, "batches") or hasattr(dataset, "__getitem__")):
        raise ValueError(f"{name}: expected a dataset of (input, label) items (an ntkfast dataset or a "
                         f"torch.utils.data.Dataset), got {type(dataset).__name__}")
    try:
        item = dataset[0]
    except Exception:  # a dataset without indexing: the first step will tell
        return
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ValueError(f"{name}: expected (input, label) items, got {type(item).__name__}")
    x = item[0]
    if not isinstance(x, torch.Tensor):
        return
    x = x.unsqueeze(0).to(model_device(model))
    if x.is_floating_point():
        p = next(model.parameters(), None)
        x = x.to(p.dtype) if p is not None and p.is_floating_point() else x
    try:
        with scoring_mode(model, False), torch.no_grad():
            out = model(x)
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{name}: the model's forward fails on its first sample (shape {tuple(x.shape[1:])}, "
                         f"{x.dtype}): {msg}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"model: expected class scores [N, classes] from the forward, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    targets = getattr(dataset, "targets", None)  # the whole label set, where the dataset keeps one
    if isinstance(targets, torch.Tensor) and targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= out.shape[1]:
            raise ValueError(f"{name}: labels run from {lo} to {hi}, but the model gives {out.shape[1]} class scores "
                             "(a model made for another number of classes?)")


def _num_batches(dataset, batch_size: int, max_batches: Optional[int]) -> Optional[int]:
    try:
        n = math.ceil(len(dataset) / batch_size)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


@holds_model
def evaluate(model: nn.Module, dataset, batch_size: int = 512, device=None,
             max_batches: Optional[int] = None) -> "tuple[float, float]":
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``dataset``. The model's
    train/eval mode is restored afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch_size = check_int(batch_size, "batch_size", lo=1)
    device = model_device(model) if device is None else check_device(device)
    _check_fits(model, dataset, "dataset")
    return _evaluate(model, dataset, batch_size, device, max_batches, channels_last=False)


@torch.no_grad()
def _evaluate(model, dataset, batch_size, device, max_batches, channels_last: bool):
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in _iterate(dataset, batch_size, False, 0, device, max_batches, channels_last=channels_last):
            out = model(x)
            total_loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("dataset gave no batches to evaluate")
    return total_loss / n, correct / n


def _wants_channels_last(model: nn.Module, device) -> bool:
    # Measured on CPU only (oneDNN); on CUDA the best layout depends on dtype and cuDNN's choice.
    return torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _to_channels_last(model: nn.Module) -> None:
    # Tensor by tensor, not Module.to: that raises on 5-D tensors and may replace the Parameters.
    # Copied into fresh channels-last strides even where .contiguous() would see nothing to do:
    # with one input channel both layouts count as contiguous, and the convolution follows the
    # strides (LeNet-5's first layer).
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == 4:
                t.data = torch.empty(t.shape, dtype=t.dtype, device=t.device,
                                     memory_format=torch.channels_last).copy_(t.data)


@torch.no_grad()
def _runs_channels_last(model: nn.Module, train_set, device) -> bool:
    """Convert the model to channels-last and check that its forward runs so, in train and in
    eval mode, on two training samples. A forward that assumes NCHW strides, such as
    ``x.view(len(x), -1)`` after a convolution, fails there: the model then goes back to its own
    layout. The probe leaves no trace but in the user's forward hooks: buffers (BatchNorm
    statistics), the RNG and the train/eval mode are restored."""
    layout = _layout_of(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    ok = True
    with torch.random.fork_rng(devices=[]):  # called for CPU training only
        try:
            _to_channels_last(model)
            x, _ = next(iter(_iterate(train_set, 2, False, 0, device, 1, channels_last=True)))
            for mode in (True, False):
                model.train(mode)
                model(x)
        except Exception:  # any failure here: train in the model's own layout, where errors are the user's to see
            ok = False
        finally:
            model.train(was_training)
            current = dict(model.named_buffers())
            for n, b in buffers.items():
                current[n].copy_(b)
    if not ok:
        _restore_layout(model, layout)
    return ok


def _layout_of(model: nn.Module) -> Dict[str, tuple]:
    """{name: strides} of the model's 4-D parameters and buffers, to restore them exactly (a
    tensor with a size-1 dimension can be "contiguous" in either layout, and a convolution still
    reads its strides)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t.stride() for n, t in tensors if t.dim() == 4}


def _restrided(t: torch.Tensor, stride: tuple) -> torch.Tensor:
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _restore_layout(model: nn.Module, layout: Mapping[str, tuple]) -> None:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for n, stride in layout.items():
            t = tensors[n]
            if t.stride() != stride:
                t.data = _restrided(t.data, stride)
            if t.grad is not None and t.grad.stride() != stride:
                t.grad = _restrided(t.grad, stride)


# -- training ------------------------------------------------------------------------------------

@holds_model
def train(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]],
    train_set: Dataset,
    test_set: Optional[Dataset],
    epochs: int,
    optimizer: Optimizer = "sgd",
    lr: Optional[float] = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    lr_milestones: Optional[Sequence[int]] = None,
    lr_gamma: float = 0.1,
    device=None,
    seed: int = 0,
    progress: bool = True,
    max_batches: Optional[int] = None,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy, keeping its pruned weights at zero.

    Args:
        model: the network; trained in place (moved to ``device`` if one is given).
        masks: name -> bool tensor (True = kept), names as in ``model.named_parameters()``
            (a ``<module>.weight`` mask also fits a ``weight_orig`` left by torch.nn.utils.prune);
            an :class:`ntkfast.Masks` works. None trains the dense network.
        train_set, test_set: :class:`ntkfast.data.ImageDataset` / ``GaussianNoise`` (read through
            their fast ``batches``) or any torch Dataset of ``(x, y)`` (read through a DataLoader).
            ``test_set`` may be None (no evaluation).
        epochs: number of passes over ``train_set``.
        optimizer: "sgd" (with ``momentum``, Nesterov off) or "adam".
        lr: learning rate; default 0.1 for sgd, 1e-3 for adam.
        weight_decay: L2 penalty of the optimiser (applied to every parameter).
        lr_milestones, lr_gamma: multiply the learning rate by ``lr_gamma`` after each epoch
            listed in ``lr_milestones`` (torch's MultiStepLR, stepped per epoch).
        device: where to train; default the device of the model's parameters.
        seed: seeds the shuffling and the global torch RNG during training (dropout, ...), which
            is restored afterwards. Same seed, same inputs -> the same result, bit for bit, on CPU.
        progress: print one progress line per epoch to stderr.
        max_batches: at most this many batches per epoch, for training and for evaluation
            (quick runs and tests).

    Returns:
        a :class:`TrainResult`.
    """
    # Every check happens before the model is touched.
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    epochs = check_int(epochs, "epochs", lo=1)
    batch_size = check_int(batch_size, "batch_size", lo=1)
    max_batches = check_int(max_batches, "max_batches", lo=1, allow_none=True)
    lr = DEFAULT_LR[optimizer] if lr is None else check_number(lr, "lr", lo=0.0, lo_open=True)
    momentum = check_number(momentum, "momentum", lo=0.0)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0)
    lr_gamma = check_number(lr_gamma, "lr_gamma", lo=0.0, lo_open=True)
    if isinstance(lr_milestones, (str, bytes)) or not all(
            isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in (lr_milestones or [])):
        raise ValueError(f"lr_milestones: expected a sequence of epoch numbers >= 1, got {lr_milestones!r}")
    milestones = sorted(int(m) for m in (lr_milestones or []))
    seed = check_seed(seed)
    param_masks = _check_masks(model, masks)
    finite_model(model, masks or None)  # meta tensors, and NaN/inf where the masks keep weights, by name
    empty = [n for n, m in param_masks.items() if m.numel() and not bool(m.any())]
    if empty:
        import warnings

        warnings.warn(f"train: the masks keep no weight of {len(empty)} tensor(s) ({', '.join(empty[:4])}"
                      f"{' ...' if len(empty) > 4 else ''}); no signal passes through them", RuntimeWarning,
                      stacklevel=3)
    if hasattr(train_set, "__len__") and len(train_set) == 0:
        raise ValueError("train_set is empty")

    if device is not None:
        device = check_device(device)
    _check_fits(model, train_set)
    if test_set is not None:
        _check_fits(model, test_set, "test_set")

    if device is not None:
        model.to(device)
    device = model_device(model)
    layout = _layout_of(model)
    channels_last = _wants_channels_last(model, device) and _runs_channels_last(model, train_set, device)
    params = dict(model.named_parameters())
    # in the parameter's own layout, so that masking a gradient or a weight keeps that layout
    mask_f = {n: torch.empty_like(params[n]).copy_(m) for n, m in param_masks.items()}

    with torch.no_grad():
        for n, m in param_masks.items():  # masked_fill, not mul: a pruned NaN/inf becomes 0, not NaN
            params[n].masked_fill_(~m.to(params[n].device), 0)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=lr_gamma) if milestones else None

    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in mask_f.items() if params[n].requires_grad]
    result = TrainResult()
    bar = Progress(total=epochs, desc="train", enabled=progress)
    fork_devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for epoch in range(epochs):
                model.train()
                n = 0
                loss_acc = torch.zeros((), device=device, dtype=torch.float64)
                correct_acc = torch.zeros((), device=device, dtype=torch.int64)
                for x, y in _iterate(train_set, batch_size, True, seed * 1_000_003 + epoch, device, max_batches,
                                     channels_last=channels_last):
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for name, m in mask_f.items():
                            params[name].mul_(m)
                        loss_acc += loss.detach().to(torch.float64) * y.shape[0]
                        correct_acc += (out.detach().argmax(1) == y).sum()
                    n += y.shape[0]
                if n == 0:
                    raise ValueError("train_set gave no batches")
                result.train_loss.append(float(loss_acc) / n)
                result.train_accuracy.append(int(correct_acc) / n)
                if sched is not None:
                    sched.step()
                fields = {"epoch": epoch + 1, "loss": result.train_loss[-1], "acc": result.train_accuracy[-1]}
                if test_set is not None:
                    tl, ta = _evaluate(model, test_set, batch_size, device, max_batches, channels_last)
                    result.test_loss.append(tl)
                    result.test_accuracy.append(ta)
                    fields.update(test_loss=tl, test_acc=ta)
                result.epochs = epoch + 1
                bar.update(**fields)
    finally:
        for h in hooks:
            h.remove()
        _restore_layout(model, layout)
        bar.close()
    result.seconds = time.perf_counter() - start
    result.final_test_accuracy = result.test_accuracy[-1] if result.test_accuracy else None
    return result
