"""Models wrapped by torch.compile: masks keyed by the original module's names, applied to the
compiled and to the plain model alike, and the trainer taking either model with either key style.

Pruning never runs the compiled forward (methods score the original module), so the default
backend costs nothing there; the trainer does run it, on the "eager" backend, which wraps the model
in the same OptimizedModule without the minutes of a C++ build."""
import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn
from torch.utils.data import TensorDataset

import ntkfast
from ntkfast import Masks, prune
from ntkfast.core.compiled import is_compiled, plain_name, unwrap
from testing import mlp

X = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))
NAMES = ["0.weight", "2.weight", "4.weight"]


def _compiled(net, backend=None):
    out = torch.compile(net, backend=backend) if backend else torch.compile(net)
    assert is_compiled(out) and unwrap(out) is net
    assert next(iter(dict(out.named_parameters()))).startswith("_orig_mod.")  # what the issue is about
    return out


def _zero_where_pruned(net, masks):
    params = dict(unwrap(net).named_parameters())
    return all(bool((params[n].detach()[~masks[n]] == 0).all()) for n in masks)


def test_names():
    assert plain_name("_orig_mod.fc.weight") == "fc.weight"
    assert plain_name("block._orig_mod.conv.weight") == "block.conv.weight"
    assert plain_name("fc.weight") == "fc.weight"
    assert not is_compiled(mlp()) and unwrap(mlp()).__class__ is nn.Sequential


@pytest.mark.parametrize("method, kwargs", [("magnitude", {}), ("snip", {"data": (X, Y)}),
                                            ("synflow", {"input_shape": (12,)})])
def test_pruning_a_compiled_model_gives_the_plain_models_masks(method, kwargs):
    plain = prune(mlp(), method, 0.3, progress=False, **kwargs)
    compiled = prune(_compiled(mlp()), method, 0.3, progress=False, **kwargs)
    assert list(compiled) == NAMES and compiled == plain
    # and a scorer called directly on the compiled model
    scores = ntkfast.methods.get(method).fn(_compiled(mlp()), **kwargs)
    assert list(scores) == NAMES


def test_masks_of_the_compiled_model_apply_to_the_plain_one_and_back():
    masks = prune(_compiled(mlp()), "magnitude", 0.3, progress=False)
    plain = mlp()
    masks.apply(plain)
    assert _zero_where_pruned(plain, masks)
    compiled = _compiled(mlp())
    prune(mlp(), "magnitude", 0.3, progress=False).apply(compiled)
    assert _zero_where_pruned(compiled, masks)


def test_masks_keyed_by_the_compiled_names_are_the_original_names():
    compiled = _compiled(mlp())
    raw = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) < 0.5
           for n, p in compiled.named_parameters() if n.endswith("weight")}
    assert list(raw) == ["_orig_mod." + n for n in NAMES]
    masks = Masks(raw)
    assert list(masks) == NAMES
    plain = mlp()
    masks.apply(plain)
    assert _zero_where_pruned(plain, masks)
    # the same weight under both names is one mask too many, refused by name
    with pytest.raises(ValueError, match=r"^masks: '0.weight' and another key name the same weight '0.weight'"):
        Masks({"_orig_mod.0.weight": raw["_orig_mod.0.weight"], "0.weight": raw["_orig_mod.0.weight"]})
    # prune's start masks, in the compiled spelling, for a plain model
    got = prune(mlp(), "magnitude", 0.2, masks={"_orig_mod.0.weight": raw["_orig_mod.0.weight"]}, progress=False)
    assert not bool((got["0.weight"] & ~raw["_orig_mod.0.weight"]).any())


def test_prune_hooks_round_trip_through_a_compiled_model():
    masks = prune(mlp(), "magnitude", 0.3, progress=False)
    compiled = _compiled(mlp(), "eager")
    masks.to_prune_hooks(compiled)
    assert isinstance(unwrap(compiled)[0].weight_mask, torch.Tensor)  # on the original module
    back = Masks.from_model(compiled)
    assert list(back) == NAMES and back == masks
    plain = mlp()
    back.to_prune_hooks(plain)
    assert Masks.from_model(plain) == masks
    # a model hooked through its compiled wrapper prunes as the plain one: pruned weights stay pruned
    again = prune(compiled, "magnitude", 0.1, on_empty_layer="ignore", progress=False)
    assert all(not bool((again[n] & ~masks[n]).any()) for n in NAMES)
    assert torch.equal(compiled(X), unwrap(compiled)(X))


@pytest.mark.parametrize("model_kind", ["compiled", "plain"])
@pytest.mark.parametrize("key_style", ["original", "compiled"])
def test_the_trainer_takes_either_model_with_either_key_style(model_kind, key_style):
    masks = prune(mlp(), "magnitude", 0.3, progress=False)
    given = dict(masks) if key_style == "original" else {"_orig_mod." + n: m for n, m in masks.items()}
    net = mlp(1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    model = _compiled(net, "eager") if model_kind == "compiled" else net
    ds = TensorDataset(X, Y)
    res = ntkfast.train(model, given, ds, None, epochs=1, batch_size=8, progress=False)
    assert len(res.train_loss) == 1
    assert _zero_where_pruned(net, masks)  # held at zero through the optimizer's steps
    after = dict(net.named_parameters())
    assert all(not torch.equal(after[n].detach()[masks[n]], before[n][masks[n]]) for n in NAMES)  # kept ones trained


def _nested():
    inner = nn.Sequential(nn.Linear(12, 20), nn.ReLU())
    return nn.Sequential(torch.compile(inner, backend="eager"), nn.Linear(20, 4)), inner


def test_a_compiled_submodule():
    net, inner = _nested()
    assert list(ntkfast.prunable_parameters(net)) == ["0.0.weight", "1.weight"]
    masks = prune(net, "snip", 0.5, data=(X, Y), progress=False)
    assert list(masks) == ["0.0.weight", "1.weight"]
    masks.apply(net)
    assert bool((inner[0].weight.detach()[~masks["0.0.weight"]] == 0).all())
    # hooks registered through the compiled submodule are read back, and respected by prune
    masks.to_prune_hooks(net)
    assert Masks.from_model(net) == masks
    again = prune(net, "magnitude", 0.2, on_empty_layer="ignore", progress=False)
    assert all(not bool((again[n] & ~masks[n]).any()) for n in masks)
    other, inner2 = _nested()
    ntkfast.train(other, masks, TensorDataset(X, Y), None, epochs=1, batch_size=8, progress=False)
    assert bool((inner2[0].weight.detach()[~masks["0.0.weight"]] == 0).all())
    res = ntkfast.transfer(_nested()[0], 0.3, X, steps=1, batch_size=8, validation=0, progress=False)
    assert list(res.masks) == ["0.0.weight", "1.weight"] and "0.0.weight" in res.state_dict


def test_transfer_of_a_compiled_model():
    res = ntkfast.transfer(_compiled(mlp()), 0.3, X, steps=2, batch_size=8, validation=0, progress=False)
    assert list(res.masks) == NAMES and all(not k.startswith("_orig_mod") for k in res.state_dict)
    mlp().load_state_dict(res.state_dict)  # loads into the plain model as it is
