"""The trainer's fast step (named optimisers over the kept entries of sparse weights, multi-tensor
masking) against the plain masked loop it replaces: the same weights, bit for bit, on fresh random
data, for an MLP and a small convolutional network, with every option of the named optimisers;
pruned weights at zero after every step; and the cases that leave the fast path."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkfast import models
from ntkfast.training import train

from testing import internal
from testing import one_thread  # noqa: F401  (the fixture, by name)


pytestmark = pytest.mark.usefixtures("one_thread")


def _masks(model, densities, seed):
    """Masks of the weights, at ``densities[i]`` for the i-th: low ones are compacted, high ones not."""
    g = torch.Generator().manual_seed(seed)
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    return {n: torch.rand(p.shape, generator=g) < densities[i % len(densities)] for i, (n, p) in enumerate(weights)}


def _batches(shape, k, n_batches, batch, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g, dtype=dtype), torch.randint(0, k, (batch,), generator=g))
            for _ in range(n_batches)]


def _reference(model, masks, batches, epochs, make_opt, check=None):
    """The masked loop written out: hooks mask the gradients, the optimiser sees the whole tensors,
    the weights are masked again after every step."""
    params = dict(model.named_parameters())
    mask_f = {n: m.to(params[n].dtype) for n, m in masks.items()}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].masked_fill_(~m, 0)
    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in mask_f.items()]
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for n, m in mask_f.items():
                    params[n].mul_(m)
            if check is not None:
                check(model)
    for h in hooks:
        h.remove()
    return opt


def _pruned_are_zero(model, masks):
    params = dict(model.named_parameters())
    return all(not params[n].detach()[~m].any() for n, m in masks.items())


NAMED = [
    ("adam", {}, lambda lr: lambda ps: torch.optim.Adam(ps, lr=lr)),
    ("adam", {"weight_decay": 0.05}, lambda lr: lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=0.05)),
    ("sgd", {}, lambda lr: lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
    ("sgd", {"momentum": 0.0}, lambda lr: lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.0)),
    ("sgd", {"momentum": 0.5, "weight_decay": 1e-3},
     lambda lr: lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.5, weight_decay=1e-3)),
]
NETS = [("lenet300_100", (1, 8, 8)), ("lenet5", (1, 16, 16))]


@pytest.mark.parametrize("net,shape", NETS)
@pytest.mark.parametrize("optimizer,options,make", NAMED)
@pytest.mark.parametrize("seed", [0, 1])
def test_named_optimizers_equal_the_plain_masked_loop_bit_for_bit(net, shape, optimizer, options, make, seed):
    torch.manual_seed(100 + seed)
    model = models.get(net, input_shape=shape, num_classes=4).double()
    ref = copy.deepcopy(model)
    masks = _masks(model, (0.1, 0.8, 0.3), seed)  # compacted, whole, compacted
    batches = _batches(shape, 4, 5, 16, torch.float64, seed)
    lr = 1e-2 if optimizer == "adam" else 0.05
    # NCHW, as the reference runs: the layouts order the convolutions' sums differently
    train(model, masks, batches, None, epochs=2, optimizer=optimizer, lr=lr, progress=False, seed=seed,
          channels_last=False, **options)
    _reference(ref, masks, batches, 2, make(lr))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        if name in masks:  # the gradients of the last step are masked, as the hooks masked them
            assert torch.equal(p.grad, q.grad), name
    assert _pruned_are_zero(model, masks)


@pytest.mark.parametrize("optimizer,options,make", NAMED[:3])
def test_channels_last_training_is_the_reference_to_rounding(optimizer, options, make):
    torch.manual_seed(7)
    model = models.get("lenet5", input_shape=(1, 16, 16), num_classes=4).double()
    ref = copy.deepcopy(model)
    masks = _masks(model, (0.1, 0.3), 7)
    batches = _batches((1, 16, 16), 4, 4, 16, torch.float64, 7)
    lr = 1e-2 if optimizer == "adam" else 0.05
    res = train(model, masks, batches, None, epochs=2, optimizer=optimizer, lr=lr, progress=False, **options)
    assert res.engine.get("channels_last")  # the compacted weights were re-indexed for the new strides
    _reference(ref, masks, batches, 2, make(lr))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    assert _pruned_are_zero(model, masks)


def test_float32_named_optimizer_equals_torch_optim_over_the_whole_tensors():
    # the user's optimiser sees the weights themselves; the named one the kept entries only
    torch.manual_seed(3)
    a = models.lenet300_100((1, 8, 8), 4)
    b = copy.deepcopy(a)
    masks = _masks(a, (0.05, 0.2, 0.9), 3)
    batches = _batches((1, 8, 8), 4, 6, 32, torch.float32, 3)
    train(a, masks, batches, None, epochs=3, optimizer="adam", lr=3e-3, weight_decay=0.01, progress=False)
    train(b, masks, batches, None, epochs=3, optimizer=torch.optim.Adam(b.parameters(), lr=3e-3, weight_decay=0.01),
          progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class _Watch(nn.Module):
    """Checks, at every forward, that the pruned weights are zero (after the previous step)."""

    def __init__(self, net, masks):
        super().__init__()
        self.net, self.masks, self.forwards = net, masks, 0

    def forward(self, x):
        if torch.is_grad_enabled():  # not train()'s look at the first sample, before it masks the weights
            params = dict(self.net.named_parameters())
            for n, m in self.masks.items():
                assert not params[n].detach()[~m].any(), (self.forwards, n)
            self.forwards += 1
        return self.net(x)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_weights_are_zero_before_every_step(optimizer):
    torch.manual_seed(0)
    net = models.lenet300_100((1, 8, 8), 4).double()
    masks = _masks(net, (0.1, 0.6), 0)
    model = _Watch(net, masks)
    batches = _batches((1, 8, 8), 4, 5, 16, torch.float64, 0)
    train(model, {f"net.{n}": m for n, m in masks.items()}, batches, None, epochs=2, optimizer=optimizer,
          weight_decay=0.1, progress=False)
    assert model.forwards >= 10
    assert _pruned_are_zero(net, masks)


class _MaxNorm(nn.Module):
    """An MLP whose forward rescales its first weight in place (a max-norm constraint): kept and
    pruned entries alike are written between the optimiser's steps."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 4)

    def forward(self, x):
        if torch.is_grad_enabled():  # training steps only: not train()'s look at the first sample
            with torch.no_grad():
                self.fc1.weight.mul_(0.99).add_(1e-3)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("optimizer,options,make", [NAMED[1], NAMED[4]])
@pytest.mark.parametrize("density", [0.1, 0.8])  # the written weight compacted, or whole
def test_a_forward_that_writes_its_weights_trains_as_the_plain_loop(optimizer, options, make, density):
    torch.manual_seed(5)
    model = _MaxNorm().double()
    ref = copy.deepcopy(model)
    masks = _masks(model, (density, 0.2), 5)
    batches = _batches((1, 8, 8), 4, 4, 16, torch.float64, 5)
    lr = 1e-2 if optimizer == "adam" else 0.05
    train(model, masks, batches, None, epochs=2, optimizer=optimizer, lr=lr, progress=False, **options)
    _reference(ref, masks, batches, 2, make(lr))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert _pruned_are_zero(model, masks)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.spare = nn.Linear(64, 4), nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_weight_the_forward_does_not_reach_is_left_as_it_is():
    torch.manual_seed(2)
    model = _Unused().double()
    ref = copy.deepcopy(model)
    masks = _masks(model, (0.1,), 2)
    batches = _batches((1, 8, 8), 4, 3, 16, torch.float64, 2)
    train(model, masks, batches, None, epochs=1, optimizer="adam", lr=1e-2, progress=False)
    _reference(ref, masks, batches, 1, lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert model.spare.weight.grad is None


def test_only_sparse_weights_of_named_optimizers_are_compacted():
    KeptEntries = internal("kept_entries").KeptEntries
    torch.manual_seed(0)
    model = models.lenet300_100((1, 8, 8), 4)
    params = dict(model.named_parameters())
    masks = _masks(model, (0.1, 0.9, 0.5), 0)
    kept = KeptEntries({params[n]: m for n, m in masks.items()})
    dense = {n for n, m in masks.items() if int(m.sum()) > 0.5 * m.numel()}
    assert {n for n in masks if kept.compacts(params[n])} == set(masks) - dense
    frozen = KeptEntries({params[n].requires_grad_(False): m for n, m in masks.items()})
    assert not frozen
