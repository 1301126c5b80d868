"""The empirical NTK engine (ntkfast.ntk) against torch.func, the official tutorial's methods."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils does not import it)
from torch import nn
from torch.func import functional_call, jacrev, vmap

import ntkfast
from ntkfast import models
from ntkfast.ntk import empirical_ntk, ntk_spectrum, ntk_trace, per_sample_jacobian
from ntkfast.ntk import reference as R

from testing import devices, internal

_empirical = internal("ntk_empirical")
_terms = internal("ntk_terms")

MODES = ("full", "trace", "diagonal", "diagonal_trace")


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh random weights everywhere, BatchNorm statistics and affine parameters included
    (defaults of 0/1 would hide a wrong normalisation)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            if mod.weight is not None:
                mod.weight.data.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.data.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
    return model.eval()


def random_masks(model, density=0.3, seed=1, include_bias=False):
    g = torch.Generator().manual_seed(seed)
    params = ntkfast.prunable_parameters(model, include_bias=include_bias)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in params.items()}


def contract(j1, j2, mode):
    out = None
    for n in j1:
        a = j1[n].reshape(j1[n].shape[0], j1[n].shape[1], -1)
        b = j2[n].reshape(j2[n].shape[0], j2[n].shape[1], -1)
        if mode == "full":
            t = torch.einsum("iap,jbp->ijab", a, b)
        elif mode == "trace":
            t = torch.einsum("iap,jap->ij", a, b)
        elif mode == "diagonal":
            t = torch.einsum("iap,ibp->iab", a, b)
        else:
            t = torch.einsum("iap,iap->i", a, b)
        out = t if out is None else out + t
    return out


ZOO = {
    "lenet300_100": dict(),
    "lenet5": dict(),
    "conv4": dict(num_classes=4),  # fewer outputs keep the torch.func oracle affordable
    "vgg11": dict(num_classes=3),
    "resnet20": dict(num_classes=4),
}


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_float64_all_modes_against_torch_func(name, masked):
    torch.manual_seed(0)
    model = randomise(models.get(name, **ZOO[name]).double())
    masks = random_masks(model) if masked else None
    x1 = torch.randn(2, *model.input_shape, dtype=torch.float64)
    x2 = torch.randn(2, *model.input_shape, dtype=torch.float64)
    j1 = R.jacobian(model, x1, masks=masks)
    j2 = R.jacobian(model, x2, masks=masks)
    for mode in MODES:
        assert rel(empirical_ntk(model, x1, masks=masks, mode=mode), contract(j1, j1, mode)) < 1e-10, mode
        assert rel(empirical_ntk(model, x1, x2, masks=masks, mode=mode), contract(j1, j2, mode)) < 1e-10, mode
    # N1 != N2
    assert rel(empirical_ntk(model, x1, x2[:1], masks=masks), contract(j1, {n: j[:1] for n, j in j2.items()},
                                                                       "full")) < 1e-10


@pytest.mark.parametrize("name", ["lenet5", "small_bn_conv"])
def test_the_replicated_capture_against_torch_func(name, monkeypatch):
    _capture_way(monkeypatch, "replicate")
    torch.manual_seed(0)
    model = _small_bn_conv() if name == "small_bn_conv" else randomise(models.get(name, num_classes=3).double())
    masks = {n: m.double() for n, m in random_masks(model, density=0.5).items()}
    x1 = torch.randn(3, *model.input_shape, dtype=torch.float64)
    x2 = torch.randn(3, *model.input_shape, dtype=torch.float64)
    j1, j2 = R.jacobian(model, x1, masks=masks), R.jacobian(model, x2, masks=masks)
    for mode in MODES:
        assert rel(empirical_ntk(model, x1, x2, masks=masks, mode=mode), contract(j1, j2, mode)) < 1e-10, mode


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_float32_within_1e4(name):
    torch.manual_seed(0)
    model = randomise(models.get(name))
    masks = random_masks(model)
    x1 = torch.randn(4, *model.input_shape)
    x2 = torch.randn(3, *model.input_shape)
    ref64 = R.jacobian_contraction(copy.deepcopy(model).double(), x1.double(), x2.double(),
                                   masks=masks, mode="full")
    assert rel(empirical_ntk(model, x1, x2, masks=masks).double(), ref64) < 1e-4


def test_both_tutorial_methods_agree():
    torch.manual_seed(0)
    model = randomise(models.get("lenet5").double())
    masks = random_masks(model)
    x1 = torch.randn(2, *model.input_shape, dtype=torch.float64)
    x2 = torch.randn(3, *model.input_shape, dtype=torch.float64)
    for mode in MODES:
        a = R.ntk_vector_products(model, x1, x1 if mode.startswith("diagonal") else x2, masks=masks, mode=mode)
        b = empirical_ntk(model, x1, x1 if mode.startswith("diagonal") else x2, masks=masks, mode=mode)
        assert rel(b, a) < 1e-10


def test_per_sample_jacobian_matches_jacrev():
    torch.manual_seed(0)
    model = randomise(models.get("resnet20").double())
    masks = random_masks(model)
    x = torch.randn(2, *model.input_shape, dtype=torch.float64)
    ours = per_sample_jacobian(model, x, masks=masks)
    ref = R.jacobian(model, x, masks=masks)
    assert list(ours) == list(ref)
    for n in ref:
        assert ours[n].shape == ref[n].shape
        assert rel(ours[n], ref[n]) < 1e-10, n
        if n in masks:
            assert (ours[n][:, :, ~masks[n]] == 0).all()


def _grad_reference(model, x, masks, loss_of_ntk):
    values = {n: p.detach() for n, p in model.named_parameters()}

    def fnet(v, xi):
        eff = {n: t * masks[n] if n in masks else t for n, t in v.items()}
        return functional_call(model, eff, (xi.unsqueeze(0),)).reshape(-1)

    def loss(v):
        jac = vmap(jacrev(fnet), (None, 0))(v, x)
        return loss_of_ntk(contract(jac, jac, "full"))

    return torch.func.grad(loss)(values)


def _capture_way(monkeypatch, way):
    """Every way the capture can get the outputs' cotangents: its default, the batch repeated once
    per output (off by default, kept to be measured on a GPU), and vmap's batched backward also
    where the default loops (a recorded graph of a convolutional network)."""
    cap = internal("ntk_capture")
    if way == "replicate":
        monkeypatch.setattr(cap, "replicates", lambda model: True)
    elif way == "vmap":
        monkeypatch.setattr(cap, "_has_convolution", lambda model: False)


@pytest.mark.parametrize("way", ["default", "replicate", "vmap"])
@pytest.mark.parametrize("name", ["lenet300_100", "lenet5", "small_bn_conv"])
def test_double_backward_against_torch_func(name, way, monkeypatch):
    _capture_way(monkeypatch, way)
    torch.manual_seed(0)
    model = _small_bn_conv() if name == "small_bn_conv" else randomise(models.get(name).double())
    x = torch.randn(3, *model.input_shape, dtype=torch.float64)
    masks = {n: m.double() for n, m in random_masks(model, density=0.5).items()}

    def loss_of_ntk(theta):
        return (theta ** 2).sum() / theta.diagonal(dim1=0, dim2=1).sum()

    ref = _grad_reference(model, x, masks, loss_of_ntk)
    theta = empirical_ntk(model, x, masks=masks, create_graph=True)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss_of_ntk(theta), [p for _, p in model.named_parameters()], allow_unused=True)
    for n, g in zip(names, grads):
        if g is None:  # e.g. the output bias: its NTK block is constant
            assert ref[n].abs().max() == 0, n
        else:
            assert rel(g, ref[n]) < 1e-9, n


def test_detached_without_create_graph():
    model = models.get("lenet300_100")
    x = torch.randn(2, *model.input_shape)
    assert not empirical_ntk(model, x).requires_grad


def _small_bn_conv():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    model.input_shape = (2, 8, 8)
    return randomise(model.double())


@pytest.mark.parametrize("name", ["lenet5", "small_bn_conv"])
def test_spectrum_against_eigvalsh(name):
    torch.manual_seed(0)
    model = _small_bn_conv() if name == "small_bn_conv" else randomise(models.get(name).double())
    masks = random_masks(model)
    x = torch.randn(3, *model.input_shape, dtype=torch.float64)
    full = R.jacobian_contraction(model, x, masks=masks)
    n = full.shape[0] * full.shape[2]
    ev = torch.linalg.eigvalsh(full.permute(0, 2, 1, 3).reshape(n, n)).flip(0)
    dense = ntk_spectrum(model, x, masks=masks)
    assert dense.method == "dense"
    assert rel(dense.eigenvalues, ev) < 1e-10
    assert abs(dense.condition_number - (ev[0] / ev[-1]).item()) < 1e-6 * dense.condition_number
    top = ntk_spectrum(model, x, masks=masks, k=4, method="lanczos")
    assert top.method == "lanczos"
    assert rel(top.eigenvalues, ev[:4]) < 1e-8
    assert ntk_spectrum(model, x, masks=masks, k=4, memory_budget=1000).method == "lanczos"


def test_trace_methods():
    torch.manual_seed(0)
    model = randomise(models.get("lenet5").double())
    masks = random_masks(model)
    x = torch.randn(4, *model.input_shape, dtype=torch.float64)
    exact_ref = R.jacobian_contraction(model, x, masks=masks, mode="diagonal_trace").sum()
    exact = ntk_trace(model, x, masks=masks)
    assert rel(exact, exact_ref) < 1e-10
    h = ntk_trace(model, x, masks=masks, method="hutchinson", n_probes=256, seed=1)
    fd = ntk_trace(model, x, masks=masks, method="finite_difference", n_probes=256, seed=1, epsilon=1e-4)
    assert abs(h / exact - 1) < 0.2
    assert abs(fd / exact - 1) < 0.2
    assert ntk_trace(model, x, masks=masks, method="hutchinson", n_probes=8, seed=3) == \
        ntk_trace(model, x, masks=masks, method="hutchinson", n_probes=8, seed=3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("given", [False, True], ids=["x2=None", "x2"])
def test_chunked_assembly_gives_the_same_kernel(mode, given, monkeypatch):
    torch.manual_seed(0)
    model = randomise(models.get("lenet5", num_classes=5).double())
    masks = random_masks(model)
    x1 = torch.randn(5, *model.input_shape, dtype=torch.float64)
    x2 = torch.randn(5 if mode.startswith("diagonal") else 3, *model.input_shape, dtype=torch.float64) if given else None
    whole = empirical_ntk(model, x1, x2, masks=masks, mode=mode)
    for chunks in ((2, 5), (3, 2), (5, 3)):
        monkeypatch.setattr(_empirical, "_plan_chunks", lambda *a, chunks=chunks: chunks)
        assert rel(empirical_ntk(model, x1, x2, masks=masks, mode=mode), whole) < 1e-12, chunks


def test_memory_budget_is_respected_by_chunking(monkeypatch):
    seen = []
    real = _empirical._plan_chunks

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(_empirical, "_plan_chunks", spy)
    model = randomise(models.get("lenet300_100").double())
    x = torch.randn(16, *model.input_shape, dtype=torch.float64)
    whole = empirical_ntk(model, x, mode="trace", memory_budget=1 << 40)
    small = empirical_ntk(model, x, mode="trace", memory_budget=200_000)
    assert seen[0] == (16, 10) and seen[1][0] < 16
    assert rel(small, whole) < 1e-12


class _Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return torch.tanh(x * self.gain)


class _TwoInputs(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.mix = nn.Parameter(torch.rand(n))

    def forward(self, x, y):
        return self.lin(x) + self.mix * y


class _Zoo(nn.Module):
    """Layers the structural rules must handle or hand over to torch.func."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(4, 6, 3, padding="same", dilation=2, bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, stride=2, groups=2)
        self.bn1 = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(6)
        self.gn = nn.GroupNorm(2, 6)
        self.seq = nn.Linear(6, 5)  # applied at several positions
        self.scale = _Scale(5)
        self.two = _TwoInputs(5)
        self.shared = nn.Linear(5, 5)
        self.tied = nn.Linear(5, 5)
        self.tied.weight = self.shared.weight
        self.head = nn.Linear(5, 3)
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):  # x: [N, 2, 16]
        h = torch.relu(self.bn1(self.c1(x)))  # [N, 4, 16]
        h = h.view(h.shape[0], 4, 4, 4)
        h = torch.relu(self.gn(self.c2(h)))
        h = self.c3(h)  # [N, 6, 1, 1]
        h = self.ln(h.flatten(1))
        h = self.seq(torch.stack([h, h * 0.5, -h], 1)).mean(1)  # Linear on [N, 3, 6]
        h = self.scale(h)
        h = self.two(h, h)
        h = torch.relu(self.shared(h))
        h = self.shared(h) * self.alpha  # the same module twice, and a parameter of the root
        h = self.tied(h)
        return self.head(h)


def _zoo_model():
    torch.manual_seed(0)
    return randomise(_Zoo().double())


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_general_layers_against_torch_func(masked):
    model = _zoo_model()
    x1 = torch.randn(3, 2, 16, dtype=torch.float64)
    x2 = torch.randn(2, 2, 16, dtype=torch.float64)
    masks = random_masks(model, density=0.6, include_bias=True) if masked else None
    j1, j2 = R.jacobian(model, x1, masks=masks), R.jacobian(model, x2, masks=masks)
    for mode in ("full", "trace"):
        assert rel(empirical_ntk(model, x1, x2, masks=masks, mode=mode), contract(j1, j2, mode)) < 1e-10
    for mode in ("diagonal", "diagonal_trace"):
        assert rel(empirical_ntk(model, x1, masks=masks, mode=mode), contract(j1, j1, mode)) < 1e-10
    _, report = empirical_ntk(model, x1, masks=masks, explain=True)
    assert set(report) == {n for n, _ in model.named_parameters()}
    assert "torch.func per-sample vjp" in report["scale.gain"]
    assert "whole model" in report["shared.weight"]  # tied with tied.weight
    assert "whole model" in report["two.mix"]  # _TwoInputs is not tensor -> tensor
    assert "structure: dense layer" in report["two.lin.weight"]
    assert "structure: convolution" in report["c3.weight"]
    assert "path:" in report["c2.weight"]


def test_params_subset_and_values():
    model = randomise(models.get("lenet300_100").double())
    x = torch.randn(3, *model.input_shape, dtype=torch.float64)
    names = ["fc2.weight", "fc3.bias"] if "fc2.weight" in dict(model.named_parameters()) else None
    if names is None:
        names = [n for n, _ in model.named_parameters()][2:4]
    ref = R.jacobian_contraction(model, x, params=names)
    assert rel(empirical_ntk(model, x, params=names), ref) < 1e-10
    values = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in names}
    ref = R.jacobian_contraction(model, x, params=values)
    assert rel(empirical_ntk(model, x, params=values), ref) < 1e-10


@pytest.mark.parametrize("path", ["position Grams", "per-sample gradient"])
def test_both_convolution_paths(path, monkeypatch):
    monkeypatch.setattr(_terms, "choose", lambda t1, t2, mode: path)
    model = randomise(models.get("conv4").double())
    x1 = torch.randn(2, *model.input_shape, dtype=torch.float64)
    x2 = torch.randn(2, *model.input_shape, dtype=torch.float64)
    j1, j2 = R.jacobian(model, x1), R.jacobian(model, x2)
    for mode in MODES:
        assert rel(empirical_ntk(model, x1, x2, mode=mode), contract(j1, j2, mode)) < 1e-10, mode


def test_prune_hooks_and_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    plain = copy.deepcopy(model)
    torch.nn.utils.prune.random_unstructured(model[3], "weight", amount=0.5)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    masks = {"3.weight": model[3].weight_mask.bool()}
    ref = R.jacobian_contraction(plain, x, masks=masks)
    assert rel(empirical_ntk(model, x), ref) < 1e-10


def test_refuses_train_mode_batchnorm_and_dropout():
    model = models.get("resnet20").train()
    x = torch.randn(2, *model.input_shape)
    with pytest.raises(ValueError, match="BatchNorm .* training mode"):
        empirical_ntk(model, x)
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match="dropout"):
        empirical_ntk(drop, torch.randn(2, 4))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats"):
        empirical_ntk(bn, torch.randn(2, 4))


def test_bad_arguments_are_named_and_model_untouched():
    model = randomise(models.get("lenet5"))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, *model.input_shape)
    cases = [
        (dict(mode="nope"), "mode"),
        (dict(x2=torch.randn(2, 3)), "x2"),
        (dict(memory_budget=-1), "memory_budget"),
        (dict(masks={"nope.weight": torch.ones(1)}), "masks"),
        (dict(masks={"features.0.weight": torch.ones(2)}), "masks"),
        (dict(params=["nope"]), "params"),
    ]
    for kwargs, word in cases:
        x2 = kwargs.pop("x2", None)
        with pytest.raises((ValueError, TypeError), match=word):
            empirical_ntk(model, x, x2, **kwargs)
    with pytest.raises(ValueError, match="x1"):
        empirical_ntk(model, torch.randn(0, *model.input_shape))
    with pytest.raises(ValueError, match="method"):
        ntk_trace(model, x, method="nope")
    with pytest.raises(ValueError, match="k"):
        ntk_spectrum(model, x, k=0)
    empirical_ntk(model, x, masks=random_masks(model), create_graph=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert not model.training


@pytest.mark.parametrize("device", devices)
def test_devices(device):
    torch.manual_seed(0)
    model = randomise(models.get("lenet5").double()).to(device)
    masks = {n: m.to(device) for n, m in random_masks(model).items()}
    x = torch.randn(3, *model.input_shape, dtype=torch.float64, device=device)
    ref = R.jacobian_contraction(model, x, masks=masks)
    for mode in MODES:
        out = empirical_ntk(model, x, masks=masks, mode=mode)
        assert out.device.type == device
        assert rel(out if mode == "full" else out, R._finish(ref, mode)) < 1e-10


class _SparseNet(nn.Module):
    """Layers whose masked per-sample gradients take the gathered kept-entries path: strided,
    padded and dilated 2-d convolutions, a 1-d convolution, and Linear on sequences."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 6, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(6, 4, (3, 2), padding=(1, 0))
        self.seq = nn.Linear(4, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):  # [N, 2, 16]
        h = torch.tanh(self.c1(x)).view(x.shape[0], 5, 4, 4)
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h))  # [N, 4, H, W]
        h = torch.tanh(self.seq(h.flatten(2).transpose(1, 2))).mean(1)
        return self.head(h)


def _sparse_masks(model, density, seed):
    """Random sparse masks with uneven kept counts per output channel: one channel keeps
    nothing and one keeps everything."""
    masks = random_masks(model, density=density, seed=seed)
    for m in masks.values():
        if m.shape[0] > 2:
            m[0] = False
            m[1] = True
            if m.float().mean() >= _terms._GATHER_BELOW:
                m[1, 1:] = False
    return masks


@pytest.mark.parametrize("density", [0.05, 0.2])
def test_sparse_masks_gather_kept_entries_only(density, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the full per-sample gradient was formed")

    monkeypatch.setattr(_terms.PositionsTerm, "dense", refuse)  # the gathered path must not need it
    torch.manual_seed(0)
    model = _SparseNet().double().eval()
    masks = _sparse_masks(model, density, seed=2)
    assert all(0 < m.float().mean() < _terms._GATHER_BELOW for m in masks.values())
    x1 = torch.randn(3, 2, 16, dtype=torch.float64)
    x2 = torch.randn(4, 2, 16, dtype=torch.float64)
    j1, j2 = R.jacobian(model, x1, masks=masks), R.jacobian(model, x2, masks=masks)
    for mode in ("full", "trace"):
        assert rel(empirical_ntk(model, x1, x2, masks=masks, mode=mode), contract(j1, j2, mode)) < 1e-10, mode
    for mode in ("diagonal", "diagonal_trace"):
        assert rel(empirical_ntk(model, x1, masks=masks, mode=mode), contract(j1, j1, mode)) < 1e-10, mode
    ours = per_sample_jacobian(model, x1, masks=masks)
    for n, j in j1.items():
        assert rel(ours[n], j) < 1e-10, n

    # differentiated through, as Neural Tangent Transfer does
    fmasks = {n: m.double() for n, m in masks.items()}

    def loss_of_ntk(theta):
        return (theta ** 2).sum() / theta.diagonal(dim1=0, dim2=1).sum()

    ref = _grad_reference(model, x2, fmasks, loss_of_ntk)
    theta = empirical_ntk(model, x2, masks=fmasks, create_graph=True)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_of_ntk(theta), list(params.values()), allow_unused=True)
    for (n, _), g in zip(params.items(), grads):
        if g is None:
            assert ref[n].abs().max() == 0, n
        else:
            assert rel(g, ref[n]) < 1e-9, n


class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_recurrent_models_match_the_brute_force_kernel(cell):
    # their fused kernels have no batching rule over samples (vmap failed with a raw "workspace"
    # error); the NTK falls back to one sample at a time and must give the same numbers
    torch.manual_seed(0)
    model = _Recurrent(cell).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule" performance warnings
        K = empirical_ntk(model, x)
    params = list(model.parameters())
    rows = []
    for i in range(3):
        for k in range(2):
            g = torch.autograd.grad(model(x[i:i + 1])[0, k], params)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    J = torch.stack(rows)
    expected = (J @ J.T).reshape(3, 2, 3, 2).permute(0, 2, 1, 3)
    torch.testing.assert_close(K, expected, rtol=1e-10, atol=1e-12)


class _LearnedQuery(nn.Module):
    """A layer called on a batch-1 constant (a buffer query) broadcast over the samples, and a
    dense layer applied to the samples' positions flattened into rows: neither call has the
    samples as its rows."""

    def __init__(self):
        super().__init__()
        self.fc_q, self.fc_x, self.mix, self.out = nn.Linear(5, 6), nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(18, 3)
        self.register_buffer("q", torch.randn(1, 5))
        self.learned = nn.Parameter(torch.randn(1, 5))

    def forward(self, x):  # x: [n, 3, 4]
        n = x.shape[0]
        h = torch.tanh(self.fc_x(x) * self.fc_q(self.q) + self.fc_q(self.learned))
        return self.out(torch.tanh(self.mix(h.reshape(n * 3, 6))).reshape(n, 18))


@pytest.mark.parametrize("n", [1, 5])
def test_calls_whose_rows_are_not_the_samples_go_through_the_whole_model(n):
    torch.manual_seed(0)
    model = randomise(_LearnedQuery().double())
    x1, x2 = torch.randn(n, 3, 4, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64)
    j1, j2 = R.jacobian(model, x1), R.jacobian(model, x2)
    for mode in ("full", "trace"):
        assert rel(empirical_ntk(model, x1, x2, mode=mode), contract(j1, j2, mode)) < 1e-10
    for mode in ("diagonal", "diagonal_trace"):
        assert rel(empirical_ntk(model, x1, mode=mode), contract(j1, j1, mode)) < 1e-10
    _, report = empirical_ntk(model, x1, explain=True)
    if n > 1:
        assert "samples as rows" in report["fc_q.weight"] and "samples as rows" in report["mix.weight"]
    assert "structure: dense layer" in report["fc_x.weight"]


class _Attention(nn.Module):
    """Weights read outside their module's calls: nn.MultiheadAttention reads out_proj.weight inside
    F.multi_head_attention_forward without calling out_proj; ``side`` is never called, its weight
    is used by the parent; ``out`` is called and its weight read by the parent as well."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.side = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [n, 5, 4]
        h = torch.tanh(self.inp(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = torch.nn.functional.linear(h, self.side.weight)  # side's weight, not side's call
        h = torch.tanh(self.out(h)) + h.mean(-1, keepdim=True) * self.out.weight.sum()
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_weights_read_without_their_module_being_called(masked):
    torch.manual_seed(0)
    model = randomise(_Attention().double()).eval()
    masks = None
    if masked:
        g = torch.Generator().manual_seed(2)
        masks = {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in model.named_parameters() if p.dim() == 2}
    x1, x2 = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    j1, j2 = R.jacobian(model, x1, masks=masks), R.jacobian(model, x2, masks=masks)
    assert j1["attn.out_proj.weight"].abs().sum() > 0 and j1["side.weight"].abs().sum() > 0
    for mode in ("full", "trace"):
        assert rel(empirical_ntk(model, x1, x2, mode=mode, masks=masks), contract(j1, j2, mode)) < 1e-10
    _, report = empirical_ntk(model, x1, explain=True)
    for name in ("attn.out_proj.weight", "side.weight", "out.weight"):
        assert "read outside its own calls" in report[name], name
    assert "structure: dense layer" in report["head.weight"] and "structure: dense layer" in report["inp.weight"]


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)  # never called, never read

    def forward(self, x):
        x = x.to(self.fc.weight.dtype).reshape(-1, self.fc.weight.shape[1])  # metadata, not values
        return self.fc(x)


def test_a_module_never_called_nor_read_contributes_nothing_and_metadata_is_no_read():
    torch.manual_seed(0)
    model = _Unused().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    j = R.jacobian(model, x)
    assert rel(empirical_ntk(model, x), contract(j, j, "full")) < 1e-12
    _, report = empirical_ntk(model, x, explain=True)
    assert "whole model" not in report["spare.weight"]  # not differentiated through the model for nothing
    assert "structure: dense layer" in report["fc.weight"]  # its dtype and shape were read, not its values


def test_prune_hooks_on_a_layer_read_by_its_parent():
    """torch.nn.utils.prune recomputes weight from weight_orig in the layer's own pre-hook: read after
    the call (the recomputed tensor) it is a read outside the layer; read by a parent that never
    calls the layer (MultiheadAttention's out_proj) it is last forward's tensor, refused by name."""
    import torch.nn.utils.prune as tprune

    torch.manual_seed(0)
    model = randomise(_Attention().double()).eval()
    g = torch.Generator().manual_seed(5)
    tprune.custom_from_mask(model.out, "weight", torch.rand(8, 8, generator=g) < 0.6)
    x1 = torch.randn(3, 5, 4, dtype=torch.float64)
    j1 = R.jacobian(model, x1)
    assert rel(empirical_ntk(model, x1, mode="trace"), contract(j1, j1, "trace")) < 1e-10
    _, report = empirical_ntk(model, x1, explain=True)
    assert "read outside its own calls" in report["out.weight_orig"]
    tprune.custom_from_mask(model.attn.out_proj, "weight", torch.rand(8, 8, generator=g) < 0.6)
    with pytest.raises(ValueError, match=r"^model: module 'attn.out_proj' is re-parametrised by torch.nn.utils.prune"):
        empirical_ntk(model, x1)


@pytest.mark.parametrize("same", [True, False])
def test_diagonal_trace_pair_is_the_per_sample_dot_product(same):
    # the contraction reads each gradient once (a norm when a term meets itself, a batched dot
    # otherwise); checked against the elementwise product it replaced, in float64
    from ntkfast.ntk._terms import _dense_pair

    gen = torch.Generator().manual_seed(3)
    for n, kk, P in ((1, 1, 5), (4, 3, 17), (7, 10, 96)):
        g1 = torch.randn(n, kk, P, generator=gen, dtype=torch.float64)
        g2 = g1 if same else torch.randn(n, kk, P, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(_dense_pair(g1, g2, "diagonal_trace"), (g1 * g2).sum((1, 2)), rtol=1e-12, atol=0)


def test_batchnorm_terms_match_autograd_per_sample_gradients():
    # eval-mode BatchNorm's scale and shift terms against torch.func per-sample gradients, float64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
    model.eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    bn = {k: v for k, v in params.items() if k.startswith("1.")}

    def f(p, xi):
        return functional_call(model, {**params, **p}, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(bn, x)  # name -> [n, K, C]
    expected = sum(torch.einsum("nkc,nkc->n", j, j) for j in jac.values())
    got = empirical_ntk(model, x, mode="diagonal_trace", params=list(bn))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
