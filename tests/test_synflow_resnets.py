"""SynFlow on torchvision-layout ResNets: the two failures the Synaptic-Flow tracker reports.

- #11: users found every SynFlow gradient zero on torchvision / timm ResNets. Here every weight of
  every layer, residual blocks included, scores above zero and finite, at Tiny-ImageNet and
  ImageNet input sizes (ResNet-50's float32 pass overflows and is recomputed in float64).
- #7: single-shot SynFlow prunes ResNet-18's 1x1 shortcut convolutions away entirely. That is the
  method's own result (the authors' code does it too); ntkfast warns and names the layers.
"""
import warnings

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import models, scores


class _TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock as written there: in-place ReLU, a Sequential downsample."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _small_torchvision_resnet():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.MaxPool2d(3, 2, 1), _TorchvisionBlock(8, 8, 1), _TorchvisionBlock(8, 16, 2),
                        _TorchvisionBlock(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    net.input_shape = (3, 64, 64)
    return net


def _all_positive(s, net):
    """The layers where some weight scores zero (or not finite) though the weight itself is not 0
    (a weight initialised to exactly 0 scores 0: |theta| is a factor)."""
    weights = dict(net.named_parameters())
    return {n: float(v.min()) for n, v in s.items()
            if not (torch.isfinite(v).all() and ((v > 0) | (weights[n] == 0)).all())}


def test_every_weight_of_an_inplace_torchvision_resnet_scores():
    net = _small_torchvision_resnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s32 = scores.synflow(net)
    assert not _all_positive(s32, net)
    s64 = scores.synflow(net, dtype=torch.float64)
    for n in s32:
        torch.testing.assert_close(s32[n].double(), s64[n], rtol=1e-4, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # in-place ReLU on a copy only


@pytest.mark.parametrize("name,shape,classes", [("resnet18", (3, 64, 64), 200), ("resnet18", (3, 224, 224), 1000),
                                                ("resnet50", (3, 64, 64), 200)])
def test_zoo_torchvision_resnets_score_every_weight(name, shape, classes):
    torch.manual_seed(0)
    net = models.get(name, input_shape=shape, num_classes=classes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "synflow: the float32 computation overflowed")  # ResNet-50: float64 then
        s = scores.synflow(net)
    assert len(s) == (21 if name == "resnet18" else 54)
    assert not _all_positive(s, net)


def test_single_shot_synflow_names_the_shortcuts_it_empties():
    torch.manual_seed(0)
    net = models.get("resnet18", input_shape=(3, 64, 64), num_classes=200)
    with pytest.warns(RuntimeWarning, match=r"prune: 2 layer\(s\) lost all their weights: "
                                            r"layer3\.0\.downsample\.0\.weight, layer4\.0\.downsample\.0\.weight"):
        masks = ntkfast.prune(net, "synflow", 0.1, rounds=1, progress=False)
    assert not masks["layer3.0.downsample.0.weight"].any()
    assert all(m.any() for n, m in masks.items() if "downsample" not in n)


def test_the_shortcuts_kept_dense_on_request():
    torch.manual_seed(0)
    net = models.get("resnet18", input_shape=(3, 64, 64), num_classes=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no layer is emptied now
        masks = ntkfast.prune(net, "synflow", 0.1, rounds=1, progress=False, exclude="*downsample*")
    assert masks.excluded == tuple(f"layer{i}.0.downsample.0.weight" for i in (2, 3, 4))
