"""count_flops: the Synaptic-Flow / NTK-SAP multiply-accumulate rule, by hand on small nets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ntkfast import models
from ntkfast.flops import count_flops


def test_lenet300_100_by_hand():
    model = models.get("lenet300_100")
    fc = count_flops(model)
    assert fc.total == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert fc.fraction == 1.0 and fc.uncounted == []


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 10x12 -> 5x6
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 4, (1, 3), groups=2, bias=False)  # 5x6 -> 5x4
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)  # 5x4 -> 10x8
        self.emb = nn.Parameter(torch.ones(3))  # used by no counted module
        self.head = nn.Linear(2 * 10 * 8, 5)

    def forward(self, x):
        x = self.grouped(torch.relu(self.bn(self.conv(x))))
        return self.head(self.up(x).flatten(1)) + self.emb.sum()


def test_convolutions_norms_and_transposed_by_hand():
    model = _Conv()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fc = count_flops(model, (3, 10, 12))
    want = {"conv.weight": 3 * 9 * 8 * 30, "conv.bias": 8 * 30, "bn.weight": 8 * 30, "bn.bias": 8 * 30,
            "grouped.weight": 4 * 3 * 4 * 20, "up.weight": 4 * 2 * 4 * 20, "up.bias": 2 * 80,
            "head.weight": 160 * 5, "head.bias": 5}
    assert dict(fc.per_param) == want and fc.uncounted == ["emb"]
    # the user's model ran nothing: BatchNorm statistics and the batch counter are as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    masks = {"conv.weight": torch.rand(8, 3, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.25,
             "head.weight": torch.zeros(5, 160, dtype=torch.bool)}
    fc = count_flops(model, (3, 10, 12), masks)
    kept = masks["conv.weight"].float().mean().item()
    assert fc.remaining == pytest.approx(sum(want.values()) - want["conv.weight"] * (1 - kept) - want["head.weight"])
    assert 0 < fc.fraction < 1


def test_linear_over_tokens_counts_every_position():
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))
    fc = count_flops(model, (7, 6))
    assert fc.per_param["0.weight"] == 6 * 4 * 7 and fc.per_param["1.weight"] == 4 * 7


@pytest.mark.parametrize("call,match", [
    (lambda m: count_flops(m), "^input_shape: the model has no input_shape"),
    (lambda m: count_flops(m, (5,)), "^input_shape: the model's forward fails"),
    (lambda m: count_flops(m, (0, 3)), "^input_shape"),
    (lambda m: count_flops(m, (6,), {"nope": torch.ones(4, 6, dtype=torch.bool)}), "^masks: the model has no parameter 'nope'"),
    (lambda m: count_flops(m, (6,), {"0.weight": torch.ones(6, 4, dtype=torch.bool)}), r"^masks\['0.weight'\]: shape"),
    (lambda m: count_flops(m, (6,), {"0.weight": torch.full((4, 6), 0.5)}), r"^masks\['0.weight'\]"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(nn.Sequential(nn.Linear(6, 4)))


def test_float64_tied_and_compiled_models():
    double = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    assert count_flops(double, (6,)).total == 6 * 4 + 4 + 4 * 2 + 2

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    assert dict(count_flops(Tied(), (4,)).per_param) == {"a.weight": 32}
    plain = nn.Sequential(nn.Linear(6, 4))
    compiled = torch.compile(plain, backend="eager")
    fc = count_flops(compiled, (6,), {"0.weight": torch.zeros(4, 6, dtype=torch.bool)})
    assert fc.remaining == 4 and fc.total == 28


def test_a_model_that_cannot_be_copied_is_named():
    import torch.nn.utils.prune as tprune

    model = nn.Sequential(nn.Linear(6, 4))
    tprune.random_unstructured(model[0], "weight", 0.5)
    with pytest.raises(ValueError, match="^model: count_flops works on a copy"):
        count_flops(model, (6,))
