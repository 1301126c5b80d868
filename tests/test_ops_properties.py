"""Property tests (hypothesis) of every compiled op against its pure-PyTorch reference.

Random shapes (size 1, sizes on both sides of the kernels' vector widths and blocks), dtypes
(float32 and float64; float16 / bfloat16 where the op takes them), layouts (contiguous, the last
two dimensions stored transposed, every other element of a wider tensor whose gaps hold NaN, so a
kernel that ignored strides would read them), random masks (all kept and none kept included, NaN
and infinities under the zero entries where the op promises to ignore them), forward and backward,
and gradcheck in float64 on small sizes.

The whole file runs in well under a minute on two cores: few examples per property, small sizes,
no deadline (the first call of a kernel may be slow). Cases that need the compiled extension skip
without it (the reference would then be compared with itself).
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from ntkfast import ops  # noqa: E402
from ntkfast.ops.conv_weight_grad_per_sample import FAMILY as CONV_FAMILY  # noqa: E402
from ntkfast.ops.masked_gram import FAMILY as GRAM_FAMILY  # noqa: E402
from ntkfast.ops.nm_mask import FAMILY as NM_FAMILY  # noqa: E402
from ntkfast.ops.path import FAMILY as PATH_FAMILY  # noqa: E402
from ntkfast.ops.perturbed_masked import FAMILY as PERTURBED_FAMILY  # noqa: E402
from ntkfast.ops.topk_mask import FAMILY as TOPK_FAMILY  # noqa: E402

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# 1, and sizes around the vector widths (4, 8, 16 lanes; panels of 2 vectors) and row blocks
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33])
SMALL = st.integers(1, 6)
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])
DENSITIES = st.sampled_from([0.0, 0.1, 0.5, 1.0])  # none kept .. all kept
BAD = [float("nan"), float("inf"), float("-inf")]


def _require(family):
    if not ops.extension_loaded():
        pytest.skip("compiled extension not loaded")
    if not family.available:
        pytest.skip(f"the extension predates {family.what}")


def _gen(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (gaps of a strided view hold NaN)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided" and t.dim() >= 1:
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _rel_close(got, want, tol, what=""):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    assert bool(torch.isfinite(got).all()), f"{what}: not finite"
    scale = float(want.norm()) if want.numel() else 0.0
    err = float((got - want).norm()) if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: relative error {err / max(scale, 1e-30):.3g}"


def _keep(gen, shape, density):
    return torch.rand(shape, generator=gen) < density


# ---------------------------------------------------------------------------------------------
# topk_mask
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_topk_mask_matches_reference(data):
    _require(TOPK_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), label="dtype")
    sizes = data.draw(st.lists(st.sampled_from([0, 1, 3, 8, 17, 64, 1000]), min_size=1, max_size=3), label="sizes")
    ties = data.draw(st.booleans(), label="ties")
    scores, keep = [], []
    density = data.draw(DENSITIES, label="density")
    for n in sizes:
        s = torch.randint(-4, 5, (n,), generator=gen).double() if ties else torch.randn(n, generator=gen, dtype=torch.float64)
        kp = _keep(gen, (n,), density)
        s[~kp] = torch.tensor(BAD, dtype=torch.float64)[torch.randint(0, 3, (n,), generator=gen)][~kp]
        shape = (n // 4, 4) if n % 4 == 0 and n else (n,)
        scores.append(_layout(s.to(dtype).reshape(shape), data.draw(LAYOUTS, label="layout")))
        keep.append(kp.reshape(shape))
    alive = sum(int(k.sum()) for k in keep)
    k = data.draw(st.integers(0, alive), label="k")
    drop = data.draw(st.booleans(), label="drop_ties")
    got = ops.topk_mask(scores, k, keep, drop_ties=drop)
    want = ops.topk_mask_reference(scores, k, keep, drop_ties=drop)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    ks = [data.draw(st.integers(0, int(kp.sum())), label="ks") for kp in keep]
    got = ops.topk_mask_layerwise(scores, ks, keep, drop_ties=drop)
    want = ops.topk_mask_layerwise_reference(scores, ks, keep, drop_ties=drop)
    assert all(torch.equal(u, v) for u, v in zip(got, want))


# ---------------------------------------------------------------------------------------------
# nm_mask
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_nm_mask_matches_reference(data):
    _require(NM_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), label="dtype")
    # the unrolled m (2, 4, 8, 16), the generic pair count (m <= 32) and the partial selection above
    m = data.draw(st.sampled_from([1, 2, 3, 4, 8, 16, 24, 32, 40]), label="m")
    n = data.draw(st.integers(1, m), label="n")
    lead = data.draw(st.lists(SMALL, min_size=0, max_size=2), label="lead")
    shape = tuple(lead) + (m * data.draw(SMALL, label="groups per row"),)
    ties = data.draw(st.booleans(), label="ties")
    s = torch.randint(-2, 3, shape, generator=gen).double() if ties else torch.randn(shape, generator=gen,
                                                                                     dtype=torch.float64)
    keep = None
    if data.draw(st.booleans(), label="with keep"):
        keep = _keep(gen, shape, data.draw(DENSITIES, label="density"))
        s[~keep] = torch.tensor(BAD, dtype=torch.float64)[torch.randint(0, 3, shape, generator=gen)][~keep]
    scores = _layout(s.to(dtype), data.draw(LAYOUTS, label="layout"))
    got = ops.nm_mask(scores, n, m, keep)
    assert torch.equal(got, ops.nm_mask_reference(scores, n, m, keep))
    per_group = got.reshape(-1, m).sum(1)
    want = torch.full_like(per_group, n) if keep is None else keep.reshape(-1, m).sum(1).clamp(max=n)
    assert torch.equal(per_group, want)


# ---------------------------------------------------------------------------------------------
# perturbed_masked
# ---------------------------------------------------------------------------------------------

PM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@SETTINGS
@given(data=st.data())
def test_perturbed_masked_matches_reference(data):
    _require(PERTURBED_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(list(PM_TOL)), label="dtype")
    mshape = tuple(data.draw(st.lists(SIZES, min_size=1, max_size=2), label="mask shape"))
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead"))
    kept = _keep(gen, mshape, data.draw(DENSITIES, label="density"))
    m = torch.where(kept, torch.rand(mshape, generator=gen, dtype=torch.float64) + 0.5, 0).to(dtype)
    w = torch.randn(lead + mshape, generator=gen, dtype=torch.float64).to(dtype)
    if data.draw(st.booleans(), label="poison"):  # NaN / inf under the zero mask entries: ignored
        w = torch.where(~kept, torch.tensor(BAD)[torch.randint(0, 3, w.shape, generator=gen)].to(dtype), w)
    w, m = _layout(w, data.draw(LAYOUTS, label="w layout")), _layout(m, data.draw(LAYOUTS, label="m layout"))
    seed, offset, eps = data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2**40)), 0.3
    wl, ml = w.clone().requires_grad_(), m.clone().requires_grad_()
    got = ops.perturbed_masked(wl, ml, eps, seed, offset)
    want = ops.perturbed_masked_reference(wl, ml, eps, seed, offset)
    _rel_close(got, want, PM_TOL[dtype], "forward")
    assert bool((got[:, ~kept.expand(w.shape)] == 0).all())
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    gw, gm = torch.autograd.grad(got, (wl, ml), g)
    rw, rm = torch.autograd.grad(want, (wl, ml), g)
    _rel_close(gw, rw, PM_TOL[dtype], "grad_weight")
    # grad_mask sums over the draws (in float for float16 / bfloat16); at a pruned entry it is the
    # product's derivative, not finite where the weight there is not: compared where kept
    tol = PM_TOL[dtype] * (1 + math.prod(lead)) * (10 if dtype in (torch.float16, torch.bfloat16) else 1)
    if bool(kept.any()):
        _rel_close(gm[kept], rm[kept], tol, "grad_mask")


@SETTINGS
@given(data=st.data())
def test_perturbed_masked_gradcheck(data):
    _require(PERTURBED_FAMILY)
    gen = _gen(data)
    mshape = (data.draw(SMALL, label="n"),)
    lead = (data.draw(st.integers(1, 2), label="lead"),)
    m = torch.where(_keep(gen, mshape, 0.6), torch.rand(mshape, generator=gen, dtype=torch.float64) + 0.5, 0)
    w = torch.randn(lead + mshape, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.perturbed_masked(a, b, 0.2, 7, 3),
                                    (w.requires_grad_(), m.requires_grad_()))


# ---------------------------------------------------------------------------------------------
# masked_gram
# ---------------------------------------------------------------------------------------------

GRAM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _gram_case(data, gen, dtype, sizes=SIZES):
    n1, n2, c, k, o = (data.draw(sizes, label=name) for name in ("n1", "n2", "c", "k", "o"))
    mode = data.draw(st.sampled_from(["full", "trace", "diagonal", "diagonal_trace"]), label="mode")
    sym = data.draw(st.booleans(), label="sym") or mode.startswith("diagonal") and n1 != n2
    if sym:
        n2 = n1
    kept = _keep(gen, (o, c), data.draw(DENSITIES, label="density"))
    m = torch.where(kept, torch.randn((o, c), generator=gen, dtype=torch.float64), 0).to(dtype)
    a1, a2 = (torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype) for n in (n1, n2))
    b1, b2 = (torch.randn(n, k, o, generator=gen, dtype=torch.float64).to(dtype) for n in (n1, n2))
    if data.draw(st.booleans(), label="poison"):  # NaN / inf in what only zero mask entries read
        dead_c, dead_o = ~kept.any(0), ~kept.any(1)
        a1[:, dead_c], a2[:, dead_c] = float("nan"), float("inf")
        b1[:, :, dead_o], b2[:, :, dead_o] = float("-inf"), float("nan")
    return a1, b1, a2, b2, m, mode, sym


@SETTINGS
@given(data=st.data())
def test_masked_gram_matches_reference(data):
    _require(GRAM_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(list(GRAM_TOL)), label="dtype")
    a1, b1, a2, b2, m, mode, sym = _gram_case(data, gen, dtype)
    lay = lambda t: _layout(t, data.draw(LAYOUTS, label="layout"))  # noqa: E731
    leaves = [lay(t).requires_grad_() for t in ((a1, b1) if sym else (a1, b1, a2, b2))]
    args = leaves * 2 if sym else leaves
    got = ops.masked_gram(*args, lay(m), mode=mode)
    want = ops.masked_gram_reference(*args, m, mode=mode)
    _rel_close(got, want, GRAM_TOL[dtype], f"forward {mode}")
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    for i, (u, v) in enumerate(zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g))):
        _rel_close(u, v, 10 * GRAM_TOL[dtype], f"gradient {i} {mode}")


@SETTINGS
@given(data=st.data())
def test_masked_gram_gradcheck(data):
    _require(GRAM_FAMILY)
    gen = _gen(data)
    a1, b1, a2, b2, m, mode, sym = _gram_case(data, gen, torch.float64, sizes=st.integers(1, 4))
    leaves = [t.requires_grad_() for t in (a1, b1, a2, b2)]
    assert torch.autograd.gradcheck(lambda w, x, y, z: ops.masked_gram(w, x, y, z, m, mode=mode), leaves)


# ---------------------------------------------------------------------------------------------
# conv_weight_grad_per_sample
# ---------------------------------------------------------------------------------------------


def _conv_case(data, gen, dtype, small=False):
    d = data.draw(st.sampled_from([1, 2]), label="dims")
    groups = data.draw(st.sampled_from([1, 2]), label="groups")
    n = data.draw(st.integers(0 if not small else 1, 2), label="N")
    kk = data.draw(st.integers(1, 2), label="K")
    c = groups * data.draw(st.integers(1, 2 if small else 3), label="C / groups")
    o = groups * data.draw(st.integers(1, 2 if small else 5), label="O / groups")
    kernel = tuple(data.draw(st.integers(1, 3), label="kernel") for _ in range(d))
    stride = tuple(data.draw(st.integers(1, 2), label="stride") for _ in range(d))
    padding = tuple(data.draw(st.integers(0, 1), label="padding") for _ in range(d))
    dilation = tuple(data.draw(st.integers(1, 2), label="dilation") for _ in range(d))
    span = tuple(dl * (k - 1) + 1 for k, dl in zip(kernel, dilation))
    size = tuple(max(1, s - 2 * p) + data.draw(st.integers(0, 4 if small else 9), label="extra")
                 for s, p in zip(span, padding))
    out = tuple((i + 2 * p - s) // st_ + 1 for i, p, s, st_ in zip(size, padding, span, stride))
    x = torch.randn((n, c) + size, generator=gen, dtype=torch.float64).to(dtype)
    go = torch.randn((n, kk, o) + out, generator=gen, dtype=torch.float64).to(dtype)
    return x, go, kernel, stride, padding, dilation, groups


@SETTINGS
@given(data=st.data())
def test_conv_weight_grad_per_sample_matches_reference(data):
    _require(CONV_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(list(GRAM_TOL)), label="dtype")
    x, go, *geo = _conv_case(data, gen, dtype)
    xl = _layout(x, data.draw(LAYOUTS, label="x layout")).requires_grad_()
    gl = _layout(go, data.draw(LAYOUTS, label="go layout")).requires_grad_()
    got = ops.conv_weight_grad_per_sample(xl, gl, *geo)
    want = ops.conv_weight_grad_per_sample_reference(xl, gl, *geo)
    _rel_close(got, want, GRAM_TOL[dtype], "forward")
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    for i, (u, v) in enumerate(zip(torch.autograd.grad(got, (xl, gl), g), torch.autograd.grad(want, (xl, gl), g))):
        _rel_close(u, v, 10 * GRAM_TOL[dtype], f"gradient {i}")


@SETTINGS
@given(data=st.data())
def test_conv_weight_grad_per_sample_gradcheck(data):
    _require(CONV_FAMILY)
    gen = _gen(data)
    x, go, *geo = _conv_case(data, gen, torch.float64, small=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.conv_weight_grad_per_sample(a, b, *geo),
                                    (x.requires_grad_(), go.requires_grad_()))


# ---------------------------------------------------------------------------------------------
# path_chain, path_score (no autograd of their own: the backward sums are path_chain's output)
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_path_chain_matches_reference(data):
    _require(PATH_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(list(GRAM_TOL)), label="dtype")
    widths = data.draw(st.lists(SIZES, min_size=2, max_size=4), label="widths")
    n = data.draw(st.integers(0, 3), label="N")  # 0: a single [C_0] input
    ws = [torch.randn(o, c, generator=gen, dtype=torch.float64).to(dtype) for c, o in zip(widths[:-1], widths[1:])]
    masked = data.draw(st.booleans(), label="masked")
    density = data.draw(DENSITIES, label="density")
    ms = [_keep(gen, w.shape, density).to(dtype) for w in ws] if masked else None
    bs = [torch.randn(w.shape[0], generator=gen, dtype=torch.float64).to(dtype)
          if data.draw(st.booleans(), label="bias") else None for w in ws]
    x = (torch.rand((n, widths[0]) if n else (widths[0],), generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    if masked and data.draw(st.booleans(), label="poison"):
        ws = [torch.where(m == 0, float("nan"), w) for w, m in zip(ws, ms)]
        x = torch.where((ms[0] == 0).all(0), float("inf"), x)
    ws = [_layout(w, data.draw(LAYOUTS, label="layout")) for w in ws]
    power = data.draw(st.sampled_from([1, 2]), label="power")
    got = ops.path_chain(ws, x, masks=ms, biases=bs, power=power)
    want = ops.path_chain_reference(ws, x, masks=ms, biases=bs, power=power)
    for i, (u, v) in enumerate(zip(got[0] + got[1], want[0] + want[1])):
        _rel_close(u, v, 10 * GRAM_TOL[dtype], f"sums {i}")


@SETTINGS
@given(data=st.data())
def test_path_score_matches_reference(data):
    _require(PATH_FAMILY)
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(list(GRAM_TOL)), label="dtype")
    if data.draw(st.booleans(), label="dense"):
        n, c, o = data.draw(st.integers(1, 3)), data.draw(SIZES, label="C"), data.draw(SIZES, label="O")
        w = torch.randn(o, c, generator=gen, dtype=torch.float64).to(dtype)
        a = torch.rand(n, c, generator=gen, dtype=torch.float64).to(dtype)
        b = torch.rand(n, o, generator=gen, dtype=torch.float64).to(dtype)
        geo = {}
    else:
        x, go, kernel, stride, padding, dilation, groups = _conv_case(data, gen, dtype)
        if x.shape[0] == 0:
            x, go = torch.cat([x, x.new_ones((1,) + x.shape[1:])]), torch.cat([go, go.new_ones((1,) + go.shape[1:])])
        a, b = x, go[:, 0]
        w = torch.randn((b.shape[1], a.shape[1] // groups) + kernel, generator=gen, dtype=torch.float64).to(dtype)
        geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    m = _keep(gen, w.shape, data.draw(DENSITIES, label="density")).to(dtype)
    if data.draw(st.booleans(), label="poison"):
        w = torch.where(m == 0, float("nan"), w)
    mask = m if data.draw(st.booleans(), label="masked") or w.isnan().any() else None
    q = data.draw(st.sampled_from([0, 1, 2]), label="weight_power")
    w, a = _layout(w, data.draw(LAYOUTS, label="w layout")), _layout(a, data.draw(LAYOUTS, label="a layout"))
    got = ops.path_score(w, a, b, mask=mask, weight_power=q, **geo)
    want = ops.path_score_reference(w, a, b, mask=mask, weight_power=q, **geo)
    _rel_close(got, want, 10 * GRAM_TOL[dtype], "score")
