"""The model zoo used by the CLI, the tests and the benchmarks.

Every constructor is ``f(input_shape=<default>, num_classes=<default>, **options) -> nn.Module``
and returns a model with ``input_shape`` (no batch dimension), ``num_classes`` and
``reinitialize()`` (re-draw all parameters in place from the global torch RNG). Models are made
of plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm`` modules (the ViT's
attention and the LSTM's gates too), so :func:`ntkfast.prunable_parameters` finds their weights.

========================  ==================  ============================================
name                      default input       follows
========================  ==================  ============================================
lenet300_100              (1, 28, 28), 10     NTT code (fmi-basel/neural-tangent-transfer)
lenet5 (LeNet-5-Caffe)    (1, 28, 28), 10     NTT code
conv4                     (3, 32, 32), 10     NTT code
vgg11, vgg16, vgg19       (3, 32, 32), 10     Synaptic-Flow / NTK-SAP ``lottery_vgg.py`` (BN)
resnet20, resnet32, 56    (3, 32, 32), 10     Synaptic-Flow / NTK-SAP ``lottery_resnet.py``
resnet18, resnet50        (3, 224, 224), 1000 Synaptic-Flow / NTK-SAP ``imagenet_resnet.py``
vit                       (3, 32, 32), 10     ViT (Dosovitskiy et al.), 4x4 patches, timm's init
lstm                      (1, 28, 28), 10     an LSTM over image rows, ``nn.LSTM``'s init
========================  ==================  ============================================

``get(name, **kwargs)`` builds a model by name; ``available()`` lists the names.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from .._catalog import model_key as _key
from ._base import ZooModel
from .cifar_resnet import CifarResNet, resnet20, resnet32, resnet56
from .imagenet_resnet import ImageNetResNet, resnet18, resnet50
from .ntt import NTTNet, conv4, lenet5, lenet300_100
from .sequence import LSTMClassifier, ViT, lstm, vit
from .vgg import VGG, vgg11, vgg16, vgg19

__all__ = [
    "get", "available", "ZooModel", "NTTNet", "VGG", "CifarResNet", "ImageNetResNet", "ViT", "LSTMClassifier",
    "lenet300_100", "lenet5", "conv4", "vgg11", "vgg16", "vgg19",
    "resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vit", "lstm",
]

_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": lenet300_100,
    "lenet5": lenet5,
    "conv4": conv4,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit": vit,
    "lstm": lstm,
}


_BY_KEY = {_key(n): n for n in _MODELS}


def available() -> List[str]:
    """Names accepted by :func:`get`, in zoo order (small MNIST nets first, ImageNet last)."""
    return list(_MODELS)


def get(name: str, **kwargs) -> nn.Module:
    """Build the model called ``name`` (case, '-' and '_' ignored: "ResNet-20" works), passing
    ``kwargs`` (``input_shape``, ``num_classes``, model options) to its constructor."""
    if not isinstance(name, str) or _key(name) not in _BY_KEY:
        raise ValueError(f"model must be one of {', '.join(_MODELS)}; got {name!r}")
    return _MODELS[_BY_KEY[_key(name)]](**kwargs)
