"""The CUDA kernels of topk_mask / topk_mask_layerwise against the CPU kernel and the reference.

Runs only where a CUDA device is usable and the extension was built with its CUDA kernels; skips
otherwise, saying why. Every comparison is exact (the chosen set, bit for bit): the three
implementations share one definition of the k highest entries, with ties broken by flat position.
Sizes run from 1 to ~3M (and to 2e8 under -m slow) so that every radix pass, the early exit, the
tie-break across chunks (4096 elements) and tensors, and empty tensors are exercised.
"""
import zlib

import pytest
import torch

from ntkfast import ops
from ntkfast.ops import loader
from ntkfast.ops import topk_mask, topk_mask_layerwise, topk_mask_layerwise_reference, topk_mask_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels cannot run here"),
]

CHUNK = 4096  # kTopkChunk in csrc/cuda/topk_mask.cuh: the unit of work of every kernel


def _cuda_kernels_or_skip():
    if not ops.extension_loaded():
        pytest.skip(f"compiled extension not loaded ({loader.STATE.error})")
    if not ops.cuda_kernels():
        pytest.skip("extension built without CUDA kernels (see test_extension_has_cuda_kernels)")


@pytest.fixture(autouse=True)
def _needs_cuda_kernels(request):
    if request.node.name != "test_extension_has_cuda_kernels":
        _cuda_kernels_or_skip()


def test_extension_has_cuda_kernels():
    # A CUDA device is here: an extension without CUDA kernels would make every other test in this
    # file compare the reference with itself, so this one fails instead of skipping.
    if not ops.extension_loaded():
        pytest.skip(f"compiled extension not loaded ({loader.STATE.error})")
    info = ops.build_info()
    assert info["cuda"], f"ntkfast._C was built without CUDA ({info}); rebuild against a CUDA build of torch"
    assert info["backend"] == "compiled-cuda"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _scores(gen, n, kind, dtype):
    if kind == "normal":
        s = torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # a small integer set: ties at every threshold, across chunks and tensors
        s = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64)
    elif kind == "specials":  # signed zeros and infinities among ordinary values
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        pick = torch.randint(0, 6, (n,), generator=gen)
        s[pick == 0] = 0.0
        s[pick == 1] = -0.0
        s[pick == 2] = float("inf")
        s[pick == 3] = float("-inf")
    elif kind == "wide":  # SynFlow-like dynamic range
        s = torch.randn(n, generator=gen, dtype=torch.float64).abs() * 10.0 ** torch.randint(-30, 30, (n,), generator=gen)
    elif kind == "lowbits":  # distinct values that differ only in the last bits: every radix pass matters
        eps = torch.finfo(dtype).eps if dtype != torch.float16 else 2.0**-10
        s = 1.0 + eps * torch.randint(0, 64, (n,), generator=gen).to(torch.float64)
    else:
        raise ValueError(kind)
    return s.to(dtype)


def _shape(n):
    # some tensors 3-d so that row-major order (not storage order) is what ties follow
    return (n // 6, 2, 3) if n and n % 6 == 0 else (n,)


def _make(gen, sizes, kind, dtype, use_keep, p_keep=0.7):
    scores = [_scores(gen, n, kind, dtype).reshape(_shape(n)) for n in sizes]
    keep = [torch.rand(s.shape, generator=gen) < p_keep for s in scores] if use_keep else None
    return scores, keep


def _to(ts, device):
    return None if ts is None else [t.to(device) for t in ts]


def _alive(scores, keep):
    return sum(int(k.sum()) for k in keep) if keep is not None else sum(s.numel() for s in scores)


def _check(scores_cpu, k, keep_cpu=None, *, reference=True):
    """CUDA kernel == CPU kernel (== reference): exactly the same set, outputs shaped like the scores."""
    scores = _to(scores_cpu, "cuda")
    keep = _to(keep_cpu, "cuda")
    got = topk_mask(scores, k, keep)
    assert len(got) == len(scores)
    for g, s in zip(got, scores):
        assert g.device == s.device and g.dtype == torch.bool and g.shape == s.shape
    got = [g.cpu() for g in got]
    cpu = topk_mask(scores_cpu, k, keep_cpu)
    for i, (g, c) in enumerate(zip(got, cpu)):
        assert torch.equal(g, c), f"k={k}: tensor {i} differs from the CPU kernel ({int((g != c).sum())} entries)"
    if reference:
        ref = topk_mask_reference(scores_cpu, k, keep_cpu)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert torch.equal(g, r), f"k={k}: tensor {i} differs from the reference"
    assert sum(int(g.sum()) for g in got) == k
    if keep_cpu is not None:
        assert not any(bool((g & ~kp).any()) for g, kp in zip(got, keep_cpu))
    return got


def _ks(alive):
    return sorted(k for k in {0, 1, 2, alive // 3, alive // 2, alive - 1, alive} if 0 <= k <= alive)


def _error_text(fn, *args, **kw):
    with pytest.raises(ValueError) as info:
        fn(*args, **kw)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# one k over all tensors
# ---------------------------------------------------------------------------------------------

SMALL_SIZES = [
    [1], [2], [7], [0, 5, 0], [3, 1, 4, 1, 5, 9, 2, 6],
    [CHUNK - 1], [CHUNK], [CHUNK + 1], [2 * CHUNK - 1, 1, 2 * CHUNK + 1], [0, 0, 3 * CHUNK, 0],
    [1000], [70_000, 12, 130_001], [300_000, 0, 65_536, 65_537],
]
LARGE_SIZES = [[1_000_003], [3_000_000, 17], [1, 2_500_000, 0, 499_999]]


@pytest.mark.parametrize("use_keep", [False, True], ids=["all", "keep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "specials", "wide", "lowbits"])
@pytest.mark.parametrize("sizes", SMALL_SIZES, ids=lambda s: f"n{sum(s)}x{len(s)}")
def test_matches_cpu_and_reference(sizes, kind, dtype, use_keep):
    if dtype == torch.float16 and kind == "wide":
        pytest.skip("wide range overflows float16")
    scores, keep = _make(_gen(sizes, kind, dtype, use_keep), sizes, kind, dtype, use_keep)
    for k in _ks(_alive(scores, keep)):
        _check(scores, k, keep)


@pytest.mark.parametrize("use_keep", [False, True], ids=["all", "keep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "lowbits"])
@pytest.mark.parametrize("sizes", LARGE_SIZES, ids=lambda s: f"n{sum(s)}x{len(s)}")
def test_large_matches_cpu_and_reference(sizes, kind, dtype, use_keep):
    scores, keep = _make(_gen(sizes, kind, dtype, use_keep), sizes, kind, dtype, use_keep)
    alive = _alive(scores, keep)
    for k in sorted({0, 1, alive // 10, alive // 2, alive - 1, alive}):
        # the CPU kernel is held to the reference by test_topk_mask.py; one sort per case here
        _check(scores, k, keep, reference=k == alive // 2)


def test_every_k_small():
    # every k of a tie-heavy list spanning tensors and an empty one
    gen = _gen("every-k")
    scores = [torch.randint(0, 3, (n,), generator=gen).float() for n in (5, 0, 9, 1, 4)]
    keep = [torch.rand(s.shape, generator=gen) < 0.8 for s in scores]
    for k in range(_alive(scores, None) + 1):
        _check(scores, k)
    for k in range(_alive(scores, keep) + 1):
        _check(scores, k, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_constant_scores_ties_by_flat_position(dtype):
    # one value everywhere: the threshold bin holds everything, and the first k entries in flat
    # order (tensor list order, then row-major) are kept, across chunk and tensor boundaries
    sizes = [CHUNK + 5, 0, 3, 2 * CHUNK]
    scores = [torch.full(_shape(n), 0.5, dtype=dtype) for n in sizes]
    total = sum(sizes)
    for k in (1, CHUNK - 1, CHUNK, CHUNK + 5, CHUNK + 6, total - 1, total):
        got = _check(scores, k)
        flat = torch.cat([g.reshape(-1) for g in got])
        assert bool(flat[:k].all()) and not bool(flat[k:].any())


def test_signed_zeros_tie():
    gen = _gen("zeros")
    n = 3 * CHUNK + 7
    s = torch.zeros(n)
    s[torch.rand(n, generator=gen) < 0.5] = -0.0
    assert bool(torch.signbit(s).any()) and not bool(torch.signbit(s).all())
    for k in (1, 5000, n - 1):
        got = _check([s], k)[0]
        assert bool(got[:k].all()) and not bool(got[k:].any())  # sign plays no part
    small = [torch.tensor([-0.0, 0.0, float("-inf"), float("inf"), -1.0])]
    assert _check(small, 2)[0].tolist() == [True, False, False, True, False]
    assert _check(small, 4)[0].tolist() == [True, True, False, True, True]


def test_infinities_and_extremes():
    f = torch.finfo(torch.float32)
    vals = [float("inf"), float("-inf"), f.max, -f.max, f.tiny, -f.tiny, 1e-45, -1e-45, 0.0, -0.0, 1.0, -1.0]
    s = torch.tensor(vals * 1000)
    for k in (1, 1000, 1001, 5999, 6000, 6001, 11_999, 12_000):
        _check([s], k)
    _check([s.double()], 3000)


def test_by_hand():
    s = [torch.tensor([1.0, 3.0, 2.0]), torch.tensor([[3.0, 0.5], [3.0, 5.0]])]
    out = _check(s, 3)
    assert out[0].tolist() == [False, True, False]
    assert out[1].tolist() == [[True, False], [False, True]]


def test_mixed_dtypes_compare_in_float64():
    a = torch.tensor([1.0 + 2**-40], dtype=torch.float64)  # not representable in float32
    b = torch.tensor([1.0], dtype=torch.float32)
    c = torch.tensor([1.0, 0.5], dtype=torch.float16)
    got = _check([b, a, c], 1)
    assert got[1].item() is True
    _check([b, a, c], 2)
    _check([c.bfloat16(), c], 3)  # bfloat16 and float16 alone: float32


def test_non_contiguous_inputs():
    gen = _gen("noncontig")
    s = torch.randint(-2, 3, (300, 200), generator=gen).float()
    kp = torch.rand(200, 300, generator=gen) < 0.6
    scores, keep = [s.t(), s[::2, 1::3]], [kp, torch.rand(150, 67, generator=gen) < 0.6]
    assert not scores[0].is_contiguous()
    for k in (1, 777, 20_000):
        _check(scores, k, keep)


def test_keep_all_false_and_never_reactivates():
    s = [torch.randn(100, generator=_gen("re")) + 100.0, torch.randn(50, generator=_gen("re2"))]
    keep = [torch.zeros(100, dtype=torch.bool), torch.ones(50, dtype=torch.bool)]
    out = _check(s, 10, keep)
    assert not out[0].any() and int(out[1].sum()) == 10
    none = [torch.zeros(100, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)]
    out = _check(s, 0, none)
    assert not any(bool(o.any()) for o in out)
    assert "k=1 exceeds the 0 entries" in _error_text(topk_mask, _to(s, "cuda"), 1, _to(none, "cuda"))


def test_many_tensors():
    # more tensors than blocks of some launches, many of them empty or smaller than a chunk
    gen = _gen("many")
    sizes = torch.randint(0, 3 * CHUNK, (300,), generator=gen).tolist()
    sizes = [0 if i % 7 == 0 else n for i, n in enumerate(sizes)]
    for kind in ("normal", "ties"):
        scores, keep = _make(gen, sizes, kind, torch.float32, True)
        alive = _alive(scores, keep)
        for k in (0, 1, alive // 2, alive):
            _check(scores, k, keep)


def test_deterministic():
    scores, keep = _make(_gen("det"), [200_000, 33_333], "ties", torch.float32, True)
    first = topk_mask(_to(scores, "cuda"), 77_777, _to(keep, "cuda"))
    for _ in range(3):
        again = topk_mask(_to(scores, "cuda"), 77_777, _to(keep, "cuda"))
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_side_stream_and_other_device():
    scores, keep = _make(_gen("stream"), [50_000, 7], "ties", torch.float32, True)
    want = topk_mask(scores, 12_345, keep)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = topk_mask(_to(scores, "cuda"), 12_345, _to(keep, "cuda"))
    stream.synchronize()
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    if torch.cuda.device_count() > 1:
        dev = torch.device("cuda", torch.cuda.device_count() - 1)
        got = topk_mask(_to(scores, dev), 12_345, _to(keep, dev))
        assert all(g.device == dev and torch.equal(g.cpu(), w) for g, w in zip(got, want))


# ---------------------------------------------------------------------------------------------
# errors: the CUDA kernel raises the CPU kernel's errors, with the same text
# ---------------------------------------------------------------------------------------------


def _same_error(fn, scores_cpu, k, keep_cpu=None, **kw):
    want = _error_text(fn, scores_cpu, k, keep_cpu, **kw)
    got = _error_text(fn, _to(scores_cpu, "cuda"), k, _to(keep_cpu, "cuda"), **kw)
    assert got == want
    return got


def test_nan_raises_naming_first_tensor():
    s = [torch.randn(10), torch.randn(2 * CHUNK + 3), torch.randn(5)]
    s[1][CHUNK + 1] = float("nan")
    s[2][0] = float("nan")
    msg = _same_error(topk_mask, s, 3)
    assert "scores[1]" in msg and "contains NaN" in msg
    msg = _same_error(topk_mask, s, 3, names=["a", "b", "c"])
    assert "scores[1] ('b') contains NaN" in msg
    s[1][CHUNK + 1] = -float("nan")  # a NaN with its sign bit set is a NaN too
    assert "scores[1]" in _same_error(topk_mask, s, 3)


def test_nan_where_keep_is_false_is_ignored():
    s = [torch.randn(10), torch.randn(CHUNK + 5)]
    s[1][CHUNK + 2] = float("nan")
    keep = [torch.ones(10, dtype=torch.bool), torch.ones(CHUNK + 5, dtype=torch.bool)]
    keep[1][CHUNK + 2] = False
    for k in (0, 3, 100, CHUNK + 14):
        _check(s, k, keep)


def test_nan_before_k_check():
    s = [torch.randn(10), torch.randn(5)]
    s[1][3] = float("nan")
    assert "contains NaN" in _same_error(topk_mask, s, 16)  # NaN is reported even though k is too large too


def test_k_too_large():
    s = [torch.randn(4, 3), torch.randn(0)]
    msg = _same_error(topk_mask, s, 13)
    assert msg == "topk_mask: k=13 exceeds the 12 entries that may be kept (keep is True)"
    keep = [torch.rand(4, 3, generator=_gen("k")) < 0.5, torch.ones(0, dtype=torch.bool)]
    _same_error(topk_mask, s, int(keep[0].sum()) + 1, keep)


def test_float16_nan_and_inf():
    s = [torch.tensor([1.0, float("inf"), -float("inf"), 2.0], dtype=torch.float16)]
    _check(s, 2)
    s[0][2] = float("nan")
    assert "contains NaN" in _same_error(topk_mask, s, 2)


def test_opcheck():
    gen = _gen("opcheck")
    s = [torch.randn(6, 4, generator=gen).cuda(), torch.randn(9, generator=gen).cuda()]
    keep = [(torch.rand(6, 4, generator=gen) < 0.8).cuda(), (torch.rand(9, generator=gen) < 0.8).cuda()]
    torch.library.opcheck(torch.ops.ntkfast.topk_mask.default, (s, 5, keep))
    torch.library.opcheck(torch.ops.ntkfast.topk_mask.default, (s, 5, None))
    torch.library.opcheck(torch.ops.ntkfast.topk_mask_layerwise.default, (s, [3, 2], keep))


# ---------------------------------------------------------------------------------------------
# layerwise
# ---------------------------------------------------------------------------------------------


def _check_layerwise(scores_cpu, ks, keep_cpu=None):
    got = topk_mask_layerwise(_to(scores_cpu, "cuda"), ks, _to(keep_cpu, "cuda"))
    for g, s in zip(got, scores_cpu):
        assert g.device.type == "cuda" and g.dtype == torch.bool and g.shape == s.shape
    got = [g.cpu() for g in got]
    cpu = topk_mask_layerwise(scores_cpu, ks, keep_cpu)
    ref = topk_mask_layerwise_reference(scores_cpu, ks, keep_cpu)
    for i, (g, c, r, k) in enumerate(zip(got, cpu, ref, ks)):
        assert torch.equal(g, c), f"tensor {i} (k={k}) differs from the CPU kernel"
        assert torch.equal(g, r), f"tensor {i} (k={k}) differs from the reference"
        assert int(g.sum()) == k
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "specials", "lowbits"])
def test_layerwise_matches_cpu_and_reference(kind, dtype):
    gen = _gen("layerwise", kind, dtype)
    sizes = [1, 17, CHUNK, 0, CHUNK + 1, 70_000, 300, 3 * CHUNK - 1]
    scores, keep = _make(gen, sizes, kind, dtype, True, p_keep=0.5)
    alive = [int(k.sum()) for k in keep]
    for frac in (0.0, 0.3, 0.5, 1.0):
        _check_layerwise(scores, [int(frac * a) for a in alive], keep)
    _check_layerwise(scores, [min(1, a) for a in alive], keep)
    _check_layerwise(scores, [max(a - 1, 0) for a in alive], keep)
    _check_layerwise(scores, [int(torch.randint(0, a + 1, (1,), generator=gen)) for a in alive], keep)
    full = [s.numel() for s in scores]
    _check_layerwise(scores, [n // 2 for n in full])


def test_layerwise_large_and_many():
    gen = _gen("layerwise-large")
    scores, keep = _make(gen, [2_000_000, 0, 1, 999_999], "ties", torch.float32, True)
    alive = [int(k.sum()) for k in keep]
    _check_layerwise(scores, [a // 3 for a in alive], keep)
    sizes = torch.randint(0, 2 * CHUNK, (200,), generator=gen).tolist()
    scores, keep = _make(gen, sizes, "ties", torch.float64, True)
    ks = [int(torch.randint(0, int(k.sum()) + 1, (1,), generator=gen)) for k in keep]
    _check_layerwise(scores, ks, keep)


def test_layerwise_errors_in_cpu_order():
    # the CPU kernel selects tensor after tensor: the first tensor with a problem decides the error
    s = [torch.randn(4), torch.randn(4), torch.randn(4)]
    s[1][0] = float("nan")
    assert "scores[1]" in _same_error(topk_mask_layerwise, s, [1, 1, 9])
    assert "k=9 exceeds the 4" in _same_error(topk_mask_layerwise, s, [9, 1, 1])
    assert "scores[1] ('b') contains NaN" in _same_error(topk_mask_layerwise, s, [1, 1, 1], names=["a", "b", "c"])
    keep = [torch.ones(4, dtype=torch.bool) for _ in s]
    keep[1][0] = False  # the NaN can no longer be kept: ignored
    _check_layerwise(s, [1, 3, 4], keep)
    assert "k=4 exceeds the 3" in _same_error(topk_mask_layerwise, s, [1, 4, 4], keep)


# ---------------------------------------------------------------------------------------------
# sizes of hundreds of millions (-m slow): the reference runs on the GPU (cat + stable sort)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,sizes,kind",
    [
        (torch.float32, [150_000_000, 0, 50_000_001], "ties"),
        (torch.float32, [200_000_000], "normal"),
        (torch.float64, [60_000_000, 3], "ties"),
    ],
    ids=["f32-ties-2e8", "f32-normal-2e8", "f64-ties-6e7"],
)
def test_huge_matches_gpu_reference(dtype, sizes, kind):
    gen = torch.Generator(device="cuda").manual_seed(7)
    if kind == "ties":
        scores = [torch.randint(-50, 51, (n,), generator=gen, device="cuda").to(dtype) for n in sizes]
    else:
        scores = [torch.randn(n, generator=gen, device="cuda", dtype=dtype) for n in sizes]
    keep = [torch.rand(n, generator=gen, device="cuda") < 0.9 for n in sizes]
    alive = _alive(scores, keep)
    for k in (1, alive // 3, alive - 1):
        got = topk_mask(scores, k, keep)
        ref = topk_mask_reference(scores, k, keep)
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
        assert sum(int(g.sum()) for g in got) == k
        del got, ref
    layer = topk_mask_layerwise(scores, [int(k.sum()) // 2 for k in keep], keep)
    assert [int(g.sum()) for g in layer] == [int(k.sum()) // 2 for k in keep]


# ---------------------------------------------------------------------------------------------
# drop_ties (the authors' masking rule) and clamp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("sizes", [[7], [0, 5, 0], [1000], [70_000, 12, 130_001]], ids=lambda s: f"n{sum(s)}x{len(s)}")
def test_drop_ties_and_clamp_match_cpu(sizes, kind):
    gen = torch.Generator().manual_seed(sum(sizes) + len(kind))
    if kind == "ties":
        scores_cpu = [torch.randint(-3, 4, (n,), generator=gen).float() for n in sizes]
    else:
        scores_cpu = [torch.randn(n, generator=gen) for n in sizes]
    keep_cpu = [torch.rand(n, generator=gen) < 0.7 for n in sizes]
    alive = sum(int(k.sum()) for k in keep_cpu)
    scores, keep = _to(scores_cpu, "cuda"), _to(keep_cpu, "cuda")
    for k in _ks(alive) + [alive + 1, alive + 50]:
        for drop in (False, True):
            clamp = k > alive
            got = [g.cpu() for g in topk_mask(scores, k, keep, drop_ties=drop, clamp=clamp)]
            cpu = topk_mask(scores_cpu, k, keep_cpu, drop_ties=drop, clamp=clamp)
            ref = topk_mask_reference(scores_cpu, k, keep_cpu, drop_ties=drop, clamp=clamp)
            for g, c, r in zip(got, cpu, ref):
                assert torch.equal(g, c) and torch.equal(g, r), (k, drop)
    ks = [max(0, int(k.sum()) // 2) for k in keep_cpu]
    for drop in (False, True):
        got = [g.cpu() for g in topk_mask_layerwise(scores, [k + 2 for k in ks], keep, drop_ties=drop, clamp=True)]
        cpu = topk_mask_layerwise(scores_cpu, [k + 2 for k in ks], keep_cpu, drop_ties=drop, clamp=True)
        assert all(torch.equal(g, c) for g, c in zip(got, cpu))
        got = [g.cpu() for g in topk_mask_layerwise(scores, ks, keep, drop_ties=drop)]
        cpu = topk_mask_layerwise(scores_cpu, ks, keep_cpu, drop_ties=drop)
        assert all(torch.equal(g, c) for g, c in zip(got, cpu))
