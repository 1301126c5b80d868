"""The baseline scorers (random, magnitude, snip, iterative_snip, grasp, synflow), each held to an
independent computation on tiny networks: brute-force path enumeration, the authors' way of doing
it on real modules (masked layers whose mask is a buffer, |state_dict| copies, .backward()), and
explicit Hessians. Also: the model is never changed, torch.nn.utils.prune hooks and masked-layer
subclasses, float64, the float64 fallback on overflow, and argument errors."""
import copy
import itertools
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkfast
from ntkfast import scores
from ntkfast.masks import Masks, prunable_parameters
from ntkfast.core.batches import as_batches, resolve_input_shape

NAMES = ["random", "magnitude", "snip", "iterative_snip", "grasp", "synflow"]
DATA_BASED = {"snip", "iterative_snip", "grasp"}


# -- authors'-style masked layers: forward computes weight_mask * weight --------------------------
class MLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("weight_mask", torch.ones(self.weight.shape))

    def forward(self, x):
        return F.linear(x, self.weight_mask * self.weight, self.bias)


class MConv2d(nn.Conv2d):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("weight_mask", torch.ones(self.weight.shape))

    def forward(self, x):
        return self._conv_forward(x, self.weight_mask * self.weight, self.bias)


# -- tiny networks ---------------------------------------------------------------------------------
def mlp(sizes=(4, 5, 3, 2), bias=True, act=nn.ReLU, lin=nn.Linear):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(lin(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


IN_CNN = (3, 6, 6)


def cnn(conv=nn.Conv2d, lin=nn.Linear):
    return nn.Sequential(
        conv(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        conv(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(3),
        nn.Flatten(),
        lin(5, 3),
    )


def perturb_bn(model, gen):
    """Running statistics, affine parameters and counters away from their defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.num_batches_tracked.fill_(7)
    return model


def random_masks(model, density=0.6, gen=None):
    return Masks(
        OrderedDict(
            (n, torch.rand(p.shape, generator=gen) < density) for n, p in prunable_parameters(model).items()
        )
    )


def batches(in_shape, n_batches=2, bs=6, classes=3, gen=None, dtype=torch.float64):
    return [
        (torch.randn((bs,) + tuple(in_shape), generator=gen, dtype=dtype), torch.randint(0, classes, (bs,), generator=gen))
        for _ in range(n_batches)
    ]


def authors_copy(plain, masks, builder):
    """The same network built from authors'-style masked layers, weight_mask = masks."""
    am = builder()
    am.load_state_dict(plain.state_dict(), strict=False)
    am = am.to(next(plain.parameters()).dtype)
    with torch.no_grad():
        for name, m in masks.items():
            am.get_submodule(name.rpartition(".")[0]).weight_mask.copy_(m.to(torch.float64))
    return am


def assert_scores_close(a, b, rtol=1e-9, atol=1e-12):
    assert list(a.keys()) == list(b.keys())
    for n in a:
        assert a[n].shape == b[n].shape, n
        torch.testing.assert_close(a[n].to(torch.float64), b[n].to(torch.float64), rtol=rtol, atol=atol, msg=n)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


CASES = {
    "mlp": (lambda lin=nn.Linear: mlp((4, 6, 5, 3), bias=True, lin=lin), (4,)),
    "cnn": (lambda lin=nn.Linear: cnn(MConv2d if lin is MLinear else nn.Conv2d, lin), IN_CNN),
}


def build_case(case, gen):
    builder, in_shape = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = perturb_bn(builder().double(), gen)
    masks = random_masks(model, 0.6, gen)
    return builder, in_shape, model, masks


# -- registry ------------------------------------------------------------------------------------------
def test_registry():
    for name in NAMES:
        info = scores.get(name)
        assert info.fn is getattr(scores, name)
        assert info.description and "\n" not in info.description
        assert info.needs_data == (name in DATA_BASED)
        assert callable(getattr(ntkfast.scores, name))


# -- random, magnitude -------------------------------------------------------------------------------
def test_random_seed_reproducible_and_normal():
    model = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10))
    a = scores.random(model, seed=3)
    b = scores.random(model, seed=3)
    c = scores.random(model, seed=4)
    for n in a:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert a[n].dtype == torch.float32 and a[n].shape == model.get_parameter(n).shape
    flat = torch.cat([v.flatten() for v in a.values()])
    assert abs(float(flat.mean())) < 0.03 and abs(float(flat.std()) - 1.0) < 0.03
    assert scores.random(model, seed=3, dtype=torch.float64)["0.weight"].dtype == torch.float64


def test_magnitude(gen):
    model = mlp((4, 5, 3), bias=True)
    masks = random_masks(model, 0.5, gen)
    s = scores.magnitude(model, masks)
    assert list(s) == ["0.weight", "2.weight"]
    for n, v in s.items():
        assert torch.equal(v, model.get_parameter(n).detach().abs())  # masked entries included
        assert v.data_ptr() != model.get_parameter(n).data_ptr()


# -- synflow -----------------------------------------------------------------------------------------------
def test_synflow_brute_force_paths(gen):
    torch.manual_seed(0)
    model = mlp((4, 5, 3, 2), bias=False).double()
    masks = random_masks(model, 0.7, gen)
    s = scores.synflow(model, masks, input_shape=(4,))
    W = [(model[i].weight.detach() * masks[f"{i}.weight"]).abs() for i in (0, 2, 4)]
    expect = [torch.zeros_like(w) for w in W]
    for i, j, k, l in itertools.product(range(4), range(5), range(3), range(2)):
        pi = W[0][j, i] * W[1][k, j] * W[2][l, k]
        expect[0][j, i] += pi
        expect[1][k, j] += pi
        expect[2][l, k] += pi
    assert_scores_close(s, OrderedDict(zip(["0.weight", "2.weight", "4.weight"], expect)))
    for n, m in masks.items():
        assert bool((s[n][~m] == 0).all())


def synflow_by_abs_copy(am, in_shape, abs_buffers=True):
    """The authors' way: |.| of the whole state dict of a copy, eval mode, ones in, sum out."""
    net = copy.deepcopy(am)
    net.eval()
    params = {id(p) for p in net.parameters()}
    with torch.no_grad():
        for t in net.state_dict(keep_vars=True).values():
            if abs_buffers or id(t) in params:
                t.abs_()
    out = net(torch.ones((1,) + tuple(in_shape), dtype=torch.float64))
    out.sum().backward()
    return OrderedDict(
        (n, (net.get_submodule(n.rpartition(".")[0]).weight.grad * net.get_parameter(n)).abs())
        for n in prunable_parameters(net)
    )


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_synflow_matches_abs_copy(case, gen):
    builder, in_shape, model, masks = build_case(case, gen)
    model.train()
    am = authors_copy(model, masks, lambda: builder(MLinear))
    expect = synflow_by_abs_copy(am, in_shape)
    assert_scores_close(scores.synflow(model, masks, input_shape=in_shape), expect)
    assert_scores_close(scores.synflow(am, input_shape=in_shape), expect)  # masks from the buffers
    if case == "cnn":  # the BN buffers' |.| matters, and the test sees it
        other = synflow_by_abs_copy(am, in_shape, abs_buffers=False)
        assert any(not torch.allclose(expect[n], other[n]) for n in expect)


# -- snip, iterative snip ---------------------------------------------------------------------------------
def snip_by_mask_leaves(am, data, train_mode=False, iterative=False):
    """The authors' SNIP / IterSNIP: masks are leaves with requires_grad, losses .backward()."""
    net = copy.deepcopy(am)
    net.train(train_mode)
    targets = prunable_parameters(net)
    for n in targets:
        net.get_submodule(n.rpartition(".")[0]).weight_mask.requires_grad_(True)
    for x, y in data:
        F.cross_entropy(net(x), y).backward()
    out = OrderedDict()
    for n, p in targets.items():
        m = net.get_submodule(n.rpartition(".")[0]).weight_mask
        out[n] = (p.grad * p).abs() if iterative else m.grad.abs()
    total = sum(v.sum() for v in out.values())
    return OrderedDict((n, v / total) for n, v in out.items())


@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_snip_matches_mask_leaves(case, train_mode, gen):
    builder, in_shape, model, masks = build_case(case, gen)
    data = batches(in_shape, 2, gen=gen)
    am = authors_copy(model, masks, lambda: builder(MLinear))
    expect = snip_by_mask_leaves(am, data, train_mode)
    got = scores.snip(model, masks, data=data, train_mode=train_mode)
    assert_scores_close(got, expect)
    assert abs(float(sum(v.sum() for v in got.values())) - 1.0) < 1e-12
    assert_scores_close(scores.snip(am, data=data, train_mode=train_mode), expect)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_iterative_snip_formula(case, gen):
    builder, in_shape, model, masks = build_case(case, gen)
    data = batches(in_shape, 2, gen=gen)
    am = authors_copy(model, masks, lambda: builder(MLinear))
    expect = snip_by_mask_leaves(am, data, train_mode=True, iterative=True)  # the default, bn="train"
    assert_scores_close(scores.iterative_snip(model, masks, data=data), expect)
    expect = snip_by_mask_leaves(am, data, iterative=True)
    got = scores.iterative_snip(model, masks, data=data, bn="eval")
    assert_scores_close(got, expect)
    # direct formula on the plain model: |theta * m * dL/dW| at W = theta * m, normalised
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        masks.apply(net)
    for x, y in data:
        F.cross_entropy(net(x), y).backward()
    raw = {n: (model.get_parameter(n).detach() * masks[n] * net.get_parameter(n).grad).abs() for n in masks}
    total = sum(v.sum() for v in raw.values())
    assert_scores_close(got, OrderedDict((n, v / total) for n, v in raw.items()))
    for n, m in masks.items():
        assert bool((got[n][~m] == 0).all())


# -- grasp --------------------------------------------------------------------------------------------------
def test_grasp_explicit_hessian(gen):
    torch.manual_seed(5)
    model = mlp((3, 4, 3), bias=True, act=nn.Tanh).double()
    masks = random_masks(model, 0.7, gen)
    data = batches((3,), 3, bs=5, gen=gen)
    names = ["0.weight", "2.weight"]
    shapes = [model.get_parameter(n).shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    v0 = torch.cat([model.get_parameter(n).detach().flatten() for n in names])
    m = torch.cat([masks[n].flatten().double() for n in names])
    b1, b2 = model[0].bias.detach(), model[2].bias.detach()

    def total_loss(v):
        w1, w2 = [t.reshape(s) for t, s in zip((v * m).split(sizes), shapes)]
        return sum(F.cross_entropy((torch.tanh(x @ w1.T + b1) @ w2.T + b2) / 200.0, y) for x, y in data)

    v = v0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(total_loss(v), v)
    H = torch.autograd.functional.hessian(total_loss, v0)
    hg = H @ g
    S = v0 * hg
    S = S / (S.sum().abs() + 1e-10)
    expect = OrderedDict((n, t.reshape(s)) for n, t, s in zip(names, S.split(sizes), shapes))
    got = scores.grasp(model, masks, data=data)
    assert_scores_close(got, expect, rtol=1e-7, atol=1e-14)
    assert any(bool((v < 0).any()) for v in got.values())  # signed scores, no abs
    for n, mk in masks.items():
        assert bool((got[n][~mk] == 0).all())


def grasp_authors(am, data, temp=200.0, eps=1e-10, train_mode=False):
    """The authors' GraSP on masked layers: autograd.grad twice, then .backward() of g . grad (their
    code leaves the network in train mode)."""
    net = copy.deepcopy(am).train(train_mode)
    ps = list(prunable_parameters(net).values())
    stopped = 0
    for x, y in data:
        gs = torch.autograd.grad(F.cross_entropy(net(x) / temp, y), ps)
        stopped = stopped + torch.cat([g.reshape(-1) for g in gs])
    for x, y in data:
        gs = torch.autograd.grad(F.cross_entropy(net(x) / temp, y), ps, create_graph=True)
        (stopped * torch.cat([g.reshape(-1) for g in gs])).sum().backward()
    out = OrderedDict((n, p.grad * p.detach()) for n, p in prunable_parameters(net).items())
    norm = sum(v.sum() for v in out.values()).abs() + eps
    return OrderedDict((n, v / norm) for n, v in out.items())


def test_grasp_matches_authors_on_cnn(gen):
    builder, in_shape, model, masks = build_case("cnn", gen)
    data = batches(in_shape, 2, gen=gen)
    am = authors_copy(model, masks, lambda: builder(MLinear))
    expect = grasp_authors(am, data)
    assert_scores_close(scores.grasp(model, masks, data=data, bn="eval"), expect, rtol=1e-7, atol=1e-13)
    assert_scores_close(scores.grasp(am, data=data, bn="eval"), expect, rtol=1e-7, atol=1e-13)
    # the default, train mode, as the authors' code runs it
    expect = grasp_authors(am, data, train_mode=True)
    assert_scores_close(scores.grasp(model, masks, data=data), expect, rtol=1e-7, atol=1e-13)


# -- the model is never changed -----------------------------------------------------------------------------
def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: (None if p.grad is None else (p.grad, p.grad.clone())) for n, p in model.named_parameters()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "attrs": [{k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)} for m in model.modules()],
        "ids": {n: id(p) for n, p in model.named_parameters()},
    }


def assert_unchanged(model, snap):
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert state[k].dtype == v.dtype and torch.equal(state[k].detach(), v), k
    for n, p in model.named_parameters():
        g = snap["grads"][n]
        if g is None:
            assert p.grad is None, n
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1]), n
        assert p.requires_grad == snap["req"][n], n
        assert id(p) == snap["ids"][n]
    assert [m.training for m in model.modules()] == snap["training"]
    for m, attrs in zip(model.modules(), snap["attrs"]):
        now = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        assert now.keys() == attrs.keys() and all(now[k] is attrs[k] for k in now)


def call(name, model, masks, data, in_shape, **kw):
    kw.setdefault("input_shape", in_shape)
    return getattr(scores, name)(model, masks, data=data if name in DATA_BASED else None, **kw)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_unchanged(name, train_mode, gen):
    _, in_shape, model, masks = build_case("cnn", gen)
    model.float()
    model.train()
    model[1].eval()  # mixed flags must come back as they were
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.randn(model[3].weight.shape, generator=gen)
    data = batches(in_shape, 2, gen=gen, dtype=torch.float32)
    snap = snapshot(model)
    s = call(name, model, masks, data, in_shape, train_mode=train_mode)
    assert list(s) == list(masks)
    assert_unchanged(model, snap)
    # and a model with torch.nn.utils.prune hooks (its `weight` attribute is recomputed by a hook)
    hooked = masks.to_prune_hooks(copy.deepcopy(model))
    snap = snapshot(hooked)
    call(name, hooked, None, data, in_shape, train_mode=train_mode)
    assert_unchanged(hooked, snap)


def test_scoring_inside_no_grad(gen):
    _, in_shape, model, masks = build_case("mlp", gen)
    data = batches(in_shape, 1, gen=gen)
    with torch.no_grad():
        for name in NAMES:
            s = call(name, model, masks, data, in_shape)
            assert all(bool(torch.isfinite(v).all()) for v in s.values())


# -- prune hooks and masked-layer subclasses give the same scores as the plain model ---------------------------
@pytest.mark.parametrize("name", NAMES)
def test_prune_hooks_and_masked_layers(name, gen):
    builder, in_shape, model, masks = build_case("cnn", gen)
    data = batches(in_shape, 2, gen=gen)
    expect = call(name, model, masks, data, in_shape)

    hooked = masks.to_prune_hooks(copy.deepcopy(model))
    assert "0.weight_orig" in dict(hooked.named_parameters())
    assert list(Masks.from_model(hooked)) == list(masks)
    assert_scores_close(call(name, hooked, Masks.from_model(hooked), data, in_shape), expect)
    assert_scores_close(call(name, hooked, None, data, in_shape), expect)  # the hooks' masks apply

    am = authors_copy(model, masks, lambda: builder(MLinear))
    assert_scores_close(call(name, am, masks, data, in_shape), expect)
    assert_scores_close(call(name, am, None, data, in_shape), expect)


# -- dtypes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_float64_on_request(name, gen):
    _, in_shape, model64, masks = build_case("cnn", gen)
    data = batches(in_shape, 2, gen=gen)
    expect = call(name, model64, masks, data, in_shape)
    model32 = copy.deepcopy(model64).float()
    data32 = [(x.float(), y) for x, y in data]
    # float64 on request: the float32 model's values, computed in double
    ref = call(name, copy.deepcopy(model32).double(), masks, data32, in_shape)
    got = call(name, model32, masks, data32, in_shape, dtype=torch.float64)
    for n in got:
        assert got[n].dtype == torch.float64
    assert_scores_close(got, ref)
    got32 = call(name, model32, masks, data32, in_shape)
    if name != "random":
        assert all(v.dtype == torch.float32 for v in got32.values())
        assert_scores_close(got32, expect, rtol=1e-3, atol=1e-5)


def deep_mlp(depth=60, width=64, scale=3.0):
    torch.manual_seed(11)
    model = mlp((width,) * depth + (10,), bias=False)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, math.sqrt(scale / m.in_features))
    return model


def test_synflow_overflow_falls_back_to_float64():
    model = deep_mlp()
    with pytest.warns(RuntimeWarning, match="float64") as rec:
        s = scores.synflow(model, input_shape=(64,))
    assert sum("overflow" in str(w.message) for w in rec) == 1  # warned once
    assert all(v.dtype == torch.float64 and bool(torch.isfinite(v).all()) for v in s.values())
    assert max(float(v.max()) for v in s.values()) > 3.5e38  # beyond float32 indeed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = scores.synflow(model, input_shape=(64,), dtype=torch.float64)
    assert_scores_close(s, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(DATA_BASED))
def test_data_scorers_overflow_fall_back(name, gen):
    model = deep_mlp(depth=60, width=32, scale=80.0)  # activations ~ 6^60 on N(0, 1) inputs
    data = batches((32,), 1, bs=4, classes=10, gen=gen, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="recomputing in float64"):
        s = getattr(scores, name)(model, data=data)
    assert all(v.dtype == torch.float64 and bool(torch.isfinite(v).all()) for v in s.values())
    ref = getattr(scores, name)(model, data=data, dtype="float64")
    assert_scores_close(s, ref, rtol=0, atol=0)


# -- argument errors ---------------------------------------------------------------------------------------------
X, Y = torch.randn(6, 4), torch.randint(0, 2, (6,))


@pytest.mark.parametrize(
    "data",
    [
        None,
        X,
        (X,),
        (X, Y, Y),
        [],
        iter([]),
        (X, Y[:5]),
        (X, Y.float()),
        (X, Y.bool()),
        [(X, Y), (X, Y[:3])],
        [(X, Y), X],
        {"x": X, "y": Y},
        42,
    ],
    ids=["none", "tensor", "one", "three", "empty", "empty-iter", "sizes", "float-y", "bool-y",
         "sizes-2nd", "bad-2nd", "dict", "int"],
)
@pytest.mark.parametrize("name", sorted(DATA_BASED))
def test_bad_data(name, data):
    model = mlp((4, 5, 2))
    with pytest.raises(ValueError, match="data"):
        getattr(scores, name)(model, data=data)


def test_as_batches_forms():
    one = as_batches((X, Y.int()))
    assert len(one) == 1 and one[0][1].dtype == torch.long
    assert len(as_batches([(X, Y), [X, Y]])) == 2
    assert len(as_batches((b for b in [(X, Y)] * 3))) == 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    assert [b[0].shape[0] for b in as_batches(loader)] == [4, 2]
    with pytest.raises(ValueError, match="loader"):
        as_batches([(X, Y.float())], name="loader")


def test_input_shape_resolution():
    model = mlp((4, 5, 2))
    with pytest.raises(ValueError, match="input_shape"):
        scores.synflow(model)
    with pytest.raises(ValueError, match="input_shape"):
        scores.synflow(model, input_shape=(0,))
    expect = scores.synflow(model, input_shape=(4,))
    assert_scores_close(scores.synflow(model, input_shape=4), expect, rtol=0, atol=0)
    assert_scores_close(scores.synflow(model, data=(X, Y)), expect, rtol=0, atol=0)
    assert resolve_input_shape(model, data=X) == (4,)
    model.input_shape = (4,)
    assert_scores_close(scores.synflow(model), expect, rtol=0, atol=0)


def test_bad_masks_and_options():
    model = mlp((4, 5, 2))
    with pytest.raises(ValueError, match="masks"):
        scores.magnitude(model, {"nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks"):
        scores.synflow(model, {"0.weight": torch.ones(2, 2, dtype=torch.bool)}, input_shape=(4,))
    with pytest.raises(ValueError, match="dtype"):
        scores.synflow(model, input_shape=(4,), dtype=torch.int64)
    with pytest.raises(TypeError):
        scores.snip(model, data=(X, Y), temperature=3.0)
    # a subset of the prunable tensors (or a bias, by name) can be scored
    s = scores.magnitude(model, {"2.weight": torch.ones(2, 5, dtype=torch.bool), "0.bias": torch.ones(5)})
    assert list(s) == ["2.weight", "0.bias"] and torch.equal(s["0.bias"], model[0].bias.detach().abs())


# -- the per-run cache of the pruning loop ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_synflow_cache_gives_the_direct_scores(case, gen):
    builder, in_shape, model, masks = build_case(case, gen)
    snap = snapshot(model)
    cache = {}
    for _ in range(2):  # the first call builds the cached copy, the second reuses it
        for m in (masks, random_masks(model, 0.3, gen)):
            assert_scores_close(scores.synflow(model, m, input_shape=in_shape, cache=cache),
                                scores.synflow(model, m, input_shape=in_shape), rtol=0, atol=0)
    assert len(cache) == 1
    hooked = masks.to_prune_hooks(copy.deepcopy(model))
    am = authors_copy(model, masks, lambda: builder(MLinear))
    expect = scores.synflow(model, masks, input_shape=in_shape)
    for other in (hooked, am):
        assert_scores_close(scores.synflow(other, None, input_shape=in_shape, cache={}), expect, rtol=0, atol=0)
    assert_unchanged(model, snap)


def test_synflow_cache_keeps_the_float64_fallback():
    model = deep_mlp()
    cache = {}
    with pytest.warns(RuntimeWarning, match="float64"):
        s = scores.synflow(model, input_shape=(64,), cache=cache)
    ref = scores.synflow(model, input_shape=(64,), dtype=torch.float64)
    assert_scores_close(s, ref, rtol=0, atol=0)


# -- from a review of the whole package ------------------------------------------------------------


def _tiny_mlp(bias):
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(8, 8, bias=bias)
        nn.init.uniform_(lin.weight, 1e-5, 2e-5)
        if bias:
            nn.init.uniform_(lin.bias, 0.1, 0.2)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


def test_synflow_float32_underflow_falls_back():
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(8, 8, bias=False)
        nn.init.uniform_(lin.weight, 1e-5, 2e-5)
        layers += [lin, nn.ReLU()]
    net = nn.Sequential(*layers)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        s = scores.synflow(net, input_shape=(8,))
    assert all(v.dtype == torch.float64 and bool((v > 0).all()) for v in s.values())


def test_synflow_fallback_is_remembered_in_the_cache():
    torch.manual_seed(0)
    layers = []
    for _ in range(60):
        lin = nn.Linear(64, 64)
        nn.init.normal_(lin.weight, std=(3 / 64) ** 0.5)
        layers += [lin, nn.ReLU()]
    net = nn.Sequential(*layers)
    cache = {}
    with pytest.warns(RuntimeWarning, match="float64"):
        first = scores.synflow(net, input_shape=(64,), cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second float32 attempt, no second warning
        second = scores.synflow(net, input_shape=(64,), cache=cache)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_synflow_underflow_with_biases_is_caught():
    # the late biases keep R > 0 while the early layers' scores underflow to 0 in float32
    net = _tiny_mlp(bias=True)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        s = scores.synflow(net, input_shape=(8,))
    ref = scores.synflow(net, input_shape=(8,), dtype=torch.float64)
    assert all(torch.equal(s[n], ref[n]) for n in s) and bool((s["0.weight"] > 0).all())


def test_a_cut_network_is_not_mistaken_for_underflow():
    net = _tiny_mlp(bias=False)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.fill_(0.5)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    masks["10.weight"][:] = False  # layer 6 of 12 fully pruned: no path survives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = scores.synflow(net, masks, input_shape=(8,))
    assert all(float(v.abs().sum()) == 0.0 for v in s.values())


def test_float64_fallback_drops_the_float32_copy_from_the_cache():
    net = _tiny_mlp(bias=True)
    cache = {}
    with pytest.warns(RuntimeWarning, match="underflowed"):
        scores.synflow(net, input_shape=(8,), cache=cache)
    assert ("synflow", torch.float32) not in cache and cache[("float64 fallback", "synflow")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores.synflow(net, input_shape=(8,), cache=cache)  # straight to float64, no second warning


def test_tied_weights_score_both_uses():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(10, 10, bias=False)
            self.b = nn.Linear(10, 10, bias=False)
            self.b.weight = self.a.weight
            self.c = nn.Linear(10, 4, bias=False)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    net = Tied().double()
    assert list(ntkfast.prunable_parameters(net)) == ["a.weight", "c.weight"]
    w = net.a.weight.detach().abs().clone().requires_grad_(True)
    c = net.c.weight.detach().abs()
    r = (torch.relu(torch.relu(torch.ones(1, 10, dtype=torch.float64) @ w.T) @ w.T) @ c.T).sum()
    (g,) = torch.autograd.grad(r, w)
    for cache in (None, {}):
        torch.testing.assert_close(scores.synflow(net, input_shape=(10,), cache=cache)["a.weight"], (w * g).abs())


def test_a_single_logit_is_refused_by_name_not_scored_zero():
    # cross-entropy over one class is 0 whatever the weights: every loss-based score would be 0
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 6), torch.zeros(16, dtype=torch.long)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in ("snip", "iterative_snip", "grasp"):
        with pytest.raises(ValueError, match=r"^model: gives one logit per sample; cross-entropy over a single class"):
            ntkfast.prune(net, method, 0.3, data=(x, y), progress=False)
    for fn in (scores.snip, scores.grasp):
        with pytest.raises(ValueError, match=r"^model: gives one logit per sample"):
            fn(net, data=(x, y))
    for method in ("magnitude", "synflow"):  # no loss: a single output is theirs to score
        assert ntkfast.prune(net, method, 0.3, data=(x, y), progress=False).density == pytest.approx(0.3, abs=0.01)
    samples = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ValueError, match=r"training would never move the weights"):
        ntkfast.train(net, None, samples, samples, epochs=1, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_prune_casts_the_data_to_the_model_dtype_as_the_scorers_do():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))  # float32 data, a float64 model
    for method in ("snip", "grasp", "iterative_snip"):
        got = ntkfast.prune(net, method, 0.3, data=(x, y), progress=False)
        want = ntkfast.prune(net, method, 0.3, data=(x.double(), y), progress=False)
        assert got == want


def test_a_tuple_of_inputs_is_named_not_read_as_two_batches():
    net = torch.nn.Sequential(torch.nn.Linear(6, 3))
    x1, x2, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 3, (4,))
    for method in ("snip", "grasp"):
        with pytest.raises(ValueError, match=r"^data: the inputs are a tuple of 2 tensors \(a model taking several "
                                             r"inputs\)"):
            ntkfast.prune(net, method, 0.5, data=((x1, x2), y), progress=False)
    # two labelled batches still read as two batches
    assert ntkfast.prune(net, "snip", 0.5, data=[(x1, y), (x2, y)], progress=False).density == pytest.approx(0.5, abs=0.06)
