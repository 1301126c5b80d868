"""ntkfast.methods: the registry and the contract between a method and the pruning loop."""
import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import methods


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_builtin_methods_declare_what_they_take_and_return():
    expect = {"ntksap": {"cache", "process_group"}, "synflow": {"cache", "process_group"},
              "snip": {"process_group"}, "random": {"process_group"},
              "ntt": {"target_density", "scope", "process_group"}}
    for name, takes in expect.items():
        assert methods.get(name).takes == takes, name
    assert methods.get("ntt").returns == "masks" and methods.get("ntt").single_shot
    assert {n for n in methods.available() if methods.get(n).returns == "masks"} >= {"ntt"}
    assert ntkfast.scores.get is methods.get  # the old home of the registry still answers


def test_a_declaration_the_function_does_not_honour_is_refused():
    with pytest.raises(ValueError, match="no parameter 'cache'"):
        methods.register("_t_missing", "x", takes=("cache",))(lambda model, masks=None, *, data=None, seed=0: {})

    def wants_cache(model, masks=None, *, data=None, seed=0, cache=None):
        return {}

    with pytest.raises(ValueError, match="parameter 'cache' the loop would fill; declare it"):
        methods.register("_t_undeclared", "x")(wants_cache)
    with pytest.raises(ValueError, match="not loop values"):
        methods.register("_t_unknown", "x", takes=("density",))
    with pytest.raises(ValueError, match="returns"):
        methods.register("_t_returns", "x", returns="weights")
    assert "_t_missing" not in methods.available() and "_t_undeclared" not in methods.available()


def test_the_loop_hands_over_only_what_a_method_takes():
    seen = []

    @methods.register("_t_takes", "records its keyword arguments", takes=("scope", "target_density"))
    def takes(model, masks=None, *, data=None, seed=0, scope="global", target_density=None):
        seen.append(dict(scope=scope, target_density=target_density))
        return {n: torch.rand(m.shape) for n, m in masks.items()}

    ntkfast.prune(_net(), "_t_takes", 0.25, rounds=2, scope="layerwise", progress=False)
    assert [s["scope"] for s in seen] == ["layerwise", "layerwise"]
    assert seen[0]["target_density"] == pytest.approx(0.5) and seen[1]["target_density"] == pytest.approx(0.25)


def test_a_method_returning_masks_keeps_them_and_its_weights():
    net = _net()

    @methods.register("_t_masks", "keeps the first half of every tensor", single_shot=True, returns="masks")
    def halves(model, masks=None, *, data=None, seed=0):
        out = {}
        for n, m in masks.items():
            k = torch.zeros(m.numel(), dtype=torch.bool)
            k[: m.numel() // 2] = True
            out[n] = k.reshape(m.shape)
        return methods.MethodResult(out, weights={k: v * 0 for k, v in model.state_dict().items()})

    got = ntkfast.prune(net, "_t_masks", 0.9, progress=False)  # the method's own masks, not re-thresholded
    assert got.kept == sum(p.numel() // 2 for n, p in net.named_parameters() if n.endswith("weight"))
    assert set(got.learned_weights) == set(net.state_dict())

    @methods.register("_t_bad_masks", "returns masks for other names", single_shot=True, returns="masks")
    def bad(model, masks=None, *, data=None, seed=0):
        return methods.MethodResult({"nope": torch.ones(1, dtype=torch.bool)})

    with pytest.raises(RuntimeError, match="returned masks for"):
        ntkfast.prune(net, "_t_bad_masks", 0.5, progress=False)
