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
    # every scorer is given exclude by register(); NTT, which chooses its masks, takes it itself
    expect = {"ntksap": {"cache", "process_group", "exclude"}, "synflow": {"cache", "process_group", "exclude"},
              "snip": {"process_group", "exclude"}, "random": {"process_group", "exclude"},
              "ntt": {"target_density", "scope", "process_group", "exclude", "include"}}
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
        methods.register("_t_undeclared", "x", takes=())(wants_cache)  # declared, and wrongly
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

    @methods.register("_t_masks", "keeps the first half of every tensor", single_shot=True, returns="masks",
                      takes=("process_group",))
    def halves(model, masks=None, *, data=None, seed=0, process_group=None):
        out = {}
        for n, m in masks.items():
            k = torch.zeros(m.numel(), dtype=torch.bool)
            k[: m.numel() // 2] = True
            out[n] = k.reshape(m.shape)
        return methods.MethodResult(out, weights={k: v * 0 for k, v in model.state_dict().items()})

    got = ntkfast.prune(net, "_t_masks", 0.9, progress=False)  # the method's own masks, not re-thresholded
    assert got.kept == sum(p.numel() // 2 for n, p in net.named_parameters() if n.endswith("weight"))
    assert set(got.learned_weights) == set(net.state_dict())

    bad_results = {
        "_t_bad_names": lambda m: {"nope": torch.ones(1, dtype=torch.bool)},
        "_t_bad_shape": lambda m: {n: torch.ones(1, dtype=torch.bool) for n in m},  # would broadcast
        "_t_scores": lambda m: {n: torch.randn(t.shape) for n, t in m.items()},  # scores, not masks
    }
    for name, make in bad_results.items():
        methods.register(name, "returns what is not the model's masks", single_shot=True, returns="masks",
                         takes=("process_group",))(
            lambda model, masks=None, *, data=None, seed=0, process_group=None, make=make:
            methods.MethodResult(make(masks)))
    with pytest.raises(RuntimeError, match="returned masks for"):
        ntkfast.prune(net, "_t_bad_names", 0.5, progress=False)
    with pytest.raises(RuntimeError, match="expected a mask of shape"):
        ntkfast.prune(net, "_t_bad_shape", 0.5, progress=False)
    with pytest.raises(RuntimeError, match="masks, not scores"):
        ntkfast.prune(net, "_t_scores", 0.5, progress=False)


def test_a_method_returning_masks_must_take_the_process_group():
    # masks must agree across processes, and only the method knows how: no silent replication
    with pytest.raises(ValueError, match="must take process_group"):
        methods.register("_t_masks_alone", "x", single_shot=True, returns="masks")(
            lambda model, masks=None, *, data=None, seed=0: None)


def test_scorers_written_before_the_contract_still_register_and_run():
    # no takes=: the loop values are read from the signature, with a DeprecationWarning; a
    # positional option is an option as before
    with pytest.warns(DeprecationWarning, match="declare the loop values"):
        @methods.register("_t_legacy", "an old-style scorer with a cache and a positional option")
        def legacy(model, masks=None, alpha=1.0, *, data=None, seed=0, cache=None):
            return {n: torch.rand(m.shape) * alpha for n, m in masks.items()}

    assert methods.get("_t_legacy").takes == {"cache", "process_group", "exclude"}
    got = ntkfast.prune(_net(), "_t_legacy", 0.5, alpha=2.0, progress=False)
    assert abs(got.density - 0.5) < 0.05
    with pytest.raises(ValueError, match="beta: not an option of method '_t_legacy' .its options: alpha"):
        ntkfast.prune(_net(), "_t_legacy", 0.5, beta=2.0, progress=False)
