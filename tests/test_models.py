"""The model zoo: shapes, parameter counts, initialisation statistics, get()/available()."""
import math

import pytest
import torch
from torch import nn

from ntkfast import models, prunable_parameters
from ntkfast.masks import Masks

from testing import devices

SMALL = ["lenet300_100", "lenet5", "conv4", "vgg11", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "vit", "lstm"]

DEFAULTS = {
    "lenet300_100": ((1, 28, 28), 10),
    "lenet5": ((1, 28, 28), 10),
    "conv4": ((3, 32, 32), 10),
    "vgg11": ((3, 32, 32), 10),
    "vgg16": ((3, 32, 32), 10),
    "vgg19": ((3, 32, 32), 10),
    "resnet20": ((3, 32, 32), 10),
    "resnet32": ((3, 32, 32), 10),
    "resnet56": ((3, 32, 32), 10),
    "resnet18": ((3, 224, 224), 1000),
    "resnet50": ((3, 224, 224), 1000),
    "vit": ((3, 32, 32), 10),
    "lstm": ((1, 28, 28), 10),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return models.resnet50()


# -- registry ----------------------------------------------------------------------------------

def test_available_lists_every_model():
    assert models.available() == list(DEFAULTS)


def test_get_builds_by_name_with_kwargs():
    m = models.get("ResNet-20", num_classes=7)
    assert isinstance(m, models.CifarResNet) and m.num_classes == 7
    assert isinstance(models.get("lenet300_100"), models.NTTNet)


def test_get_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="model") as e:
        models.get("alexnet")
    assert "resnet20" in str(e.value) and "alexnet" in str(e.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet20(num_classes=0)
    with pytest.raises(ValueError, match="input_shape"):
        models.lenet5((28, 28))
    with pytest.raises(ValueError, match="too small"):
        models.vgg16((3, 8, 8))
    with pytest.raises(ValueError, match="init"):
        models.vgg11(init="xavier")


# -- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_default_shapes(name):
    torch.manual_seed(0)
    m = models.get(name)
    shape, k = DEFAULTS[name]
    assert m.input_shape == shape and m.num_classes == k
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, *shape))
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,shape,k", [
    ("resnet20", (3, 16, 16), 7),
    ("lenet5", (1, 32, 32), 10),
    ("lenet300_100", (3, 8, 8), 4),
    ("conv4", (1, 28, 28), 5),
    ("vgg11", (1, 28, 28), 3),
    ("vgg16", (3, 64, 48), 100),
    ("resnet56", (1, 20, 24), 2),
    ("resnet18", (3, 64, 64), 10),
    ("vit", (1, 28, 28), 10),
    ("lstm", (3, 8, 8), 4),
])
def test_other_shapes(name, shape, k):
    torch.manual_seed(0)
    m = models.get(name, input_shape=shape, num_classes=k)
    assert m.input_shape == shape and m.num_classes == k
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, *shape)).shape == (2, k)


def test_resnet50_forward_small_input(resnet50):
    resnet50.eval()
    with torch.no_grad():
        assert resnet50(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("device", devices)
def test_forward_backward_on_device(device):
    torch.manual_seed(0)
    m = models.resnet20().to(device)
    m(torch.randn(4, 3, 32, 32, device=device)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


# -- parameter counts --------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("lenet300_100", 266_610),
    ("lenet5", 431_080),          # LeNet-5-Caffe
    ("conv4", 1_904_202),         # NTT's VALID-padded Conv-4 on 32x32
    ("resnet20", 272_474),        # ~0.27M
    ("resnet32", 466_906),        # ~0.46M
    ("resnet56", 855_770),        # ~0.85M
    ("vgg16", 14_728_266),        # ~14.7M (BatchNorm, one 512->10 classifier)
    ("resnet18", 11_689_512),     # torchvision's count
    ("vit", 811_146),
    ("lstm", 81_674),             # nn.LSTM(28, 128) with one bias per gate (its two add up) + Linear(128, 10)
])
def test_parameter_counts(name, expected):
    assert n_params(models.get(name)) == expected


def test_resnet50_parameter_count(resnet50):
    assert n_params(resnet50) == 25_557_032


def test_vgg_layout():
    m = models.vgg16()
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 13 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 13
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.modules()) == 4
    assert [x for x in m.modules() if isinstance(x, nn.Linear)] == [m.fc]
    assert m.fc.in_features == 512
    assert not any(isinstance(x, nn.BatchNorm2d) for x in models.vgg11(batch_norm=False).modules())


def test_cifar_resnet_layout():
    m = models.resnet20()
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    # 19 3x3 convs (stem + 9 blocks x 2) and two 1x1 projection shortcuts
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(shortcuts) == 2 and all(c.stride == (2, 2) for c in shortcuts)
    assert [c.out_channels for c in shortcuts] == [32, 64]
    assert all(c.bias is None for c in convs)


def test_prunable_weights_found():
    m = models.resnet20()
    names = list(prunable_parameters(m))
    assert names[0] == "conv.weight" and names[-1] == "fc.weight"
    assert "blocks.3.shortcut.0.weight" in names
    assert len(names) == 19 + 2 + 1


# -- initialisation ----------------------------------------------------------------------------

def test_glorot_normal_statistics():
    torch.manual_seed(0)
    m = models.lenet300_100()
    w = m.classifier[0].weight  # 300 x 784
    target = math.sqrt(2.0 / (784 + 300))
    assert abs(w.std().item() / target - 1) < 0.02
    assert abs(w.mean().item()) < 0.02 * target
    # truncated at 2 sigma of the underlying normal, as JAX's glorot_normal
    assert w.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-6
    b = m.classifier[0].bias
    assert 0.005 < b.std().item() < 0.015  # N(0, 0.01^2), the authors' stax default
    m0 = models.lenet300_100(bias_std=0)
    assert all((x.bias == 0).all() for x in m0.modules() if isinstance(x, nn.Linear))


def test_glorot_conv_fans():
    torch.manual_seed(0)
    w = models.conv4().features[2].weight  # 64 x 64 x 3 x 3
    target = math.sqrt(2.0 / (64 * 9 + 64 * 9))
    assert abs(w.std().item() / target - 1) < 0.03


def test_kaiming_statistics_cifar():
    torch.manual_seed(0)
    m = models.vgg16()
    w = m.layers[10].conv.weight  # 512 x 256 x 3 x 3
    assert w.shape == (512, 256, 3, 3)
    target = math.sqrt(2.0 / (256 * 9))  # kaiming_normal_, fan_in
    assert abs(w.std().item() / target - 1) < 0.02
    assert (m.fc.bias == 0).all() and all((x.conv.bias == 0).all() for x in m.layers if hasattr(x, "conv"))
    bn = m.layers[0].bn
    assert (bn.weight == 1).all() and (bn.bias == 0).all()
    r = models.resnet56()
    assert abs(r.blocks[20].conv1.weight.std().item() / math.sqrt(2.0 / (64 * 9)) - 1) < 0.03
    assert abs(r.fc.weight.std().item() / math.sqrt(2.0 / 64) - 1) < 0.1


def test_ntksap_init_keeps_default_biases():
    torch.manual_seed(0)
    m = models.vgg11(init="ntksap")
    assert m.fc.bias.abs().max() > 0
    assert m.fc.bias.abs().max() <= 1 / math.sqrt(512)


def test_kaiming_fan_out_imagenet(resnet50):
    w = resnet50.layer3[0].conv2.weight  # 256 x 256 x 3 x 3, fan_out = 256 * 9
    assert abs(w.std().item() / math.sqrt(2.0 / (256 * 9)) - 1) < 0.02
    w = resnet50.layer4[0].conv3.weight  # 2048 x 512 x 1 x 1: fan_out 2048 (fan_in would be 512)
    assert abs(w.std().item() / math.sqrt(2.0 / 2048) - 1) < 0.02
    bound = 1 / math.sqrt(2048)  # default nn.Linear init of the classifier
    assert resnet50.fc.weight.abs().max() <= bound and resnet50.fc.bias.abs().max() <= bound


@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet20", "resnet18"])
def test_reinitialize_changes_weights_keeps_shapes(name):
    torch.manual_seed(0)
    m = models.get(name)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(3.0)
                mod.running_mean.fill_(1.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = {n: id(p) for n, p in m.named_parameters()}
    assert m.reinitialize() is m
    for n, p in m.named_parameters():
        assert id(p) == ids[n] and p.shape == before[n].shape
        if n.endswith("weight") and p.dim() > 1:
            assert not torch.equal(p, before[n]), n
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert (mod.weight == 1).all() and (mod.running_mean == 0).all()


def test_reinitialize_is_seeded_by_global_rng():
    m = models.resnet20()
    torch.manual_seed(5)
    m.reinitialize()
    a = [p.clone() for p in m.parameters()]
    torch.manual_seed(5)
    m.reinitialize()
    assert all(torch.equal(x, p) for x, p in zip(a, m.parameters()))
    torch.manual_seed(5)
    b = models.resnet20()
    torch.manual_seed(5)
    c = models.resnet20()
    assert all(torch.equal(x, y) for x, y in zip(b.parameters(), c.parameters()))


def test_reinitialize_under_prune_hooks():
    torch.manual_seed(0)
    m = models.lenet300_100()
    masks = Masks({n: torch.rand(p.shape) < 0.5 for n, p in prunable_parameters(m).items()})
    masks.to_prune_hooks(m)
    orig = m.classifier[0].weight_orig.detach().clone()
    m.reinitialize()
    assert not torch.equal(orig, m.classifier[0].weight_orig)
    m(torch.randn(1, 1, 28, 28))  # the pre-hook recomputes weight = weight_orig * weight_mask
    mask = masks["classifier.0.weight"]
    assert torch.equal(m.classifier[0].weight, m.classifier[0].weight_orig * mask)
    assert (m.classifier[0].weight[~mask] == 0).all()
