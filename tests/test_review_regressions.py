"""Regression tests for behaviour a review found broken: pruning never revives weights the model
itself has pruned, data read once, odd model outputs, named errors for odd arguments."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

import ntkfast
from ntkfast import Masks, scores
from ntkfast.ops import topk_mask, topk_mask_reference


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))


class AuthorsLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("weight_mask", torch.ones_like(self.weight))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.weight_mask, self.bias)


@pytest.mark.parametrize("method", ["magnitude", "random", "synflow"])
def test_prune_never_revives_weights_pruned_by_torch_prune_hooks(method):
    net = mlp()
    tprune.l1_unstructured(net[0], "weight", amount=0.5)
    before = net[0].weight_mask.clone()
    m = ntkfast.prune(net, method, 0.6, progress=False, input_shape=(12,), on_empty_layer="ignore")
    assert not bool((m["0.weight"] & (before == 0)).any())
    assert torch.equal(net[0].weight_mask, before)  # and the model is untouched


def test_prune_never_revives_weights_pruned_by_authors_mask_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(AuthorsLinear(12, 20), nn.ReLU(), nn.Linear(20, 4))
    with torch.no_grad():
        net[0].weight_mask.copy_((torch.rand(20, 12) < 0.3).float())
    m = ntkfast.prune(net, "magnitude", 0.5, progress=False)
    assert not bool((m["0.weight"] & (net[0].weight_mask == 0)).any())


def test_one_shot_iterables_are_read_once():
    net = mlp()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    for method in ("snip", "grasp", "iterative_snip"):
        m = ntkfast.prune(net, method, 0.5, rounds=2, data=iter([(x[:4], y[:4]), (x[4:], y[4:])]), progress=False)
        ref = ntkfast.prune(net, method, 0.5, rounds=2, data=[(x[:4], y[:4]), (x[4:], y[4:])], progress=False)
        assert m == ref


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x), x.sum()


def test_models_returning_tuples():
    net = TupleOut()
    data = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    m = ntkfast.prune(net, "snip", 0.5, data=data, progress=False)
    assert m.kept == 9


def test_wrong_input_shape_is_named():
    net = mlp()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"input_shape: the forward failed for an input of shape \(13,\)"):
        ntkfast.prune(net, "synflow", 0.5, input_shape=(13,), progress=False)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("fn", [topk_mask, topk_mask_reference])
def test_numpy_and_huge_k(fn):
    s = [torch.randn(5)]
    assert int(fn(s, np.int64(2))[0].sum()) == 2
    with pytest.raises(ValueError, match="k must be >= 0"):
        fn(s, np.int64(-1))
    with pytest.raises(ValueError, match="beyond"):
        fn(s, 2**70)


def test_numpy_density_is_accepted():
    m = ntkfast.prune(mlp(), "magnitude", np.float32(0.25), progress=False)
    assert abs(m.density - 0.25) < 1e-2


def test_masks_load_refuses_a_state_dict(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not masks"):
        Masks.load(tmp_path / "sd.pt")


def test_train_attribute_is_always_the_function():
    import ntkfast.training  # noqa: F401  (importing the module must not change what ntkfast.train is)

    assert callable(ntkfast.train) and ntkfast.train is ntkfast.train
    assert ntkfast.train.__module__ == "ntkfast.training"


def test_synflow_float32_underflow_falls_back():
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(8, 8, bias=False)
        nn.init.uniform_(lin.weight, 1e-5, 2e-5)
        layers += [lin, nn.ReLU()]
    net = nn.Sequential(*layers)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        s = scores.synflow(net, input_shape=(8,))
    assert all(v.dtype == torch.float64 and bool((v > 0).all()) for v in s.values())


def test_synflow_fallback_is_remembered_in_the_cache():
    torch.manual_seed(0)
    layers = []
    for _ in range(60):
        lin = nn.Linear(64, 64)
        nn.init.normal_(lin.weight, std=(3 / 64) ** 0.5)
        layers += [lin, nn.ReLU()]
    net = nn.Sequential(*layers)
    cache = {}
    with pytest.warns(RuntimeWarning, match="float64"):
        first = scores.synflow(net, input_shape=(64,), cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second float32 attempt, no second warning
        second = scores.synflow(net, input_shape=(64,), cache=cache)
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("drop", [False, True])
def test_cpu_wide_digit_path_matches_reference(drop):
    # 2.1M entries: the CPU kernel switches to 16-bit digits from 2^21 entries on
    gen = torch.Generator().manual_seed(21)
    for kind in ("normal", "ties"):
        if kind == "ties":
            s = [torch.randint(-50, 50, (1_600_000,), generator=gen).float(), torch.randint(-50, 50, (500_000,), generator=gen).float()]
        else:
            s = [torch.randn(1_600_000, generator=gen), torch.randn(500_000, generator=gen).double()]
        keep = [torch.rand(x.shape, generator=gen) < 0.6 for x in s]
        alive = sum(int(k.sum()) for k in keep)
        for k in (1, alive // 3, alive - 1):
            got = topk_mask(s, k, keep, drop_ties=drop)
            ref = topk_mask_reference(s, k, keep, drop_ties=drop)
            assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_cpu_kernel_independent_of_thread_count():
    gen = torch.Generator().manual_seed(4)
    s = [torch.randint(0, 30, (300_000,), generator=gen).float(), torch.randn(2_200_000, generator=gen)]
    keep = [torch.rand(x.shape, generator=gen) < 0.5 for x in s]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = topk_mask(s, 500_000, keep)
        torch.set_num_threads(max(2, threads))
        many = topk_mask(s, 500_000, keep)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def _tiny_mlp(bias):
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(8, 8, bias=bias)
        nn.init.uniform_(lin.weight, 1e-5, 2e-5)
        if bias:
            nn.init.uniform_(lin.bias, 0.1, 0.2)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


def test_synflow_underflow_with_biases_is_caught():
    # the late biases keep R > 0 while the early layers' scores underflow to 0 in float32
    net = _tiny_mlp(bias=True)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        s = scores.synflow(net, input_shape=(8,))
    ref = scores.synflow(net, input_shape=(8,), dtype=torch.float64)
    assert all(torch.equal(s[n], ref[n]) for n in s) and bool((s["0.weight"] > 0).all())


def test_a_cut_network_is_not_mistaken_for_underflow():
    net = _tiny_mlp(bias=False)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.fill_(0.5)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    masks["10.weight"][:] = False  # layer 6 of 12 fully pruned: no path survives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = scores.synflow(net, masks, input_shape=(8,))
    assert all(float(v.abs().sum()) == 0.0 for v in s.values())


def test_float64_fallback_drops_the_float32_copy_from_the_cache():
    net = _tiny_mlp(bias=True)
    cache = {}
    with pytest.warns(RuntimeWarning, match="underflowed"):
        scores.synflow(net, input_shape=(8,), cache=cache)
    assert ("synflow", torch.float32) not in cache and cache[("float64 fallback", "synflow")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores.synflow(net, input_shape=(8,), cache=cache)  # straight to float64, no second warning


def test_prune_with_start_masks_still_respects_hook_masks():
    net = mlp()
    tprune.l1_unstructured(net[0], "weight", amount=0.5)
    pruned = net[0].weight_mask == 0
    m = ntkfast.prune(net, "magnitude", 0.9, masks=Masks.ones(net), progress=False)
    assert not bool((m["0.weight"] & pruned).any())


def test_tensors_on_devices_without_kernels_warn_once(monkeypatch):
    from ntkfast.ops import loader

    monkeypatch.setattr(loader.STATE, "device_warned", set())
    with pytest.warns(RuntimeWarning, match="meta tensors use the pure-PyTorch reference"):
        assert loader.use_kernel(torch.device("meta")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.use_kernel(torch.device("meta"))


def test_tied_weights_score_both_uses():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(10, 10, bias=False)
            self.b = nn.Linear(10, 10, bias=False)
            self.b.weight = self.a.weight
            self.c = nn.Linear(10, 4, bias=False)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    net = Tied().double()
    assert list(ntkfast.prunable_parameters(net)) == ["a.weight", "c.weight"]
    w = net.a.weight.detach().abs().clone().requires_grad_(True)
    c = net.c.weight.detach().abs()
    r = (torch.relu(torch.relu(torch.ones(1, 10, dtype=torch.float64) @ w.T) @ w.T) @ c.T).sum()
    (g,) = torch.autograd.grad(r, w)
    for cache in (None, {}):
        torch.testing.assert_close(scores.synflow(net, input_shape=(10,), cache=cache)["a.weight"], (w * g).abs())
