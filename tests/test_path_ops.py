"""ntkfast.ops.path: the Path Kernel's compiled ops (path_chain, path_score) against their
references and against independent oracles (path sums by explicit matrix powers of a chain; the
convolution's weight gradient by autograd), on fresh random inputs (never zeros), several sizes,
both dtypes, every device; opcheck; argument errors; the fallback."""

import pytest
import torch
import torch.nn.functional as F

from ntkfast import ops
from ntkfast.ops.path import FAMILY
from testing import devices, kernel_device, needs_extension, seeded

REL = {torch.float64: 1e-12, torch.float32: 2e-6}




def _rel(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


def _chain(gen, widths, n, dtype, device, masked=True, bias=True):
    ws = [torch.randn(o, c, generator=gen, dtype=torch.float64) for c, o in zip(widths[:-1], widths[1:])]
    ms = [(torch.rand(w.shape, generator=gen) < 0.6).double() for w in ws] if masked else None
    bs = [torch.randn(w.shape[0], generator=gen, dtype=torch.float64) if bias and i % 2 == 0 else None
          for i, w in enumerate(ws)]
    x = torch.rand((n, widths[0]) if n else (widths[0],), generator=gen, dtype=torch.float64) + 0.1
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [move(w) for w in ws], None if ms is None else [move(m) for m in ms], [move(b) for b in bs], move(x)


def _chain_oracle(ws, ms, bs, x, power):
    """Forward by products of the transformed matrices, backward by the row sums of their products."""
    g = (lambda t: t.abs()) if power == 1 else (lambda t: t * t)
    gw = [g(w.double() * (ms[i].double() if ms else 1)) for i, w in enumerate(ws)]
    a = x.double() if x.dim() == 2 else x.double()[None]
    fwd = []
    for w, b in zip(gw, bs):
        a = a @ w.t() + (0 if b is None else g(b.double()))
        fwd.append(a if x.dim() == 2 else a[0])
    bwd = []
    for i in range(len(gw)):
        prod = torch.eye(gw[-1].shape[0], dtype=torch.float64)
        for w in reversed(gw[i:]):
            prod = prod @ w
        bwd.append(prod.sum(0))  # 1ᵀ G_L ... G_i
    return fwd, bwd


CHAINS = [([5, 3], 0), ([784, 300, 100, 10], 0), ([17, 64, 33, 1], 3), ([1000, 513, 7], 2), ([2, 1, 2], 1)]


@needs_extension
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("power", [1, 2])
def test_path_chain_matches_oracle_and_reference(device, dtype, power):
    dev = kernel_device(device, FAMILY)
    for widths, n in CHAINS:
        for masked, bias in ((True, True), (False, False)):
            ws, ms, bs, x = _chain(seeded("chain", tuple(widths), n, masked), widths, n, dtype, dev, masked, bias)
            fwd, bwd = ops.path_chain(ws, x, masks=ms, biases=bs, power=power)
            rf, rb = ops.path_chain_reference(ws, x, masks=ms, biases=bs, power=power)
            of, ob = _chain_oracle([w.cpu() for w in ws], ms and [m.cpu() for m in ms],
                                   [b if b is None else b.cpu() for b in bs], x.cpu(), power)
            assert [t.shape for t in fwd] == [t.shape for t in of] and [t.shape for t in bwd] == [t.shape for t in ob]
            for got, ref, want in zip(fwd + bwd, rf + rb, of + ob):
                assert got.dtype == dtype and got.device.type == dev.type
                assert _rel(got.cpu(), want) < REL[dtype], (widths, n, masked)
                assert _rel(ref.cpu(), want) < REL[dtype]


@needs_extension
@pytest.mark.parametrize("device", devices)
def test_path_chain_defaults_and_noncontiguous(device):
    dev = kernel_device(device, FAMILY)
    ws, _, _, _ = _chain(seeded("nc"), [6, 9, 4], 0, torch.float64, dev, masked=False, bias=False)
    wt = [w.t().contiguous().t() for w in ws]  # same values, column-major storage
    fwd, bwd = ops.path_chain(wt)  # input ones, power 2
    of, ob = _chain_oracle([w.cpu() for w in ws], None, [None, None], torch.ones(6, dtype=torch.float64), 2)
    for got, want in zip(fwd + bwd, of + ob):
        assert _rel(got.cpu(), want) < 1e-12
    # R = 1ᵀ a_L = b_0ᵀ 1: the forward and backward sums describe the same path sum
    assert abs(float(fwd[-1].sum()) - float(bwd[0].sum())) < 1e-10 * float(bwd[0].sum())


def _conv_case(gen, n, c, o, size, k, s, p, d, groups, dtype, device):
    sd = len(size)
    w = torch.randn((o, c // groups) + tuple(k), generator=gen, dtype=torch.float64)
    a = torch.rand((n, c) + tuple(size), generator=gen, dtype=torch.float64) + 0.1
    conv = F.conv1d if sd == 1 else F.conv2d
    out_shape = conv(a, w, stride=s, padding=p, dilation=d, groups=groups).shape
    b = torch.rand(out_shape, generator=gen, dtype=torch.float64) + 0.1
    m = (torch.rand(w.shape, generator=gen) < 0.5).double()
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(w), move(a), move(b), move(m)


def _score_oracle(w, a, b, m, q, stride, padding, dilation, groups):
    """|w|^q ⊙ m ⊙ ∂Σ⟨b, layer(a; w)⟩/∂w by autograd, float64."""
    w64 = w.double().clone().requires_grad_(True)
    if w.dim() == 2:
        y = a.double() @ w64.t()
    else:
        conv = F.conv1d if w.dim() == 3 else F.conv2d
        y = conv(a.double(), w64, stride=stride, padding=padding, dilation=dilation, groups=groups)
    (grad,) = torch.autograd.grad((y * b.double()).sum(), w64)
    return w.double().abs() ** q * m.double() * grad


CONVS = [  # n, c, o, size, kernel, stride, padding, dilation, groups
    (1, 3, 16, (32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 6, 8, (9, 7), (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (3, 4, 4, (11,), (5,), (2,), (2,), (1,), 4),
    (1, 8, 5, (6, 6), (1, 1), (2, 2), (0, 0), (1, 1), 1),
    (2, 5, 3, (7, 13), (7, 3), (1, 3), (3, 1), (1, 1), 1),
]


@needs_extension
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_path_score_conv_matches_autograd(device, dtype):
    dev = kernel_device(device, FAMILY)
    for case in CONVS:
        n, c, o, size, k, s, p, d, groups = case
        w, a, b, m = _conv_case(seeded("conv", case), n, c, o, size, k, s, p, d, groups, dtype, dev)
        for q in (0, 1, 2):
            for mask in (m, None):
                got = ops.path_score(w, a, b, mask=mask, weight_power=q, stride=s, padding=p, dilation=d, groups=groups)
                ref = ops.path_score_reference(w, a, b, mask=mask, weight_power=q, stride=s, padding=p, dilation=d,
                                             groups=groups)
                want = _score_oracle(w.cpu(), a.cpu(), b.cpu(), torch.ones_like(w.cpu()) if mask is None else m.cpu(),
                                     q, s, p, d, groups)
                assert got.shape == w.shape and got.dtype == dtype
                assert _rel(got.cpu(), want) < 10 * REL[dtype], (case, q)
                assert _rel(ref.cpu(), want) < 10 * REL[dtype]


@needs_extension
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_path_score_dense_matches_autograd(device, dtype):
    dev = kernel_device(device, FAMILY)
    for n, c, o in ((1, 784, 300), (1, 3, 1), (4, 100, 37), (1, 1000, 513)):
        gen = seeded("dense", n, c, o)
        w = torch.randn(o, c, generator=gen, dtype=torch.float64)
        a = torch.rand(n, c, generator=gen, dtype=torch.float64) + 0.1
        b = torch.rand(n, o, generator=gen, dtype=torch.float64) + 0.1
        m = (torch.rand(w.shape, generator=gen) < 0.3).double()
        for q in (0, 1, 2):
            for mask in (m, None):
                args = [t.to(dev, dtype) for t in (w, a, b)]
                got = ops.path_score(*args, mask=None if mask is None else mask.to(dev, dtype), weight_power=q)
                want = _score_oracle(w, a, b, torch.ones_like(w) if mask is None else m, q, None, None, None, 1)
                assert _rel(got.cpu(), want) < 10 * REL[dtype], (n, c, o, q)


@needs_extension
@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    dev = kernel_device(device, FAMILY)
    for dtype in (torch.float32, torch.float64):
        ws, ms, bs, x = _chain(seeded("opcheck", str(dtype)), [7, 5, 3], 2, dtype, dev)
        torch.library.opcheck(torch.ops.ntkfast.path_chain.default, (ws, ms, bs, x, 2))
        torch.library.opcheck(torch.ops.ntkfast.path_chain.default, (ws, [], [None] * 2, x, 1))
        w, a, b, m = _conv_case(seeded("opcheck-conv", str(dtype)), *CONVS[1], dtype, dev)
        n, c, o, size, k, s, p, d, groups = CONVS[1]
        torch.library.opcheck(torch.ops.ntkfast.path_score.default, (w, m, a, b, 1, list(s), list(p), list(d), groups))
        torch.library.opcheck(torch.ops.ntkfast.path_score.default,
                              (ws[0], None, x, torch.rand(2, 5, dtype=dtype, device=dev) + 0.1, 2, [], [], [], 1))


BAD_CHAIN = [
    (lambda ws, x: dict(weights=ws, input=x, power=3), "power"),
    (lambda ws, x: dict(weights=[ws[1], ws[0]], input=x), "weights[0]"),
    (lambda ws, x: dict(weights=ws, input=x, masks=[torch.ones(2, 2, dtype=torch.float64)] * 2), "masks[0]"),
    (lambda ws, x: dict(weights=ws, input=x, masks=[torch.ones_like(ws[0])]), "masks"),
    (lambda ws, x: dict(weights=ws, input=x.float()), "dtype"),
    (lambda ws, x: dict(weights=ws, input=x, biases=[None]), "biases"),
    (lambda ws, x: dict(weights=ws, input=x, biases=[torch.ones(3, dtype=torch.float64), None]), "biases[0]"),
    (lambda ws, x: dict(weights=[], input=x), "weights"),
]


@pytest.mark.parametrize("make, message", BAD_CHAIN)
def test_path_chain_errors_name_the_argument(make, message):
    ws, _, _, x = _chain(seeded("bad"), [4, 6, 2], 0, torch.float64, torch.device("cpu"), masked=False, bias=False)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.path_chain(**make(ws, x))


def test_path_score_errors_name_the_argument():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    a = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    b = torch.rand(1, 4, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight_power"):
        ops.path_score(w, a, b, weight_power=3)
    with pytest.raises(ValueError, match="stride"):
        ops.path_score(w, a, b, stride=(1, 1, 1))
    if FAMILY.available:  # the kernel's own checks (the reference would fail inside torch)
        with pytest.raises(ValueError, match="b's spatial size"):
            ops.path_score(w, a, b, padding=1)
        with pytest.raises(ValueError, match="mask has shape"):
            ops.path_score(w, a, b, mask=torch.ones(4, 3, 3, 2, dtype=torch.float64))
        with pytest.raises(ValueError, match="a must have shape"):
            ops.path_score(w, a[:, :2], b)


# ---------------------------------------------------------------------------------------------
# pruned entries: NaN / inf under a zero mask (issue 25)
# ---------------------------------------------------------------------------------------------
#
# A weight under a zero mask entry contributes nothing whatever it holds (g(w * 0) would be NaN for
# an infinite w), and neither does what only pruned weights read: an input feature of path_chain
# whose column of masks[0] is all zero; for path_score, an input channel (or feature) whose weights
# are all pruned and an output whose weights are all pruned. The results must equal those with
# zeros (or any finite values) there, and be finite; path_score is exactly 0 under a zero mask.

BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def _poison(t, where, value, gen):
    t = t.clone()
    if value == "finite":
        t[where] = (1e3 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(t.device, t.dtype)[where]
    else:
        t[where] = value
    return t


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_path_chain_ignores_non_finite_values_under_a_zero_mask(device, dtype, path, bad):
    fn = ops.path_chain if path == "kernel" else ops.path_chain_reference
    dev = kernel_device(device, FAMILY) if path == "kernel" else torch.device(device)
    for widths, n in (([5, 3], 0), ([40, 33, 17, 2], 3), ([300, 70, 9], 1)):
        gen = seeded("pruned-chain", widths, n, dtype)
        ws, ms, bs, x = _chain(gen, widths, n, dtype, dev)
        ms[0][:, ::3] = 0  # input features read by no kept weight
        for m in ms:
            m[0] = 1.0  # and at least one kept weight in each layer's first row
            m[0, ::3] = 0
        dead_in = (ms[0] == 0).all(0)
        results = []
        for value in (BAD[bad], 0.0, "finite"):
            wv = [_poison(w, m == 0, value, gen) for w, m in zip(ws, ms)]
            xv = _poison(x, (..., dead_in), value, gen)
            results.append(fn(wv, xv, masks=ms, biases=bs, power=1 + len(widths) % 2))
        for i, (f, b) in enumerate(zip(*results[0])):
            assert bool(torch.isfinite(f).all()) and bool(torch.isfinite(b).all()), (widths, i)
        for other in results[1:]:
            for u, v in zip(results[0][0] + results[0][1], other[0] + other[1]):
                torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_path_score_ignores_non_finite_values_under_a_zero_mask(device, dtype, path, bad):
    fn = ops.path_score if path == "kernel" else ops.path_score_reference
    dev = kernel_device(device, FAMILY) if path == "kernel" else torch.device(device)
    cases = [(None,) + c for c in CONVS] + [("dense", 1, 30, 7), ("dense", 4, 50, 9)]
    for case in cases:
        gen = seeded("pruned-score", case, dtype)
        if case[0] == "dense":
            _, n, c, o = case
            w = torch.randn(o, c, generator=gen, dtype=torch.float64).to(dev, dtype)
            a = (torch.rand(n, c, generator=gen, dtype=torch.float64) + 0.1).to(dev, dtype)
            b = (torch.rand(n, o, generator=gen, dtype=torch.float64) + 0.1).to(dev, dtype)
            m = (torch.rand(w.shape, generator=gen) < 0.5).to(dev, dtype)
            geo = {}
            m[:, ::4] = 0
            m[::3] = 0
            dead_a = (..., (m == 0).all(0))
        else:
            n, c, o, size, k, s, p, d, groups = case[1:]
            w, a, b, m = _conv_case(gen, n, c, o, size, k, s, p, d, groups, dtype, dev)
            geo = dict(stride=s, padding=p, dilation=d, groups=groups)
            m[::3] = 0
            m[:, 0] = 0  # the first input channel of every group: read by pruned weights only
            cg, og = c // groups, o // groups
            dead_ch = torch.zeros(c, dtype=torch.bool, device=dev)
            for gi in range(groups):
                dead_ch[gi * cg: (gi + 1) * cg] = (m[gi * og: (gi + 1) * og] == 0).transpose(0, 1).reshape(cg, -1).all(1)
            dead_a = (slice(None), dead_ch)
        dead_b = (slice(None), (m == 0).reshape(m.shape[0], -1).all(1))
        results = []
        for value in (BAD[bad], 0.0, "finite"):
            wv = _poison(w, m == 0, value, gen)
            av = _poison(a, dead_a, value, gen)
            bv = _poison(b, dead_b, value, gen)
            results.append([fn(wv, av, bv, mask=m, weight_power=q, **geo) for q in (0, 1, 2)])
        for q, (got, zero, finite) in enumerate(zip(*results)):
            assert bool(torch.isfinite(got).all()), (case, q)
            assert bool((got[m == 0] == 0).all()), (case, q)
            torch.testing.assert_close(got, zero, rtol=0, atol=0)
            # the kept entries see the pruned ones through nothing: the same bits, finite values there or not
            torch.testing.assert_close(got, finite, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [ops.path_score, ops.path_score_reference])
def test_path_score_input_smaller_than_the_kernel_names_the_argument(fn):
    w = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    a = torch.rand(2, 3, 3, 3, dtype=torch.float64)
    b = torch.rand(2, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"a: its spatial size \(3, 3\), padded by \(0, 0\), is smaller than the "
                                         r"weight's dilated kernel \(5, 5\)"):
        fn(w, a, b)
    with pytest.raises(ValueError, match=r"a: its spatial size \(3,\), padded by \(1,\), is smaller than the "
                                         r"weight's dilated kernel \(9,\) \(kernel \(5,\), dilation \(2,\);"):
        fn(torch.randn(4, 3, 5, dtype=torch.float64), a[..., 0], b[..., 0], padding=1, dilation=2)
    # one padded row more and it fits
    out = fn(w, a, torch.rand(2, 4, 1, 1, dtype=torch.float64), padding=1)
    assert out.shape == w.shape


def test_fallback_without_kernel(monkeypatch):
    """With the kernel switched off, the wrappers give the references' results."""
    ws, ms, bs, x = _chain(seeded("fallback"), [5, 4, 3], 2, torch.float64, torch.device("cpu"))
    want = ops.path_chain_reference(ws, x, masks=ms, biases=bs, power=1)
    monkeypatch.setattr(FAMILY, "available", False)
    monkeypatch.setattr(FAMILY, "warned", True)
    got = ops.path_chain(ws, x, masks=ms, biases=bs, power=1)
    for u, v in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(u, v)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_score_larger_than_one_grid_matches_the_reference():
    # 300M entries: more than the dense score's capped grid (2**20 blocks x 256 threads) covers at
    # once, so the kernel's grid-stride loop is what reaches the last entries
    if not ops.cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    g = torch.Generator(device="cuda").manual_seed(5)
    o, c = 20_000, 15_000
    w = torch.randn(o, c, device="cuda", generator=g)
    a = torch.rand(2, c, device="cuda", generator=g)
    b = torch.rand(2, o, device="cuda", generator=g)
    got = ops.path_score(w, a, b, weight_power=1)
    want = w.abs() * (b.t() @ a)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
