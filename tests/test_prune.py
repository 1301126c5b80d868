"""The pruning loop: schedules, exact densities, nesting, reproducibility, bad input, no side effects."""
from testing import AuthorsLinear, mlp
import ntkfast
import torch.nn.utils.prune as tprune
import numpy as np
import math
import warnings

import pytest
import torch
from torch import nn


from ntkfast import Masks, prune, scores
from ntkfast.masks import density_schedule, n_keep
from ntkfast.prune import LayerCollapseError

CALLS = []


@scores.register("_test_recording", "test-only: |w| + tiny noise, records what it is called with")
def _recording(model, masks, *, data=None, seed=0, bonus=0.0):
    CALLS.append({"masks": {n: m.clone() for n, m in masks.items()}, "seed": seed, "data": data})
    g = torch.Generator().manual_seed(seed % 2**31)
    named = dict(model.named_parameters())
    return {n: named[n].detach().abs() + 1e-3 * torch.rand(m.shape, generator=g) + bonus for n, m in masks.items()}


@scores.register("_test_kill_layer", "test-only: the last layer scores lowest")
def _kill_layer(model, masks, *, data=None, seed=0):
    names = list(masks)
    return {n: torch.full(m.shape, -1.0 if n == names[-1] else 1.0) + torch.arange(m.numel()).reshape(m.shape) * 1e-6
            for n, m in masks.items()}


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def same(model, snap):
    state, grads, flags = snap
    now = snapshot(model)
    return (all(torch.equal(state[k], now[0][k]) for k in state) and
            all(grads[n][0] == now[1][n][0] and (grads[n][1] is None) == (now[1][n][1] is None) for n in grads) and
            flags == now[2])


@pytest.mark.parametrize("schedule", ["exponential", "linear", "expinv"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_rounds_hit_exact_densities_and_nest(schedule, scope):
    model = net()
    snap = snapshot(model)
    CALLS.clear()
    masks = prune(model, "_test_recording", 0.05, rounds=5, schedule=schedule, scope=scope, progress=False)
    assert len(CALLS) == 5
    seen = [c["masks"] for c in CALLS[1:]] + [dict(masks)]
    total = sum(m.numel() for m in masks.values())
    for t, (m, d) in enumerate(zip(seen, density_schedule(0.05, 5, schedule))):
        if scope == "global":
            assert sum(int(x.sum()) for x in m.values()) == n_keep(d, total)
        else:
            for x in m.values():
                assert int(x.sum()) == n_keep(d, x.numel())
    masks_in_order = [c["masks"] for c in CALLS] + [dict(masks)]
    for a, b in zip(masks_in_order, masks_in_order[1:]):  # nested: nothing comes back
        assert all(not bool((b[n] & ~a[n]).any()) for n in a)
    assert same(model, snap)
    assert isinstance(masks, Masks) and masks.metadata["method"] == "_test_recording"
    assert masks.metadata["rounds"] == 5 and masks.metadata["scope"] == scope and masks.metadata["version"]


def test_expinv_is_ntksaps_schedule():
    # NTK-SAP's prune.py: sparse = 1 - (1 - sparsity) ** (epochs / (epoch + 1)), epoch 0-based
    T, d = 20, 0.8 ** 10
    want = [1.0 - (1.0 - d) ** (T / (e + 1)) for e in range(T)]
    assert density_schedule(d, T, "expinv") == pytest.approx(want, rel=1e-15)
    assert density_schedule(d, T, "expinv")[-1] == pytest.approx(d, rel=1e-15)
    # another path than the exponential schedule: more pruning first at high sparsity, less at low
    assert density_schedule(0.8 ** 18, T, "expinv")[0] < density_schedule(0.8 ** 18, T, "exponential")[0]
    assert density_schedule(0.8 ** 2, T, "expinv")[0] > density_schedule(0.8 ** 2, T, "exponential")[0]


def test_seed_reproduces_bit_for_bit_and_differs():
    model = net()
    a = prune(model, "random", 0.1, rounds=3, seed=3, progress=False) if "random" in scores.available() else None
    if a is None:
        pytest.skip("random scorer not registered")
    b = prune(model, "random", 0.1, rounds=3, seed=3, progress=False)
    c = prune(model, "random", 0.1, rounds=3, seed=4, progress=False)
    assert a == b and a != c


def test_round_seeds_are_distinct_and_reproducible():
    CALLS.clear()
    prune(net(), "_test_recording", 0.5, rounds=3, seed=9, progress=False)
    first = [c["seed"] for c in CALLS]
    CALLS.clear()
    prune(net(), "_test_recording", 0.5, rounds=3, seed=9, progress=False)
    assert [c["seed"] for c in CALLS] == first and len(set(first)) == 3


def test_start_masks_are_respected():
    model = net()
    start = Masks({n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) < 0.5
                   for n, m in Masks.ones(model).items()})
    out = prune(model, "_test_recording", 0.2, masks=start, progress=False)
    assert all(not bool((out[n] & ~start[n]).any()) for n in out)
    assert out.kept == n_keep(0.2, out.numel)


def test_method_options_forwarded_and_checked():
    CALLS.clear()
    prune(net(), "_test_recording", 0.5, bonus=1.0, progress=False)
    with pytest.raises(ValueError, match="bogus: not an option of method '_test_recording'"):
        prune(net(), "_test_recording", 0.5, bogus=1, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), "density: expected a finite number > 0.0 and <= 1.0"),
    (dict(density=1.5), "density: expected a finite number > 0.0"),
    (dict(density=float("nan")), "density: expected a finite number > 0.0"),
    (dict(density=True), "density: expected a finite number"),
    (dict(density="0.1"), "density: expected a finite number"),
    (dict(rounds=0), "rounds: expected an int >= 1"),
    (dict(rounds=2.0), "rounds: expected an int"),
    (dict(method="nope"), "method: unknown method 'nope'"),
    (dict(schedule="cosine"), "schedule: expected one of"),
    (dict(scope="channel"), "scope: expected one of"),
    (dict(on_empty_layer="explode"), "on_empty_layer: expected one of"),
    (dict(seed=1.5), "seed: expected an int"),
    (dict(keep_rule="paper"), "keep_rule: expected one of"),
    (dict(masks={"x": torch.ones(2, dtype=torch.bool)}), "masks: .x. is not a prunable weight of the model"),
    (dict(exclude="4.wieght"), "exclude: .4.wieght. names no prunable weight"),
    (dict(data=(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))), "data: inputs of shape"),
    (dict(data=(torch.randn(4, 3, 6, 6), torch.full((4,), 10))), "data: targets must lie in"),
])
def test_bad_input_is_named_and_changes_nothing(kwargs, match):
    model = net()
    snap = snapshot(model)
    args = dict(method="_test_recording", density=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        prune(model, args.pop("method"), args.pop("density"), progress=False, **args)
    assert same(model, snap)


def test_model_without_prunable_weights():
    with pytest.raises(ValueError, match="model: no prunable weights"):
        prune(nn.Sequential(nn.ReLU()), "_test_recording", 0.5, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prune("resnet", "_test_recording", 0.5, progress=False)


def test_data_methods_need_data():
    if "snip" not in scores.available():
        pytest.skip("snip not registered")
    with pytest.raises(ValueError, match="data: method 'snip' needs a labelled batch"):
        prune(net(), "snip", 0.5, progress=False)


def test_empty_layer_warns_or_errors_by_name():
    model = net()
    with pytest.warns(RuntimeWarning, match=r"lost all their weights: .*6\.weight"):
        m = prune(model, "_test_kill_layer", 0.05, progress=False)
    assert not m["6.weight"].any()
    with pytest.raises(LayerCollapseError, match="6.weight"):
        prune(model, "_test_kill_layer", 0.05, progress=False, on_empty_layer="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(model, "_test_kill_layer", 0.05, progress=False, on_empty_layer="ignore")


def test_progress_prints_rounds(capsys):
    prune(net(), "_test_recording", 0.1, rounds=3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "density" in err


def test_density_one_keeps_everything():
    m = prune(net(), "_test_recording", 1.0, rounds=2, progress=False)
    assert m.density == 1.0 and math.isclose(m.metadata["density"], 1.0)


def _authors_style_synflow(model, density, rounds):
    """Iterative SynFlow the way the Synaptic-Flow code runs it: |state_dict| in place, eval mode,
    ones in, sum out, backward, |grad * weight|, cat + kthvalue, prune score <= threshold."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    masks = [torch.ones_like(m.weight, dtype=torch.bool) for m in layers]
    model.eval()
    x = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    for t in range(1, rounds + 1):
        with torch.no_grad():
            signs = {n: torch.sign(v) for n, v in model.state_dict().items()}
            for v in model.state_dict().values():
                v.abs_()
        model.zero_grad()
        model(x).sum().backward()
        scores = [(m.weight.grad * m.weight).detach().abs() for m in layers]
        with torch.no_grad():
            for n, v in model.state_dict().items():
                v.mul_(signs[n])
            flat = torch.cat([s.flatten() for s in scores])
            d = density ** (t / rounds)
            n_prune = int((1.0 - d) * flat.numel())
            if n_prune >= 1:
                thr, _ = torch.kthvalue(flat, n_prune)
                masks = [s > thr for s in scores]
            for m, mk in zip(layers, masks):
                m.weight.mul_(mk)
    return masks


def test_iterative_synflow_reproduces_authors_loop_bit_for_bit():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    with torch.no_grad():  # BN statistics away from their defaults, so their |.| matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    import copy

    ref = _authors_style_synflow(copy.deepcopy(model), 0.02, 10)
    got = prune(model, "synflow", 0.02, rounds=10, keep_rule="authors", progress=False, on_empty_layer="ignore",
                input_shape=(3, 8, 8))
    assert [torch.equal(g, r) for g, r in zip(got.values(), ref)] == [True] * len(ref)


def test_unsupported_layers_are_reported_by_name_and_left_dense():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.Flatten(), nn.Linear(4 * 9 * 9, 10))
    with pytest.warns(RuntimeWarning, match=r"stay dense: 0\.weight \(ConvTranspose2d\)"):
        m = prune(net, "magnitude", 0.5, progress=False)
    assert list(m) == ["2.weight"]


# -- from a review of the whole package ------------------------------------------------------------


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x), x.sum()


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


def test_numpy_density_is_accepted():
    m = ntkfast.prune(mlp(), "magnitude", np.float32(0.25), progress=False)
    assert abs(m.density - 0.25) < 1e-2


def test_prune_with_start_masks_still_respects_hook_masks():
    net = mlp()
    tprune.l1_unstructured(net[0], "weight", amount=0.5)
    pruned = net[0].weight_mask == 0
    m = ntkfast.prune(net, "magnitude", 0.9, masks=Masks.ones(net), progress=False)
    assert not bool((m["0.weight"] & pruned).any())


def test_huge_and_numpy_numbers_are_named_not_overflowed():
    from ntkfast.core.checks import check_bytes, check_number

    assert check_bytes(10**400) == 10**400 and check_bytes(np.int64(5)) == 5
    with pytest.raises(ValueError, match="lr: expected a finite number"):
        check_number(10**400, "lr")  # too large for a float: named, not an OverflowError
    assert check_number(np.float32(0.5), "lr") == 0.5


def test_weights_whose_sum_overflows_are_finite_and_pruned():
    # the finiteness check sums a tensor first: a sum past float32's range must only send it to
    # the exact check, never refuse a finite model
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(3e38)
        net[0].weight[0, 0] = 1.0
    masks = ntkfast.prune(net, "magnitude", 0.5, progress=False, on_empty_layer="ignore")
    assert masks.kept == round(0.5 * (24 + 8)) and not bool(masks["0.weight"][0, 0])
    net[0].weight.data[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"0\.weight"):
        ntkfast.prune(net, "synflow", 0.5, progress=False)
