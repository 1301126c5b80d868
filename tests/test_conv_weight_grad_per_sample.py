"""ntkfast.ops.conv_weight_grad_per_sample: the kernels and the reference against an independent
oracle (torch.func: vmap over samples and cotangents of the vjp of F.conv*d with respect to the
weight), gradients, opcheck, argument errors, fallbacks.

Errors are measured as max |got - oracle| / max |oracle| over the whole output; the oracle runs in
float64 on the same values (for float32 inputs too). Every test that runs a kernel is
parametrised over ``testing.devices`` (CPU, plus CUDA where a device is usable; CUDA cases skip
when the extension has no CUDA kernels); CPU cases run every instruction set the kernel has
(NTKFAST_CPU_ISA caps it; the kernel reads it on every call).
"""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from ntkfast import ops
from ntkfast.ops import loader
from ntkfast.ops.conv_weight_grad_per_sample import FAMILY
from ntkfast.ops import conv_weight_grad_per_sample, conv_weight_grad_per_sample_reference
from testing import devices, kernel_device, needs_extension, seeded

REL = {torch.float64: 1e-12, torch.float32: 1e-5}
ISAS = ["avx512", "avx2", "generic"]




def _tuple(v, d):
    return (v,) * d if isinstance(v, int) else tuple(v)


def _out_size(size, k, s, p, dl):
    return tuple((i + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for i, kk, ss, pp, dd in zip(size, k, s, p, dl))


def _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, device):
    """Fresh normal input and grad_output (no zeros anywhere, which could hide a wrong index)."""
    d = len(size)
    k, s, p, dl = (_tuple(v, d) for v in (k, s, p, dl))
    x = torch.randn((N, C) + tuple(size), generator=gen, dtype=torch.float64)
    go = torch.randn((N, K, O) + _out_size(size, k, s, p, dl), generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), go.to(device=device, dtype=dtype)


def oracle(x, go, k, s, p, dl, groups):
    """vmap over samples and cotangents of torch.func.vjp of F.conv{1,2,3}d w.r.t. the weight, in
    float64."""
    x, go = x.double(), go.double()
    d = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    k, s, p, dl = (_tuple(v, d) for v in (k, s, p, dl))
    w = torch.randn((go.shape[2], x.shape[1] // groups) + k, dtype=torch.float64, device=x.device)

    def per_sample(xn, gon):
        _, pull = vjp(lambda weight: conv(xn.unsqueeze(0), weight, None, s, p, dl, groups).squeeze(0), w)
        return vmap(lambda cot: pull(cot)[0])(gon)

    return vmap(per_sample)(x, go)


def _rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _check(got, x, go, k, s, p, dl, groups, want=None):
    want = oracle(x, go, k, s, p, dl, groups) if want is None else want
    assert got.shape == want.shape and got.dtype == x.dtype and got.device == x.device
    err = _rel_err(got, want)
    assert err <= REL[x.dtype], (err, tuple(x.shape), tuple(go.shape), k, s, p, dl, groups)
    return want


def _transposed_storage(t):
    """The same values with the last two dimensions' storage transposed: not contiguous."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _isa_params(device):
    return ISAS if device == "cpu" else [None]


@pytest.fixture
def isa(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setenv("NTKFAST_CPU_ISA", request.param)
    return request.param


def _device_isa_cases():
    return [(dev, i) for dev in devices for i in _isa_params(dev)]


# Every kernel size x stride x padding x dilation, with groups cycling through 1, 2 and depthwise
# and sizes (N, K, C, O, non-square images) drawn from the case's index.
def _grid_cases():
    cases = []
    for i, (k, s, p, dl) in enumerate(itertools.product((1, 3, 5), (1, 2), (0, 1, 2), (1, 2))):
        groups = (1, 2, "depthwise")[i % 3]
        N = (1, 2, 3)[i % 3]
        K = (1, 3, 2, 1)[i % 4]
        C = 4 if groups != 1 else (1, 3, 5)[i % 3]
        O = (6, 4, 8)[i % 3]
        if groups == "depthwise":
            groups, O = C, 2 * C
        span = dl * (k - 1) + 1
        H = max(span - 2 * p, 1) + 3 + i % 4
        W = max(span - 2 * p, 1) + 5 + (i * 7) % 5
        cases.append((N, C, O, K, (H, W), (k, k), (s, s), (p, p), (dl, dl), groups))
    # rectangular kernels and mixed per-axis parameters
    cases += [
        (2, 6, 4, 3, (9, 13), (3, 5), (1, 2), (1, 2), (2, 1), 2),
        (1, 3, 5, 2, (12, 7), (1, 3), (2, 1), (0, 1), (1, 2), 1),
        (3, 4, 4, 1, (6, 17), (5, 1), (3, 1), (2, 0), (1, 1), 4),
    ]
    return cases


GRID = _grid_cases()

# Sizes that exercise the blocking: position tiles (L well above a tile), several row blocks
# (K * O / groups > 384), several column blocks (C / groups * kh * kw > 576), one sample (blocks
# split for the threads), ResNet-20 and LeNet-5 layers at a small batch.
BLOCKING = [
    (2, 3, 8, 4, (48, 41), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 16, 64, 7, (6, 5), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 72, 8, 3, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 16, 16, 10, (32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 32, 64, 10, (16, 16), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    (2, 32, 64, 10, (16, 16), (1, 1), (2, 2), (0, 0), (1, 1), 1),
    (3, 3, 16, 10, (32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 1, 6, 10, (28, 28), (5, 5), (1, 1), (2, 2), (1, 1), 1),
    (2, 6, 16, 10, (14, 14), (5, 5), (1, 1), (0, 0), (1, 1), 1),
    (2, 64, 64, 10, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 2),
]


# ---------------------------------------------------------------------------------------------
# the oracle itself, against per-(n, k) autograd
# ---------------------------------------------------------------------------------------------


def test_oracle_matches_per_sample_autograd():
    gen = seeded("oracle")
    for N, C, O, K, size, k, s, p, dl, groups in GRID[::7] + [GRID[-1]]:
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, torch.float64, "cpu")
        w = torch.randn((O, C // groups) + k, dtype=torch.float64, requires_grad=True)
        conv = lambda n: F.conv2d(x[n : n + 1], w, None, s, p, dl, groups)  # noqa: E731
        want = torch.stack([torch.stack([torch.autograd.grad(conv(n), w, go[n, kk : kk + 1])[0] for kk in range(K)])
                            for n in range(N)])
        assert _rel_err(oracle(x, go, k, s, p, dl, groups), want) < 1e-14


# ---------------------------------------------------------------------------------------------
# kernels and reference against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,isa", _device_isa_cases(), indirect=["isa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grid_matches_oracle(device, isa, dtype):
    dev = kernel_device(device, FAMILY)
    gen = seeded("grid", dtype)
    for case in GRID:
        N, C, O, K, size, k, s, p, dl, groups = case
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
        _check(conv_weight_grad_per_sample(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups)


@pytest.mark.parametrize("device,isa", _device_isa_cases(), indirect=["isa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocking_sizes_match_oracle(device, isa, dtype):
    dev = kernel_device(device, FAMILY)
    gen = seeded("blocking", dtype)
    for N, C, O, K, size, k, s, p, dl, groups in BLOCKING:
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
        _check(conv_weight_grad_per_sample(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_oracle(dtype):
    gen = seeded("reference", dtype)
    for N, C, O, K, size, k, s, p, dl, groups in GRID + BLOCKING[:3]:
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, "cpu")
        _check(conv_weight_grad_per_sample_reference(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups)


@pytest.mark.parametrize("device", devices)
def test_noncontiguous_inputs(device):
    dev = kernel_device(device, FAMILY)
    gen = seeded("noncontig")
    for dtype in (torch.float64, torch.float32):
        for N, C, O, K, size, k, s, p, dl, groups in (GRID[4], GRID[17], BLOCKING[4]):
            x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
            want = oracle(x, go, k, s, p, dl, groups)
            variants = [
                (x.contiguous(memory_format=torch.channels_last), go),
                (_transposed_storage(x), _transposed_storage(go)),
                # every other sample / cotangent of a larger tensor
                (torch.stack([x, x + 1], 1).flatten(0, 1)[::2], torch.stack([go, go - 1], 2).flatten(1, 2)[:, ::2]),
            ]
            for xv, gv in variants:
                assert not (xv.is_contiguous() and gv.is_contiguous())
                _check(conv_weight_grad_per_sample(xv, gv, k, s, p, dl, groups), x, go, k, s, p, dl, groups, want)


@pytest.mark.parametrize("device", devices)
def test_kernel_matches_reference_and_is_deterministic(device):
    dev = kernel_device(device, FAMILY)
    gen = seeded("determinism")
    N, C, O, K, size, k, s, p, dl, groups = BLOCKING[0]
    x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, torch.float32, dev)
    a = conv_weight_grad_per_sample(x, go, k, s, p, dl, groups)
    assert torch.equal(a, conv_weight_grad_per_sample(x, go, k, s, p, dl, groups))
    torch.testing.assert_close(a, conv_weight_grad_per_sample_reference(x, go, k, s, p, dl, groups),
                               rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@needs_extension
def test_thread_count_does_not_change_the_result():
    kernel_device("cpu", FAMILY)
    gen = seeded("threads")
    N, C, O, K, size, k, s, p, dl, groups = BLOCKING[3]
    x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, torch.float32, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = conv_weight_grad_per_sample(x, go, k, s, p, dl, groups)
        torch.set_num_threads(max(before, 2))
        many = conv_weight_grad_per_sample(x, go, k, s, p, dl, groups)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", devices)
def test_int_and_tuple_arguments(device):
    dev = kernel_device(device, FAMILY)
    x, go = _inputs(seeded("ints"), 2, 4, 6, 3, (9, 8), 3, 2, 1, 1, torch.float64, dev)
    a = conv_weight_grad_per_sample(x, go, 3, 2, 1)
    b = conv_weight_grad_per_sample(x, go, (3, 3), stride=[2, 2], padding=(1, 1), dilation=(1, 1), groups=1)
    assert torch.equal(a, b)
    _check(a, x, go, 3, 2, 1, 1, 1)


@pytest.mark.parametrize("device", devices)
def test_empty_batch(device):
    dev = kernel_device(device, FAMILY)
    x, go = torch.randn(0, 4, 5, 6, device=dev), torch.randn(0, 2, 6, 3, 4, device=dev)
    for fn in (conv_weight_grad_per_sample, conv_weight_grad_per_sample_reference):
        out = fn(x, go, 3)
        assert out.shape == (0, 2, 6, 4, 3, 3)


# ---------------------------------------------------------------------------------------------
# 1-d and 3-d convolutions
# ---------------------------------------------------------------------------------------------

CASES_1D = [
    (2, 3, 4, 2, (17,), 3, 1, 1, 1, 1),
    (1, 4, 6, 1, (20,), 5, 2, 2, 2, 2),
    (3, 4, 8, 3, (9,), 1, 2, 0, 1, 4),
    (2, 2, 2, 4, (300,), 7, 3, 3, 2, 1),
]
CASES_3D = [
    (2, 3, 4, 2, (5, 6, 7), 3, 1, 1, 1, 1),
    (1, 4, 6, 3, (7, 5, 6), (3, 1, 2), (2, 1, 2), (1, 0, 1), (1, 2, 1), 2),
    (2, 4, 4, 1, (4, 4, 5), 1, 1, 0, 1, 4),
]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv1d(device, dtype):
    dev = kernel_device(device, FAMILY)
    gen = seeded("1d", dtype)
    for N, C, O, K, size, k, s, p, dl, groups in CASES_1D:
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
        want = _check(conv_weight_grad_per_sample(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups)
        _check(conv_weight_grad_per_sample_reference(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups, want)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv3d_reference(device, dtype):
    gen = seeded("3d", dtype)
    for N, C, O, K, size, k, s, p, dl, groups in CASES_3D:
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, device)
        want = _check(conv_weight_grad_per_sample_reference(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups)
        # the public function runs the reference for 3-d inputs, on any device, without a warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check(conv_weight_grad_per_sample(x, go, k, s, p, dl, groups), x, go, k, s, p, dl, groups, want)


# ---------------------------------------------------------------------------------------------
# entries no window reads: NaN / inf there contribute nothing (issue 25)
# ---------------------------------------------------------------------------------------------
#
# The op has no mask; what it must ignore, whatever they hold, are the input positions that no
# window of the convolution reads (the rows and columns left over by the stride, the gaps a
# dilation skips): the output and both gradients are those with zeros there, and finite, and the
# input's gradient is exactly 0 there.

BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}

UNREAD_CASES = [  # N, C, O, K, size, kernel, stride, padding, dilation, groups
    (2, 3, 4, 2, (8, 10), (2, 2), (3, 4), (0, 0), (1, 1), 1),   # stride leaves rows 2, 5 and more unread
    (1, 4, 6, 3, (10, 9), (2, 3), (4, 2), (1, 0), (3, 2), 2),   # dilation gaps and a stride remainder
    (2, 2, 2, 1, (11,), (3,), (4,), (1,), (2,), 1),            # 1-d
    (1, 2, 4, 2, (7, 6, 8), (2, 1, 2), (3, 2, 3), (0, 0, 1), (2, 1, 1), 2),  # 3-d (the reference)
]


def _unread(size, k, s, p, dl):
    """Boolean [*size]: the input positions no window reads."""
    read = torch.ones((), dtype=torch.bool)
    for axis, (n, kk, ss, pp, dd) in enumerate(zip(size, k, s, p, dl)):
        out = (n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
        hit = torch.zeros(n, dtype=torch.bool)
        for y in range(out):
            for r in range(kk):
                i = y * ss + r * dd - pp
                if 0 <= i < n:
                    hit[i] = True
        read = read[..., None] & hit.reshape((1,) * axis + (n,))
    return ~read


@pytest.mark.parametrize("device,isa", _device_isa_cases() + [("cpu", None)], indirect=["isa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_non_finite_values_no_window_reads_contribute_nothing(device, isa, dtype, path, bad):
    if path == "reference" and isa is not None:
        pytest.skip("the reference has no instruction sets")
    fn = conv_weight_grad_per_sample if path == "kernel" else conv_weight_grad_per_sample_reference
    dev = kernel_device(device, FAMILY) if path == "kernel" else torch.device(device)
    for case in UNREAD_CASES:
        N, C, O, K, size, k, s, p, dl, groups = case
        gen = seeded("unread", case, dtype)
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
        unread = _unread(size, k, s, p, dl).to(dev).expand(x.shape)
        assert bool(unread.any()), case
        finite = (1e3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(dev, dtype)
        g = torch.randn((N, K, O, C // groups) + tuple(k), generator=gen, dtype=torch.float64).to(dev, dtype)
        results = []
        for xv in (x.masked_fill(unread, BAD_VALUES[bad]), x.masked_fill(unread, 0), torch.where(unread, finite, x)):
            xl, gol = xv.clone().requires_grad_(), go.clone().requires_grad_()
            out = fn(xl, gol, k, s, p, dl, groups)
            results.append((out.detach(),) + torch.autograd.grad(out, (xl, gol), g))
        for what, got, zero, fin in zip(("output", "grad_input", "grad_grad_output"), *results):
            assert bool(torch.isfinite(got).all()), (case, what)
            torch.testing.assert_close(got, zero, rtol=0, atol=0, msg=f"{case} {what}")
            torch.testing.assert_close(got, fin, rtol=0, atol=0, msg=f"{case} {what} (finite values)")
        assert bool((results[0][1][unread] == 0).all()), case


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [  # small: gradcheck builds the whole Jacobian, one call per input entry
    (2, 2, 4, 2, (5, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 4, 2, (5, 4), (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (1, 3, 3, 1, (6, 5), (1, 1), (2, 2), (0, 0), (1, 1), 3),
]


@pytest.mark.parametrize("device", devices)
def test_gradcheck(device):
    dev = kernel_device(device, FAMILY)
    gen = seeded("gradcheck")
    for i, (N, C, O, K, size, k, s, p, dl, groups) in enumerate(GRAD_CASES + [CASES_1D[1]]):
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, torch.float64, dev)
        fn = lambda a, b: conv_weight_grad_per_sample(a, b, k, s, p, dl, groups)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), go.requires_grad_()))
        if i == 1:  # one input at a time: the backward computes only what is asked for
            assert torch.autograd.gradcheck(lambda a: fn(a, go.detach()), (x,))
            assert torch.autograd.gradcheck(lambda b: fn(x.detach(), b), (go,))


def test_reference_gradients_of_3d_and_1d():
    gen = seeded("ref-grad")
    small_3d = (1, 2, 2, 2, (4, 3, 4), (2, 1, 2), (2, 1, 1), (1, 0, 1), (1, 1, 2), 2)
    for N, C, O, K, size, k, s, p, dl, groups in (small_3d, CASES_1D[2]):
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, torch.float64, "cpu")
        assert torch.autograd.gradcheck(lambda a, b: conv_weight_grad_per_sample_reference(a, b, k, s, p, dl, groups),
                                        (x.requires_grad_(), go.requires_grad_()))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grads_match_autograd_through_reference(device, dtype):
    dev = kernel_device(device, FAMILY)
    gen = seeded("grads", dtype)
    for N, C, O, K, size, k, s, p, dl, groups in GRID[::5] + BLOCKING[4:6]:
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
        out_shape = (N, K, O, C // groups) + k
        g = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device=dev, dtype=dtype)
        for need in ((True, True), (True, False), (False, True)):
            xg, gg = x.clone().requires_grad_(need[0]), go.clone().requires_grad_(need[1])
            wanted = [t for t, nd in zip((xg, gg), need) if nd]
            got = torch.autograd.grad(conv_weight_grad_per_sample(xg, gg, k, s, p, dl, groups), wanted, g)
            # the reference differentiated in float64: an independent formula (unfold's backward)
            x64, g64 = xg.detach().double().requires_grad_(need[0]), gg.detach().double().requires_grad_(need[1])
            ref = torch.autograd.grad(conv_weight_grad_per_sample_reference(x64, g64, k, s, p, dl, groups),
                                      [t for t, nd in zip((x64, g64), need) if nd], g.double())
            for a, b in zip(got, ref):
                assert a.shape == b.shape and a.dtype == dtype
                assert _rel_err(a, b) <= REL[dtype] * 10


@pytest.mark.parametrize("device", devices)
def test_second_order_through_the_backward(device):
    # the backward is written with differentiable PyTorch ops: a double backward runs and agrees
    # with the reference's
    dev = kernel_device(device, FAMILY)
    N, C, O, K, size, k, s, p, dl, groups = GRAD_CASES[1]
    x, go = _inputs(seeded("double"), N, C, O, K, size, k, s, p, dl, torch.float64, dev)
    results = []
    for fn in (conv_weight_grad_per_sample, conv_weight_grad_per_sample_reference):
        xg, gg = x.clone().requires_grad_(), go.clone().requires_grad_()
        out = fn(xg, gg, k, s, p, dl, groups)
        (gx,) = torch.autograd.grad((out**2).sum(), xg, create_graph=True)
        results.append(torch.autograd.grad(gx.sin().sum(), (xg, gg)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# opcheck, errors, fallbacks
# ---------------------------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    dev = kernel_device(device, FAMILY)
    gen = seeded("opcheck")
    op = torch.ops.ntkfast.conv_weight_grad_per_sample.default
    dtypes = (torch.float32, torch.float64, torch.float32)
    for (N, C, O, K, size, k, s, p, dl, groups), dtype in zip(GRAD_CASES, dtypes):
        x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, dev)
        args = (x, go, list(k), list(s), list(p), list(dl), groups)
        torch.library.opcheck(op, args)
        torch.library.opcheck(op, (x.clone().requires_grad_(), go.clone().requires_grad_()) + args[2:])


BAD = [
    # (input shape, grad_output shape, kwargs, dtype change, message)
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=0), "kernel_size must be >= 1"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, stride=0), "stride must be >= 1"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, padding=-1), "padding must be >= 0"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, groups=0), "groups must be >= 1"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=(3, 3, 3)), "kernel_size must be an int or have 2 entries"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, stride=(1,)), "stride must be an int or have 2 entries"),
    ((2, 4, 8, 8), (2, 3, 6, 7, 6), dict(kernel_size=3), "grad_output's spatial size"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, padding=1), "grad_output's spatial size"),
    ((2, 4, 8, 8), (3, 3, 6, 6, 6), dict(kernel_size=3), "grad_output has 3 samples but input has 2"),
    ((2, 4, 8, 8), (2, 0, 6, 6, 6), dict(kernel_size=3), "at least one cotangent"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, groups=3), "input's channel count 4"),
    ((2, 4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3, groups=4), "grad_output's channel count O = 6"),
    ((2, 4, 8, 8), (2, 3, 6, 1, 1), dict(kernel_size=9), "smaller than the dilated kernel_size"),
    ((2, 4, 8, 8), (2, 3, 6, 1, 1), dict(kernel_size=5, dilation=2), "smaller than the dilated kernel_size"),
    ((2, 4, 8, 8), (2, 3, 6, 6), dict(kernel_size=3), "grad_output must be"),
    ((4, 8, 8), (2, 3, 6, 6, 6), dict(kernel_size=3), "grad_output must be"),
    ((8, 8), (2, 3, 6, 6), dict(kernel_size=3), "input must be"),
]


@pytest.mark.parametrize("fn", [conv_weight_grad_per_sample, conv_weight_grad_per_sample_reference])
def test_bad_arguments(fn):
    for xs, gs, kw, msg in BAD:
        with pytest.raises(ValueError, match=msg):
            fn(torch.randn(xs), torch.randn(gs), **kw)
    x, go = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 6, 6, 6)
    with pytest.raises(ValueError, match="computes in float32 or float64 only, got torch.float16"):
        fn(x.half(), go.half(), 3)
    with pytest.raises(ValueError, match="grad_output has dtype torch.float64 but input has torch.float32"):
        fn(x, go.double(), 3)
    with pytest.raises(ValueError, match="grad_output is on meta but input is on cpu"):
        fn(x, go.to("meta"), 3)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        fn(x, go, 3.0)
    with pytest.raises(TypeError, match="groups must be an int"):
        fn(x, go, 3, groups=1.5)
    with pytest.raises(TypeError, match="grad_output must be a tensor"):
        fn(x, go.numpy(), 3)


@needs_extension
def test_op_level_errors_are_value_errors():
    kernel_device("cpu", FAMILY)
    op = torch.ops.ntkfast.conv_weight_grad_per_sample
    x, go = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 6, 6, 6)
    ok = ([3, 3], [1, 1], [0, 0], [1, 1], 1)
    assert op(x, go, *ok).shape == (2, 3, 6, 4, 3, 3)
    cases = [
        ((x, go, [3, 3], [1, 1], [1, 1], [1, 1], 1), "grad_output's spatial size"),
        ((x, go, [3], [1, 1], [0, 0], [1, 1], 1), "kernel_size must have 2 entries"),
        ((x, go, [3, 3], [0, 1], [0, 0], [1, 1], 1), "stride must be >= 1"),
        ((x, go, [3, 3], [1, 1], [0, -1], [1, 1], 1), "padding must be >= 0"),
        ((x, go, [3, 3], [1, 1], [0, 0], [1, 0], 1), "dilation must be >= 1"),
        ((x, go, [3, 3], [1, 1], [0, 0], [1, 1], 3), "must be a positive multiple of groups"),
        ((x, go.double(), *ok), "grad_output has dtype"),
        ((x.half(), go.half(), *ok), "computes in float32 or float64 only, got Half"),
        ((x[0], go, *ok), r"input must be \[N, C, H, W\]"),
        ((x, go[:1], *ok), "grad_output has 1 samples but input has 2"),
        ((x, go[:, :0], *ok), "at least one cotangent"),
        ((x, go, [9, 9], [1, 1], [0, 0], [1, 1], 1), "smaller than the dilated kernel_size"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            op(*args)


@needs_extension
def test_bad_isa_name_is_a_value_error(monkeypatch):
    kernel_device("cpu", FAMILY)
    monkeypatch.setenv("NTKFAST_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="NTKFAST_CPU_ISA must be"):
        conv_weight_grad_per_sample(torch.randn(1, 2, 5, 5), torch.randn(1, 1, 3, 3, 3), 3)


def test_fallback_without_extension_warns_and_matches(monkeypatch):
    x, go = _inputs(seeded("fallback"), 2, 4, 6, 3, (9, 8), 3, 1, 1, 1, torch.float64, "cpu")
    compiled = conv_weight_grad_per_sample(x, go, 3, 1, 1, 1, 2) if ops.extension_loaded() else None
    monkeypatch.setattr(loader.STATE, "module", None)
    monkeypatch.setattr(loader.STATE, "error", "ImportError: simulated")
    monkeypatch.setattr(loader.STATE, "warned", False)
    xg = x.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="falls back to its pure-PyTorch reference"):
        out = conv_weight_grad_per_sample(xg, go, 3, 1, 1, 1, 2)
    want = _check(out, x, go, 3, 1, 1, 1, 2)
    assert torch.autograd.grad(out.sum(), xg)[0].shape == x.shape
    if compiled is not None:
        _check(compiled, x, go, 3, 1, 1, 1, 2, want)


@needs_extension
def test_extension_without_this_op_falls_back(monkeypatch):
    monkeypatch.setattr(FAMILY, "available", False)
    monkeypatch.setattr(FAMILY, "warned", False)
    x, go = _inputs(seeded("old-ext"), 2, 4, 6, 3, (9, 8), 3, 1, 1, 1, torch.float64, "cpu")
    with pytest.warns(RuntimeWarning, match="predates conv_weight_grad_per_sample"):
        out = conv_weight_grad_per_sample(x, go, 3, 1, 1)
    assert torch.equal(out, conv_weight_grad_per_sample_reference(x, go, 3, 1, 1))


def test_device_without_kernels_uses_the_reference():
    # meta tensors: no ntkfast kernel on that device, so the reference runs (shapes only)
    x, go = torch.randn(2, 4, 9, 8, device="meta"), torch.randn(2, 3, 6, 5, 4, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = conv_weight_grad_per_sample(x, go, 3, 2, 1, 1, 2)
    assert out.shape == (2, 3, 6, 2, 3, 3) and out.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# CUDA only: the kernel against the CPU kernel on larger sizes
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA kernels cannot run here")


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu_kernel_at_network_sizes():
    kernel_device("cuda", FAMILY)
    gen = seeded("cuda-cpu")
    sizes = [
        (16, 16, 16, 10, (32, 32), 3, 1, 1, 1, 1),
        (16, 64, 64, 10, (8, 8), 3, 1, 1, 1, 1),
        (16, 32, 64, 10, (16, 16), 1, 2, 0, 1, 1),
        (4, 1, 6, 10, (28, 28), 5, 1, 2, 1, 1),
        (1, 3, 64, 10, (224, 224), 7, 2, 3, 1, 1),  # one sample, many positions: split over them
        (2, 32, 32, 3, (12, 12), 3, 1, 1, 1, 32),
    ]
    for dtype in (torch.float32, torch.float64):
        for N, C, O, K, size, k, s, p, dl, groups in sizes:
            x, go = _inputs(gen, N, C, O, K, size, k, s, p, dl, dtype, "cpu")
            cpu = conv_weight_grad_per_sample(x, go, k, s, p, dl, groups)
            gpu = conv_weight_grad_per_sample(x.cuda(), go.cuda(), k, s, p, dl, groups)
            assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
            assert _rel_err(gpu.cpu(), cpu) <= REL[dtype] * 10
