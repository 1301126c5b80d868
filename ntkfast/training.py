"""Train a (pruned) network with its masks held fixed: the standard check of a pruning method.

    from ntkfast import models, data
    from ntkfast.training import train

    model = models.lenet300_100()
    result = train(model, masks, data.load_mnist(root), data.load_mnist(root, train=False), epochs=10)
    print(result.final_test_accuracy)

Pruned weights are zeroed before training and stay exactly zero: their gradients are masked
after every backward pass, before the optimiser sees them, and after every optimiser step the
weights are zeroed again, so neither weight decay nor momentum (nor Adam's running moments) can
bring them back. Unpruned tensors (biases, BatchNorm) train normally. The named optimizers
update only the kept entries of a weight pruned to at most half (:mod:`ntkfast.core.kept_entries`):
the same values, bit for bit, as ``torch.optim`` over the whole tensor, without its passes over
the zeros (on CPU, most of a step of an MLP such as LeNet-300-100 at density 0.1).

On CPU, a network with 2-D convolutions trains in the channels-last layout (its weights and the
batches) if its forward runs so (one that calls ``.view`` on a convolution's output does not, and
trains as it is), and the model's layout is restored afterwards: oneDNN's NHWC kernels are faster
there (LeNet-5 and ResNet-20: about 1.2x a step, ``benchmarks/bench_train.py``). The values are
the same; the float rounding may differ.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .core.checks import check_choice, check_device, check_int, check_mask, check_number, check_seed
from .core.options import Amp, Optimizer, choices
from .core.progress import check_progress, format_value, progress_bar
from .core.sources import BatchSource, as_source
from .core.kept_entries import KeptEntries
from .core.numerics import check_classes
from .train_engine import Engine, autocast, check_engine, compiled, device_flags, resident_source
from .core.targets import model_device
from .masks import parameter_name
from .core.concurrency import holds_model
from .core.state import finite_model, scoring_mode

__all__ = ["train", "evaluate", "TrainResult"]

_log = logging.getLogger(__name__)

OPTIMIZERS = choices(Optimizer)
SCHEDULER_INTERVALS = ("epoch", "step")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


@dataclass
class TrainResult:
    """The history of one :func:`train` run, one entry per epoch in each list.

    Losses are mean cross-entropies, accuracies fractions in [0, 1]. The train metrics are running
    averages over the epoch's batches (in train mode); the test metrics are measured after the
    epoch (in eval mode). ``lr`` is the learning rate of the optimiser's first parameter group as
    the epoch began; ``epoch_seconds`` the wall time of each epoch, evaluation included, and
    ``seconds`` that of the whole run. Without a test set the test lists stay empty and
    ``final_test_accuracy`` is None. ``test_top5_accuracy``: a label among the five highest
    outputs (NTK-SAP reports it for ImageNet; with fewer than five classes it is 1). ``engine``:
    how the steps ran where that is not plain full precision (``amp``, ``tf32``, ``compile``,
    ``resident``, ``channels_last``; see :mod:`ntkfast.train_engine`), empty otherwise.

    ``to_dict()`` gives plain lists and numbers, ``to_json()`` the same as JSON text, and
    ``TrainResult.from_dict`` reads either back.
    """

    train_loss: List[float] = field(default_factory=list)
    train_accuracy: List[float] = field(default_factory=list)
    test_loss: List[float] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)
    final_test_accuracy: Optional[float] = None
    epochs: int = 0
    seconds: float = 0.0
    test_top5_accuracy: List[float] = field(default_factory=list)  # after the first nine: positional callers keep working
    engine: Dict[str, object] = field(default_factory=dict)

    @property
    def best_test_accuracy(self) -> Optional[float]:
        """The highest test accuracy of any epoch (None without a test set)."""
        return max(self.test_accuracy) if self.test_accuracy else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # copies: the dict does not share the lists

    def to_json(self, indent: Optional[int] = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainResult":
        """The history ``to_dict`` (or ``json.loads`` of ``to_json``) gave; keys it does not know
        are refused by name, missing ones left at their defaults (histories of older versions)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"d: {unknown[0]!r} is not a field of TrainResult (its fields: {', '.join(sorted(known))})")
        return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


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
             channels_last: bool = False, augment=None, dtype: Optional[torch.dtype] = None):
    """The batches of one epoch; floating inputs in ``dtype`` (the model's) where given."""
    source = as_source(dataset, "dataset")  # a BatchSource passes as it is, keeping its name
    for i, (x, y) in enumerate(source.batches(batch_size, shuffle, seed, device, augment=augment)):
        if max_batches is not None and i >= max_batches:
            break
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def _steps_per_epoch(source: BatchSource, batch_size: int, max_batches: Optional[int]) -> Optional[int]:
    """The batches an epoch of ``_iterate`` gives (for the step bar), None where unknown."""
    steps = source.num_batches(batch_size)
    if max_batches is not None:
        steps = max_batches if steps is None else min(steps, max_batches)
    return steps


def _check_augment(augment, source: BatchSource):
    """``augment`` as a callable (images, generator) -> images, or None; refused by name where the
    data does not hand raw pixels to it."""
    if augment is None:
        return None
    from . import augment as A

    if isinstance(augment, str):
        if augment == "auto":
            name = getattr(source.data, "name", "")
            try:
                augment = A.for_dataset(name)
            except ValueError:
                raise ValueError(f"augment: 'auto' knows no recipe for the dataset {name!r}; give a recipe "
                                 f"({', '.join(A.recipes())}) or an augmentation") from None
            if augment is None:
                return None
        else:
            augment = A.get(augment)
    if not callable(augment):
        raise TypeError(f"augment: expected a recipe name, 'auto', a callable (images, generator) -> images "
                        f"or None, got {type(augment).__name__}")
    if not source.takes_augment():
        if source.kind == "ntkfast":
            raise ValueError(f"augment: {source.name}'s batches take no batched augmentation (a lazy image "
                             "folder decodes each image on its own: give per-image transforms to its DataLoader)")
        raise ValueError(f"augment: {source.name} is not an ntkfast dataset of images; a DataLoader applies its "
                         "own transforms (put them in its dataset)")
    images = getattr(source.data, "images", None)
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0]:
        # one small batch through it now: a recipe made for other image sizes would otherwise train on
        # 64x64 crops and test on 32x32 images without a word (adaptive pooling runs either)
        out = augment(images[:2], torch.Generator().manual_seed(0))
        if tuple(out.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(f"augment: it turns {source.name}'s {'x'.join(map(str, images.shape[1:]))} images into "
                             f"{'x'.join(map(str, out.shape[1:]))}; pick the recipe for this dataset ('auto')")
    return augment


def _check_fits(model: nn.Module, source: BatchSource) -> None:
    """The model's forward on the first sample of ``source``, before the model is touched: data
    of another input shape or dtype, or with labels beyond the model's outputs, is refused by
    name, not found failing in a later step."""
    name = source.name
    first = source.first_sample()
    if first is None:  # a dataset without indexing: the first step will tell
        return
    x, labels = first
    x = x.to(model_device(model))
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
    check_classes(out.shape[1], "training would never move the weights")
    # the whole label set where the dataset keeps one, else the labels of the first batch read
    targets = source.targets if source.targets is not None else labels
    if isinstance(targets, torch.Tensor) and targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= out.shape[1]:
            raise ValueError(f"{name}: labels run from {lo} to {hi}, but the model gives {out.shape[1]} class scores "
                             "(a model made for another number of classes?)")


def _float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating parameter: what its inputs are cast to (an image
    dataset gives float32; a float64 model takes them in float64)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch of a dataset the trainer batches itself."""
    return seed * 1_000_003 + epoch


def _num_batches(dataset, batch_size: int, max_batches: Optional[int]) -> Optional[int]:
    n = as_source(dataset, "dataset").num_batches(batch_size)
    if n is None:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


@holds_model
def evaluate(model: nn.Module, dataset, batch_size: int = 512, device=None,
             max_batches: Optional[int] = None, *, top5: bool = False) -> tuple:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``dataset`` (any data
    :func:`train` takes as its test set); with ``top5=True`` also the top-5 accuracy, as a third
    item. The model's train/eval mode is restored afterwards."""
    if not isinstance(top5, bool):
        raise TypeError(f"top5: expected True or False, got {type(top5).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch_size = check_int(batch_size, "batch_size", lo=1)
    device = model_device(model) if device is None else check_device(device)
    dataset = as_source(dataset, "dataset")
    _check_fits(model, dataset)
    loss, acc, acc5 = _evaluate(model, dataset, batch_size, device, max_batches, channels_last=False)
    return (loss, acc, acc5) if top5 else (loss, acc)


@torch.no_grad()
def _evaluate(model, dataset, batch_size, device, max_batches, channels_last: bool, forward=None,
              engine: Engine = Engine()):
    """(mean loss, accuracy, top-5 accuracy); ``forward``: what to call (a compiled model)."""
    was_training = model.training
    model.eval()
    forward = model if forward is None else forward
    # summed on the device, read once: a float() per batch would wait for the GPU at every batch
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in _iterate(dataset, batch_size, False, 0, device, max_batches, channels_last=channels_last,
                             dtype=_float_dtype(model)):
            with autocast(engine, torch.device(device)):
                out = forward(x)
            out = out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
            total_loss += F.cross_entropy(out, y, reduction="sum").to(torch.float64)
            correct += (out.argmax(1) == y).sum()
            top = out.topk(min(5, out.shape[1]), dim=1).indices  # the authors' topk(5) count
            correct5 += (top == y.unsqueeze(1)).any(1).sum()
            n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"{as_source(dataset, 'dataset').name} gave no batches to evaluate")
    return float(total_loss) / n, int(correct) / n, int(correct5) / n


def _wants_channels_last(model: nn.Module, device, asked: Optional[bool] = None) -> bool:
    # Automatic on CPU only, where it was measured (oneDNN); on CUDA the best layout depends on the
    # dtype and cuDNN's choice, so it is the user's (channels_last=True: with bf16 tensor cores).
    if asked is not None:
        return asked and any(isinstance(m, nn.Conv2d) for m in model.modules())
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
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        try:
            _to_channels_last(model)
            # a collection of batches gives its own first batch, whatever its size
            x = as_source(train_set, "train_set").first_batch(2, device)[0][:2]
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
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


# -- optimiser and schedule -----------------------------------------------------------------------

def _check_optimizer(optimizer, lr, momentum, weight_decay) -> None:
    if isinstance(optimizer, str):
        check_choice(optimizer, "optimizer", OPTIMIZERS)
        return
    if isinstance(optimizer, nn.Module) or not (isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)):
        raise TypeError(f"optimizer: expected one of {', '.join(map(repr, OPTIMIZERS))}, a torch.optim.Optimizer, or a "
                        f"callable params -> optimizer, got {type(optimizer).__name__}")
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if value is not None:  # it would be silently ignored: the optimiser given carries its own
            raise ValueError(f"{name}: applies to the named optimizers {OPTIMIZERS} only; set it on the optimizer "
                             f"you pass (got {name}={value!r} with a {type(optimizer).__name__})")


def _check_scheduler(scheduler, interval: str, milestones) -> None:
    check_choice(interval, "scheduler_interval", SCHEDULER_INTERVALS)
    if scheduler is None:
        return
    if milestones:
        raise ValueError("lr_milestones: give lr_milestones or a scheduler, not both")
    if not (isinstance(scheduler, LRScheduler) or callable(scheduler)):
        raise TypeError(f"scheduler: expected a torch.optim.lr_scheduler.LRScheduler or a callable "
                        f"optimizer -> scheduler, got {type(scheduler).__name__}")
    if interval == "step" and isinstance(scheduler, ReduceLROnPlateau):
        raise ValueError("scheduler_interval: ReduceLROnPlateau steps on an epoch's loss; use 'epoch'")


def _make_optimizer(optimizer, model: nn.Module, lr, momentum, weight_decay,
                    kept: Optional[KeptEntries] = None) -> torch.optim.Optimizer:
    """The optimiser to train with, checked to update only the model's parameters. A named one is
    made on ``kept``'s shadows in place of the sparse weights (see :mod:`ntkfast.core.kept_entries`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(kept.params_for(trainable) if kept else trainable,
                               lr=DEFAULT_LR["sgd"] if lr is None else lr,
                               momentum=0.9 if momentum is None else momentum,
                               weight_decay=weight_decay or 0.0)
    if optimizer == "adam":
        return torch.optim.Adam(kept.params_for(trainable) if kept else trainable,
                                lr=DEFAULT_LR["adam"] if lr is None else lr,
                                weight_decay=weight_decay or 0.0)
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(trainable)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer: the callable returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    owned = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in owned)
    if foreign:
        raise ValueError(f"optimizer: it updates {foreign} tensor(s) that are not parameters of the model")
    return opt


def _make_scheduler(scheduler, opt: torch.optim.Optimizer, milestones, gamma: float):
    if scheduler is None:
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=gamma) if milestones else None
    sched = scheduler if isinstance(scheduler, LRScheduler) else scheduler(opt)
    if not isinstance(sched, LRScheduler):
        raise TypeError(f"scheduler: the callable returned a {type(sched).__name__}, not a "
                        "torch.optim.lr_scheduler.LRScheduler")
    if sched.optimizer is not opt:
        raise ValueError("scheduler: it steps another optimizer than the one training uses; pass that optimizer "
                         "as optimizer=, or pass a callable optimizer -> scheduler")
    return sched


# -- training ------------------------------------------------------------------------------------

@holds_model(mutates=True)
def train(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]],
    train_set,
    test_set,
    epochs: int,
    optimizer: Union[Optimizer, torch.optim.Optimizer, Callable[..., torch.optim.Optimizer]] = "sgd",
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
    compile: Union[bool, str] = False,
    resident: Optional[bool] = None,
    channels_last: Optional[bool] = None,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy, keeping its pruned weights at zero.

    Args:
        model: the network; trained in place (moved to ``device`` if one is given). Its
            train/eval mode and the memory layout of its tensors are restored afterwards.
        masks: name -> bool tensor (True = kept), names as in ``model.named_parameters()``
            (a ``<module>.weight`` mask also fits a ``weight_orig`` left by torch.nn.utils.prune);
            an :class:`ntkfast.Masks` works. None trains the dense network.
        train_set, test_set: the data, read once per epoch: an :class:`ntkfast.data.ImageDataset`
            or ``GaussianNoise`` (read through their fast ``batches``), a torch ``Dataset`` of
            ``(x, y)`` samples (read through a DataLoader of ``batch_size``, shuffled from
            ``seed``), or any iterable of ``(inputs, labels)`` batches that starts afresh when
            iterated again: a ``DataLoader``, a list of batches (read as they come: their batch
            size and order are their own). A generator is refused (it would be empty after one
            epoch). ``test_set`` may be None (no evaluation).
        epochs: number of passes over ``train_set``.
        optimizer: "sgd" (with ``momentum``, Nesterov off) or "adam"; or your own optimiser: a
            ``torch.optim.Optimizer`` over the model's parameters, or a callable taking the list
            of the model's trainable parameters and returning one (``torch.optim.AdamW`` itself,
            a ``functools.partial``, a lambda). ``lr``, ``momentum`` and ``weight_decay`` then
            belong to it and are refused here.
        lr: learning rate of a named optimizer; default 0.1 for sgd, 1e-3 for adam.
        momentum: sgd's momentum, default 0.9.
        weight_decay: L2 penalty of a named optimizer (applied to every parameter), default 0.
        lr_milestones, lr_gamma: multiply the learning rate by ``lr_gamma`` after each epoch
            listed in ``lr_milestones`` (torch's MultiStepLR, stepped per epoch).
        device: where to train; default the device of the model's parameters.
        seed: seeds the shuffling and the global torch RNG during training (dropout, a
            DataLoader's shuffling), which is restored afterwards. Same seed, same inputs -> the
            same result, bit for bit, on CPU.
        progress: a bar of the epochs (loss, accuracy, rate, ETA) and, inside it, one of the
            current epoch's steps. None (default): on a terminal at once, elsewhere only once the
            training has run a couple of seconds; True: always; False: none. Each epoch's
            summary is also logged (``logging.getLogger("ntkfast")``: INFO with
            ``progress=False``, DEBUG otherwise).
        max_batches: at most this many batches per epoch, for training and for evaluation
            (quick runs and tests).
        scheduler: instead of ``lr_milestones``, a learning-rate schedule: a
            ``torch.optim.lr_scheduler`` instance made on the optimiser passed as ``optimizer``,
            or a callable taking the optimiser training uses and returning one (this works with
            a named optimizer too). ``ReduceLROnPlateau`` is stepped with the epoch's test loss
            (its train loss without a test set).
        scheduler_interval: "epoch" (step the scheduler after every epoch) or "step" (after every
            optimiser step, for warm-up and one-cycle schedules).
        augment: training-time augmentation of an ntkfast dataset's batches, on the device, before
            normalisation (:mod:`ntkfast.augment`): a recipe name (``"pad4-crop-flip"``, ...),
            ``"auto"`` (the authors' recipe for the dataset's name, none for MNIST-like sets), an
            augmentation object, or None (default: none). Seeded from ``seed`` and the epoch.
            Data given as a DataLoader carries its own transforms and is refused with one.
        amp: "bf16" runs the forward and loss under bfloat16 autocast (the weights and the
            optimiser stay in their dtype); None (default): full precision.
        tf32: allow TF32 tensor cores in CUDA matmuls and convolutions (default False: PyTorch's
            own default allows it in cuDNN convolutions; here float32 is float32 unless asked).
        compile: run the forward through ``torch.compile`` (True: its default backend; a string:
            that backend, e.g. "aot_eager"). Off by default.
        resident: move an in-memory ntkfast image dataset to the device once, so batches are cut,
            augmented and normalised there (None: on CUDA; False: copy each batch from the host).
        channels_last: train a 2-D convolutional network in the channels-last layout (None:
            on CPU, where it was measured faster, when the forward runs so; True: on any device).

    Returns:
        a :class:`TrainResult`: the per-epoch history. Every engine setting that is on (``amp``,
        ``tf32``, ``compile``, ``resident``, ``channels_last``) is named in its ``engine`` (see
        :mod:`ntkfast.train_engine`).
    """
    # Every check happens before the model is touched.
    _check_optimizer(optimizer, lr, momentum, weight_decay)
    epochs = check_int(epochs, "epochs", lo=1)
    batch_size = check_int(batch_size, "batch_size", lo=1)
    max_batches = check_int(max_batches, "max_batches", lo=1, allow_none=True)
    lr = check_number(lr, "lr", lo=0.0, lo_open=True, allow_none=True)
    momentum = check_number(momentum, "momentum", lo=0.0, allow_none=True)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0, allow_none=True)
    lr_gamma = check_number(lr_gamma, "lr_gamma", lo=0.0, lo_open=True)
    if isinstance(lr_milestones, (str, bytes)) or not all(
            isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in (lr_milestones or [])):
        raise ValueError(f"lr_milestones: expected a sequence of epoch numbers >= 1, got {lr_milestones!r}")
    milestones = sorted(int(m) for m in (lr_milestones or []))
    _check_scheduler(scheduler, scheduler_interval, milestones)
    seed = check_seed(seed)
    check_progress(progress)
    engine = check_engine(amp, tf32, compile, resident)
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected True, False or None, got {type(channels_last).__name__}")
    param_masks = _check_masks(model, masks)
    finite_model(model, masks or None)  # meta tensors, and NaN/inf where the masks keep weights, by name
    empty = [n for n, m in param_masks.items() if m.numel() and not bool(m.any())]
    if empty:
        import warnings

        warnings.warn(f"train: the masks keep no weight of {len(empty)} tensor(s) ({', '.join(empty[:4])}"
                      f"{' ...' if len(empty) > 4 else ''}); no signal passes through them", RuntimeWarning,
                      stacklevel=3)
    train_set = as_source(train_set, "train_set")
    if train_set.sized() and len(train_set) == 0:
        raise ValueError("train_set is empty")
    if test_set is not None:
        test_set = as_source(test_set, "test_set")
    augment = _check_augment(augment, train_set)

    if device is not None:
        device = check_device(device)
    _check_fits(model, train_set)
    if test_set is not None:
        _check_fits(model, test_set)
    params = dict(model.named_parameters())
    # a user's optimiser gets the weights themselves: it is theirs, and may not be elementwise
    kept = KeptEntries({params[n]: m for n, m in param_masks.items()} if isinstance(optimizer, str) else {})
    # the user's own optimiser and schedule are built (and checked) before the model changes
    opt = _make_optimizer(optimizer, model, lr, momentum, weight_decay, kept)
    sched = _make_scheduler(scheduler, opt, milestones, lr_gamma)
    per_step = sched is not None and scheduler_interval == "step"

    if device is not None:
        model.to(device)
    device = model_device(model)
    kept.to(device)
    train_set, on_device = resident_source(train_set, device, engine)
    if test_set is not None:
        test_set, _ = resident_source(test_set, device, engine)
    layout = _layout_of(model)
    was_training = model.training
    channels_last = _wants_channels_last(model, device, channels_last) and _runs_channels_last(model, train_set, device)
    forward = compiled(model, engine)
    dtype = _float_dtype(model)
    params = dict(model.named_parameters())
    # in the parameter's own layout, so that masking a gradient or a weight keeps that layout
    mask_f = {n: torch.empty_like(params[n]).copy_(m) for n, m in param_masks.items()}

    with torch.no_grad():
        for n, m in param_masks.items():  # masked_fill, not mul: a pruned NaN/inf becomes 0, not NaN
            params[n].masked_fill_(~m.to(params[n].device), 0)

    # the compacted weights are masked by ``kept`` itself
    masked = [params[n] for n in mask_f if not kept.compacts(params[n])]
    masks_f = [m for n, m in mask_f.items() if not kept.compacts(params[n])]
    grad_masked = [(params[n], m) for n, m in mask_f.items()
                   if params[n].requires_grad and not kept.compacts(params[n])]
    result = TrainResult()
    bar = progress_bar(epochs, "train", progress=progress, unit="epoch")
    steps = _steps_per_epoch(train_set, batch_size, max_batches)
    fork_devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    result.engine = engine.record(device, on_device, channels_last)
    try:
        with torch.random.fork_rng(devices=fork_devices), device_flags(engine, device):
            torch.manual_seed(seed)
            for epoch in range(epochs):
                epoch_start = time.perf_counter()
                result.lr.append(float(opt.param_groups[0]["lr"]))
                model.train()
                n = 0
                loss_acc = torch.zeros((), device=device, dtype=torch.float64)
                correct_acc = torch.zeros((), device=device, dtype=torch.int64)
                step_bar = progress_bar(steps, f"epoch {epoch + 1}", progress=progress, unit="step")
                for x, y in _iterate(train_set, batch_size, True, _epoch_seed(seed, epoch), device, max_batches,
                                     channels_last=channels_last, augment=augment, dtype=dtype):
                    with autocast(engine, device):
                        out = forward(x)
                        loss = F.cross_entropy(out, y)
                    opt.zero_grad(set_to_none=True)
                    kept.zero_grad()
                    loss.backward()
                    _mask_grads(grad_masked)
                    kept.gather()
                    opt.step()
                    kept.scatter()
                    if per_step:
                        sched.step()
                    with torch.no_grad():
                        if masked:
                            torch._foreach_mul_(masked, masks_f)
                        loss_acc += loss.detach().to(torch.float64) * y.shape[0]
                        correct_acc += (out.detach().argmax(1) == y).sum()
                    n += y.shape[0]
                    step_bar.update(1)
                step_bar.close()
                if n == 0:
                    raise ValueError("train_set gave no batches")
                result.train_loss.append(float(loss_acc) / n)
                result.train_accuracy.append(int(correct_acc) / n)
                fields = {"epoch": epoch + 1, "loss": result.train_loss[-1], "acc": result.train_accuracy[-1]}
                if test_set is not None:
                    tl, ta, ta5 = _evaluate(model, test_set, batch_size, device, max_batches, channels_last,
                                            forward, engine)
                    result.test_loss.append(tl)
                    result.test_accuracy.append(ta)
                    result.test_top5_accuracy.append(ta5)
                    fields.update(test_loss=tl, test_acc=ta)
                if sched is not None and not per_step:
                    _step_per_epoch(sched, result)
                result.epochs = epoch + 1
                result.epoch_seconds.append(time.perf_counter() - epoch_start)
                bar.update(1, **fields)
                _log.log(logging.INFO if bar.silenced else logging.DEBUG, "train: %s",
                         " ".join(f"{k}={format_value(v)}" for k, v in fields.items()))
    finally:
        kept.mask_grads()
        _restore_layout(model, layout)
        model.train(was_training)
        bar.close()
    result.seconds = time.perf_counter() - start
    result.final_test_accuracy = result.test_accuracy[-1] if result.test_accuracy else None
    return result


@torch.no_grad()
def _mask_grads(pairs) -> None:
    """Every masked parameter's gradient times its mask, in place: one multi-tensor call, where a
    hook per tensor would allocate a masked copy of each gradient inside the backward pass. A
    parameter the forward did not reach has no gradient to mask."""
    grads, masks = [], []
    for p, m in pairs:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:  # an embedding's sparse gradient: the foreach kernels take dense tensors only
            p.grad = g * m
            continue
        grads.append(g)
        masks.append(m)
    if grads:
        torch._foreach_mul_(grads, masks)


def _step_per_epoch(sched, result: TrainResult) -> None:
    if isinstance(sched, ReduceLROnPlateau):
        sched.step(result.test_loss[-1] if result.test_loss else result.train_loss[-1])
    else:
        sched.step()
