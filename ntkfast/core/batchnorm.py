"""Which BatchNorm statistics a data-based scorer evaluates the network with: ``bn=``.

A freshly initialised network has running statistics (0, 1), so in eval mode its BatchNorm layers
are the identity and the activations grow layer by layer: SNIP and GraSP then rank weights of a
network that is not the one that will train (in the reduced ResNet-20 study, train-mode scoring
raised GraSP from 21% to 44% and SNIP from 44% to 51% at density 0.1), and NTT's kernel term
dwarfs its output term. Three choices:

- "eval": the running statistics as they are (Synaptic-Flow's default);
- "train": each batch normalised by its own statistics, with gradient through them (NTK-SAP's
  ``--prune-train-mode``, which its scripts pass to every pruner but SynFlow; GraSP's own code);
  the default of SNIP, iterative SNIP and GraSP on a network with BatchNorm, measured best of the
  three (DEFAULT_SCORING_BN); without BatchNorm their default is "eval" (train mode would only
  switch dropout on);
- "calibrate": a few train-mode passes over the scoring data without gradient set the running
  statistics of the scorer's private copy to their mean over those batches (cumulative average,
  not the momentum's), then eval mode: the normalisation of "train" with fixed statistics, so a
  sample's score does not depend on the other samples of its batch. NTT's default on a network
  with BatchNorm (its per-sample kernel needs fixed statistics).

The user's model is never changed: the statistics are set in the scorer's copy of the state.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .options import BNMode, choices
from .state import functional_forward

__all__ = ["BNMode", "BN_MODES", "DEFAULT_SCORING_BN", "default_bn", "check_train_batches", "resolve_bn", "bn_setting", "calibrate_batchnorm", "calibrate_module", "batchnorm_layers"]

BN_MODES = choices(BNMode)
# SNIP, iterative SNIP and GraSP score with batch statistics unless told otherwise: in the reduced
# ResNet-20 / CIFAR-10 study (density 0.1, one seed) "train" gave SNIP 50.5% against 47.2%
# ("calibrate") and 43.7% ("eval"), GraSP 44.4% against 30.4% and 21.3%; iterative SNIP 49.7%,
# 51.0% and 48.0%. It is also GraSP's own code and the NTK-SAP authors' protocol.
DEFAULT_SCORING_BN = "train"


def resolve_bn(bn: Optional[str], train_mode: Optional[bool], default: str = DEFAULT_SCORING_BN) -> Tuple[bool, bool]:
    """(train_mode, calibrate) for a scorer given ``bn``, its older ``train_mode`` flag (True is
    "train", False "eval") and the scorer's default when neither is given; a conflicting pair is
    refused by name."""
    if train_mode is not None and not isinstance(train_mode, bool):
        raise ValueError(f"train_mode: expected True or False, got {train_mode!r}")
    if bn is None:
        bn = default if train_mode is None else ("train" if train_mode else "eval")
    elif isinstance(bn, (list, dict, set)) or bn not in BN_MODES:
        raise ValueError(f"bn: expected one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    elif train_mode is not None and (bn == "train") != train_mode:
        raise ValueError(f"bn: {bn!r} contradicts train_mode={train_mode} (which is bn="
                         f"{'train' if train_mode else 'eval'!r}); give one of them")
    return bn == "train", bn == "calibrate"


def batchnorm_layers(model: nn.Module):
    """(name, module) of every normalisation layer that keeps running statistics: BatchNorm, and
    InstanceNorm with ``track_running_stats``, whose eval-mode output reads them the same way
    (at initialisation (0, 1): the identity)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats]


class _CumulativeMomentum:
    """For the block, the running statistics become the plain mean over the batches seen: before
    batch i (from 0) :meth:`step` sets every layer's momentum to 1 / (i + 1), the factor BatchNorm
    itself uses with momentum None (InstanceNorm reads None as 0 and would not update at all).
    Each layer's own momentum is restored afterwards."""

    def __init__(self, layers):
        self.layers = layers

    def __enter__(self):
        self.saved = [m.momentum for _, m in self.layers]
        return self

    def step(self, seen: int) -> None:
        for _, m in self.layers:
            m.momentum = 1.0 / (seen + 1)

    def __exit__(self, *exc):
        for (_, m), momentum in zip(self.layers, self.saved):
            m.momentum = momentum


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, state: dict, inputs: Iterable[torch.Tensor]) -> int:
    """Set the running statistics in ``state`` (a :func:`~ntkfast.core.state.state_copy` of
    ``model``) to the mean over ``inputs`` of each batch's mean and unbiased variance, by
    train-mode passes computed on ``state``; returns the number of layers set. ``model``'s own
    tensors are not touched (its layers' momentum is restored)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    for name, _ in layers:
        state[f"{name}.running_mean"].zero_()
        state[f"{name}.running_var"].fill_(1)
        state[f"{name}.num_batches_tracked"].zero_()
    seen = 0
    with _CumulativeMomentum(layers) as momentum:
        for x in inputs:
            momentum.step(seen)
            functional_forward(model, state, x, train_mode=True)
            seen += 1
    if seen == 0:
        raise ValueError("bn: 'calibrate' needs at least one batch of data")
    return len(layers)


@torch.no_grad()
def calibrate_module(module: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """:func:`calibrate_batchnorm` on a private copy of a model (its own buffers are set); the
    copy's train/eval flags are restored."""
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    for _, m in layers:
        m.reset_running_stats()
    was = [(m, m.training) for m in module.modules()]
    seen = 0
    try:
        with _CumulativeMomentum(layers) as momentum:
            module.train()
            for x in inputs:
                momentum.step(seen)
                module(x)
                seen += 1
    finally:
        for m, training in was:
            m.training = training
    if seen == 0:
        raise ValueError("bn: 'calibrate' needs at least one batch of data")
    return len(layers)


def check_train_batches(model: nn.Module, inputs: Iterable[torch.Tensor]) -> None:
    """Train-mode BatchNorm cannot normalise a batch of one sample; say so by argument name instead
    of PyTorch's error from deep inside the forward."""
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return
    for x in inputs:
        if x.shape[0] < 2:
            raise ValueError("data: a batch of one sample cannot be scored with bn='train' (the default for this "
                             "scorer: BatchNorm normalises by the batch's own statistics); give batches of at least "
                             "2 samples, or bn='calibrate' or 'eval'")


def default_bn(model: nn.Module) -> str:
    """The scorers' mode when none is asked: "train" on a network with BatchNorm (the measured
    default), "eval" on one without, where train mode would only switch dropout on and make the
    scores random."""
    return DEFAULT_SCORING_BN if batchnorm_layers(model) else "eval"


def bn_setting(bn: Optional[str], train_mode: Optional[bool], shard, model: nn.Module) -> Tuple[bool, bool]:
    """:func:`resolve_bn` for a scorer that may run over a process group, with
    :func:`default_bn` of ``model``: "calibrate" is refused over a group (each process would set
    the statistics from its own share of the data, and the ranks would score different networks)."""
    train_mode, calibrate = resolve_bn(bn, train_mode, default_bn(model))
    if calibrate and getattr(shard, "size", 1) > 1:
        raise ValueError("bn: 'calibrate' is not supported over a process group (each process would calibrate on its "
                         "own share of the data); use 'train' or 'eval'")
    return train_mode, calibrate
