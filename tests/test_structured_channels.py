"""Channel masks (ntkfast.structured): whole channels, the ties traced from the model, the
aggregations, the density reached, prune(structure="channel"), and bad input refused by name."""
import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import Masks, prune
from ntkfast.models import resnet20
from ntkfast.structured import ChannelTraceError, channel_groups, channel_masks
from testing import mlp, seeded

STREAMS = [  # ResNet-20's residual streams: the stem (or shortcut conv) and every conv2 added to it
    ("conv", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"),
    ("blocks.3.conv2", "blocks.3.shortcut.0", "blocks.4.conv2", "blocks.5.conv2"),
    ("blocks.6.conv2", "blocks.6.shortcut.0", "blocks.7.conv2", "blocks.8.conv2"),
]


def random_scores(model, key=0):
    g = seeded("scores", key)
    return {n: torch.rand(p.shape, generator=g) for n, p in ntkfast.prunable_parameters(model).items()}


def dead_rows(mask):
    return frozenset(torch.nonzero(~mask.reshape(mask.shape[0], -1).any(1)).flatten().tolist())


def dead_inputs(mask):
    return frozenset(torch.nonzero(~mask.transpose(0, 1).reshape(mask.shape[1], -1).any(1)).flatten().tolist())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


def unchanged(model, snap):
    s, flags = state(model)
    return all(torch.equal(s[k], snap[0][k]) for k in s) and flags == snap[1]


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return resnet20()


# -- ties --------------------------------------------------------------------------------------------
def test_resnet20_ties_follow_the_residual_streams(r20):
    groups = {g.layers: g for g in channel_groups(r20)}
    for stream, width in zip(STREAMS, (16, 32, 64)):
        key = tuple(sorted(stream, key=list(dict(r20.named_modules())).index))
        assert key in groups and groups[key].channels == width
    for i in range(9):  # a block's first conv is tied to nothing but its own BatchNorm
        g = groups[(f"blocks.{i}.conv1",)]
        assert g.norms == (f"blocks.{i}.bn1",)
    assert len(groups) == 3 + 9
    assert not any("fc" in layers for layers in groups)  # the logits are never a prunable channel
    stem = groups[tuple(sorted(STREAMS[0], key=list(dict(r20.named_modules())).index))]
    assert set(stem.norms) == {"bn", "blocks.0.bn2", "blocks.1.bn2", "blocks.2.bn2"}


@pytest.mark.parametrize("aggregate", ["sum", "mean", "l2", "max"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_resnet20_masks_are_whole_tied_channels(r20, aggregate, scope):
    snap = state(r20)
    masks = channel_masks(r20, random_scores(r20, aggregate), 0.5, aggregate=aggregate, scope=scope)
    assert unchanged(r20, snap)
    for name, m in masks.items():
        rows = m.reshape(m.shape[0], -1)
        dead = dead_rows(m)
        alive = [r for r in range(m.shape[0]) if r not in dead]
        # every kept filter keeps the same input slices: those of the channels that are kept
        assert all(torch.equal(rows[r], rows[alive[0]]) for r in alive), name
    for stream in STREAMS:  # tied layers lose the same channels
        assert len({dead_rows(masks[f"{n}.weight"]) for n in stream}) == 1
    assert any(dead_rows(masks[f"{n}.weight"]) for s in STREAMS for n in s)
    # a block's readers lose exactly the inputs its producers lost
    for i in range(9):
        assert dead_inputs(masks[f"blocks.{i}.conv2.weight"]) == dead_rows(masks[f"blocks.{i}.conv1.weight"])
    assert dead_inputs(masks["blocks.0.conv1.weight"]) == dead_rows(masks["conv.weight"])
    assert dead_inputs(masks["blocks.3.shortcut.0.weight"]) == dead_rows(masks["blocks.2.conv2.weight"])
    assert dead_inputs(masks["fc.weight"]) == dead_rows(masks["blocks.8.conv2.weight"])
    assert not dead_rows(masks["fc.weight"])
    assert masks.metadata["achieved_density"] == pytest.approx(masks.density)


def test_norm_and_bias_masks_follow_their_channel():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    keep = Masks.ones(model, include_bias=True, include_norm=True)
    scores = random_scores(model)
    masks = channel_masks(model, scores, 0.6, keep=keep, example_inputs=torch.randn(2, 3, 8, 8), scope="layerwise")
    assert list(masks) == list(keep)
    for conv, bn in (("0", "1"), ("3", "4")):
        dead = dead_rows(masks[f"{conv}.weight"])
        assert dead
        for entry in (f"{conv}.bias", f"{bn}.weight", f"{bn}.bias"):
            assert dead_rows(masks[entry].reshape(-1, 1)) == dead


def test_flatten_maps_a_channel_to_its_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))
    masks = channel_masks(model, random_scores(model), 0.5, example_inputs=torch.randn(2, 3, 6, 6))
    dead = dead_rows(masks["0.weight"])
    assert dead
    expected = {c * 36 + j for c in dead for j in range(36)}
    assert dead_inputs(masks["4.weight"]) == expected


class TwoBranch(nn.Module):
    """cat of two convolutions along the channels, read by a third; a gated sum of two others."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.d = nn.Conv2d(5, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.c(torch.cat([self.a(x), torch.relu(self.b(x))], 1)))
        z = y + self.d(y) * torch.sigmoid(y)  # d's channels meet c's: tied
        return self.fc(z.mean((2, 3)))


def test_cat_joins_labels_end_to_end_and_sums_tie():
    model = TwoBranch()
    groups = {g.layers for g in channel_groups(model, torch.randn(2, 3, 5, 5))}
    assert groups == {("a",), ("b",), ("c", "d")}
    masks = channel_masks(model, random_scores(model, "cat"), 0.55, example_inputs=torch.randn(2, 3, 5, 5),
                          scope="layerwise")
    expected = set(dead_rows(masks["a.weight"])) | {4 + c for c in dead_rows(masks["b.weight"])}
    assert expected and dead_inputs(masks["c.weight"]) == expected
    assert dead_rows(masks["c.weight"]) == dead_rows(masks["d.weight"])


class DenseCat(nn.Module):
    """The input concatenated with a convolution's channels (DenseNet's pattern), then read."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(9, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.head(torch.cat([x, torch.relu(self.conv(x))], dim=1)).amax((2, 3)))


def test_cat_with_the_input_keeps_the_layer_prunable():
    model = DenseCat()
    x = torch.randn(2, 3, 4, 4)
    assert {g.layers for g in channel_groups(model, x)} == {("conv",), ("head",)}
    masks = channel_masks(model, random_scores(model, "dense"), 0.6, example_inputs=x, scope="layerwise")
    dead = dead_rows(masks["conv.weight"])
    assert dead and dead_inputs(masks["head.weight"]) == {3 + c for c in dead}


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pw(torch.relu(self.dw(self.conv(x)))).mean((2, 3)))


def test_depthwise_filter_goes_with_its_input_channel():
    model = Depthwise()
    assert {g.layers for g in channel_groups(model, torch.randn(2, 3, 4, 4))} == {("conv", "dw"), ("pw",)}
    masks = channel_masks(model, random_scores(model, "dw"), 0.6, example_inputs=torch.randn(2, 3, 4, 4))
    assert dead_rows(masks["conv.weight"]) == dead_rows(masks["dw.weight"]) == dead_inputs(masks["pw.weight"])


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.roll(x, 1, 2)  # unknown to the trace, but only the (pinned) input passes it
        return self.fc(self.head(x + self.conv(x)).mean((2, 3)))


def test_channels_meeting_the_input_are_pinned():
    groups = {g.layers for g in channel_groups(InputResidual(), torch.randn(2, 3, 4, 4))}
    assert groups == {("head",)}  # conv's channels are added to the input's: never pruned


# -- aggregation ---------------------------------------------------------------------------------------
def one_layer_scores():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    first = torch.tensor([[1.1, 1.1, 1.1, 1.1],    # sum 4.4, l2 2.2, max 1.1
                          [2.5, 0.0, 0.0, 0.0],    # sum 2.5, l2 2.5, max 2.5
                          [1.2, 1.2, 1.2, 0.0]])   # sum 3.6, l2 2.08, max 1.2
    return model, {"0.weight": first, "2.weight": torch.full((2, 3), 9.0)}


@pytest.mark.parametrize("aggregate,pruned", [("sum", 1), ("l2", 2), ("max", 0), ("mean", 1)])
def test_each_aggregate_prunes_its_own_lowest_channel(aggregate, pruned):
    model, scores = one_layer_scores()
    masks = channel_masks(model, scores, 0.7, aggregate=aggregate, example_inputs=torch.randn(2, 4))
    assert dead_rows(masks["0.weight"]) == {pruned}
    assert dead_inputs(masks["2.weight"]) == {pruned}


def test_mean_ranks_per_weight_where_sum_ranks_per_channel():
    # A (fan-in 8) has a channel of scores 0.5 (sum 4, mean 0.5); B (fan-in 2) one of 1s (sum 2,
    # mean 1): the sum prunes B's channel, the mean A's
    model = nn.Sequential(nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    scores = {"0.weight": torch.tensor([[0.5] * 8, [10.0] * 8]), "2.weight": torch.tensor([[1.0, 1.0], [10.0, 10.0]]),
              "4.weight": torch.tensor([[10.0, 10.0]])}
    x = torch.randn(2, 8)
    by_sum = channel_masks(model, scores, 0.7, aggregate="sum", example_inputs=x)
    by_mean = channel_masks(model, scores, 0.7, aggregate="mean", example_inputs=x)
    assert (dead_rows(by_sum["0.weight"]), dead_rows(by_sum["2.weight"])) == (frozenset(), {0})
    assert (dead_rows(by_mean["0.weight"]), dead_rows(by_mean["2.weight"])) == ({0}, frozenset())


def test_invert_keeps_the_lowest():
    model, scores = one_layer_scores()
    masks = channel_masks(model, scores, 0.7, invert=True, example_inputs=torch.randn(2, 4))
    assert dead_rows(masks["0.weight"]) == {0}  # the highest sum goes


# -- density ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_density_is_the_nearest_reachable(r20, scope, target):
    scores = random_scores(r20, ("density", target))
    masks = channel_masks(r20, scores, target, scope=scope)
    got = masks.metadata["achieved_density"]
    assert got == pytest.approx(masks.kept / masks.numel)
    assert masks.metadata["target_density"] == target
    # one channel of the widest stream weighs about 1.1% of ResNet-20's weights
    assert abs(got - target) < (0.011 if scope == "global" else 0.03)


def test_global_density_steps_are_single_channels():
    model, scores = one_layer_scores()  # 12 + 6 weights; channel of layer 0: 4 + 2 weights
    x = torch.randn(2, 4)
    assert channel_masks(model, scores, 1.0, example_inputs=x).metadata["achieved_density"] == 1.0
    assert channel_masks(model, scores, 12 / 18, example_inputs=x).metadata["achieved_density"] == pytest.approx(12 / 18)
    # 0.6 lies between 12/18 (one channel) and 6/18 (two): the nearest wins
    assert channel_masks(model, scores, 0.6, example_inputs=x).metadata["achieved_density"] == pytest.approx(12 / 18)


class SmallRes(nn.Module):
    """A stem, one residual block (each conv with its BatchNorm) and a classifier: 8 + 6 channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_every_target_gets_the_nearest_reachable_density_and_reachable_ones_exactly(scope):
    torch.manual_seed(0)
    model, x = SmallRes(), torch.randn(2, 3, 6, 6)
    scores = random_scores(model, ("sweep", scope))
    got = {}
    for t in np.linspace(0.02, 1.0, 99).tolist():
        try:
            masks = channel_masks(model, scores, t, scope=scope, example_inputs=x)
        except ValueError as e:  # below what one channel per layer keeps
            assert str(e).startswith("density: ")
            continue
        got[t] = masks.metadata["achieved_density"]
        assert got[t] == masks.kept / masks.numel  # the figure reported is the masks' own
    reachable = set(got.values())
    assert len(reachable) >= 5
    for t, a in got.items():  # no density reached anywhere in the sweep is nearer
        assert abs(a - t) <= min(abs(r - t) for r in reachable) + 1e-12, (t, a)
    for r in reachable:  # a reachable target is hit exactly
        assert channel_masks(model, scores, r, scope=scope, example_inputs=x).metadata["achieved_density"] == r


def test_no_layer_is_emptied_and_a_too_low_density_is_named(r20):
    scores = random_scores(r20, "low")
    scores["blocks.3.conv1.weight"] = torch.zeros_like(scores["blocks.3.conv1.weight"])  # the lowest of all
    masks = channel_masks(r20, scores, 0.05)
    for name, m in masks.items():
        assert m.shape[0] - len(dead_rows(m)) >= 1, name
    assert len(dead_rows(masks["blocks.3.conv1.weight"])) == 31
    with pytest.raises(ValueError, match=r"^density: 0.0005 is below 0.00074"):  # about 200 weights: one channel per layer
        channel_masks(r20, scores, 0.0005)


def test_layers_left_out_of_the_scores_keep_their_channels(r20):
    scores = random_scores(r20, "exclude")
    del scores["blocks.4.conv2.weight"]
    masks = channel_masks(r20, scores, 0.4)
    for n in STREAMS[1]:  # tied to an unscored layer: kept whole
        assert not dead_rows(masks[f"{n}.weight"])
    assert dead_rows(masks["blocks.4.conv1.weight"])
    assert dead_inputs(masks["blocks.4.conv2.weight"]) == dead_rows(masks["blocks.4.conv1.weight"])


def test_keep_naming_some_layers_still_gives_masks_for_all(r20):
    masks = channel_masks(r20, random_scores(r20, "some"), 0.5, keep={"fc.weight": torch.ones(10, 64, dtype=torch.bool)})
    assert list(masks) == list(ntkfast.prunable_parameters(r20))
    assert dead_inputs(masks["fc.weight"]) == dead_rows(masks["blocks.8.conv2.weight"])


def test_start_masks_are_kept_and_dead_channels_stay_dead(r20):
    scores = random_scores(r20, "keep")
    first = channel_masks(r20, scores, 0.7)
    again = channel_masks(r20, random_scores(r20, "other"), 0.5, keep=first)
    assert all(bool((again[n] <= first[n]).all()) for n in first)
    assert again.metadata["achieved_density"] == pytest.approx(0.5, abs=0.011)


# -- prune(structure="channel") ----------------------------------------------------------------------------
def test_prune_channel_structure_matches_channel_masks(r20):
    snap = state(r20)
    masks = prune(r20, "magnitude", 0.5, structure="channel", channel_aggregate="l2", progress=False)
    assert unchanged(r20, snap)
    scores = {n: p.detach().abs() for n, p in ntkfast.prunable_parameters(r20).items()}
    assert masks == channel_masks(r20, scores, 0.5, aggregate="l2")
    md = masks.metadata
    assert (md["structure"], md["channel_aggregate"], md["method"]) == ("channel", "l2", "magnitude")
    assert md["achieved_density"] == pytest.approx(masks.density)
    inverted = prune(r20, "magnitude", 0.5, structure="channel", invert=True, progress=False)
    assert inverted == channel_masks(r20, scores, 0.5, invert=True)


def test_prune_rounds_never_bring_a_channel_back(r20):
    masks = prune(r20, "synflow", 0.4, rounds=3, structure="channel", progress=False)
    assert masks.metadata["achieved_density"] == pytest.approx(0.4, abs=0.011)
    for stream in STREAMS:
        assert len({dead_rows(masks[f"{n}.weight"]) for n in stream}) == 1


def test_prune_with_exclude_and_data_traces_with_the_data():
    model = mlp()
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    masks = prune(model, "snip", 0.6, data=(x, y), structure="channel", exclude="0", progress=False)
    assert not dead_rows(masks["0.weight"])  # excluded: its channels stay
    assert dead_rows(masks["2.weight"])
    assert masks.metadata["exclude"] == ["0.weight"]
    assert masks.pruned_density == pytest.approx(masks.metadata["achieved_density"])


def test_prune_and_channel_masks_leave_grads_flags_and_weights_alone():
    torch.manual_seed(0)
    model, x, y = SmallRes(), torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(model(x), y).backward()  # every parameter holds a .grad
    model.bn1.eval()  # mixed train/eval flags
    model.stem.weight.requires_grad_(False)

    def snapshot():
        return (state(model), {n: (p.grad.clone(), p.requires_grad) for n, p in model.named_parameters()})

    before = snapshot()

    def untouched():
        after = snapshot()
        return (unchanged(model, before[0]) and after[1].keys() == before[1].keys()
                and all(torch.equal(g, before[1][n][0]) and r == before[1][n][1] for n, (g, r) in after[1].items()))

    with pytest.raises(ValueError, match=r"^data: structure='channel' traces the channel ties of SmallRes"):
        prune(model, "magnitude", 0.5, structure="channel", progress=False)  # nothing to trace with
    assert untouched()
    model.input_shape = (3, 6, 6)  # what the zoo's models carry: the trace's random inputs
    for method, kwargs in (("magnitude", {}), ("snip", dict(data=(x, y))), ("synflow", dict(rounds=2))):
        masks = prune(model, method, 0.5, structure="channel", progress=False, **kwargs)
        assert masks.metadata["structure"] == "channel" and dead_rows(masks["conv1.weight"]) | dead_rows(masks["stem.weight"])
        assert untouched(), method
    channel_masks(model, random_scores(model), 0.5, example_inputs=x)
    assert untouched()


@pytest.mark.parametrize("kwargs,match", [
    (dict(structure="filters"), r"^structure: "),
    (dict(structure="channel", channel_aggregate="median"), r"^channel_aggregate: "),
    (dict(channel_aggregate="l2"), r"^channel_aggregate: .*structure='channel'"),
    (dict(structure="channel", keep_rule="authors"), r"^keep_rule: "),
])
def test_prune_refuses_what_does_not_fit_channels(r20, kwargs, match):
    snap = state(r20)
    with pytest.raises(ValueError, match=match):
        prune(r20, "magnitude", 0.5, progress=False, **kwargs)
    assert unchanged(r20, snap)


def test_prune_refuses_a_method_that_chooses_its_own_masks():
    model = mlp()
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match=r"^structure: method 'ntt' chooses its own masks"):
        prune(model, "ntt", 0.5, data=(x, y), structure="channel", progress=False)


# -- bad input ---------------------------------------------------------------------------------------------
class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.roll(self.conv(x), 1, 1).mean((2, 3)))


def test_bad_input_is_named_and_leaves_model_and_masks_alone(r20):
    scores = random_scores(r20)
    keep = channel_masks(r20, scores, 0.8)
    kept = keep.clone()
    snap = state(r20)
    cases = [
        (dict(density=1.5), r"^density: "),
        (dict(aggregate="median"), r"^aggregate: "),
        (dict(scope="per-layer"), r"^scope: "),
        (dict(scores={"bn.weight": torch.rand(16)}), r"^scores: none is the weight of a Conv or Linear layer"),
        (dict(scores={"nope.weight": torch.rand(3)}), r"^scores: 'nope.weight' is not a prunable weight"),
        (dict(scores={**scores, "fc.weight": torch.rand(3, 3)}), r"^scores\['fc.weight'\]: expected a tensor of shape"),
        (dict(scores={**scores, "fc.weight": torch.full((10, 64), float("nan"))}), r"^scores\['fc.weight'\]: holds NaN"),
        (dict(keep={"fc.weight": torch.ones(3)}), r"^keep\['fc.weight'\]: expected a mask"),
    ]
    for change, match in cases:
        args = dict(scores=scores, density=0.5, keep=keep)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            channel_masks(r20, args.pop("scores"), args.pop("density"), **args)
    assert unchanged(r20, snap) and keep == kept


class Assigned(Rolled):
    def forward(self, x):
        y = self.conv(x)
        y[:, 0] = 0
        return self.fc(y.mean((2, 3)))


def test_models_the_trace_cannot_follow_are_named():
    with pytest.raises(ChannelTraceError, match=r"^model: cannot follow the channels of Rolled through roll"):
        channel_groups(Rolled(), torch.randn(2, 3, 4, 4))
    with pytest.raises(ChannelTraceError, match=r"^model: cannot follow the channels of Assigned through an assignment"):
        channel_groups(Assigned(), torch.randn(2, 3, 4, 4))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"^model: 0 is a grouped convolution \(groups=2"):
        channel_groups(grouped, torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"^model: Sequential has no Conv or Linear layer"):
        channel_groups(nn.Sequential(nn.BatchNorm1d(3)), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"^example_inputs: Sequential has no input_shape"):
        channel_groups(mlp())
    with pytest.raises(ValueError, match=r"^example_inputs: the forward of Sequential fails on inputs of shape \(2, 5\)"):
        channel_groups(mlp(), torch.randn(2, 5))


def test_export_without_torch_pruning_says_how_to_install(monkeypatch, r20):
    from ntkfast.structured import export_torch_pruning

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning now fails
    masks = channel_masks(r20, random_scores(r20), 0.5)
    with pytest.raises(ImportError, match="pip install torch-pruning"):
        export_torch_pruning(r20, masks, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)),
    lambda: nn.Sequential(nn.Linear(12, 4)),
])
def test_a_model_without_a_removable_channel_is_named(make):
    net = make()
    before = copy.deepcopy(net.state_dict())
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    calls = []
    net.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    with pytest.raises(ValueError, match=r"^structure: 'channel' finds no output channel of Sequential that can be "
                                         r"removed: every prunable layer's outputs are pinned"):
        ntkfast.prune(net, "snip", 0.5, structure="channel", data=(x, y), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert 6 not in calls  # refused before SNIP's forward over the batch (the trace's 2 rows are all it ran)
