"""Every scorer and the pruning loop on every available device, against the CPU (float64).

On a CPU-only machine this checks the CPU against itself through the same code path; with a GPU
it holds the CUDA path (scorers, the compiled top-k, the SynFlow cache) to the CPU."""
import copy

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import Masks, scores
from testing import devices


def small_cnn():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10)).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    net.input_shape = (3, 8, 8)
    return net


def batch(device):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, 10, (12,), generator=g).to(device))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("method", ["magnitude", "snip", "iterative_snip", "grasp", "synflow"])
def test_scorers_agree_with_cpu(device, method):
    cpu_model = small_cnn()
    dev_model = copy.deepcopy(cpu_model).to(device)
    g = torch.Generator().manual_seed(9)
    masks = Masks({n: torch.rand(m.shape, generator=g) < 0.6 for n, m in Masks.ones(cpu_model).items()})
    ref = scores.get(method).fn(cpu_model, masks, data=batch("cpu"))
    got = scores.get(method).fn(dev_model, masks.to(device), data=batch(device))
    for n in ref:
        assert got[n].device.type == torch.device(device).type
        torch.testing.assert_close(got[n].cpu(), ref[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_iterative_synflow_same_masks_as_cpu(device, scope):
    cpu_model = small_cnn()
    dev_model = copy.deepcopy(cpu_model).to(device)
    ref = ntkfast.prune(cpu_model, "synflow", 0.05, rounds=8, scope=scope, progress=False, on_empty_layer="ignore")
    got = ntkfast.prune(dev_model, "synflow", 0.05, rounds=8, scope=scope, progress=False, on_empty_layer="ignore")
    assert all(got[n].device.type == torch.device(device).type for n in got)
    assert got.to("cpu") == ref


@pytest.mark.parametrize("device", devices)
def test_random_is_seeded_per_device(device):
    model = small_cnn().to(device)
    a = ntkfast.prune(model, "random", 0.2, rounds=3, seed=11, progress=False)
    b = ntkfast.prune(model, "random", 0.2, rounds=3, seed=11, progress=False)
    assert a == b and abs(a.density - 0.2) < 1e-3
