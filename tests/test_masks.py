"""Prunable weights, the Masks object, torch.nn.utils.prune interop, save/load, schedules."""
from testing import AuthorsLinear, mlp
import copy
import math

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

import ntkfast
from ntkfast import Masks, prunable_parameters
from ntkfast.masks import density_schedule, n_keep, parameter_name, threshold


MaskedLinear = AuthorsLinear  # the authors' masked layers: a subclass with its own weight_mask buffer


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Identity(),
        nn.Flatten(), MaskedLinear(4 * 8 * 8, 10), nn.ReLU(), nn.Linear(10, 5),
    )


def test_prunable_default_and_options():
    net = nn.ModuleDict({"c1": nn.Conv1d(2, 3, 3), "c2": nn.Conv2d(3, 3, 3), "c3": nn.Conv3d(3, 2, 1),
                         "bn": nn.BatchNorm2d(3), "ln": nn.LayerNorm(4), "fc": MaskedLinear(4, 2),
                         "emb": nn.Embedding(5, 4)})
    assert list(prunable_parameters(net)) == ["c1.weight", "c2.weight", "c3.weight", "fc.weight"]
    assert list(prunable_parameters(net, include_bias=True)) == [
        "c1.weight", "c1.bias", "c2.weight", "c2.bias", "c3.weight", "c3.bias", "fc.weight", "fc.bias"]
    assert list(prunable_parameters(net, include_norm=True)) == [
        "c1.weight", "c2.weight", "c3.weight", "bn.weight", "ln.weight", "fc.weight"]
    named = dict(net.named_parameters())
    for n, p in prunable_parameters(net, include_bias=True, include_norm=True).items():
        assert named[n] is p


def test_shared_weights_counted_once():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    assert list(prunable_parameters(net)) == ["0.weight"]


def test_no_prunable_weights_is_named_error():
    with pytest.raises(ValueError, match="model: no prunable weights"):
        Masks.ones(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_density_report_apply():
    net = small_net()
    masks = Masks.ones(net)
    assert masks.density == 1.0 and list(masks) == ["0.weight", "5.weight", "7.weight"]
    m = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.25 for n, t in masks.items()}
    masks = Masks(m, {"method": "test"})
    kept = sum(int(t.sum()) for t in m.values())
    total = sum(t.numel() for t in m.values())
    assert masks.kept == kept and masks.numel == total and math.isclose(masks.density, kept / total)
    for n, d in masks.layer_density().items():
        assert math.isclose(d, int(m[n].sum()) / m[n].numel())
    report = masks.report()
    assert "5.weight" in report and "total" in report and f"{kept}" in report
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    masks.apply(net)
    for n, p in net.named_parameters():
        expect = before[n] * m[n] if n in m else before[n]
        assert torch.equal(p.detach(), expect)


def test_apply_rejects_mismatched_masks_and_changes_nothing():
    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    bad = dict(Masks.ones(net))
    bad["7.weight"] = torch.zeros(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks\['7.weight'\] has shape"):
        Masks(bad).apply(net)
    with pytest.raises(ValueError, match="has no module 'nope'"):
        Masks({"nope.weight": torch.ones(2, dtype=torch.bool)}).apply(net)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_torch_prune_round_trip():
    net = small_net()
    x = torch.randn(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(2)
    masks = Masks({n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in Masks.ones(net).items()})
    dense_copy = small_net()
    masks.apply(dense_copy)
    masks.to_prune_hooks(net)
    assert hasattr(net[0], "weight_orig") and hasattr(net[0], "weight_mask")
    assert tprune.is_pruned(net)
    net.eval(), dense_copy.eval()
    assert torch.allclose(net(x), dense_copy(x))
    back = Masks.from_model(net)
    assert back == masks
    # names still resolve to the re-parametrised tensors
    assert parameter_name(net, "0.weight") == "0.weight_orig"
    assert list(prunable_parameters(net)) == list(masks)
    assert prunable_parameters(net)["0.weight"] is net[0].weight_orig


def test_from_model_reads_torch_prune():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    tprune.l1_unstructured(net[0], "weight", amount=0.5)
    tprune.random_unstructured(net[2], "weight", amount=0.3)
    m = Masks.from_model(net)
    assert torch.equal(m["0.weight"], net[0].weight_mask.bool()) and torch.equal(m["2.weight"], net[2].weight_mask.bool())
    assert m["0.weight"].sum() == 100 and m["2.weight"].sum() == 21
    with pytest.raises(ValueError, match="no \\*_mask buffers"):
        Masks.from_model(nn.Linear(3, 3))


def test_save_load_metadata(tmp_path):
    net = small_net()
    masks = Masks({n: torch.rand(t.shape) < 0.3 for n, t in Masks.ones(net).items()},
                  {"method": "synflow", "density": 0.3, "seed": 7})
    path = tmp_path / "m.pt"
    masks.save(path)
    back = Masks.load(path)
    assert back == masks
    assert back.metadata["method"] == "synflow" and back.metadata["seed"] == 7
    assert back.metadata["version"] and math.isclose(back.metadata["final_density"], masks.density)
    torch.save({n: t for n, t in masks.items()}, tmp_path / "plain.pt")
    assert Masks.load(tmp_path / "plain.pt") == masks
    with pytest.raises(FileNotFoundError, match="no masks file"):
        Masks.load(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not hold ntkfast masks"):
        Masks.load(tmp_path / "junk.pt")


def test_schedules():
    assert density_schedule(0.01, 2) == pytest.approx([0.1, 0.01])
    exp = density_schedule(0.01, 100)
    assert exp[-1] == pytest.approx(0.01) and all(a > b for a, b in zip(exp, exp[1:]))
    assert exp[49] == pytest.approx(0.1)
    assert density_schedule(0.2, 4, "linear") == pytest.approx([0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="^schedule: expected one of"):
        density_schedule(0.5, 3, "cosine")


def test_n_keep_rounds_half_up():
    assert n_keep(0.5, 5) == 3 and n_keep(0.1, 10) == 1 and n_keep(1.0, 7) == 7 and n_keep(0.01, 49) == 0
    assert n_keep(0.01, 150) == 2


def test_threshold_global_layerwise_and_keep():
    gen = torch.Generator().manual_seed(4)
    scores = {"a": torch.randn(100, generator=gen) + 20, "b": torch.randn(300, generator=gen)}
    g = threshold(scores, 0.25)
    assert int(g["a"].sum()) == 100 and int(g["b"].sum()) == 0  # global: a dominates
    lw = threshold(scores, 0.25, scope="layerwise")
    assert int(lw["a"].sum()) == 25 and int(lw["b"].sum()) == 75
    keep = {"a": torch.zeros(100, dtype=torch.bool), "b": torch.ones(300, dtype=torch.bool)}
    g2 = threshold(scores, 0.25, keep=keep)
    assert not g2["a"].any() and int(g2["b"].sum()) == 100
    # fewer alive than k: keep all alive, nothing comes back
    g3 = threshold(scores, 0.9, keep=keep)
    assert not g3["a"].any() and bool(g3["b"].all())
    with pytest.raises(ValueError, match="^scope: expected one of"):
        threshold(scores, 0.5, scope="per-channel")


def _authors_masking(scores, density, keep, scope):
    """The Synaptic-Flow masking step written literally: cat + kthvalue, prune score <= threshold
    (pruned entries carry the lowest possible score)."""
    s = [torch.where(keep[n], scores[n].double(), torch.tensor(float("-inf"), dtype=torch.float64))
         for n in scores]
    groups = [s] if scope == "global" else [[x] for x in s]
    out = []
    for g in groups:
        flat = torch.cat([x.flatten() for x in g])
        n_prune = int((1.0 - density) * flat.numel())
        if n_prune < 1:
            out += [x > float("-inf") for x in g]
            continue
        thr, _ = torch.kthvalue(flat, n_prune)
        out += [x > thr for x in g]
    return out


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_keep_rule_authors_matches_kthvalue_masking(scope, kind):
    gen = torch.Generator().manual_seed(7)
    shapes = {"a": (40, 30), "b": (7,), "c": (5, 4, 3, 3), "d": (1,)}
    for trial in range(6):
        if kind == "ties":
            scores = {n: torch.randint(0, 5, sh, generator=gen).float() for n, sh in shapes.items()}
        else:
            scores = {n: torch.randn(sh, generator=gen) for n, sh in shapes.items()}
        keep = {n: torch.rand(sh, generator=gen) < (0.4 + 0.1 * trial) for n, sh in shapes.items()}
        for density in (0.01, 0.1, 0.33, 0.5, 0.9, 1.0):
            got = threshold(scores, density, keep=keep, scope=scope, keep_rule="authors")
            ref = _authors_masking(scores, density, keep, scope)
            for (n, g), r in zip(got.items(), ref):
                assert torch.equal(g, r), (n, density, trial)
                assert not bool((g & ~keep[n]).any())


def test_keep_rule_exact_vs_authors_on_ties():
    scores = {"a": torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])}
    exact = threshold(scores, 0.4, keep_rule="exact")["a"].tolist()  # k=2: 3.0 and the first 2.0
    authors = threshold(scores, 0.4, keep_rule="authors")["a"].tolist()  # 2.0s tie at the cut: all go
    assert exact == [True, True, False, False, False]
    assert authors == [True, False, False, False, False]
    with pytest.raises(ValueError, match="keep_rule: expected one of"):
        threshold(scores, 0.4, keep_rule="paper")


# -- from a review of the whole package ------------------------------------------------------------


def test_masks_load_refuses_a_state_dict(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not masks"):
        Masks.load(tmp_path / "sd.pt")


class _TiedHead(nn.Module):
    """A language model's layout: the output layer shares the embedding table."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


@pytest.mark.parametrize("twice", [False, True], ids=["once", "on top of earlier hooks"])
def test_prune_hooks_mask_every_holder_of_a_tied_weight(twice):
    torch.manual_seed(0)
    net = _TiedHead()
    names = list(prunable_parameters(net, include=nn.Embedding))
    assert names == ["emb.weight", "mid.weight"]  # the tied table once, under its first name
    gen = torch.Generator().manual_seed(3)
    masks = Masks({n: torch.rand(net.get_parameter(n).shape, generator=gen) < 0.5 for n in names})
    x = torch.randint(0, 9, (5, 3))
    expected = copy.deepcopy(net)
    masks.apply(expected)  # in place: the one shared tensor, so both modules see it masked
    if twice:
        Masks({n: torch.ones_like(m) for n, m in masks.items()}).to_prune_hooks(net)
    masks.to_prune_hooks(net)
    assert hasattr(net.head, "weight_mask") and hasattr(net.emb, "weight_mask")
    assert net.head.weight_orig is net.emb.weight_orig  # still one parameter to train
    torch.testing.assert_close(net(x), expected(x), rtol=0, atol=0)


def test_a_lazy_module_not_yet_run_is_named():
    net = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"^model: '0.weight' is not initialised yet \(a lazy module\); run one forward"):
        ntkfast.prune(net, "magnitude", 0.5, progress=False)
    net(torch.randn(2, 5))  # once run, it is an ordinary Linear
    masks = ntkfast.prune(net, "magnitude", 0.5, progress=False)
    assert masks["0.weight"].shape == (8, 5)
