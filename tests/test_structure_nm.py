"""N:M semi-structured masks: ntkfast.masks.nm_masks (where the groups run through Linear and
convolution weights, keep, errors) and prune(..., structure="N:M") (exactly N of every M with
random, magnitude and SNIP on an MLP and a conv net, one round and iterative schedules, scope,
exclude, invert, start masks, the density rule, layers the structure does not fit, and that nothing
the user holds changes on an error). Every N:M check here counts the groups itself, along the axis
the documentation names, independently of the code that chose them."""
import math
import warnings

import pytest
import torch
from torch import nn

from ntkfast import Masks, prune, scores
from ntkfast.masks import density_schedule, n_keep, nm_masks, nm_misfit, parse_structure
from ntkfast.ops import nm_mask_reference
from testing import seeded

ROUNDS_SEEN = []


@scores.register("_test_nm_recording", "test-only: random scores, records the masks each round starts from")
def _nm_recording(model, masks, *, data=None, seed=0):
    ROUNDS_SEEN.append({n: m.clone() for n, m in masks.items()})
    g = torch.Generator().manual_seed(seed % 2**31)
    return {n: torch.randn(m.shape, generator=g) for n, m in masks.items()}


@scores.register("_test_nm_constant", "test-only: every score 1.0 (all tied)")
def _nm_constant(model, masks, *, data=None, seed=0):
    return {n: torch.ones(m.shape) for n, m in masks.items()}


def mlp16(seed=0):
    """Every input dimension a multiple of 8: 16 -> 32 -> 24 -> 8."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def convnet(seed=0, stem=4):
    """A small conv net on [N, stem, 8, 8] inputs; with stem=3 its first convolution has 3 input
    channels (27 inputs per output), which no M > 1 of 2, 4, 8 divides."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(stem, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def batch(model, seed=0):
    gen = seeded("batch", seed)
    first = next(iter(model.children()))
    shape = (16,) if isinstance(first, nn.Linear) else (first.in_channels, 8, 8)
    return torch.randn((12,) + shape, generator=gen), torch.randint(0, 8, (12,), generator=gen)


def groups(mask, m, layout="channels"):
    """The [groups, m] view of a mask along the axis the documentation names."""
    if mask.dim() >= 3:
        mask = mask.permute(0, *range(2, mask.dim()), 1) if layout == "channels" else mask.reshape(mask.shape[0], -1)
    return mask.reshape(-1, m)


def assert_nm(masks, n, m, layout="channels", names=None):
    for name in names or list(masks):
        per = groups(masks[name], m, layout).sum(1)
        assert bool((per == n).all()), f"{name}: groups hold {sorted(set(per.tolist()))} kept, not exactly {n}"


# -- parse_structure, nm_misfit --------------------------------------------------------------------


def test_parse_structure():
    assert parse_structure("2:4") == (2, 4)
    assert parse_structure(" 1 : 8 ") == (1, 8)
    assert parse_structure("4:4") == (4, 4)
    for bad in ("2/4", "2:", "a:b", "2:4:8", "-1:4", "2.0:4"):
        with pytest.raises(ValueError, match="^structure: expected 'N:M'"):
            parse_structure(bad)
    for bad in ("0:4", "5:4", "3:2", "0:0"):
        with pytest.raises(ValueError, match="needs 1 <= N <= M"):
            parse_structure(bad)
    with pytest.raises(TypeError, match="^structure: expected a string"):
        parse_structure((2, 4))


def test_nm_misfit_names_the_length():
    assert nm_misfit((10, 16), 4) is None and nm_misfit((16, 8, 3, 3), 4) is None
    assert "3 input channels" in nm_misfit((16, 3, 3, 3), 4)
    assert nm_misfit((16, 3, 2, 2), 4, "flat") is None  # 12 = 3 x 4
    assert "27 = 3 input channels x 9 kernel positions" in nm_misfit((16, 3, 3, 3), 4, "flat")
    assert "10 inputs" in nm_misfit((4, 10), 4)


# -- nm_masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (8, 16), (3, 7)])
@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_nm_masks_exact_on_every_shape(n, m, layout):
    gen = seeded("shapes", n, m, layout)
    shapes = {"linear": (5, 4 * m), "conv1d": (6, 2 * m, 3), "conv2d": (4, 3 * m, 3, 3), "conv3d": (3, m, 2, 1, 2),
              "pointwise": (7, 2 * m, 1, 1), "bias": (3 * m,)}
    for kind in ("normal", "ties"):
        sc = {k: (torch.randn(s, generator=gen) if kind == "normal" else torch.randint(0, 3, s, generator=gen).float())
              for k, s in shapes.items()}
        out = nm_masks(sc, n, m, layout=layout)
        assert list(out) == list(shapes)
        for k, mask in out.items():
            assert mask.shape == sc[k].shape and mask.dtype == torch.bool and mask.is_contiguous()
        assert_nm(out, n, m, layout)
        # the kept entries of each group are its n highest (ties: the lower index in the group)
        for k in shapes:
            want = nm_mask_reference(groups(sc[k], m, layout), n, m)
            assert torch.equal(groups(out[k], m, layout), want), k


@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_all_equal_scores_still_keep_exactly_n(layout):
    # every score tied: each group keeps its first n (the lower index in the group), still exactly n
    sc = {"linear": torch.ones(6, 16), "conv": torch.zeros(4, 8, 3, 3), "pointwise": torch.full((5, 12, 1, 1), 7.0)}
    for n, m in [(2, 4), (1, 4), (3, 4), (4, 8)]:
        if any(nm_misfit(v.shape, m, layout) for v in sc.values()):
            continue
        out = nm_masks(sc, n, m, layout=layout)
        assert_nm(out, n, m, layout)
        for k in sc:
            want = torch.zeros(m, dtype=torch.bool)
            want[:n] = True
            assert bool((groups(out[k], m, layout) == want).all()), k
    masks = prune(convnet(stem=8), "_test_nm_constant", None, structure="2:4", nm_layout=layout, rounds=3,
                  progress=False)
    assert_nm(masks, 2, 4, layout)


def test_channels_layout_by_hand():
    # [out=1, in=4, 1, 2]: at kernel position 0 channel 2 wins, at position 1 channel 0 (1:4)
    s = torch.tensor([[[[0.0, 9.0]], [[1.0, 0.0]], [[5.0, 2.0]], [[3.0, 1.0]]]])
    got = nm_masks({"w": s}, 1, 4)["w"]
    assert got[0, :, 0, 0].tolist() == [False, False, True, False]
    assert got[0, :, 0, 1].tolist() == [True, False, False, False]
    # flat: [0, 9, 1, 0 | 5, 2, 3, 1] -> 9 and 5
    flat = nm_masks({"w": s}, 1, 4, layout="flat")["w"].reshape(-1).tolist()
    assert flat == [False, True, False, False, True, False, False, False]


def test_nm_masks_keep():
    gen = seeded("keep")
    sc = {"a": torch.randn(8, 16, generator=gen), "b": torch.randn(4, 8, 3, 3, generator=gen)}
    keep = {k: torch.rand(v.shape, generator=gen) < 0.5 for k, v in sc.items()}
    out = nm_masks(sc, 2, 4, keep=keep)
    for k in sc:
        assert not bool((out[k] & ~keep[k]).any())
        per, alive = groups(out[k], 4).sum(1), groups(keep[k], 4).sum(1)
        assert torch.equal(per, alive.clamp(max=2))  # a group with fewer than 2 keepable keeps what it has


def test_nm_masks_errors_name_every_misfit():
    sc = {"ok": torch.randn(4, 8), "stem": torch.randn(8, 3, 3, 3), "head": torch.randn(10, 30)}
    with pytest.raises(ValueError, match=r"'stem' \(shape \(8, 3, 3, 3\): 3 input channels.*'head' \(shape \(10, 30\)"):
        nm_masks(sc, 2, 4)
    with pytest.raises(ValueError, match=r"need 1 <= n <= m"):
        nm_masks({"ok": torch.randn(4, 8)}, 5, 4)
    with pytest.raises(TypeError, match="expected ints"):
        nm_masks({"ok": torch.randn(4, 8)}, 2.0, 4)
    with pytest.raises(ValueError, match=r"^layout: expected one of 'channels', 'flat'"):
        nm_masks({"ok": torch.randn(4, 8)}, 2, 4, layout="rows")
    with pytest.raises(ValueError, match=r"keep: has no mask for 'ok'"):
        nm_masks({"ok": torch.randn(4, 8)}, 2, 4, keep={})
    bad = torch.randn(4, 8)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"scores \('fc.weight'\) contains NaN"):
        nm_masks({"fc.weight": bad}, 2, 4)


# -- prune(..., structure=) -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "magnitude", "snip"])
@pytest.mark.parametrize("make", [mlp16, convnet], ids=["mlp", "convnet"])
@pytest.mark.parametrize("rounds", [1, 4])
def test_prune_2_4(method, make, rounds):
    model = make()
    data = batch(model) if method == "snip" else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune(model, method, None, structure="2:4", rounds=rounds, data=data, progress=False)
    assert list(masks) == [n for n, p in model.named_parameters() if p.dim() > 1]
    assert_nm(masks, 2, 4)
    assert masks.density == 0.5
    assert masks.metadata["structure"] == "2:4" and masks.metadata["nm_layout"] == "channels"
    assert masks.metadata["density"] == 0.5 and "unstructured" not in masks.metadata
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # density may be N/M itself: the same masks
    again = prune(model, method, 0.5, structure="2:4", rounds=rounds, data=data, progress=False)
    assert again == masks


@pytest.mark.parametrize("structure", ["1:4", "3:4", "4:8", "1:2", "2:8"])
@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_prune_other_structures(structure, layout):
    n, m = parse_structure(structure)
    masks = prune(convnet(stem=8), "magnitude", None, structure=structure, nm_layout=layout, progress=False)
    assert_nm(masks, n, m, layout)
    assert math.isclose(masks.density, n / m)


def test_one_round_is_nm_masks_of_the_scores_whatever_the_scope():
    model = convnet()
    magnitude = {n: p.detach().abs() for n, p in model.named_parameters() if p.dim() > 1}
    want = nm_masks(magnitude, 2, 4)
    for scope in ("global", "layerwise"):
        got = prune(model, "magnitude", None, structure="2:4", scope=scope, progress=False)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("schedule", ["exponential", "linear", "expinv"])
def test_iterative_rounds_follow_the_schedule_and_never_starve_a_group(scope, schedule):
    model = convnet()
    rounds = 5
    ROUNDS_SEEN.clear()
    masks = prune(model, "_test_nm_recording", None, structure="2:4", rounds=rounds, scope=scope, schedule=schedule,
                  progress=False)
    assert_nm(masks, 2, 4)
    assert len(ROUNDS_SEEN) == rounds
    numel = sum(m.numel() for m in masks.values())
    seen = ROUNDS_SEEN[1:] + [dict(masks.items())]
    for t, (d, start) in enumerate(zip(density_schedule(0.5, rounds, schedule), seen), start=1):
        for name, mask in start.items():
            assert bool((groups(mask, 4).sum(1) >= 2).all()), f"round {t}: a group of {name} fell below 2"
            if scope == "layerwise":
                assert int(mask.sum()) == n_keep(d, mask.numel()), (t, name)
        if scope == "global":
            assert sum(int(mk.sum()) for mk in start.values()) == n_keep(d, numel), t
        if t > 1:  # pruned weights never come back
            prev = seen[t - 2]
            assert all(not bool((start[k] & ~prev[k]).any()) for k in start)


def test_iterative_differs_from_one_round():
    # the earlier rounds decide which N survive: rescoring matters (else rounds would be pointless)
    one = prune(convnet(), "_test_nm_recording", None, structure="2:4", rounds=1, seed=3, progress=False)
    many = prune(convnet(), "_test_nm_recording", None, structure="2:4", rounds=6, seed=3, progress=False)
    assert one != many


def test_exclude_and_invert():
    model = convnet()
    masks = prune(model, "magnitude", None, structure="2:4", exclude="7", progress=False)  # the classifier
    assert bool(masks["7.weight"].all())
    assert_nm(masks, 2, 4, names=["0.weight", "2.weight", "4.weight"])
    assert masks.pruned_density == 0.5
    low = prune(model, "magnitude", None, structure="2:4", invert=True, progress=False)
    assert_nm(low, 2, 4)
    for k in low:  # complements: the two smallest of each group of four
        assert torch.equal(low[k], ~prune(model, "magnitude", None, structure="2:4", progress=False)[k])


def test_start_masks_that_leave_a_group_short_warn_and_keep_what_they_can():
    model = mlp16()
    start = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}
    start["2.weight"][0, :4] = torch.tensor([True, False, False, False])
    keep_copy = {k: v.clone() for k, v in start.items()}
    with pytest.warns(RuntimeWarning, match=r"groups of 2\.weight keep fewer than 2"):
        masks = prune(model, "magnitude", None, structure="2:4", masks=start, progress=False)
    assert masks["2.weight"][0, :4].tolist() == [True, False, False, False]
    assert all(torch.equal(start[k], keep_copy[k]) for k in start)  # the user's masks are untouched
    assert_nm(masks, 2, 4, names=["0.weight", "4.weight"])


def test_indivisible_layers_are_named_before_any_work_and_nothing_changes():
    model = convnet(stem=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = {"2.weight": torch.rand(16, 8, 3, 3, generator=seeded("start")) < 0.9}
    start_copy = start["2.weight"].clone()
    ROUNDS_SEEN.clear()
    with pytest.raises(ValueError, match=r"^structure: 2:4 groups run along each weight's input dimension \(channels "
                                         r"layout\).*'0\.weight' \(shape \(8, 3, 3, 3\): 3 input channels, not a "
                                         r"multiple of 4\)\. Keep them dense with exclude=\['0\.weight'\]"):
        prune(model, "_test_nm_recording", None, structure="2:4", masks=start, progress=False)
    assert ROUNDS_SEEN == []  # refused before any scoring
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(start["2.weight"], start_copy)
    with pytest.raises(ValueError, match=r"'0\.weight' \(shape \(8, 3, 3, 3\): 27 = 3 input channels x 9 kernel"):
        prune(model, "magnitude", None, structure="2:4", nm_layout="flat", progress=False)
    # the two ways out the message names
    dense = prune(model, "magnitude", None, structure="2:4", exclude=["0.weight"], progress=False)
    assert bool(dense["0.weight"].all())
    assert_nm(dense, 2, 4, names=["2.weight", "4.weight", "7.weight"])
    for scope in ("global", "layerwise"):
        loose = prune(model, "magnitude", None, structure="2:4", on_indivisible="unstructured", scope=scope,
                      rounds=3, progress=False)
        assert loose.metadata["unstructured"] == ["0.weight"]
        assert int(loose["0.weight"].sum()) == n_keep(0.5, 8 * 27)
        assert_nm(loose, 2, 4, names=["2.weight", "4.weight", "7.weight"])
        assert math.isclose(loose.density, 0.5, abs_tol=1 / loose.numel)


def test_prune_refusals():
    model = mlp16()
    with pytest.raises(ValueError, match=r"^density: 0\.3, but structure '2:4' keeps 2 of every 4 weights, a density "
                                         r"of 0\.5; pass density=None \(or 0\.5\)"):
        prune(model, "magnitude", 0.3, structure="2:4", progress=False)
    with pytest.raises(ValueError, match="^density"):  # None needs a structure
        prune(model, "magnitude", None, progress=False)
    for bad, msg in [("2-4", "expected 'N:M'"), ("a:b", "expected 'N:M'"), ("3:2", "needs 1 <= N <= M"),
                     ("0:4", "needs 1 <= N <= M")]:
        with pytest.raises(ValueError, match=f"^structure: .*{msg}"):
            prune(model, "magnitude", None, structure=bad, progress=False)
    with pytest.raises(ValueError, match="^keep_rule: 'authors'"):
        prune(model, "magnitude", None, structure="2:4", keep_rule="authors", progress=False)
    with pytest.raises(ValueError, match="^structure: ntt chooses its masks itself"):
        prune(model, "ntt", None, structure="2:4", progress=False)
    with pytest.raises(ValueError, match="^nm_layout: expected one of 'channels', 'flat'"):
        prune(model, "magnitude", None, structure="2:4", nm_layout="rows", progress=False)
    with pytest.raises(ValueError, match="^on_indivisible: expected one of 'error', 'unstructured'"):
        prune(model, "magnitude", None, structure="2:4", on_indivisible="skip", progress=False)
    # 1:3 is a density no float writes exactly: None, or 1/3 itself
    m3 = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    assert_nm(prune(m3, "magnitude", 1 / 3, structure="1:3", progress=False), 1, 3)
    with pytest.raises(ValueError, match="^density: 0.333"):
        prune(m3, "magnitude", 0.333, structure="1:3", progress=False)


def test_saved_masks_keep_the_structure(tmp_path):
    masks = prune(mlp16(), "random", None, structure="2:4", progress=False)
    masks.save(tmp_path / "m.pt")
    back = Masks.load(tmp_path / "m.pt")
    assert back == masks and back.metadata["structure"] == "2:4"


def test_applied_masks_are_semi_structured_weights():
    # what torch.sparse.to_sparse_semi_structured checks of a Linear weight: at most 2 nonzeros in
    # every 4 consecutive entries of each row
    model = mlp16()
    masks = prune(model, "magnitude", None, structure="2:4", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks.apply(model)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert bool(((p.detach() != 0).reshape(p.shape[0], -1, 4).sum(-1) <= 2).all()), name


def test_nm_options_need_an_nm_structure():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="^nm_layout: applies to an N:M structure, and structure is 'channel'"):
        prune(model, "magnitude", 0.5, structure="channel", nm_layout="flat", progress=False)
    with pytest.raises(ValueError, match="^on_indivisible: applies to an N:M structure, and structure is None"):
        prune(model, "magnitude", 0.5, on_indivisible="unstructured", progress=False)
    with pytest.raises(ValueError, match="^channel_aggregate: ranks whole channels"):
        prune(model, "magnitude", None, structure="2:4", channel_aggregate="max", progress=False)


def test_an_included_weight_of_another_layout_is_not_given_groups():
    """include= can add weights whose input dimension is not dimension 1 (an embedding table;
    transformers' Conv1D, stored [in, out]): N:M refuses them by name, or prunes them unstructured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Flatten(), nn.Linear(8 * 4, 4))
    with pytest.raises(ValueError, match=r"^structure: 2:4 .*'0\.weight' \(Embedding weight: N:M cannot tell"):
        prune(model, "magnitude", None, structure="2:4", include=nn.Embedding, progress=False)
    masks = prune(model, "magnitude", None, structure="2:4", include=nn.Embedding, on_indivisible="unstructured",
                  progress=False)
    assert masks.metadata["unstructured"] == ["0.weight"]
    assert bool((masks["2.weight"].reshape(4, -1, 4).sum(-1) == 2).all())
