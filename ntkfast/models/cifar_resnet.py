"""CIFAR ResNet-20/32/56 as in the Synaptic-Flow and NTK-SAP code.

Follows ``Models/lottery_resnet.py`` of ganguli-lab/Synaptic-Flow (from facebookresearch/open_lth),
which NTK-SAP (YiteWang/NTK-SAP) copies:

- stem: conv3x3 (16 filters, stride 1, padding 1, no bias) -> BatchNorm -> ReLU;
- three stages of widths W, 2W, 4W (W = 16) with D = (depth - 2) / 6 BasicBlocks each; the first
  block of stages 2 and 3 downsamples with stride 2;
- block: conv3x3 (stride s) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU; the
  shortcut is a 1x1 conv (stride 2, no bias) + BN where the block downsamples, else the identity;
- global average pool, flatten, ``Linear(4W, num_classes)``.
- init ``"synflow"`` (default): ``kaiming_normal_`` (fan_in, gain sqrt 2) on conv and linear
  weights, linear bias 0, BatchNorm weight 1 / bias 0. ``"ntksap"``: the same, but the linear bias
  keeps PyTorch's default uniform(+-1/sqrt(fan_in)) draw (NTK-SAP comments out the zeroing).

One deliberate difference: the authors' identity shortcut is ``layers.Identity2d``, a per-channel
scale initialised to 1 and trainable (but not prunable by default). Here it is a parameter-free
identity, as in He et al. (2016); the parameter count differs by 16 per identity block of stage 1,
32 of stage 2, 64 of stage 3 (ResNet-20: 272,474 here vs 272,714 there, 10 classes).

Module names (``conv``, ``bn``, ``blocks.<i>.conv1`` ..., ``blocks.<i>.shortcut.0``, ``fc``) match
the authors' state dicts.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.checks import check_int
from ..core.options import ZooInit
from ._base import ZooModel, check_image_shape, check_init, check_num_classes, kaiming_reinit_

__all__ = ["CifarResNet", "BasicBlock", "resnet20", "resnet32", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a residual connection (1x1 conv + BN when downsampling)."""

    def __init__(self, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if downsample or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(ZooModel):
    """ResNet-(6D+2) for CIFAR (He et al., 2016, section 4.2) in the open_lth/Synaptic-Flow form."""

    def __init__(self, depth: int, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                 width: int = 16, init: ZooInit = "synflow"):
        c, _, _ = check_image_shape(input_shape, f"resnet{depth}")
        check_num_classes(num_classes)
        init = check_init(init)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6*D + 2 with D >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        width = check_int(width, "width", lo=1)
        super().__init__(input_shape, num_classes)
        self.init = init
        self.depth = depth
        per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(c, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks = []
        filters = width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for i in range(per_stage):
                blocks.append(BasicBlock(filters, stage_width, downsample=stage > 0 and i == 0))
                filters = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters, num_classes)
        self.reinitialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.conv(x)))
        out = self.pool(self.blocks(out))
        return self.fc(torch.flatten(out, 1))

    def reinitialize(self) -> "CifarResNet":
        kaiming_reinit_(self, self.init)
        return self


def resnet20(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, width: int = 16,
             init: ZooInit = "synflow") -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage): 272,474 parameters for 10 classes."""
    return CifarResNet(20, input_shape, num_classes, width=width, init=init)


def resnet32(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, width: int = 16,
             init: ZooInit = "synflow") -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage): 466,906 parameters for 10 classes."""
    return CifarResNet(32, input_shape, num_classes, width=width, init=init)


def resnet56(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, width: int = 16,
             init: ZooInit = "synflow") -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage): 855,770 parameters for 10 classes."""
    return CifarResNet(56, input_shape, num_classes, width=width, init=init)
