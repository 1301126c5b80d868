"""ntkfast.ops.masked_gram: the compiled kernel (CPU: dense BLAS and sparse CSR paths, every
instruction set; CUDA where usable) and the pure-PyTorch reference against a brute-force einsum,
all four modes, the symmetric case (a2 is a1, b2 is b1), gradients, opcheck, argument errors and
the fallbacks.

Inputs are fresh random numbers (never zeros, which would hide a wrong index); masks are random
real values or 0/1 at several densities, so that both CPU paths are taken. The CPU kernel reads
NTKFAST_MASKED_GRAM_PATH (dense / sparse) and NTKFAST_MASKED_GRAM_ISA (base / avx2 / avx512) on
every call; the tests set them to force each path and instruction set on the same inputs.
Errors are norm-wise relative to the brute force in float64: 1e-12 (float64), 1e-5 (float32).
"""
import warnings

import pytest
import torch

from ntkfast import ops
from ntkfast.ops import loader
from ntkfast.ops.masked_gram import FAMILY
from ntkfast.ops import masked_gram, masked_gram_reference
from testing import devices, internal, kernel_device, seeded

MODES = ("full", "trace", "diagonal", "diagonal_trace")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# (N1, N2, C, K, O): ones, C = 1, K = 1, O = 1, N1 != N2 both ways, sizes crossing the kernels'
# blocks (8 rows, panels of 32 samples, several tasks per block row)
SIZES = [
    (1, 1, 1, 1, 1),
    (3, 5, 1, 2, 4),
    (4, 6, 7, 1, 3),
    (5, 7, 9, 3, 1),
    (33, 17, 40, 4, 12),
    (9, 41, 23, 2, 5),
    (40, 40, 50, 10, 30),
    (70, 77, 130, 3, 70),
]
DENSITIES = (1.0, 0.6, 0.2, 0.05)




def _inputs(gen, n1, n2, c, k, o, dtype, device, density=1.0, binary=False):
    """Random a1, b1, a2, b2 and a mask: normal values, the mask zero outside a random density
    fraction (and 0/1 when binary); at least one nonzero mask entry."""
    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    keep = torch.rand((o, c), generator=gen) < density
    keep.view(-1)[torch.randint(o * c, (1,), generator=gen)] = True
    values = (torch.ones(o, c, dtype=torch.float64) if binary
              else torch.randn((o, c), generator=gen, dtype=torch.float64))
    mask = (values * keep).to(device=device, dtype=dtype)
    return randn(n1, c), randn(n1, k, o), randn(n2, c), randn(n2, k, o), mask


def _brute(a1, b1, a2, b2, mask, mode):
    """Independent oracle: einsums in float64."""
    a1, b1, a2, b2, mask = (t.detach().double() for t in (a1, b1, a2, b2, mask))
    p = torch.einsum("oc,ic,jc->ijo", mask, a1, a2)
    full = torch.einsum("ijo,iko,jlo->ijkl", p, b1, b2)
    return _reduce(full, mode)


def _reduce(full, mode):
    if mode == "full":
        return full
    if mode == "trace":
        return full.diagonal(dim1=2, dim2=3).sum(-1)
    diag = full.diagonal(dim1=0, dim2=1).permute(2, 0, 1)
    return diag if mode == "diagonal" else diag.diagonal(dim1=1, dim2=2).sum(-1)


def _assert_close(got, want, dtype, what=""):
    assert got.shape == want.shape, what
    got = got.detach().double().cpu()
    want = want.cpu()
    scale = float(want.norm())
    err = float((got - want).norm())
    assert err <= TOL[dtype] * max(scale, 1e-300), f"{what}: relative error {err / max(scale, 1e-300):.3g}"


def _noncontig(t):
    """The same values in a strided layout: the last two dims stored transposed, or every other
    element of a 1-d tensor."""
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
    wide[::2] = t
    return wide[::2]


def _modes_for(n1, n2):
    return MODES if n1 == n2 else ("full", "trace")


# ---------------------------------------------------------------------------------------------
# the kernel and the reference against brute force
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["dense", "sparse", "auto"])
def test_kernel_matches_brute_force(device, dtype, path, monkeypatch):
    dev = kernel_device(device, FAMILY)
    monkeypatch.setenv("NTKFAST_MASKED_GRAM_PATH", path)
    for size in SIZES:
        n1, n2 = size[:2]
        for density in DENSITIES:
            for binary in (False, True):
                a1, b1, a2, b2, m = _inputs(seeded(size, density, binary, dtype), *size, dtype, dev, density, binary)
                full = _brute(a1, b1, a2, b2, m, "full")
                for mode in _modes_for(n1, n2):
                    got = masked_gram(a1, b1, a2, b2, m, mode=mode)
                    assert got.dtype == dtype and got.device.type == dev.type and got.is_contiguous()
                    _assert_close(got, _reduce(full, mode), dtype, f"{size} {density} {binary} {mode}")
                # a2 is a1 and b2 is b1: the kernels compute one half and mirror it
                full_sym = _brute(a1, b1, a1, b1, m, "full")
                for mode in MODES:
                    got = masked_gram(a1, b1, mask=m, mode=mode)
                    _assert_close(got, _reduce(full_sym, mode), dtype, f"{size} {density} {binary} {mode} sym")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_every_instruction_set(isa, path, monkeypatch):
    """The vectorised loops exist once per instruction set (the CPU's best is the default; one
    above what it has falls back to the best it has)."""
    kernel_device("cpu", FAMILY)
    monkeypatch.setenv("NTKFAST_MASKED_GRAM_ISA", isa)
    monkeypatch.setenv("NTKFAST_MASKED_GRAM_PATH", path)
    for dtype in (torch.float64, torch.float32):
        for size in ((70, 77, 130, 3, 70), (33, 17, 40, 4, 12), (40, 40, 50, 11, 30)):
            a1, b1, a2, b2, m = _inputs(seeded("isa", size, dtype), *size, dtype, "cpu", 0.3)
            full = _brute(a1, b1, a2, b2, m, "full")
            for mode in _modes_for(*size[:2]):
                _assert_close(masked_gram(a1, b1, a2, b2, m, mode=mode), _reduce(full, mode), dtype, f"{size} {mode}")
            full_sym = _brute(a1, b1, a1, b1, m, "full")
            _assert_close(masked_gram(a1, b1, mask=m), full_sym, dtype, f"{size} sym")


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous_inputs(device, dtype):
    dev = kernel_device(device, FAMILY)
    size = (21, 21, 37, 3, 19)
    a1, b1, a2, b2, m = _inputs(seeded("noncontig", dtype), *size, dtype, dev, 0.3)
    args = [_noncontig(t) for t in (a1, b1, a2, b2, m)]
    assert not any(t.is_contiguous() for t in args)
    # slices with a step too: every other sample of a larger batch
    big = _inputs(seeded("noncontig-step", dtype), 42, 42, 37, 3, 19, dtype, dev, 0.3)
    stepped = [big[0][::2], big[1][::2], big[2][1::2], big[3][1::2], big[4]]
    for case in (args, stepped):
        full = _brute(*case, "full")
        for mode in MODES:
            _assert_close(masked_gram(*case, mode=mode), _reduce(full, mode), dtype, mode)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_brute_force(dtype, monkeypatch):
    # a small chunk budget: several chunks of rows i, and a last one shorter than the others
    monkeypatch.setattr(internal("masked_gram"), "_GRAM_CHUNK_ELEMENTS", 5000)
    for size in SIZES:
        n1, n2 = size[:2]
        for density, binary in ((1.0, False), (0.2, True)):
            a1, b1, a2, b2, m = _inputs(seeded("ref", size, density, dtype), *size, dtype, "cpu", density, binary)
            full = _brute(a1, b1, a2, b2, m, "full")
            for mode in _modes_for(n1, n2):
                got = masked_gram_reference(a1, b1, a2, b2, m, mode=mode)
                assert got.dtype == dtype
                _assert_close(got, _reduce(full, mode), dtype, f"{size} {mode}")
            full_sym = _brute(a1, b1, a1, b1, m, "full")
            for mode in MODES:
                _assert_close(masked_gram_reference(a1, b1, mask=m, mode=mode), _reduce(full_sym, mode), dtype, mode)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("fn", [masked_gram, masked_gram_reference])
def test_no_mask_is_all_ones(device, fn):
    size = (6, 9, 11, 3, 5)
    a1, b1, a2, b2, _ = _inputs(seeded("nomask"), *size, torch.float64, device)
    ones = torch.ones(size[4], size[2], dtype=torch.float64, device=device)
    full = _brute(a1, b1, a2, b2, ones, "full")
    for mode in ("full", "trace"):
        _assert_close(fn(a1, b1, a2, b2, mode=mode), _reduce(full, mode), torch.float64, mode)
    full_sym = _brute(a1, b1, a1, b1, ones, "full")
    for mode in MODES:
        _assert_close(fn(a1, b1, mode=mode), _reduce(full_sym, mode), torch.float64, mode)


@pytest.mark.parametrize("device", devices)
def test_symmetric_result_is_exactly_symmetric(device):
    dev = kernel_device(device, FAMILY)
    for density in (1.0, 0.1):
        a1, b1, _, _, m = _inputs(seeded("sym", density), 45, 45, 33, 4, 21, torch.float32, dev, density)
        full = masked_gram(a1, b1, mask=m)
        assert torch.equal(full, full.permute(1, 0, 3, 2))
        trace = masked_gram(a1, b1, mask=m, mode="trace")
        assert torch.equal(trace, trace.T)


@pytest.mark.parametrize("device", devices)
def test_empty_and_zero_cases(device):
    dev = kernel_device(device, FAMILY)
    for size in ((0, 3, 4, 2, 5), (3, 0, 4, 2, 5), (3, 4, 0, 2, 5), (3, 4, 5, 0, 2), (3, 4, 5, 2, 0)):
        n1, n2, c, k, o = size
        a1, b1, a2, b2 = (torch.randn(s, device=dev) for s in ((n1, c), (n1, k, o), (n2, c), (n2, k, o)))
        m = torch.randn(o, c, device=dev)
        for mode in _modes_for(n1, n2):
            got = masked_gram(a1, b1, a2, b2, m, mode=mode)
            want = masked_gram_reference(a1, b1, a2, b2, m, mode=mode)
            assert got.shape == want.shape == internal("masked_gram")._gram_out_shape(n1, n2, k, mode)
            assert bool((got == 0).all())
    # an all-zero mask
    a1, b1, a2, b2, m = _inputs(seeded("zero-mask"), 5, 6, 7, 2, 3, torch.float64, dev)
    for mode in ("full", "trace"):
        assert bool((masked_gram(a1, b1, a2, b2, torch.zeros_like(m), mode=mode) == 0).all())


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(device, mode):
    dev = kernel_device(device, FAMILY)
    for size, density in (((3, 3, 4, 2, 5), 0.5), ((4, 4, 3, 1, 2), 1.0), ((2, 2, 5, 3, 1), 1.0)):
        a1, b1, a2, b2, m = (t.requires_grad_() if i < 4 else t for i, t in
                             enumerate(_inputs(seeded("gradcheck", size, mode), *size, torch.float64, dev, density)))
        assert torch.autograd.gradcheck(lambda w, x, y, z: masked_gram(w, x, y, z, m, mode=mode), (a1, b1, a2, b2))
        # a2 is a1 and b2 is b1: both uses of each tensor get their gradient
        assert torch.autograd.gradcheck(lambda w, x: masked_gram(w, x, mask=m, mode=mode), (a1, b1))
        # some inputs constant
        assert torch.autograd.gradcheck(lambda x: masked_gram(a1.detach(), x, a2.detach(), b2.detach(), m, mode=mode),
                                        (b1,))
        assert torch.autograd.gradcheck(lambda y: masked_gram(a1.detach(), b1.detach(), y, b2.detach(), m, mode=mode),
                                        (a2,))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("mode", MODES)
def test_gradgradcheck(device, mode):
    """Only first-order gradients are promised, but the backward is plain PyTorch ops, so a second
    order comes for free: held here so that it is not lost unnoticed."""
    dev = kernel_device(device, FAMILY)
    a1, b1, a2, b2, m = _inputs(seeded("gradgrad", mode), 3, 3, 4, 2, 3, torch.float64, dev, 0.6)
    leaves = [t.requires_grad_() for t in (a1, b1, a2, b2)]
    assert torch.autograd.gradgradcheck(lambda w, x, y, z: masked_gram(w, x, y, z, m, mode=mode), leaves)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grads_match_autograd_through_reference(device, dtype, monkeypatch):
    dev = kernel_device(device, FAMILY)
    monkeypatch.setattr(internal("masked_gram"), "_GRAM_CHUNK_ELEMENTS", 20000)  # the backward's chunks: several
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for size in ((37, 29, 23, 3, 11), (30, 30, 40, 10, 13)):
        a1, b1, a2, b2, m = _inputs(seeded("grads", size, dtype), *size, dtype, dev, 0.4)
        for mode in _modes_for(*size[:2]):
            for sym in (False, True):
                leaves = [t.clone().requires_grad_() for t in ((a1, b1) if sym else (a1, b1, a2, b2))]
                args = (leaves[0], leaves[1]) + ((leaves[0], leaves[1]) if sym else (leaves[2], leaves[3]))
                out = masked_gram(*args, m, mode=mode)
                g = torch.randn(out.shape, generator=seeded("g", size, mode), dtype=torch.float64).to(dev, dtype)
                got = torch.autograd.grad(out, leaves, g)
                want = torch.autograd.grad(masked_gram_reference(*args, m, mode=mode), leaves, g)
                for x, y in zip(got, want):
                    err = float((x.double() - y.double()).norm() / y.double().norm())
                    assert err < tol, (size, mode, sym, err)


def test_only_needed_gradients_and_no_mask_gradient():
    a1, b1, a2, b2, m = _inputs(seeded("needs"), 6, 5, 7, 2, 3, torch.float64, "cpu", 0.5)
    b1.requires_grad_()
    m.requires_grad_()
    out = masked_gram(a1, b1, a2, b2, m, mode="trace")
    (gb1,) = torch.autograd.grad(out.sum(), (b1,), retain_graph=True)
    assert gb1.shape == b1.shape
    out.sum().backward()
    assert m.grad is None  # documented: the mask is a constant for masked_gram
    # while the reference differentiates it
    ref = masked_gram_reference(a1, b1, a2, b2, m, mode="trace")
    assert torch.autograd.grad(ref.sum(), (m,))[0].shape == m.shape


# ---------------------------------------------------------------------------------------------
# opcheck, errors, fallback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    dev = kernel_device(device, FAMILY)
    a1, b1, a2, b2, m = _inputs(seeded("opcheck"), 4, 4, 5, 2, 3, torch.float64, dev, 0.5)
    for mode in MODES:
        torch.library.opcheck(torch.ops.ntkfast.masked_gram.default, (a1, b1, a2, b2, m, mode))
        grads = [t.clone().requires_grad_() for t in (a1, b1, a2, b2)]
        torch.library.opcheck(torch.ops.ntkfast.masked_gram.default, (*grads, m, mode))
    torch.library.opcheck(torch.ops.ntkfast.masked_gram.default, (a1.float(), b1.float(), a1.float(), b1.float(),
                                                                  m.float(), "trace"))


@pytest.mark.parametrize("fn", [masked_gram, masked_gram_reference])
def test_bad_arguments(fn):
    a1, b1, a2, b2, m = _inputs(seeded("bad"), 3, 4, 5, 2, 6, torch.float32, "cpu")
    value_errors = [
        ((a1, b1, a2, b2, m), dict(mode="nope"), "mode must be one of"),
        ((a1, b1, a2, b2, m), dict(mode="diagonal"), "needs as many samples"),
        ((a1.long(), b1, a2, b2, m), {}, "masked_gram computes in float32 or float64 only, got torch.int64"),
        ((a1.half(), b1.half(), a2.half(), b2.half(), m.half()), {},
         "masked_gram computes in float32 or float64 only, got torch.float16"),
        ((a1, b1.double(), a2, b2, m), {}, "b1 has dtype"),
        ((a1, b1, a2.double(), b2, m), {}, "a2 has dtype"),
        ((a1, b1, a2, b2, m.double()), {}, "mask has dtype"),
        ((a1, b1, a2, b2.to("meta"), m), {}, "b2 is on meta"),
        ((a1, b1, a2, b2, m.to("meta")), {}, "mask is on meta"),
        ((a1[0], b1, a2, b2, m), {}, r"a1 must have shape \[N1, C\]"),
        ((a1, b1[0], a2, b2, m), {}, r"b1 must have shape \[N1, K, O\]"),
        ((a1, b1, a2[None], b2, m), {}, r"a2 must have shape \[N2, C\]"),
        ((a1, b1, a2, b2, m[None]), {}, r"mask must have shape \[O, C\]"),
        ((a1, b1[:2], a2, b2, m), {}, "b1 has 2 samples"),
        ((a1, b1, a2[:, :4], b2, m), {}, "a2 has 4 features"),
        ((a1, b1, a2, b2[:3], m), {}, "b2 has 3 samples"),
        ((a1, b1, a2, b2[:, :1], m), {}, "b2 has shape"),
        ((a1, b1, a2, b2, m[:5]), {}, "mask has shape"),
        ((a1, b1, a2, b2, m.T), {}, "mask has shape"),
    ]
    for args, kwargs, msg in value_errors:
        with pytest.raises(ValueError, match=msg):
            fn(*args, **kwargs)
    with pytest.raises(TypeError, match="mode must be a str"):
        fn(a1, b1, a2, b2, m, mode=1)
    with pytest.raises(TypeError, match="a1 must be a tensor"):
        fn(a1.tolist(), b1, a2, b2, m)
    with pytest.raises(TypeError, match="b2 must be a tensor"):
        fn(a1, b1, a2, b2.numpy(), m)
    with pytest.raises(TypeError, match="mask must be a tensor"):
        fn(a1, b1, a2, b2, 1.0)


def test_op_level_errors_are_value_errors():
    kernel_device("cpu", FAMILY)
    a1, b1, a2, b2, m = _inputs(seeded("op-errors"), 3, 4, 5, 2, 6, torch.float32, "cpu")
    op = torch.ops.ntkfast.masked_gram
    with pytest.raises(ValueError, match="mode must be one of"):
        op(a1, b1, a2, b2, m, "full ")
    with pytest.raises(ValueError, match="needs as many samples"):
        op(a1, b1, a2, b2, m, "diagonal_trace")
    with pytest.raises(ValueError, match="mask has shape"):
        op(a1, b1, a2, b2, m.T.contiguous(), "full")
    with pytest.raises(ValueError, match="b1 has dtype"):
        op(a1, b1.double(), a2, b2, m, "full")
    with pytest.raises(ValueError, match="masked_gram computes in float32 or float64 only, got Half"):
        op(a1.half(), b1.half(), a2.half(), b2.half(), m.half(), "full")


def test_bad_environment_override(monkeypatch):
    kernel_device("cpu", FAMILY)
    a1, b1, a2, b2, m = _inputs(seeded("env"), 3, 4, 5, 2, 6, torch.float32, "cpu")
    monkeypatch.setenv("NTKFAST_MASKED_GRAM_PATH", "fast")
    with pytest.raises(ValueError, match="NTKFAST_MASKED_GRAM_PATH"):
        masked_gram(a1, b1, a2, b2, m)
    monkeypatch.setenv("NTKFAST_MASKED_GRAM_PATH", "auto")
    monkeypatch.setenv("NTKFAST_MASKED_GRAM_ISA", "sse9")
    with pytest.raises(ValueError, match="NTKFAST_MASKED_GRAM_ISA"):
        masked_gram(a1, b1, a2, b2, m)


def test_fallback_without_extension_warns_and_matches(monkeypatch):
    a1, b1, a2, b2, m = _inputs(seeded("fallback"), 5, 6, 7, 3, 4, torch.float64, "cpu", 0.5)
    compiled = masked_gram(a1, b1, a2, b2, m) if ops.extension_loaded() else None
    monkeypatch.setattr(loader.STATE, "module", None)
    monkeypatch.setattr(loader.STATE, "error", "ImportError: simulated")
    monkeypatch.setattr(loader.STATE, "warned", False)
    with pytest.warns(RuntimeWarning, match="falls back to its pure-PyTorch reference"):
        out = masked_gram(a1, b1, a2, b2, m)
    _assert_close(out, _brute(a1, b1, a2, b2, m, "full"), torch.float64)
    if compiled is not None:
        _assert_close(out, compiled.double(), torch.float64)


def test_extension_without_the_op_falls_back(monkeypatch):
    if not ops.extension_loaded():
        pytest.skip("compiled extension not loaded")
    monkeypatch.setattr(FAMILY, "available", False)
    monkeypatch.setattr(FAMILY, "warned", False)
    a1, b1, a2, b2, m = _inputs(seeded("no-op"), 5, 6, 7, 3, 4, torch.float64, "cpu", 0.5)
    with pytest.warns(RuntimeWarning, match="predates masked_gram"):
        out = masked_gram(a1, b1, a2, b2, m, mode="trace")
    _assert_close(out, _brute(a1, b1, a2, b2, m, "trace"), torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        masked_gram(a1, b1, a2, b2, m, mode="trace")


# ---------------------------------------------------------------------------------------------
# pruned entries: NaN / inf under a zero mask (issue 25)
# ---------------------------------------------------------------------------------------------
#
# A column c of the mask that is all zero means input feature c reaches no kept weight, a row o all
# zero that output o has none: a1[:, c], a2[:, c], b1[:, :, o] and b2[:, :, o] are then multiplied
# by zero mask entries only, and whatever they hold (NaN, +inf, -inf) must contribute nothing to
# the result or to any gradient, on every path: it must equal the result with zeros (or any finite
# values) there, and be finite.

BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def _pruned_case(gen, n1, n2, c, k, o, dtype, device):
    """Inputs with every third column and every fourth row of the mask zero (and scattered zeros
    elsewhere), and the boolean index of those dead columns and rows."""
    a1, b1, a2, b2, m = _inputs(gen, n1, n2, c, k, o, dtype, "cpu", 0.7)
    dead_c = torch.zeros(c, dtype=torch.bool)
    dead_o = torch.zeros(o, dtype=torch.bool)
    dead_c[1::3] = True
    dead_o[::4] = True
    m[:, dead_c] = 0
    m[dead_o] = 0
    m[(~dead_o).nonzero()[0], (~dead_c).nonzero()[0]] = 1.5  # at least one kept entry
    move = lambda t: t.to(device)  # noqa: E731
    return tuple(map(move, (a1, b1, a2, b2, m))), dead_c.to(device), dead_o.to(device)


def _fill_dead(a1, b1, a2, b2, dead_c, dead_o, value):
    """Copies with ``value`` (a float, or a generator for random finite values) in the dead places."""
    def fill(t, idx):
        t = t.detach().clone()
        if isinstance(value, torch.Generator):
            t[idx] = (1e3 * torch.randn(t[idx].shape, generator=value, dtype=torch.float64)).to(t.dtype).to(t.device)
        else:
            t[idx] = value
        return t
    return (fill(a1, (slice(None), dead_c)), fill(b1, (slice(None), slice(None), dead_o)),
            fill(a2, (slice(None), dead_c)), fill(b2, (slice(None), slice(None), dead_o)))


def _equal(got, want, what):
    assert got.shape == want.shape, what
    assert bool(torch.isfinite(got).all()), f"{what}: not finite"
    # exact, signed zeros aside (a zero mask entry may give -0.0 one way and +0.0 the other)
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=what)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["kernel-dense", "kernel-sparse", "reference"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_non_finite_values_under_a_zero_mask_contribute_nothing(device, dtype, path, bad, monkeypatch):
    if path == "reference":
        fn, dev = masked_gram_reference, torch.device(device)
    else:
        fn, dev = masked_gram, kernel_device(device, FAMILY)
        monkeypatch.setenv("NTKFAST_MASKED_GRAM_PATH", path.split("-")[1])
    for size in ((5, 7, 10, 3, 9), (33, 33, 40, 2, 20), (9, 41, 23, 1, 5)):
        (a1, b1, a2, b2, m), dead_c, dead_o = _pruned_case(seeded("pruned", size, dtype), *size, dtype, dev)
        poisoned = _fill_dead(a1, b1, a2, b2, dead_c, dead_o, BAD[bad])
        zeros = _fill_dead(a1, b1, a2, b2, dead_c, dead_o, 0.0)
        finite = _fill_dead(a1, b1, a2, b2, dead_c, dead_o, seeded("finite", size))
        g = None
        for mode in _modes_for(*size[:2]):
            for sym in (False, True):
                pick = (lambda t: (t[0], t[1], t[0], t[1])) if sym else (lambda t: t)
                what = f"{size} {mode} sym={sym}"
                leaves = [[x.clone().requires_grad_() for x in (pick(v)[:2] if sym else pick(v))]
                          for v in (poisoned, zeros, finite)]
                outs = [fn(*(ls * 2 if sym else ls), m, mode=mode) for ls in leaves]
                _equal(outs[0], outs[1], what)
                _equal(outs[0], outs[2], what + " (finite values)")
                g = torch.randn(outs[0].shape, generator=seeded("g", size, mode), dtype=torch.float64).to(dev, dtype)
                grads = [torch.autograd.grad(out, ls, g) for out, ls in zip(outs, leaves)]
                for i, (u, v, w) in enumerate(zip(*grads)):
                    _equal(u, v, f"{what}: gradient {i}")
                    _equal(u, w, f"{what}: gradient {i} (finite values)")


@pytest.mark.parametrize("fn", [masked_gram, masked_gram_reference])
def test_an_all_zero_mask_gives_zeros_whatever_the_inputs(fn):
    a1, b1, a2, b2, m = _inputs(seeded("all-zero"), 4, 5, 6, 2, 3, torch.float64, "cpu")
    a1[0, 0], b2[1, 0, 2], a2[2, 3] = float("nan"), float("inf"), float("-inf")
    for mode in ("full", "trace"):
        out = fn(a1, b1, a2, b2, torch.zeros_like(m), mode=mode)
        assert bool((out == 0).all()), mode


# ---------------------------------------------------------------------------------------------
# CUDA only: the CUDA kernels against the CPU kernel, several chunks of rows
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA kernels cannot run here")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_kernel(dtype):
    kernel_device("cuda", FAMILY)
    for size in ((130, 97, 300, 10, 100), (64, 64, 784, 10, 300), (3, 200, 5, 1, 70)):
        a1, b1, a2, b2, m = _inputs(seeded("cuda", size, dtype), *size, dtype, "cpu", 0.3)
        for sym in (False, True):
            args = (a1, b1, a1, b1) if sym else (a1, b1, a2, b2)
            for mode in _modes_for(size[0], size[0] if sym else size[1]):
                cpu = masked_gram(*args, m, mode=mode)
                gpu = masked_gram(*(t.cuda() for t in args), m.cuda(), mode=mode).cpu()
                _assert_close(gpu, cpu.double(), dtype, f"{size} {mode} {sym}")
