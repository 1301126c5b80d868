"""Presets: complete, consistent with the registries, and their published numbers well formed."""
from __future__ import annotations

import math

import pytest

from ntkfast import augment, methods, models, presets


@pytest.mark.parametrize("name", presets.available())
def test_every_preset_names_things_that_exist(name):
    p = presets.get(name)
    assert p.name == name and p.sources and p.paper
    assert p.model in models.available()
    for m in p.methods:
        assert m == "ntt" or m in methods.available()
    for m in list(p.rounds) + list(p.method_options):
        assert m in p.methods
    assert all(0 < d <= 1 for d in p.densities) and list(p.densities) == sorted(p.densities, reverse=True)
    if p.augment is not None:
        augment.get(p.augment)
    assert all(0 <= m < p.epochs for m in p.lr_milestones) and p.scope in ("global", "layerwise")
    for method, row in p.published.items():
        assert method in p.methods and row
        for d, acc in row.items():
            assert any(math.isclose(d, g) for g in p.densities) and 0 <= acc <= 1


def test_the_ntksap_grid_is_0_8_to_the_k():
    p = presets.get("ntksap-resnet20-cifar10")
    assert [round(1 - d, 4) for d in p.densities] == [0.36, 0.5904, 0.7379, 0.8322, 0.8926, 0.9313, 0.956, 0.9719, 0.982]
    assert p.rounds["ntksap"] == 20 and p.method_options["ntksap"]["repeats"] == 5
    assert p.method_options["snip"] == {"train_mode": True} and "synflow" not in p.method_options


def test_synflow_published_values_sit_on_its_grid():
    p = presets.get("synflow-vgg16-cifar10")
    assert p.published["synflow"][0.1] == pytest.approx(0.9326) and p.published["synflow"][0.001] == pytest.approx(0.8039)


def test_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="^preset: unknown 'nope'"):
        presets.get("nope")
