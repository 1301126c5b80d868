"""The reused per-run set-up of iterative SynFlow and its Path Kernel variants (one |theta| network
for every round, masks written into it in place, targets re-masked instead of looked up, the model's
finiteness checked once) against the straightforward computation, round after round: fresh random
non-zero weights and BatchNorm statistics, float64, masks bit for bit."""
import copy
import math

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import models, scores
from ntkfast.core.state import RunCache
from ntkfast.masks import Masks, round_density, threshold


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every parameter and BatchNorm statistic redrawn (non-zero, both signs), so
    that |state| differs from state everywhere and no weight is tied at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return model


def _mlp():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net.input_shape = (12,)
    return net


def _vgg_like():
    return models.VGG([8, "M", 16, "M", 16], input_shape=(3, 16, 16), num_classes=5)


MODELS = {
    "mlp": _mlp,
    "lenet5": lambda: models.lenet5(),
    "resnet20-bn": lambda: models.resnet20(input_shape=(3, 16, 16), width=4),
    "vgg-like-bn": _vgg_like,
}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomised(MODELS[name]().double(), seed + 1)


def _reference(model: nn.Module, masks, weight_power: int = 1):
    """SynFlow written out plainly: a copy of the model with |.| of its whole state, in eval mode,
    each scored weight W = |theta| * m a leaf, fed ones; S = |theta|^(weight_power - 1) * |W * dR/dW|."""
    net = copy.deepcopy(model).eval()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    for p in net.parameters():
        p.requires_grad_(False)
    w = {}
    for n, m in masks.items():
        p = params[n]
        with torch.no_grad():
            p.mul_(m)
        w[n] = p.requires_grad_(True)
    r = net(torch.ones((1,) + tuple(model.input_shape), dtype=torch.float64)).sum()
    grads = torch.autograd.grad(r, list(w.values()), allow_unused=True)
    out = {}
    for (n, p), gr in zip(w.items(), grads):
        s = (p.detach() * (torch.zeros_like(p) if gr is None else gr)).abs()
        if weight_power == 2:
            s = s * dict(model.named_parameters())[n].detach().abs()
        out[n] = s
    return out


def _rounds(score, model, density=0.05, rounds=4):
    """The masks of each round of ``rounds`` exponential rounds scored by ``score(masks)``, thresholded
    as prune(keep_rule='authors') does."""
    masks = Masks.ones(model)
    seen = []
    for t in range(1, rounds + 1):
        masks = Masks(threshold(score(masks), round_density(density, t, rounds), keep=masks, keep_rule="authors"))
        seen.append(masks)
    return seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_synflow_run_cache_matches_the_plain_computation_round_by_round(name):
    model = _model(name)
    cache = RunCache()
    ref = _rounds(lambda m: _reference(model, m), model)
    # each round: the reused network's scores against the plain ones on the same masks
    masks = Masks.ones(model)
    for want in ref:
        got = scores.synflow(model, masks, dtype=torch.float64, cache=cache)
        direct = _reference(model, masks)
        for n in direct:
            torch.testing.assert_close(got[n], direct[n], rtol=1e-12, atol=0)
        masks = want
    assert cache.notes, "the run's set-up was not kept: the test would not exercise the reused path"
    # the pruning loop end to end
    pruned = ntkfast.prune(model, "synflow", 0.05, rounds=4, keep_rule="authors", dtype=torch.float64,
                           progress=False, on_empty_layer="ignore")
    assert all(torch.equal(pruned[n], ref[-1][n]) for n in ref[-1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_synflow_l2_run_cache_matches_the_plain_computation(name):
    model = _model(name, seed=3)
    plain = _rounds(lambda m: scores.synflow_l2(model, m), model)  # no cache: a fresh path network per call
    cache = RunCache()
    fast = _rounds(lambda m: scores.synflow_l2(model, m, cache=cache), model)
    net = next(v for k, v in cache.items() if isinstance(k, tuple) and k[0] == "path network")
    assert net.reuse and net._copy is not None
    for a, b in zip(plain, fast):
        assert a == b
    masks = Masks.ones(model)
    for want in fast:
        got = scores.synflow_l2(model, masks, cache=cache)
        direct = _reference(model, masks, weight_power=2)
        for n in direct:
            torch.testing.assert_close(got[n], direct[n], rtol=1e-9, atol=1e-300)
        masks = want
    pruned = ntkfast.prune(model, "synflow_l2", 0.05, rounds=4, keep_rule="authors", progress=False,
                           on_empty_layer="ignore")
    assert pruned == fast[-1]


@pytest.mark.parametrize("method", ["synflow_l2_squared", "synflow_dist", "synflow_l2_dist"])
def test_other_variants_reuse_the_network_with_the_same_masks(method):
    model = _model("resnet20-bn", seed=5)
    fn = getattr(scores, method)
    extra = {"input_mean": torch.rand(3, 16, 16, dtype=torch.float64)} if "dist" in method else {}
    plain = _rounds(lambda m: fn(model, m, **extra), model)
    cache = RunCache()
    fast = _rounds(lambda m: fn(model, m, cache=cache, **extra), model)
    for a, b in zip(plain, fast):
        assert a == b


def test_run_cache_with_mask_buffers_and_a_nan_in_a_pruned_weight():
    """Re-masked targets still AND the module's own mask buffer in; a NaN under a pruned entry is
    zeroed every round (the model is not all finite, so the check is not skipped)."""
    model = _model("resnet20-bn", seed=7)
    start = Masks({n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) > 0.3
                   for n, m in Masks.ones(model).items()})
    hooked = start.to_prune_hooks(copy.deepcopy(model))
    cache = RunCache()
    both = lambda m: Masks({n: m[n] & start[n] for n in m})  # noqa: E731
    for m in _rounds(lambda m: _reference(model, both(m)), model, rounds=3):
        got = scores.synflow(hooked, m, dtype=torch.float64, cache=cache)
        want = _reference(model, both(m))
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=0)

    poisoned = copy.deepcopy(model)
    first = next(iter(start))
    with torch.no_grad():
        dict(poisoned.named_parameters())[first].view(-1)[0] = math.nan
    masks = Masks.ones(model)
    masks[first].view(-1)[0] = False
    cache = RunCache()
    for _ in range(2):
        got = scores.synflow(poisoned, masks, dtype=torch.float64, cache=cache)
        want = _reference(model, masks)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=0)
    assert ("finite model", False) not in cache.notes
    with pytest.raises(ValueError, match="NaN"):
        scores.synflow(poisoned, Masks.ones(model), dtype=torch.float64, cache=RunCache())
