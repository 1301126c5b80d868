"""CIFAR-style VGG-11/16/19 as in the Synaptic-Flow and NTK-SAP code.

Follows ``Models/lottery_vgg.py`` of ganguli-lab/Synaptic-Flow (itself from facebookresearch/
open_lth), which NTK-SAP (YiteWang/NTK-SAP) copies:

- plans: VGG-11 ``64 M 128 M 256 256 M 512 512 M 512 512``; VGG-16 ``64 64 M 128 128 M 256x3 M
  512x3 M 512x3``; VGG-19 ``64 64 M 128 128 M 256x4 M 512x4 M 512x4`` (``M`` = 2x2 max-pool,
  stride 2; note there is no pool after the last block);
- every conv is 3x3, padding 1, with bias, followed by BatchNorm (``*_bn`` variants there; pass
  ``batch_norm=False`` for their plain ``vgg*``) and ReLU;
- then a 2x2 average pool (global on 32x32 inputs, where the map is 2x2), flatten, and a single
  ``Linear(512, num_classes)``. Here the pool is ``AdaptiveAvgPool2d(1)``, identical on 32x32
  inputs and keeping the classifier at 512 inputs for other input sizes.
- init ``"synflow"`` (default): ``kaiming_normal_`` (fan_in, gain sqrt 2) on conv and linear
  weights, biases 0, BatchNorm weight 1 / bias 0. ``"ntksap"``: NTK-SAP's variant, the same but
  biases keep PyTorch's default uniform(+-1/sqrt(fan_in)) draw (its code comments out the zeroing).

Module names (``layers.<i>.conv``, ``layers.<i>.bn``, ``fc``) match the authors' state dicts.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import nn

from ..core.options import ZooInit
from ._base import (ZooModel, check_image_shape, check_init, check_num_classes, kaiming_reinit_,
                    too_small)

__all__ = ["VGG", "vgg11", "vgg16", "vgg19", "PLANS"]

PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class ConvBlock(nn.Module):
    """conv3x3 (padding 1, bias) -> [BatchNorm] -> ReLU."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(c_out) if batch_norm else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x)


class VGG(ZooModel):
    """VGG for small images: conv blocks and max-pools per ``plan``, global average pool, Linear."""

    def __init__(self, plan: List[Union[int, str]], input_shape: Sequence[int] = (3, 32, 32),
                 num_classes: int = 10, *, batch_norm: bool = True, init: ZooInit = "synflow", name: str = "vgg"):
        c, h, w = check_image_shape(input_shape, name)
        check_num_classes(num_classes)
        init = check_init(init)
        for spec in plan:
            if spec == "M":
                if h < 2 or w < 2:
                    raise too_small(name, input_shape, "before a 2x2 max-pool (needs at least 16x16)")
                h, w = h // 2, w // 2
        super().__init__(input_shape, num_classes)
        self.init = init
        self.plan = list(plan)
        blocks: List[nn.Module] = []
        filters = c
        for spec in plan:
            if spec == "M":
                blocks.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                blocks.append(ConvBlock(filters, int(spec), batch_norm))
                filters = int(spec)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters, num_classes)
        self.reinitialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(x))
        return self.fc(torch.flatten(x, 1))

    def reinitialize(self) -> "VGG":
        kaiming_reinit_(self, self.init)
        return self


def vgg11(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, batch_norm: bool = True,
          init: ZooInit = "synflow") -> VGG:
    """VGG-11 (CIFAR layout, BatchNorm by default): 9.23M parameters for 10 classes."""
    return VGG(PLANS[11], input_shape, num_classes, batch_norm=batch_norm, init=init, name="vgg11")


def vgg16(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, batch_norm: bool = True,
          init: ZooInit = "synflow") -> VGG:
    """VGG-16 (CIFAR layout, BatchNorm by default): 14.73M parameters for 10 classes."""
    return VGG(PLANS[16], input_shape, num_classes, batch_norm=batch_norm, init=init, name="vgg16")


def vgg19(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, batch_norm: bool = True,
          init: ZooInit = "synflow") -> VGG:
    """VGG-19 (CIFAR layout, BatchNorm by default): 20.04M parameters for 10 classes."""
    return VGG(PLANS[19], input_shape, num_classes, batch_norm=batch_norm, init=init, name="vgg19")
