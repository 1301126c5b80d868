"""The Path Kernel (ntkfast.pathkernel) and the SynFlow variants against brute-force enumeration
of every input-output path on tiny networks (float64)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import pathkernel
from ntkfast.pathkernel.reference import BruteForce
from ntkfast.scores import get
from testing import internal


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class _Residual(nn.Module):
    """conv -> ReLU -> avg pool -> two convs with a residual sum -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(2, 2, 1, bias=False)
        self.fc = nn.Linear(2 * 2 * 2, 3, bias=False)
        self.input_shape = (1, 4, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.c1(x)))
        h = torch.relu(self.c3(torch.relu(self.c2(h))) + h)
        return self.fc(h.flatten(1))


def _mlp():
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(),
                        nn.Linear(4, 3, bias=False))
    net.input_shape = (4,)
    return net


def _conv():
    return _Residual()


NETS = {"mlp": _mlp, "conv": _conv}


def _net(name, seed=0):
    torch.manual_seed(seed)
    return NETS[name]().double().eval()


def _masks(model, density, seed=1):
    if density is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in ntkfast.prunable_parameters(model).items()}


CASES = [(n, d) for n in NETS for d in (None, 0.6)]


@pytest.mark.parametrize("name, density", CASES)
def test_trace_and_diagonal_against_every_path(name, density):
    model = _net(name)
    masks = _masks(model, density)
    bf = BruteForce(model, masks)
    assert len(bf.paths) > 20
    diag = pathkernel.diagonal(model, masks)
    ref = bf.diagonal()
    for n in ref:
        assert rel(diag[n], ref[n]) < 1e-10, n
        if masks is not None:
            assert (diag[n][~masks[n]] == 0).all()
    assert abs(pathkernel.trace(model, masks) - bf.trace()) < 1e-10 * bf.trace()


@pytest.mark.parametrize("name, density", CASES)
def test_spectrum_against_the_explicit_path_gram(name, density):
    model = _net(name)
    masks = _masks(model, density)
    ev = BruteForce(model, masks).eigenvalues()
    k = 5
    top = pathkernel.spectrum(model, masks, k=k, steps=min(ev.numel(), 60))
    assert rel(top, ev[:k]) < 1e-8
    # the trace is the sum of all eigenvalues
    assert abs(float(ev.sum()) - pathkernel.trace(model, masks)) < 1e-9 * float(ev.sum())


@pytest.mark.parametrize("name, density", CASES)
def test_the_four_scorers_against_every_path(name, density):
    model = _net(name)
    masks = _masks(model, density)
    bf = BruteForce(model, masks)
    theta = {n: p.detach().abs() for n, p in ntkfast.prunable_parameters(model).items()}
    syn = bf.synflow()
    x = torch.rand(*model.input_shape, dtype=torch.float64) + 0.1
    syn_x = bf.synflow(x)
    expect = {
        "synflow_l2": {n: theta[n] * syn[n] for n in syn},
        "synflow_l2_squared": bf.synflow_l2_squared(),
        "synflow_dist": syn_x,
        "synflow_l2_dist": {n: theta[n] * syn_x[n] for n in syn},
    }
    for method, ref in expect.items():
        opts = {"input_mean": x} if method.endswith("dist") else {}
        got = get(method).fn(model, masks, **opts)
        for n in ref:
            assert rel(got[n], ref[n]) < 1e-10, (method, n)
    # SynFlow itself agrees with the enumeration too, and synflow_l2 is |theta| times it
    plain = get("synflow").fn(model, masks, dtype=torch.float64)
    for n in syn:
        assert rel(plain[n], syn[n]) < 1e-10


def test_path_norms_are_the_layer_path_sums():
    model = _net("mlp")
    masks = _masks(model, 0.7)
    pn = pathkernel.path_norms(model, masks, power=2)
    # by hand: a_0 = 1, a_l = (W_l ⊙ W_l ⊙ m) a_{l-1}; b_L = 1, b_{l-1} = (W_l ⊙ W_l ⊙ m)^T b_l
    names = list(ntkfast.prunable_parameters(model))
    W = [(dict(model.named_parameters())[n].detach() ** 2) * masks[n] for n in names]
    a = [torch.ones(4, dtype=torch.float64)]
    for w in W:
        a.append(w @ a[-1])
    b = [torch.ones(3, dtype=torch.float64)]
    for w in reversed(W):
        b.insert(0, w.T @ b[0])
    for i, n in enumerate(names):
        assert rel(pn.forward[n], a[i]) < 1e-12
        assert rel(pn.backward[n], b[i + 1]) < 1e-12
    assert abs(pn.total - float(a[-1].sum())) < 1e-12 * pn.total
    # tr Π = Σ_l Σ_edges b_l[j] a_{l-1}[i] over kept edges
    tr = sum(float((torch.outer(b[i + 1], a[i]) * masks[n]).sum()) for i, n in enumerate(names))
    assert abs(tr - pathkernel.trace(model, masks)) < 1e-10 * tr
    p1 = pathkernel.path_norms(model, masks, power=1, inputs=torch.full((4,), 2.0, dtype=torch.float64))
    assert rel(p1.forward[names[1]], ((dict(model.named_parameters())[names[0]].detach().abs() * masks[names[0]])
                                      @ torch.full((4,), 2.0, dtype=torch.float64))) < 1e-12


def test_overflow_names_the_layer_and_bad_arguments_are_refused():
    net = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(12)])
    net.input_shape = (8,)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e4)
    with pytest.raises(OverflowError, match="'"):
        pathkernel.trace(net, dtype=torch.float32)
    model = _net("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="power"):
        pathkernel.path_norms(model, power=3)
    with pytest.raises(ValueError, match="inputs"):
        pathkernel.path_norms(model, inputs=-torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k"):
        pathkernel.spectrum(model, k=0)
    with pytest.raises(ValueError, match="k"):
        pathkernel.spectrum(model, k=1000)
    with pytest.raises(ValueError, match="masks"):
        pathkernel.trace(model, {"nope": torch.ones(3)})
    with pytest.raises(ValueError, match="data"):
        get("synflow_dist").fn(model, None)
    with pytest.raises(ValueError, match="data"):
        get("synflow_dist").fn(model, None, data=-torch.ones(5, 4, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_iterative_synflow_l2_through_prune_builds_one_path_network(monkeypatch):
    _network = internal("pathkernel_network")

    built = []
    original = _network.PathNetwork.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_network.PathNetwork, "__init__", counting)
    model = _net("mlp")
    masks = ntkfast.prune(model, "synflow_l2", 0.3, rounds=10, progress=False)
    assert len(built) == 1  # the transformed state is built once, not once per round
    # the same masks as ten one-round prunes, each from the last one's mask
    current = None
    for t in range(1, 11):
        current = ntkfast.prune(model, "synflow_l2", 0.3 ** (t / 10), masks=current, progress=False)
    assert all(torch.equal(masks[n], current[n]) for n in masks)
    assert abs(masks.density - 0.3) < 0.02


@pytest.mark.parametrize("name, density", CASES)
def test_path_score_route_equals_the_autograd_route(name, density, monkeypatch):
    """Dense and conv layers are scored by the path_score op from the layer sums (no weight
    gradient); any other layer by autograd. Both routes give the same scores and trace, and the
    op route is the one taken for these layers."""
    _network = internal("pathkernel_network")

    model = _net(name)
    masks = _masks(model, density)
    calls = []
    real = _network.path_score
    monkeypatch.setattr(_network, "path_score", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = _network.PathNetwork(model, masks, 1, torch.float64, input_shape=None)
    fast = {q: net.scores(q) for q in (0, 1, 2)}
    assert len(calls) == 3 * len(net.targets)
    trace_fast = pathkernel.trace(model, masks)
    monkeypatch.setattr(_network, "score_geometry", lambda module, target: None)
    net.targets = net.targets  # re-reads the layers' routes: all through autograd now
    assert not net.op_route
    for q in (0, 1, 2):
        slow = net.scores(q)
        for n in slow:
            assert rel(fast[q][n], slow[n]) < 1e-12, (q, n)
    assert abs(pathkernel.trace(model, masks) - trace_fast) < 1e-12 * trace_fast


@pytest.mark.parametrize("name", list(NETS))
def test_trace_of_a_float32_model_is_computed_in_float32_and_matches_float64(name):
    model = _net(name).float()
    masks = _masks(model, 0.6)
    exact = pathkernel.trace(model, masks, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: nothing overflows here
        got = pathkernel.trace(model, masks)
    assert abs(got - exact) < 1e-5 * exact


def test_trace_falls_back_to_float64_when_float32_overflows():
    net = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(12)])
    net.input_shape = (8,)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e4)  # squared path sums reach 64**11 * 1e96: past float32, within float64
    before = copy.deepcopy(net.state_dict())
    with pytest.warns(RuntimeWarning, match="float64"):
        got = pathkernel.trace(net)
    assert got == pathkernel.trace(net, dtype=torch.float64)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
