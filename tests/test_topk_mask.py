"""ntkfast.ops.topk_mask: compiled kernel vs the reference, exact-k, keep, ties, errors, fallback."""
import numpy as np
import warnings
import zlib

import pytest
import torch

from ntkfast import ops
from ntkfast.ops import loader
from testing import needs_extension
from ntkfast.ops import topk_mask, topk_mask_layerwise, topk_mask_layerwise_reference, topk_mask_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_list(gen, sizes, dtype, kind, device):
    out = []
    for n in sizes:
        if kind == "normal":
            s = torch.randn(n, generator=gen, dtype=torch.float64)
        elif kind == "ties":  # a handful of distinct values: many ties at any threshold
            s = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64)
        elif kind == "specials":
            s = torch.randn(n, generator=gen, dtype=torch.float64)
            pick = torch.randint(0, 6, (n,), generator=gen)
            s[pick == 0] = 0.0
            s[pick == 1] = -0.0
            s[pick == 2] = float("inf")
            s[pick == 3] = float("-inf")
        else:  # wide dynamic range, as SynFlow scores have
            s = torch.randn(n, generator=gen, dtype=torch.float64).abs() * 10.0 ** torch.randint(-30, 30, (n,), generator=gen)
        out.append(s.to(dtype).to(device))
    return out


def _shapes_of(sizes, gen):
    # reshape some into 2-d / 4-d tensors: the row-major order must be honoured
    shapes = []
    for n in sizes:
        if n % 6 == 0 and n:
            shapes.append((n // 6, 2, 3))
        else:
            shapes.append((n,))
    return shapes


SIZE_SETS = [[1], [7], [0, 5, 0], [1000], [3, 1, 4, 1, 5, 9, 2, 6], [70_000, 12, 130_001], [300_000, 1, 65_536, 65_537]]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "specials", "wide"])
@pytest.mark.parametrize("sizes", SIZE_SETS, ids=lambda s: f"n{sum(s)}x{len(s)}")
def test_kernel_matches_reference(device, dtype, kind, sizes):
    if dtype == torch.float16 and kind == "wide":
        pytest.skip("wide range overflows float16")
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{sizes}{dtype}".encode()))
    scores = [s.reshape(sh) for s, sh in zip(_random_list(gen, sizes, dtype, kind, device), _shapes_of(sizes, gen))]
    total = sum(sizes)
    use_keep = total > 3
    keep = [torch.rand(s.shape, generator=gen).to(device) < 0.7 for s in scores] if use_keep else None
    alive = sum(int(k.sum()) for k in keep) if keep is not None else total
    for k in sorted({0, 1, alive // 3, alive // 2, max(alive - 1, 0), alive}):
        if k > alive:
            continue
        got = topk_mask(scores, k, keep)
        ref = topk_mask_reference(scores, k, keep)
        assert sum(int(g.sum()) for g in got) == k
        for g, r, s in zip(got, ref, scores):
            assert g.dtype == torch.bool and g.shape == s.shape and g.device == s.device
            assert torch.equal(g.cpu(), r.cpu())
        if keep is not None:
            assert all(not bool((g & ~kp).any()) for g, kp in zip(got, keep))
        got = topk_mask(scores, k, keep, drop_ties=True)
        ref = topk_mask_reference(scores, k, keep, drop_ties=True)
        assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref))
        assert sum(int(g.sum()) for g in got) <= k
    for extra in (1, 1000):  # clamp: beyond the alive count keeps every alive entry
        for drop in (False, True):
            got = topk_mask(scores, alive + extra, keep, drop_ties=drop, clamp=True)
            ref = topk_mask_reference(scores, alive + extra, keep, drop_ties=drop, clamp=True)
            assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref))
            assert sum(int(g.sum()) for g in got) == alive


def test_reference_semantics_by_hand():
    s = [torch.tensor([1.0, 3.0, 2.0]), torch.tensor([[3.0, 0.5], [3.0, 5.0]])]
    # 5.0 first, then the three 3.0s by flat position: s[0][1], s[1][0,0], s[1][1,0]; k=3 keeps two of them
    out = topk_mask_reference(s, 3)
    assert out[0].tolist() == [False, True, False]
    assert out[1].tolist() == [[True, False], [False, True]]
    assert [o.tolist() for o in topk_mask(s, 3)] == [o.tolist() for o in out]


def test_signed_zeros_tie_and_infinities_order():
    s = [torch.tensor([-0.0, 0.0, float("-inf"), float("inf"), -1.0])]
    out = topk_mask(s, 2)[0].tolist()  # +inf, then the first zero (-0.0 ties +0.0)
    assert out == [True, False, False, True, False]
    assert topk_mask(s, 4)[0].tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("fn", [topk_mask, topk_mask_reference])
def test_drop_ties_by_hand(fn):
    s = [torch.tensor([5.0, 2.0, 2.0]), torch.tensor([2.0, 1.0])]
    # k=2: 5.0 and one 2.0; the next (3rd) highest is also 2.0, so every 2.0 goes
    assert [o.tolist() for o in fn(s, 2, drop_ties=True)] == [[True, False, False], [False, False]]
    # k=4: the 5th highest is 1.0, nothing ties with it
    assert [o.tolist() for o in fn(s, 4, drop_ties=True)] == [[True, True, True], [True, False]]
    assert [o.tolist() for o in fn(s, 5, drop_ties=True)] == [[True] * 3, [True] * 2]
    assert [o.tolist() for o in fn(s, 0, drop_ties=True)] == [[False] * 3, [False] * 2]
    with pytest.raises(ValueError, match="k=6 exceeds"):
        fn(s, 6, drop_ties=True)


def test_never_reactivates():
    torch.manual_seed(0)
    s = [torch.randn(100), torch.randn(50)]
    keep = [torch.zeros(100, dtype=torch.bool), torch.ones(50, dtype=torch.bool)]
    s[0] += 100.0  # the highest scores are all in the pruned tensor
    out = topk_mask(s, 10, keep)
    assert not out[0].any() and int(out[1].sum()) == 10
    with pytest.raises(ValueError, match="k=51 exceeds the 50"):
        topk_mask(s, 51, keep)


@pytest.mark.parametrize("fn", [topk_mask, topk_mask_reference])
def test_nan_raises_naming_tensor(fn):
    s = [torch.randn(10), torch.randn(5)]
    s[1][3] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\].*contains NaN"):
        fn(s, 3)
    with pytest.raises(ValueError, match=r"'layer2.weight'.*contains NaN"):
        fn(s, 3, names=["layer1.weight", "layer2.weight"])
    # and says what to do about it, in the same words on every path
    with pytest.raises(ValueError, match=r"^topk_mask: scores\[1\] contains NaN where keep allows it: a NaN cannot "
                                         r"be ranked \(give it keep=False, or a number\)$"):
        fn(s, 3)
    keep = [torch.ones(10, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
    keep[1][3] = False  # a NaN where nothing can be kept is ignored
    assert sum(int(o.sum()) for o in fn(s, 3, keep)) == 3


BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf"), "mixed": None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_non_finite_scores_where_keep_is_false_change_nothing(device, dtype, path, bad):
    """Issue 25: an entry whose keep is False is never kept and takes no part in the selection,
    whatever its score: NaN, +inf (which would otherwise win) or -inf give the same masks as zeros
    or any finite values there, on the kernel and on the reference, global and layerwise, with and
    without drop_ties."""
    if path == "kernel" and not ops.extension_loaded():
        pytest.skip("compiled extension not loaded")
    glob, layer = (topk_mask, topk_mask_layerwise) if path == "kernel" else (topk_mask_reference,
                                                                              topk_mask_layerwise_reference)
    gen = torch.Generator().manual_seed(zlib.crc32(f"pruned{dtype}{bad}".encode()))
    # the last size spans two of the CPU kernel's segments; the reference (a sort) need not be as large
    sizes = [1, 37, 300, 66_000 if path == "kernel" else 3_000]
    scores = [torch.randint(-20, 20, (n,), generator=gen).to(torch.float64) / 4 for n in sizes]  # ties too
    keep = [torch.rand(n, generator=gen) < 0.6 for n in sizes]
    keep[0][0] = False
    def fill(value):
        out = []
        for s, kp in zip(scores, keep):
            s = s.clone()
            if value is None:  # a mix of the three
                pick = torch.randint(0, 3, s.shape, generator=gen)
                s[~kp] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=s.dtype)[pick[~kp]]
            elif isinstance(value, str):  # random finite values, far outside the kept range
                s[~kp] = 1e3 * torch.randn(s.shape, generator=gen, dtype=s.dtype)[~kp]
            else:
                s[~kp] = value
            out.append(s.to(device=device, dtype=dtype))
        return out
    poisoned, zeros, finite = fill(BAD[bad]), fill(0.0), fill("finite")
    kp = [k.to(device) for k in keep]
    alive = sum(int(k.sum()) for k in keep)
    for drop in (False, True):
        for k in (0, 17, alive // 2, alive):
            got = glob(poisoned, k, kp, drop_ties=drop)
            for other in (zeros, finite):
                want = glob(other, k, kp, drop_ties=drop)
                assert all(torch.equal(u, v) for u, v in zip(got, want)), (drop, k)
            assert not any(bool((g & ~kk).any()) for g, kk in zip(got, kp))
        ks = [min(3, int(k.sum())) for k in keep]
        got = layer(poisoned, ks, kp, drop_ties=drop)
        for other in (zeros, finite):
            want = layer(other, ks, kp, drop_ties=drop)
            assert all(torch.equal(u, v) for u, v in zip(got, want)), drop


def test_layerwise_nan_names_tensor():
    s = [torch.randn(4), torch.randn(4)]
    s[1][0] = float("nan")
    for fn in (topk_mask_layerwise, topk_mask_layerwise_reference):
        with pytest.raises(ValueError, match=r"scores\[1\] \('b'\) contains NaN"):
            fn(s, [1, 1], names=["a", "b"])


@pytest.mark.parametrize("fn", [topk_mask, topk_mask_reference])
def test_bad_arguments(fn):
    s = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match="k must be >= 0"):
        fn(s, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        fn(s, 2.5)
    with pytest.raises(ValueError, match="k=13 exceeds"):
        fn(s, 13)
    with pytest.raises(ValueError, match=r"keep\[0\] must be a bool"):
        fn(s, 2, [torch.ones(4, 3)])
    with pytest.raises(ValueError, match=r"keep\[0\] has shape"):
        fn(s, 2, [torch.ones(3, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="keep has 2 tensors"):
        fn(s, 2, [torch.ones(4, 3, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="must be a floating tensor"):
        fn([torch.arange(5)], 2)
    with pytest.raises(ValueError, match=r"scores\[0\] is a meta tensor"):  # was "item() ... on meta"
        fn([torch.randn(5, device="meta")], 2)
    assert fn([], 0) == []


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_layerwise_matches_reference(device):
    gen = torch.Generator().manual_seed(3)
    for kind in ("normal", "ties"):
        scores = _random_list(gen, [1, 17, 70_000, 0, 300], torch.float32, kind, device)
        keep = [torch.rand(s.shape, generator=gen).to(device) < 0.5 for s in scores]
        alive = [int(k.sum()) for k in keep]
        for frac in (0.0, 0.3, 1.0):
            ks = [int(frac * a) for a in alive]
            got = topk_mask_layerwise(scores, ks, keep)
            ref = topk_mask_layerwise_reference(scores, ks, keep)
            for g, r, k in zip(got, ref, ks):
                assert int(g.sum()) == k and torch.equal(g.cpu(), r.cpu())
            for drop in (False, True):
                big = [k + 3 for k in ks]
                got = topk_mask_layerwise(scores, ks, keep, drop_ties=drop)
                ref = topk_mask_layerwise_reference(scores, ks, keep, drop_ties=drop)
                assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref))
                got = topk_mask_layerwise(scores, big, keep, drop_ties=drop, clamp=True)
                ref = topk_mask_layerwise_reference(scores, big, keep, drop_ties=drop, clamp=True)
                assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref))


def test_layerwise_bad_ks():
    s = [torch.randn(5), torch.randn(5)]
    with pytest.raises(ValueError, match="ks has 1 entries"):
        topk_mask_layerwise(s, [1])
    with pytest.raises(ValueError, match=r"ks\[1\] must be >= 0"):
        topk_mask_layerwise(s, [1, -1])


def test_mixed_dtypes_compare_in_float64():
    a = torch.tensor([1.0 + 2**-40], dtype=torch.float64)  # not representable in float32
    b = torch.tensor([1.0], dtype=torch.float32)
    assert topk_mask([b, a], 1)[1].item() is True


def test_deterministic_bit_for_bit():
    gen = torch.Generator().manual_seed(11)
    scores = _random_list(gen, [200_000, 33_333], torch.float32, "ties", "cpu")
    first = topk_mask(scores, 77_777)
    for _ in range(3):
        again = topk_mask(scores, 77_777)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@needs_extension
def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    s = [torch.randn(6, 4, generator=gen), torch.randn(9, generator=gen)]
    keep = [torch.rand(6, 4, generator=gen) < 0.8, torch.rand(9, generator=gen) < 0.8]
    torch.library.opcheck(torch.ops.ntkfast.topk_mask.default, (s, 5, keep))
    torch.library.opcheck(torch.ops.ntkfast.topk_mask.default, (s, 5, None))
    torch.library.opcheck(torch.ops.ntkfast.topk_mask_layerwise.default, (s, [3, 2], keep))
    torch.library.opcheck(torch.ops.ntkfast.topk_mask.default, (s, 5, keep, True, True))
    torch.library.opcheck(torch.ops.ntkfast.topk_mask_layerwise.default, (s, [30, 2], keep, True, True))


def test_fallback_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(loader.STATE, "module", None)
    monkeypatch.setattr(loader.STATE, "error", "ImportError: simulated")
    monkeypatch.setattr(loader.STATE, "warned", False)
    s = [torch.randn(50), torch.randn(7, 3)]
    with pytest.warns(RuntimeWarning, match="falls back to its pure-PyTorch reference"):
        out = topk_mask(s, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = topk_mask(s, 20)
    ref = topk_mask_reference(s, 20)
    assert all(torch.equal(a, b) and torch.equal(a, r) for a, b, r in zip(out, again, ref))
    assert ops.build_info()["backend"] == "reference"


def test_build_info_reports_backend():
    info = ops.build_info()
    assert info["backend"] in ("compiled-cpu", "compiled-cuda", "reference")
    assert info["extension"] == ops.extension_loaded()


# -- from a review of the whole package ------------------------------------------------------------


@pytest.mark.parametrize("fn", [topk_mask, topk_mask_reference])
def test_numpy_and_huge_k(fn):
    s = [torch.randn(5)]
    assert int(fn(s, np.int64(2))[0].sum()) == 2
    with pytest.raises(ValueError, match="k must be >= 0"):
        fn(s, np.int64(-1))
    with pytest.raises(ValueError, match="beyond"):
        fn(s, 2**70)


@pytest.mark.parametrize("drop", [False, True])
def test_cpu_wide_digit_path_matches_reference(drop):
    # 2.1M entries: the CPU kernel switches to 16-bit digits from 2^21 entries on
    gen = torch.Generator().manual_seed(21)
    for kind in ("normal", "ties"):
        if kind == "ties":
            s = [torch.randint(-50, 50, (1_600_000,), generator=gen).float(), torch.randint(-50, 50, (500_000,), generator=gen).float()]
        else:
            s = [torch.randn(1_600_000, generator=gen), torch.randn(500_000, generator=gen).double()]
        keep = [torch.rand(x.shape, generator=gen) < 0.6 for x in s]
        alive = sum(int(k.sum()) for k in keep)
        for k in (1, alive // 3, alive - 1):
            got = topk_mask(s, k, keep, drop_ties=drop)
            ref = topk_mask_reference(s, k, keep, drop_ties=drop)
            assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_cpu_kernel_independent_of_thread_count():
    gen = torch.Generator().manual_seed(4)
    s = [torch.randint(0, 30, (300_000,), generator=gen).float(), torch.randn(2_200_000, generator=gen)]
    keep = [torch.rand(x.shape, generator=gen) < 0.5 for x in s]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = topk_mask(s, 500_000, keep)
        torch.set_num_threads(max(2, threads))
        many = topk_mask(s, 500_000, keep)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
