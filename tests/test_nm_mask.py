"""ntkfast.ops.nm_mask: the reference against a brute-force oracle (every group sorted in plain
Python), the kernels against the reference on every device (CUDA cases run only on a GPU), exact
N per group, ties, keep, NaN and infinities, dtypes, strides, opcheck, errors and the fallback."""
import warnings

import pytest
import torch

from ntkfast import ops
from ntkfast.ops import nm_mask, nm_mask_reference
from ntkfast.ops.nm_mask import FAMILY
from testing import devices, kernel_device, needs_extension, seeded

# (n, m): 2:4 first; the unrolled kernels (m = 2, 4, 8, 16), the generic pair count (m <= 32) and
# the partial selection above it
NM = [(2, 4), (1, 4), (3, 4), (4, 4), (1, 1), (1, 2), (4, 8), (2, 8), (8, 16), (5, 16), (3, 7), (16, 32), (10, 33),
      (20, 64), (1, 100)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _scores(gen, shape, kind, dtype=torch.float64):
    if kind == "normal":
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # a handful of values: ties inside most groups
        s = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
    elif kind == "specials":  # signed zeros and infinities among ordinary values
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
        pick = torch.randint(0, 6, shape, generator=gen)
        s[pick == 0] = 0.0
        s[pick == 1] = -0.0
        s[pick == 2] = float("inf")
        s[pick == 3] = float("-inf")
    else:  # SynFlow-like range (float32 and float64 only)
        s = torch.randn(shape, generator=gen, dtype=torch.float64).abs() * 10.0 ** torch.randint(-30, 30, shape,
                                                                                                 generator=gen)
    return s.to(dtype)


def _oracle(scores, n, m, keep=None):
    """Every group sorted in plain Python by (score descending, index ascending)."""
    flat = scores.double().reshape(-1).tolist()
    alive = keep.reshape(-1).tolist() if keep is not None else [True] * len(flat)
    out = [False] * len(flat)
    for g in range(0, len(flat), m):
        cand = sorted((i for i in range(g, g + m) if alive[i]), key=lambda i: (-flat[i], i))
        for i in cand[:n]:
            out[i] = True
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


def _check_counts(mask, n, m, keep=None):
    per_group = mask.reshape(-1, m).sum(1)
    want = torch.full_like(per_group, n) if keep is None else keep.reshape(-1, m).sum(1).clamp(max=n)
    assert torch.equal(per_group, want), "not N per group (or every keepable entry where fewer than N)"
    if keep is not None:
        assert not bool((mask & ~keep).any()), "an entry keep forbids was kept"


@pytest.mark.parametrize("kind", ["normal", "ties", "specials"])
@pytest.mark.parametrize("n,m", NM)
def test_reference_matches_oracle(kind, n, m):
    gen = seeded("oracle", kind, n, m)
    s = _scores(gen, (3, 2 * m), kind)
    for keep in (None, torch.rand(s.shape, generator=gen) < 0.6):
        got = nm_mask_reference(s, n, m, keep)
        assert torch.equal(got, _oracle(s, n, m, keep))
        _check_counts(got, n, m, keep)


def test_by_hand():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, -0.0, 0.0, float("-inf"), float("inf")]])
    # group 0: 3.0 at index 1 and 2; group 1: +inf, then the first zero (-0.0 ties +0.0)
    want = [[False, True, True, False, True, False, False, True]]
    for fn in (nm_mask, nm_mask_reference):
        assert fn(s, 2, 4).tolist() == want
        # a tie at the cut: the lower index wins
        assert fn(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), 2, 4).tolist() == [[True, True, False, False]]
        # keep: the forbidden 9.0 neither is kept nor pushes another out; a group with one keepable entry keeps one
        keep = torch.tensor([[True, False, True, True, False, False, True, False]])
        s2 = torch.tensor([[1.0, 9.0, 0.5, 2.0, 7.0, 8.0, -1.0, 6.0]])
        assert fn(s2, 2, 4, keep).tolist() == [[True, False, False, True, False, False, True, False]]


@needs_extension
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "specials", "wide"])
def test_kernel_matches_reference(device, dtype, kind):
    dev = kernel_device(device, FAMILY)
    if kind == "wide" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the wide range overflows half precision")
    for n, m in NM:
        # rows of several groups; the largest spans many of the CPU kernel's parallel tasks
        for shape in [(1, m), (5, 3 * m), (37, 4 * m), (2, 3, 2 * m), (4096 // m + 3, 16 * m)]:
            gen = seeded("kernel", str(dtype), kind, n, m, shape)
            s = _scores(gen, shape, kind, dtype)
            for keep in (None, torch.rand(shape, generator=gen) < 0.7, torch.rand(shape, generator=gen) < 0.2):
                got = nm_mask(s.to(dev), n, m, None if keep is None else keep.to(dev))
                assert got.dtype == torch.bool and got.shape == s.shape and got.device.type == dev.type
                assert got.is_contiguous()
                ref = nm_mask_reference(s, n, m, keep)
                assert torch.equal(got.cpu(), ref), (n, m, shape, keep is not None)
                _check_counts(got.cpu(), n, m, keep)


@needs_extension
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_oracle(device, dtype):
    dev = kernel_device(device, FAMILY)
    for n, m in [(2, 4), (3, 7), (10, 33)]:
        gen = seeded("kernel-oracle", str(dtype), n, m)
        s = _scores(gen, (6, 5 * m), "ties", dtype)
        keep = torch.rand(s.shape, generator=gen) < 0.8
        assert torch.equal(nm_mask(s.to(dev), n, m, keep.to(dev)).cpu(), _oracle(s, n, m, keep))


@needs_extension
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset", "expanded"])
def test_any_strides(device, layout):
    dev = kernel_device(device, FAMILY)
    gen = seeded("strides", layout)
    base = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    if layout == "transposed":  # stored column-major; the groups still run along the last dimension
        s = base.t().contiguous().t()
    elif layout == "strided":  # every other column of a wider tensor whose gaps hold NaN
        wide = torch.full((24, 32), float("nan"), dtype=torch.float64)
        wide[:, ::2] = base
        s = wide[:, ::2]
    elif layout == "offset":  # contiguous, but not at the start of its storage
        s = torch.cat([torch.randn(7, generator=gen, dtype=torch.float64), base.reshape(-1)])[7:].reshape(24, 16)
    else:  # one row repeated (stride 0): ties across rows, none within
        s = base[:1].expand(24, 16)
    keep = (torch.rand(24, 16, generator=gen) < 0.7).t().contiguous().t()  # keep non-contiguous too
    for n, m in [(2, 4), (3, 8), (5, 16)]:
        got = nm_mask(s.to(dev), n, m, keep.to(dev))
        assert torch.equal(got.cpu(), nm_mask_reference(s.contiguous(), n, m, keep.contiguous()))
        assert torch.equal(got.cpu(), _oracle(s.contiguous(), n, m, keep.contiguous()))


@needs_extension
@pytest.mark.parametrize("device", devices)
def test_half_precisions_compare_exactly(device):
    dev = kernel_device(device, FAMILY)
    # values that differ only in the last bit of float16 / bfloat16: exact widening keeps them apart
    for dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        s = (1.0 + eps * torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0, 0.0, 1.0, 3.0]])).to(dtype)
        want = [[False, True, False, True, True, False, False, True]]
        assert nm_mask(s.to(dev), 2, 4).tolist() == want
        assert nm_mask_reference(s, 2, 4).tolist() == want


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("bad", ["nan", "+inf", "-inf"])
def test_non_finite_where_keep_is_false_changes_nothing(device, path, bad):
    dev = kernel_device(device, FAMILY) if path == "kernel" else torch.device(device)
    fn = nm_mask if path == "kernel" else nm_mask_reference
    gen = seeded("poison", bad)
    s = torch.randint(-3, 4, (40, 32), generator=gen).double()
    keep = torch.rand(s.shape, generator=gen) < 0.6
    value = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}[bad]
    for dtype in (torch.float32, torch.float64, torch.float16):
        poisoned = s.masked_fill(~keep, value).to(dtype).to(dev)
        for n, m in [(2, 4), (3, 8), (10, 32)]:
            got = fn(poisoned, n, m, keep.to(dev))
            for other in (s.masked_fill(~keep, 0.0), s.masked_fill(~keep, 1e3)):
                assert torch.equal(got, fn(other.to(dtype).to(dev), n, m, keep.to(dev)))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_nan_raises_naming_the_tensor(device, path):
    dev = kernel_device(device, FAMILY) if path == "kernel" else torch.device(device)
    fn = nm_mask if path == "kernel" else nm_mask_reference
    s = torch.randn(4, 8, dtype=torch.float64)
    s[2, 5] = float("nan")
    for m in (4, 8):
        with pytest.raises(ValueError, match=r"^nm_mask: scores contains NaN where keep allows it: a NaN cannot be "
                                             r"ranked \(give it keep=False, or a number\)$"):
            fn(s.to(dev), 2, m)
    with pytest.raises(ValueError, match=r"^nm_mask: scores \('fc\.weight'\) contains NaN"):
        fn(s.to(dev), 2, 4, name="fc.weight")
    big = torch.randn(3, 64, dtype=torch.float64)
    big[1, 50] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):  # the partial-selection path (m > 32)
        fn(big.to(dev), 5, 64)
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[2, 5] = False
    assert int(fn(s.to(dev), 2, 4, keep.to(dev)).sum()) == 16  # its group still has 3 keepable entries


@pytest.mark.parametrize("fn", [nm_mask, nm_mask_reference])
def test_bad_arguments(fn):
    s = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"m must be >= 1, got 0"):
        fn(s, 1, 0)
    with pytest.raises(ValueError, match=r"n must lie in \[1, m=4\], got 5"):
        fn(s, 5, 4)
    with pytest.raises(ValueError, match=r"n must lie in \[1, m=4\], got 0"):
        fn(s, 0, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        fn(s, 2.0, 4)
    with pytest.raises(TypeError, match="m must be an int"):
        fn(s, 2, True)
    with pytest.raises(ValueError, match=r"the last dimension of scores \('w'\) \(8\) is not a multiple of m=3"):
        fn(s, 1, 3, name="w")
    with pytest.raises(ValueError, match="must have a dimension"):
        fn(torch.tensor(1.0), 1, 1)
    with pytest.raises(ValueError, match="must be a floating tensor"):
        fn(torch.arange(8).reshape(2, 4), 2, 4)
    with pytest.raises(ValueError, match="meta tensor"):
        fn(torch.randn(2, 4, device="meta"), 2, 4)
    with pytest.raises(ValueError, match="keep must be bool"):
        fn(s, 2, 4, torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"keep has shape \(8, 3\)"):
        fn(s, 2, 4, torch.ones(8, 3, dtype=torch.bool))
    assert fn(torch.randn(0, 4), 2, 4).shape == (0, 4)
    assert fn(torch.randn(3, 0), 2, 4).shape == (3, 0)


@needs_extension
def test_kernel_checks_match_wrapper():
    """The op called directly (as torch.compile or C++ would) refuses what the wrapper refuses, in
    the same words."""
    kernel_device("cpu", FAMILY)
    op = torch.ops.ntkfast.nm_mask
    s = torch.randn(3, 8)
    for args, msg in [((s, 1, 0, None), "m must be >= 1"), ((s, 5, 4, None), r"n must lie in \[1, m=4\]"),
                      ((s, 1, 3, None), r"the last dimension of scores \(8\) is not a multiple of m=3"),
                      ((torch.arange(8.0).long(), 2, 4, None), "must be a floating tensor"),
                      ((torch.tensor(1.0), 1, 1, None), "must have a dimension"),
                      ((s, 2, 4, torch.ones(3, 8)), "keep must be bool"),
                      ((s, 2, 4, torch.ones(8, 3, dtype=torch.bool)), "keep has shape")]:
        with pytest.raises(ValueError, match=msg):
            op(*args)


@needs_extension
@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    dev = kernel_device(device, FAMILY)
    gen = seeded("opcheck")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        s = torch.randn(6, 16, generator=gen).to(dtype).to(dev)
        keep = (torch.rand(6, 16, generator=gen) < 0.8).to(dev)
        torch.library.opcheck(torch.ops.ntkfast.nm_mask.default, (s, 2, 4, keep))
        torch.library.opcheck(torch.ops.ntkfast.nm_mask.default, (s, 3, 8, None))
        torch.library.opcheck(torch.ops.ntkfast.nm_mask.default, (s.t().contiguous().t(), 1, 4, None))
        torch.library.opcheck(torch.ops.ntkfast.nm_mask.default, (s.reshape(2, 3, 16), 5, 16, keep.reshape(2, 3, 16)))


@needs_extension
def test_independent_of_thread_count():
    gen = seeded("threads")
    cases = []
    for n, m in NM:  # many parallel tasks each
        s = torch.randint(0, 5, (256, 8 * m), generator=gen).float()
        cases.append((s, n, m, torch.rand(s.shape, generator=gen) < 0.5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [nm_mask(*c) for c in cases]
        torch.set_num_threads(max(2, threads))
        many = [nm_mask(*c) for c in cases]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@needs_extension
def test_fallback_when_the_extension_predates_the_op(monkeypatch):
    monkeypatch.setattr(FAMILY, "available", False)
    monkeypatch.setattr(FAMILY, "warned", False)
    s = torch.randn(5, 12, generator=seeded("fallback"))
    with pytest.warns(RuntimeWarning, match="predates nm_mask"):
        out = nm_mask(s, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = nm_mask(s, 2, 4)
    assert torch.equal(out, again) and torch.equal(out, nm_mask_reference(s, 2, 4))


def test_registered_with_the_other_ops():
    assert "nm_mask" in ops.__all__ and "nm_mask_reference" in ops.__all__
    if ops.extension_loaded():
        assert FAMILY.defined, "the loaded extension lacks ntkfast::nm_mask: rebuild it"
