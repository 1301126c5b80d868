"""ImageNet ResNet-18/50 (torchvision layout) as in the Synaptic-Flow and NTK-SAP code.

Follows ``Models/imagenet_resnet.py`` of ganguli-lab/Synaptic-Flow and of YiteWang/NTK-SAP, both
taken from torchvision's ``resnet.py``:

- stem: conv7x7 (64, stride 2, padding 3, no bias) -> BN -> ReLU -> maxpool 3x3 (stride 2, pad 1);
- four stages of 64, 128, 256, 512 planes; stages 2-4 start with stride 2; BasicBlock
  (expansion 1; ResNet-18: 2-2-2-2) or Bottleneck (1x1, 3x3, 1x1, expansion 4, stride on the 3x3
  conv as in torchvision's "ResNet v1.5"; ResNet-50: 3-4-6-3); the shortcut is a 1x1 conv (no
  bias) + BN where the stride or the width changes;
- adaptive average pool to 1x1, flatten, ``Linear(512 * expansion, num_classes)``.
- no zero-init of the last BN of each block (``zero_init_residual=False`` there).

Initialisation, two variants (``init=``):

- ``"synflow"`` (default), Synaptic-Flow's code, same as torchvision: conv weights
  ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN weight 1 / bias 0; the final Linear
  is not re-initialised there, so it keeps PyTorch's default ``nn.Linear`` draw
  (kaiming_uniform with a = sqrt 5, bias uniform(+-1/sqrt(fan_in))).
- ``"ntksap"``, NTK-SAP's code: ``kaiming_normal_`` with the default fan_in mode on conv AND the
  final Linear weights; the Linear bias keeps the default uniform draw; BN weight 1 / bias 0.

ResNet-18 has 11,689,512 parameters and ResNet-50 25,557,032 (1000 classes), as torchvision's.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import torch
from torch import nn

from ..core.options import ZooInit
from ._base import ZooModel, check_image_shape, check_init, check_num_classes, param, reset_batchnorm_, torch_default_

__all__ = ["ImageNetResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet50"]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(ZooModel):
    """ResNet for ImageNet-sized inputs (He et al., 2016), torchvision module names."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int],
                 input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000, *,
                 init: ZooInit = "synflow", name: str = "resnet"):
        c, _, _ = check_image_shape(input_shape, name)
        check_num_classes(num_classes)
        init = check_init(init)
        super().__init__(input_shape, num_classes)
        self.init = init
        self.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._c = 64
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        del self._c
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.reinitialize()

    def _stage(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._c != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self._c, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self._c, planes, stride, downsample)]
        self._c = planes * block.expansion
        blocks += [block(self._c, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @torch.no_grad()
    def reinitialize(self) -> "ImageNetResNet":
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if self.init == "synflow":
                    nn.init.kaiming_normal_(param(m, "weight"), mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.kaiming_normal_(param(m, "weight"))
            elif isinstance(m, nn.BatchNorm2d):
                reset_batchnorm_(m)
            elif isinstance(m, nn.Linear):
                torch_default_(m)
                if self.init == "ntksap":
                    nn.init.kaiming_normal_(param(m, "weight"))
        return self


def resnet18(input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000, *,
             init: ZooInit = "synflow") -> ImageNetResNet:
    """ResNet-18, ImageNet layout (BasicBlocks 2-2-2-2): 11.69M parameters for 1000 classes."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], input_shape, num_classes, init=init, name="resnet18")


def resnet50(input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000, *,
             init: ZooInit = "synflow") -> ImageNetResNet:
    """ResNet-50, ImageNet layout (Bottlenecks 3-4-6-3): 25.56M parameters for 1000 classes."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], input_shape, num_classes, init=init, name="resnet50")
