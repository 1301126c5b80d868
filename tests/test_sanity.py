"""Sanity checks: layerwise shuffle and re-initialisation keep what they promise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ntkfast import models, prune
from ntkfast.sanity import reinitialize, shuffle_layerwise


def _masks():
    model = models.get("lenet300_100")
    return model, prune(model, "magnitude", 0.1, progress=False)


def test_shuffle_keeps_each_layers_count_and_moves_the_entries():
    _, masks = _masks()
    a, b, c = shuffle_layerwise(masks, 1), shuffle_layerwise(masks, 1), shuffle_layerwise(masks, 2)
    for name, m in masks.items():
        assert a[name].dtype == torch.bool and int(a[name].sum()) == int(m.sum())
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[n], masks[n]) for n in masks.keys())
    assert any(not torch.equal(a[n], c[n]) for n in masks.keys())
    assert a.metadata["sanity"] == {"check": "shuffle_layerwise", "seed": 1} and "sanity" not in masks.metadata


@pytest.mark.parametrize("name", ["lenet300_100", "resnet20"])
def test_reinitialize_draws_new_weights_keeps_the_mask_and_the_users_model(name):
    model = models.get(name)
    masks = prune(model, "magnitude", 0.2, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = reinitialize(model, masks, seed=5)
    again = reinitialize(model, masks, seed=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    params = dict(fresh.named_parameters())
    for n, m in masks.items():
        w = params[n]
        assert torch.all(w[~m] == 0) and not torch.equal(w, dict(model.named_parameters())[n])
        assert torch.equal(w, dict(again.named_parameters())[n])


def test_reinitialize_a_plain_module_uses_reset_parameters():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0.weight": torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) < 0.5}
    fresh = reinitialize(model, masks, seed=3)
    assert not torch.equal(fresh[0].weight, model[0].weight) and torch.all(fresh[0].weight[~masks["0.weight"]] == 0)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="^masks: expected"):
        shuffle_layerwise([1, 2])
    with pytest.raises(ValueError, match="^seed"):
        shuffle_layerwise({"w": torch.ones(3, dtype=torch.bool)}, seed=2**64)
    with pytest.raises(ValueError, match="^model: no module has reset_parameters"):
        reinitialize(nn.Sequential(nn.ReLU()), {})


@pytest.mark.parametrize("rounds", [1, 3])
def test_inverted_magnitude_keeps_the_smallest_weights(rounds):
    model = models.get("lenet300_100")
    masks = prune(model, "magnitude", 0.1, rounds=rounds, invert=True, scope="layerwise", progress=False)
    assert masks.metadata["invert"] is True
    for name, p in model.named_parameters():
        if name in masks.keys():
            m = masks[name]
            kept, gone = p.detach().abs()[m], p.detach().abs()[~m]
            assert kept.max() <= gone.min()  # every kept weight is no larger than any pruned one
    normal = prune(model, "magnitude", 0.1, scope="layerwise", progress=False)
    assert all(int(masks[n].sum()) == int(normal[n].sum()) for n in masks.keys())


def test_invert_is_refused_where_there_are_no_scores_and_checked():
    model = models.get("lenet300_100")
    with pytest.raises(ValueError, match="^invert: ntt chooses its masks itself"):
        prune(model, "ntt", 0.1, invert=True, data=torch.randn(8, 1, 28, 28), progress=False)
    with pytest.raises(TypeError, match="^invert: expected True or False"):
        prune(model, "magnitude", 0.1, invert="yes", progress=False)
