"""Effective weights: checked against boolean reachability (MLPs) and against every path
enumerated one by one (small CNNs, a residual block)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkfast import Masks, models, prunable_parameters
from ntkfast.connectivity import connectivity
from ntkfast.pathkernel.reference import enumerate_paths


def _random_masks(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    return Masks(OrderedDict((n, torch.rand(p.shape, generator=g) < density)
                             for n, p in prunable_parameters(model).items()))


def _mlp(sizes, bias=True):
    layers = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("sizes", [(6, 5, 4, 3), (20, 30, 10, 10, 2), (7, 3)])
@pytest.mark.parametrize("density", [0.08, 0.3, 0.9])
def test_mlp_matches_boolean_reachability(sizes, density):
    torch.manual_seed(len(sizes))
    model = _mlp(sizes)
    masks = _random_masks(model, density, seed=int(density * 100))
    got = connectivity(model, masks, input_shape=(sizes[0],))
    ms = [m.to(torch.int64) for m in masks.values()]  # [out, in] each
    reach = [torch.ones(sizes[0], dtype=torch.int64)]  # units reached from some input
    for m in ms:
        reach.append(((m @ reach[-1]) > 0).to(torch.int64))
    back = [torch.ones(sizes[-1], dtype=torch.int64)]  # units that reach some output
    for m in reversed(ms):
        back.insert(0, ((m.T @ back[0]) > 0).to(torch.int64))
    for k, (name, m) in enumerate(masks.items()):
        want = m & (back[k + 1][:, None] > 0) & (reach[k][None, :] > 0)
        assert torch.equal(got.effective[name], want), name
        assert got.live_units[name] == int(want.any(1).sum())
    counts = torch.ones(1, sizes[-1], dtype=torch.int64)
    for m in reversed(ms):
        counts = counts @ m
    assert torch.equal(got.input_paths, counts.reshape(-1).to(torch.float64))  # exact path counts
    assert got.wasted == masks.kept - got.effective.kept >= 0


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.head = nn.Linear(2 * 4 * 4, 3, bias=False)

    def forward(self, x):
        return self.head((x + torch.relu(self.conv(x))).flatten(1))


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 2, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(3, 2, 2, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(2 * 1 * 1, 2, bias=False))


@pytest.mark.parametrize("make, shape", [(_small_cnn, (1, 5, 5)), (_Residual, (2, 4, 4))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cnn_and_residual_match_path_enumeration(make, shape, seed):
    torch.manual_seed(seed)
    model = make()
    masks = _random_masks(model, 0.45, seed)
    got = connectivity(model, masks, input_shape=shape)
    paths, _ = enumerate_paths(model, masks, input_shape=shape)
    on_a_path = {n: torch.zeros(m.numel(), dtype=torch.bool) for n, m in masks.items()}
    per_input = torch.zeros(torch.Size(shape).numel(), dtype=torch.float64)
    for p in paths:
        per_input[p.input_unit] += p.coefficient
        for name, e in p.edges:
            on_a_path[name][e] = True
    for name, m in masks.items():
        assert torch.equal(got.effective[name], on_a_path[name].view(m.shape)), name
    torch.testing.assert_close(got.input_paths.reshape(-1), per_input, rtol=1e-12, atol=0)


def test_max_pooling_and_batchnorm_count_as_their_linear_twins():
    torch.manual_seed(0)
    with_max = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 3 * 3, 5))
    with_avg = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Identity(), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 3 * 3, 5))
    with_avg.load_state_dict({k: v for k, v in with_max.state_dict().items() if not k.startswith("1.")})
    masks = _random_masks(with_max, 0.3, 4)
    a = connectivity(with_max, masks, input_shape=(1, 8, 8))
    b = connectivity(with_avg, masks, input_shape=(1, 8, 8))
    assert a.effective == b.effective
    torch.testing.assert_close(a.input_paths, b.input_paths)


class _Functional(nn.Module):
    # the same network as with_max below, with pooling, normalisation and activations as functions
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        y = F.max_pool2d(torch.sigmoid(F.layer_norm(self.conv(x), (6, 6))), 2)
        return F.log_softmax(self.fc(y.flatten(1)), dim=1)


def test_functional_pooling_normalisation_and_softmax_count_like_modules():
    torch.manual_seed(1)
    functional = _Functional()
    modules = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm((6, 6)), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(),
                            nn.Linear(4 * 3 * 3, 5), nn.LogSoftmax(1))
    masks = _random_masks(functional, 0.3, 5)
    renamed = {"0.weight": masks["conv.weight"], "5.weight": masks["fc.weight"]}
    a = connectivity(functional, masks, input_shape=(1, 8, 8))
    b = connectivity(modules, renamed, input_shape=(1, 8, 8))
    assert torch.equal(a.effective["conv.weight"], b.effective["0.weight"])
    assert torch.equal(a.effective["fc.weight"], b.effective["5.weight"])
    torch.testing.assert_close(a.input_paths, b.input_paths)


def test_torch_prune_reparametrised_and_tied_weights():
    torch.manual_seed(0)
    model = _mlp((6, 5, 4))
    ours = _random_masks(model, 0.4, 1)
    want = connectivity(model, ours, input_shape=(6,))
    ours.to_prune_hooks(model)  # weight_orig and weight_mask, as torch.nn.utils.prune makes them
    got = connectivity(model, ours, input_shape=(6,))
    assert got.effective == want.effective
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False))
    tied[2].weight = tied[0].weight
    mask = torch.tensor([[True, False, False], [False, True, False], [False, False, False]])
    c = connectivity(tied, {"0.weight": mask}, input_shape=(3,))  # both uses keep the same entries
    assert c.effective["0.weight"].tolist() == mask.tolist() and c.live_units["0.weight"] == 2


class _Scaled(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("shape", [(), (3,), (1, 3)])
def test_parameters_of_unknown_role_are_refused_by_name(shape):
    model = _Scaled(shape)
    with pytest.raises(ValueError, match="parameter 'scale' of a _Scaled"):
        connectivity(model, Masks.ones(model), input_shape=(4,))


def test_a_unit_without_outgoing_weights_wastes_its_incoming_ones():
    model = _mlp((4, 3, 2))
    masks = Masks.ones(model)
    masks["3.weight"][:, 1] = False  # hidden unit 1 reaches no output
    got = connectivity(model, masks, input_shape=(4,))
    assert not got.effective["1.weight"][1].any() and got.effective["1.weight"][[0, 2]].all()
    assert got.live_units == OrderedDict([("1.weight", 2), ("3.weight", 2)])
    assert got.wasted == 4


def test_a_dense_resnet_wastes_nothing_and_the_model_is_left_alone():
    model = models.resnet20(input_shape=(3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    got = connectivity(model, Masks.ones(model))
    assert got.wasted == 0 and got.effective.density == 1.0
    assert all(got.live_units[n] == got.units[n] for n in got.units)
    assert bool((got.input_paths > 0).all())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == types


def test_zoo_model_with_random_masks_loses_weights_at_high_sparsity():
    torch.manual_seed(0)
    model = models.lenet300_100()
    got = connectivity(model, _random_masks(model, 0.01, 0))
    assert got.wasted > 0 and got.effective.density < 0.01


def test_bad_arguments_are_named():
    model = _mlp((4, 3, 2))
    with pytest.raises(ValueError, match="input_shape"):
        connectivity(model, Masks.ones(model))
    with pytest.raises(ValueError, match="no parameter 'nope.weight'"):
        connectivity(model, {"nope.weight": torch.ones(3, 4, dtype=torch.bool)}, input_shape=(4,))
    with pytest.raises(ValueError, match="shape"):
        connectivity(model, {"1.weight": torch.ones(4, 3, dtype=torch.bool)}, input_shape=(4,))
    with pytest.raises(ValueError, match=r"masks\['1.weight'\] must be a tensor"):
        connectivity(model, {"1.weight": [[True] * 4] * 3}, input_shape=(4,))
    with pytest.raises(ValueError, match=r"input_shape \(5,\)"):
        connectivity(model, Masks.ones(model), input_shape=(5,))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="normalisation"):
        connectivity(bn, {"1.weight": torch.ones(3, dtype=torch.bool)}, input_shape=(4,))
