"""Thread safety as the README's Guarantees state it: calls on one model from several threads run
one at a time and leave the model as it was; calls on different models run side by side and give
what they give alone; NTK-SAP's seeded draws never share the global RNG with another call."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import models
from ntkfast.core.concurrency import GLOBAL_RNG_LOCK, holds_model, model_lock, seeded_global_rng
from ntkfast.ntk import empirical_ntk

from testing import mlp


def _bn_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    net[3].bias.requires_grad_(False)  # a frozen bias: the swap once left it requiring grad
    return net


def _snapshot(model):
    return {"params": [(n, id(p), p.is_leaf, p.requires_grad, p.grad, p.detach().clone())
                       for n, p in model.named_parameters()],
            "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
            "training": [m.training for m in model.modules()],
            "attrs": [sorted(k for k, v in vars(m).items() if isinstance(v, torch.Tensor)) for m in model.modules()]}


def _same(a, b):
    if len(a["params"]) != len(b["params"]):
        return False
    for (n1, i1, l1, r1, g1, v1), (n2, i2, l2, r2, g2, v2) in zip(a["params"], b["params"]):
        if (n1, i1, l1, r1, g1) != (n2, i2, l2, r2, g2) or not torch.equal(v1, v2):
            return False
    return (all(torch.equal(x, y) for (_, x), (_, y) in zip(a["buffers"], b["buffers"]))
            and a["training"] == b["training"] and a["attrs"] == b["attrs"])


def _in_threads(n, fn):
    errors, results = [], [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", ["grasp", "snip", "iterative_snip", "synflow"])
def test_threads_pruning_one_model_leave_it_unchanged_and_agree(method):
    model = _bn_net()
    model.train()
    before = _snapshot(model)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
    alone = ntkfast.prune(model, method, 0.3, rounds=2, data=data, progress=False)
    masks = _in_threads(4, lambda i: ntkfast.prune(model, method, 0.3, rounds=2, data=data, progress=False))
    assert _same(before, _snapshot(model))
    for m in masks:
        assert all(torch.equal(m[n], alone[n]) for n in alone)


def test_threads_computing_ntks_and_connectivity_of_one_model_leave_it_unchanged():
    from ntkfast.connectivity import connectivity

    model = _bn_net().eval()
    before = _snapshot(model)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    masks = ntkfast.prune(model, "random", 0.5, progress=False)
    alone = empirical_ntk(model, x, masks=masks)

    def work(i):
        return empirical_ntk(model, x, masks=masks) if i % 2 else connectivity(model, masks, input_shape=(12,)).effective.density

    out = _in_threads(6, work)
    assert _same(before, _snapshot(model))
    for i in range(1, 6, 2):
        assert torch.equal(out[i], alone)


def test_ntksap_on_separate_models_in_threads_gives_what_it_gives_alone():
    nets = [models.get("lenet300_100") for _ in range(3)]
    for k, net in enumerate(nets):
        torch.manual_seed(k)
        net.reinitialize()
    kw = dict(rounds=2, progress=False, repeats=2, batch_size=4)
    alone = [ntkfast.prune(net, "ntksap", 0.2, seed=5, **kw) for net in nets]
    together = _in_threads(3, lambda i: ntkfast.prune(nets[i], "ntksap", 0.2, seed=5, **kw))
    for a, b in zip(alone, together):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_seeded_global_rng_is_exclusive_and_restores_the_stream():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    draws = _in_threads(4, lambda i: _draw_seeded(i))
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is as if nothing had run
    for i, d in enumerate(draws):
        assert torch.equal(d, torch.Generator().manual_seed(1000 + i).manual_seed(1000 + i) and
                           torch.rand(50, generator=torch.Generator().manual_seed(1000 + i)))


def _draw_seeded(i):
    with seeded_global_rng(1000 + i):
        parts = []
        for _ in range(50):  # many small draws: another caller inside the section would interleave
            parts.append(torch.rand(1))
        return torch.cat(parts)


def test_model_lock_is_per_model_and_reentrant():
    a, b = mlp(), mlp(1)
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)
    with model_lock(a):
        with model_lock(a):  # prune holding it, then the scorer it calls
            pass
    held = []

    @holds_model
    def f(model):
        if isinstance(model, nn.Module):
            held.append(model_lock(model)._is_owned())
        return model

    assert f(a) is a and held == [True]
    assert f("not a model") == "not a model"  # the function's own checks still see it
    assert isinstance(GLOBAL_RNG_LOCK, type(threading.RLock()))
