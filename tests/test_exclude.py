"""exclude=: layers kept dense by every method, the density over the other weights (the
Synaptic-Flow / NTK-SAP --dense-classifier convention), what an entry may be, and the refusals."""
import warnings

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import Masks, methods, prune
from ntkfast.core.exclude import resolve_exclude
from ntkfast.masks import last_linear, n_keep, threshold
from testing import mlp

X = torch.rand(16, 12, generator=torch.Generator().manual_seed(0))  # >= 0: the Dist variants' mean input
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))


def _reinit(net):
    for m in net.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()


# what each method needs beyond the model to run in a second on a 12-20-10-4 MLP
OPTIONS = {
    "ntksap": dict(input_shape=(12,), repeats=2, batch_size=8, init_fn=_reinit),
    "ntt": dict(data=X, steps=2, batch_size=8, validation=0),
}


def _options(method):
    info = methods.get(method)
    opts = dict(OPTIONS.get(method, {}))
    if "data" not in opts and (info.needs_data or info.raw_data):
        opts["data"] = (X, Y)
    if "data" not in opts and "input_shape" in info.options():
        opts["input_shape"] = (12,)
    return opts


def _run(method, density, **kwargs):
    return prune(mlp(), method, density, progress=False, **_options(method), **kwargs)


def _layers_at(masks, density, names, scope):
    """Whether ``names`` keep exactly what ``density`` promises them (globally or per tensor)."""
    if scope == "layerwise":
        return all(int(masks[n].sum()) == n_keep(density, masks[n].numel()) for n in names)
    return sum(int(masks[n].sum()) for n in names) == n_keep(density, sum(masks[n].numel() for n in names))


@pytest.mark.parametrize("method", sorted(methods.available()))
def test_every_method_keeps_the_excluded_layer_dense_and_reaches_its_density(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer emptied at this density is not the point
        masks = _run(method, 0.2, exclude="4")
    assert list(masks) == ["0.weight", "2.weight", "4.weight"]  # the result covers every prunable weight
    assert bool(masks["4.weight"].all())
    assert masks.excluded == ("4.weight",) and masks.metadata["exclude"] == ["4.weight"]
    assert _layers_at(masks, 0.2, ["0.weight", "2.weight"], masks.metadata["scope"])
    assert masks.density > masks.pruned_density  # the dense layer counts as kept in the report's total
    assert masks.pruned_density == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("method", sorted(n for n in methods.available() if methods.get(n).returns == "scores"))
def test_a_scorer_called_directly_scores_the_rest_as_before(method):
    # the whole network still runs: the other weights' scores do not change, the excluded ones are left out
    info = methods.get(method)
    net = mlp()
    full = info.fn(net, seed=3, **_options(method))
    part = info.fn(net, seed=3, exclude="4", **_options(method))
    assert list(part) == ["0.weight", "2.weight"]
    for n in part:
        torch.testing.assert_close(part[n], full[n], rtol=0, atol=0)


def test_the_density_is_over_the_other_weights_as_the_authors_dense_classifier():
    # Synaptic-Flow's --dense-classifier builds the last layer as a plain nn.Linear, outside its
    # masked_parameters: the threshold is taken over the other weights alone
    net = mlp()
    got = prune(net, "magnitude", 0.1, exclude=last_linear(net), on_empty_layer="ignore", progress=False)
    rest = {n: p.detach().abs() for n, p in ntkfast.prunable_parameters(net).items() if n != "4.weight"}
    want = threshold(rest, 0.1)
    assert all(torch.equal(got[n], want[n]) for n in rest)
    assert got.kept == n_keep(0.1, sum(t.numel() for t in rest.values())) + 40


def test_density_and_report_count_the_excluded_weights_as_kept(tmp_path):
    masks = prune(mlp(), "magnitude", 0.25, exclude="4", progress=False)
    numel = {"0.weight": 240, "2.weight": 200, "4.weight": 40}
    kept_rest = n_keep(0.25, 440)
    assert masks.density == pytest.approx((kept_rest + 40) / 480)
    assert masks.pruned_density == pytest.approx(kept_rest / 440)
    report = masks.report()
    assert "4.weight (excluded)" in report and "0.weight (excluded)" not in report
    assert "pruned (not excluded)" in report and f"{kept_rest + 40}" in report
    masks.save(tmp_path / "m.pt")  # the names of the dense weights travel with the masks
    back = Masks.load(tmp_path / "m.pt")
    assert back.excluded == ("4.weight",) and back.pruned_density == masks.pruned_density
    assert sum(numel.values()) == masks.numel
    plain = prune(mlp(), "magnitude", 0.25, progress=False)
    assert plain.excluded == () and plain.pruned_density == plain.density and "excluded" not in plain.report()


def test_iterative_rounds_and_layerwise_scope_keep_the_excluded_layer_dense():
    masks = _run("synflow", 0.1, exclude=["0"], rounds=4, scope="layerwise")
    assert bool(masks["0.weight"].all())
    assert _layers_at(masks, 0.1, ["2.weight", "4.weight"], "layerwise")


def test_an_excluded_layer_keeps_its_start_mask_and_prune_hooks():
    net = mlp()
    start = {"4.weight": torch.rand(4, 10, generator=torch.Generator().manual_seed(2)) < 0.5}
    got = prune(net, "magnitude", 0.3, masks=start, exclude="4", progress=False)
    assert torch.equal(got["4.weight"], start["4.weight"])  # no mask change, and nothing comes back
    import torch.nn.utils.prune as tprune

    hooked = mlp()
    tprune.random_unstructured(hooked[4], "weight", amount=0.5)
    got = prune(hooked, "magnitude", 0.3, exclude="4.weight_orig", progress=False)
    assert torch.equal(got["4.weight"], hooked[4].weight_mask.bool())


@pytest.mark.parametrize("entry", [
    "4", "4.weight", "4.weight_orig", "_orig_mod.4.weight", "4*", "[4]", nn.Linear, "*",
    lambda name, module: module.out_features == 4,
])
def test_what_an_entry_may_be(entry):
    net = mlp()
    names = list(ntkfast.prunable_parameters(net))
    got = resolve_exclude(net, entry, names)
    assert got == (("0.weight", "2.weight", "4.weight") if entry in (nn.Linear, "*") else ("4.weight",))


def test_a_container_a_module_instance_a_type_and_a_list():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)))
    names = list(ntkfast.prunable_parameters(net))
    assert resolve_exclude(net, "2", names) == ("2.0.weight", "2.2.weight")  # every weight below a container
    assert resolve_exclude(net, "2.*", names) == ("2.0.weight", "2.2.weight")
    assert resolve_exclude(net, net[2], names) == ("2.0.weight", "2.2.weight")
    assert resolve_exclude(net, net[2][2], names) == ("2.2.weight",)
    assert resolve_exclude(net, nn.Conv2d, names) == ("0.weight",)
    assert resolve_exclude(net, [nn.Conv2d, "2.2"], names) == ("0.weight", "2.2.weight")
    assert resolve_exclude(net, ("2.0", ["2.2"]), names) == ("2.0.weight", "2.2.weight")
    assert last_linear(net) == "2.2"
    with_bias = list(ntkfast.prunable_parameters(net, include_bias=True))
    assert resolve_exclude(net, "2.2", with_bias) == ("2.2.weight", "2.2.bias")


@pytest.mark.parametrize("entry, error, match", [
    ("fc9", ValueError, r"^exclude: 'fc9' names no prunable weight of the model; its prunable weights: 0.weight"),
    ("4.wieght", ValueError, r"^exclude: '4.wieght' names no prunable weight.*did you mean '4.weight'"),
    ("", ValueError, r"^exclude: an empty name"),
    ("9*", ValueError, r"^exclude: '9\*' names no prunable weight"),
    (nn.Conv2d, ValueError, r"^exclude: the model has no prunable weight in a Conv2d module"),
    (nn.Linear(10, 4), ValueError, r"^exclude: the Linear module given is not a module of the model"),
    (lambda n, m: False, ValueError, r"^exclude: predicate .*picks no prunable weight"),
    (lambda n, m: "yes", TypeError, r"^exclude: predicate .*returned 'yes' for '0.weight'; expected True or False"),
    (3, TypeError, r"^exclude: expected a layer name, a module type, .*; got int 3"),
    (["4", None], TypeError, r"^exclude: expected .*got NoneType None"),
    (int, TypeError, r"^exclude: expected .*the type int, which is not a module type"),
    ([nn.Linear], ValueError, r"^exclude: keeps every prunable weight dense .*nothing is left to prune"),
])
def test_bad_entries_are_refused_by_name_and_change_nothing(entry, error, match):
    net = mlp()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(error, match=match):
        prune(net, "magnitude", 0.5, exclude=entry, progress=False)
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())


def test_a_module_without_prunable_weight_is_refused():
    net = mlp()
    with pytest.raises(ValueError, match=r"^exclude: the ReLU module given \(ReLU\) holds no prunable weight"):
        prune(net, "magnitude", 0.5, exclude=net[1], progress=False)
    with pytest.raises(ValueError, match="^model: .* has no nn.Linear layer"):
        last_linear(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_a_method_choosing_its_masks_without_exclude_is_refused_by_name():
    @methods.register("_t_masks_no_exclude", "test-only: keeps everything", single_shot=True, returns="masks",
                      takes=("process_group",))
    def keep_all(model, masks=None, *, data=None, seed=0, process_group=None):
        return methods.MethodResult(masks={n: torch.ones_like(m) for n, m in masks.items()})

    assert prune(mlp(), "_t_masks_no_exclude", 0.5, progress=False).density == 1.0
    with pytest.raises(ValueError, match="^exclude: method '_t_masks_no_exclude' chooses its own masks and does not take"):
        prune(mlp(), "_t_masks_no_exclude", 0.5, exclude="4", progress=False)


def test_a_scorer_excluding_everything_is_refused():
    with pytest.raises(ValueError, match="^exclude: keeps every scored weight dense"):
        ntkfast.scores.magnitude(mlp(), exclude=nn.Linear)


def test_start_masks_for_only_some_layers():
    net = mlp()
    start = {"2.weight": torch.rand(10, 20, generator=torch.Generator().manual_seed(5)) < 0.5}
    got = prune(net, "magnitude", 0.3, masks=start, progress=False)
    assert list(got) == ["0.weight", "2.weight", "4.weight"]
    assert not bool((got["2.weight"] & ~start["2.weight"]).any())  # pruned there stays pruned
    assert got.kept == n_keep(0.3, got.numel)
    # the other layers started dense: the same as giving them all-ones masks
    full = dict(Masks.ones(net))
    full.update(start)
    assert got == prune(net, "magnitude", 0.3, masks=full, progress=False)
    with pytest.raises(ValueError, match=r"^masks: 'nope.weight' is not a prunable weight of the model"):
        prune(net, "magnitude", 0.3, masks={"nope.weight": torch.ones(2, dtype=torch.bool)}, progress=False)


def test_transfer_keeps_the_excluded_layer_dense():
    net = mlp()
    res = ntkfast.transfer(net, 0.2, X, steps=3, batch_size=8, validation=0, progress=False, exclude=["0"],
                           mask_update_every=2)
    assert bool(res.masks["0.weight"].all()) and res.masks.excluded == ("0.weight",)
    assert _layers_at(res.masks, 0.2, ["2.weight", "4.weight"], "layerwise")
    assert bool((res.state_dict["0.weight"] != 0).all())  # trained, never masked
    with pytest.raises(ValueError, match="^exclude: 'zz' names no prunable weight"):
        ntkfast.transfer(net, 0.2, X, steps=1, batch_size=8, progress=False, exclude="zz")
