"""The three networks of Neural Tangent Transfer (Liu & Zenke, ICML 2020).

Layouts and initialisation follow the authors' JAX code (fmi-basel/neural-tangent-transfer,
``nt_transfer/nn_models.py``: ``gen_mlp_lenet``, ``gen_cnn_lenet_caffe``, ``gen_cnn_conv4``):

- weights: ``jax.nn.initializers.glorot_normal()``, which is a normal truncated to +-2 sigma and
  rescaled so that its standard deviation is exactly sqrt(2 / (fan_in + fan_out)) (here:
  :func:`~ntkfast.models._base.glorot_normal_truncated_`);
- biases: ``jax.nn.initializers.normal()``, i.e. N(0, 0.01^2) (``bias_std=0.01``); pass
  ``bias_std=0`` for zero biases;
- convolutions: ``stax.Conv`` with its default ``padding='VALID'`` (no padding), stride 1;
  max-pooling 2x2 with stride 2; ReLU after every layer but the last.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..core.checks import check_number
from ._base import (ZooModel, check_image_shape, check_input_shape, check_num_classes, conv_out,
                    glorot_normal_truncated_, param, too_small)

__all__ = ["NTTNet", "lenet300_100", "lenet5", "conv4"]


def _check_bias_std(bias_std) -> float:
    check_number(bias_std, "bias_std", lo=0.0)
    return float(bias_std)


class NTTNet(ZooModel):
    """A feature extractor (``features``) followed by a classifier (``classifier``), initialised
    as in the NTT code: truncated Glorot-normal weights, N(0, bias_std^2) biases."""

    def __init__(self, input_shape, num_classes, features: nn.Module, classifier: nn.Module, bias_std: float):
        super().__init__(input_shape, num_classes)
        self.bias_std = bias_std
        self.features = features
        self.classifier = classifier
        self.reinitialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    @torch.no_grad()
    def reinitialize(self) -> "NTTNet":
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                glorot_normal_truncated_(param(m, "weight"))
                b = param(m, "bias")
                if b is not None:
                    if self.bias_std > 0:
                        nn.init.normal_(b, 0.0, self.bias_std)
                    else:
                        nn.init.zeros_(b)
        return self


def lenet300_100(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, *, bias_std: float = 0.01) -> NTTNet:
    """LeNet-300-100: flatten -> Linear 300 -> ReLU -> Linear 100 -> ReLU -> Linear num_classes.

    266,610 parameters on MNIST. NTT code: ``gen_mlp_lenet``.
    """
    shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    bias_std = _check_bias_std(bias_std)
    n_in = math.prod(shape)
    features = nn.Identity()
    classifier = nn.Sequential(
        nn.Linear(n_in, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )
    return NTTNet(shape, num_classes, features, classifier, bias_std)


def lenet5(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, *, bias_std: float = 0.01) -> NTTNet:
    """LeNet-5-Caffe: conv5x5·20 -> ReLU -> maxpool 2 -> conv5x5·50 -> ReLU -> maxpool 2 ->
    fc500 -> ReLU -> fc num_classes; no padding. 431,080 parameters on MNIST.
    NTT code: ``gen_cnn_lenet_caffe``.
    """
    c, h, w = check_image_shape(input_shape, "lenet5")
    check_num_classes(num_classes)
    bias_std = _check_bias_std(bias_std)
    for _ in range(2):
        h, w = conv_out(h, 5), conv_out(w, 5)
        if h < 2 or w < 2:
            raise too_small("lenet5", input_shape, "before a 2x2 max-pool")
        h, w = h // 2, w // 2
    features = nn.Sequential(
        nn.Conv2d(c, 20, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
    )
    classifier = nn.Sequential(nn.Linear(50 * h * w, 500), nn.ReLU(), nn.Linear(500, num_classes))
    return NTTNet(input_shape, num_classes, features, classifier, bias_std)


def conv4(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, padding: int = 0,
          bias_std: float = 0.01) -> NTTNet:
    """Conv-4: 2x (conv3x3·64, ReLU), maxpool 2, 2x (conv3x3·128, ReLU), maxpool 2, fc512, ReLU,
    fc num_classes. NTT code: ``gen_cnn_conv4`` (a scaled-up Keras CIFAR-10 example).

    ``padding`` is 0 by default, as the authors' ``stax.Conv`` layers use 'VALID' padding
    (32x32 input: 32-30-28, pool 14, 12-10, pool 5, so the first Linear has 128*5*5 = 3200
    inputs; 1,904,202 parameters). ``padding=1`` gives the 'same'-padded variant (8192 inputs).
    """
    c, h, w = check_image_shape(input_shape, "conv4")
    check_num_classes(num_classes)
    bias_std = _check_bias_std(bias_std)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    for _ in range(2):
        for _ in range(2):
            h, w = conv_out(h, 3, 1, padding), conv_out(w, 3, 1, padding)
        if h < 2 or w < 2:
            raise too_small("conv4", input_shape, "before a 2x2 max-pool")
        h, w = h // 2, w // 2
    features = nn.Sequential(
        nn.Conv2d(c, 64, 3, padding=padding), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=padding), nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(64, 128, 3, padding=padding), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=padding), nn.ReLU(),
        nn.MaxPool2d(2, 2),
    )
    classifier = nn.Sequential(nn.Linear(128 * h * w, 512), nn.ReLU(), nn.Linear(512, num_classes))
    return NTTNet(input_shape, num_classes, features, classifier, bias_std)
