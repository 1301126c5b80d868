"""ntkfast.ops.philox_normal / perturbed_masked: Philox known answers, the kernels against the
pure-PyTorch reference, the stream's properties, gradients, opcheck, argument errors, fallback.

Every test that runs a kernel is parametrised over ``testing.devices`` (CPU, plus CUDA where a
device is usable; CUDA cases skip when the extension has no CUDA kernels). The kernels and the
reference share the Philox words exactly; their normals may differ in the last bit of log/sin/cos
(libm or CUDA against torch's vectorised math), hence the tolerances below, which are a few ulps.
"""
import math
import warnings

import pytest
import torch

from ntkfast import ops
from ntkfast.ops import loader
from ntkfast.ops.perturbed_masked import FAMILY
from ntkfast.ops import (
    perturbed_masked,
    perturbed_masked_reference,
    philox_normal,
    philox_normal_reference,
    philox_words_reference,
)
from testing import devices, kernel_device, needs_extension, seeded


# Random123's known-answer vectors for Philox4x32-10: (counter c0..c3, key k0 k1, output words)
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
SIZES = [1, 3, 5, 17, 1000, 4099, 2**20 + 3]
OFFSETS = [0, 1, 2, 3, 5, 2**33 + 1]




def _noncontig(t):
    """The same values in a strided layout: transposed storage of the last two dims, or every
    other element of a 1-d tensor."""
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if t.dim() == 1:
        wide = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
        wide[::2] = t
        return wide[::2]
    return t


def _inputs(gen, mask_shape, lead, dtype, device, noncontig=False):
    """Random weight [*lead, *mask_shape] and a mask in [0.5, 1.5): never zeros, which would hide
    a wrong mask index."""
    w = torch.randn(tuple(lead) + tuple(mask_shape), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    m = (torch.rand(tuple(mask_shape), generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    return (_noncontig(w), _noncontig(m)) if noncontig else (w, m)


def _mask_shape(n):
    return (n // 10, 10) if n % 10 == 0 else (n,)


# ---------------------------------------------------------------------------------------------
# Philox words and the normal transform
# ---------------------------------------------------------------------------------------------


def test_philox_known_answers_reference():
    for counter, key, want in KATS:
        got = philox_words_reference(torch.tensor(counter), key)
        assert got.tolist() == list(want)
    # all three at once, keys as tensors: the reference vectorises over counters and keys
    counters = torch.tensor([c for c, _, _ in KATS])
    keys = torch.tensor([k for _, k, _ in KATS])
    got = philox_words_reference(counters, (keys[:, 0], keys[:, 1]))
    assert got.tolist() == [list(w) for _, _, w in KATS]


def _box_muller_by_hand(words):
    """The normal transform of four words in Python floats (float64): no torch, no kernel."""
    out = []
    for a, b in ((words[0], words[1]), (words[2], words[3])):
        u0, u1 = (a + 0.5) * 2.0**-32, (b + 0.5) * 2.0**-32
        r = math.sqrt(-2.0 * math.log(u0))
        out += [r * math.cos(2 * math.pi * u1), r * math.sin(2 * math.pi * u1)]
    return out


@pytest.mark.parametrize("device", devices)
def test_known_answer_through_the_stream(device):
    # seed 0, offset 0 is key (0, 0), counter (0, 0, 0, 0): the first known-answer vector
    want = torch.tensor(_box_muller_by_hand(KATS[0][2]), dtype=torch.float64)
    for fn in (philox_normal, lambda n, s, o, **kw: philox_normal_reference((s, o), n, **kw)):
        got64 = fn(4, 0, 0, dtype=torch.float64, device=device).cpu()
        torch.testing.assert_close(got64, want, rtol=1e-14, atol=1e-15)
        got32 = fn(4, 0, 0, dtype=torch.float32, device=device).cpu()
        torch.testing.assert_close(got32, want.float(), rtol=1e-6, atol=1e-6)
    # both key words all ones, and a block counter with both words in use
    got = philox_normal(4, 2**64 - 1, 2**62 - 4, dtype=torch.float64, device=device).cpu()
    block = (2**62 - 4) // 4
    words = philox_words_reference(torch.tensor([block & 0xFFFFFFFF, block >> 32, 0, 0]),
                                   (0xFFFFFFFF, 0xFFFFFFFF)).tolist()
    torch.testing.assert_close(got, torch.tensor(_box_muller_by_hand(words), dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_philox_normal_matches_reference(device, dtype):
    dev = kernel_device(device)
    for seed in (0, 1, 12345, 2**32, 2**63 + 7, 2**64 - 1, -5):
        for offset in OFFSETS + [4 * 2**32 - 3]:  # the last crosses into the counter's high word
            for size in ((1,), (7,), (3, 5, 11)):
                got = philox_normal(size, seed, offset, dtype=dtype, device=dev)
                ref = philox_normal_reference((seed, offset), size, dtype, dev)
                assert got.shape == size and got.dtype == dtype and got.device.type == dev.type
                torch.testing.assert_close(got, ref, **TOL[dtype])
    big = philox_normal(2**20 + 3, 99, 2**33 + 1, dtype=dtype, device=dev)
    torch.testing.assert_close(big, philox_normal_reference((99, 2**33 + 1), 2**20 + 3, dtype, dev), **TOL[dtype])


@pytest.mark.parametrize("device", devices)
def test_philox_normal_reference_reads_a_philox_tensor(device):
    ph = torch.tensor([-3, 2**33 + 6], device=device)
    got = philox_normal_reference(ph, (4, 9))
    assert got.device == ph.device
    assert torch.equal(got, philox_normal_reference((2**64 - 3, 2**33 + 6), (4, 9), device=device))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_normal_statistics(device, dtype):
    dev = kernel_device(device)
    n = 10**6
    z = philox_normal(n, 2024, 3, dtype=dtype, device=dev).double().cpu()
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.std()) - 1) < 5 * se
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15 / n)  # skewness
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    p1 = float((z.abs() < 1).double().mean())
    assert abs(p1 - math.erf(1 / math.sqrt(2))) < 5 * math.sqrt(0.683 * 0.317 / n)
    for lag in (1, 2, 3, 4):  # neighbours, Box-Muller partners and the next block
        c = float((z[:-lag] * z[lag:]).mean())
        assert abs(c) < 5 * se, lag
    assert bool(torch.isfinite(z).all())


@pytest.mark.parametrize("device", devices)
def test_philox_normal_seeds_offsets_reproduce(device):
    dev = kernel_device(device)
    a = philox_normal(1000, 7, device=dev)
    assert torch.equal(a, philox_normal(1000, 7, device=dev))  # same seed and offset: same numbers
    for other in (8, 7 + 2**32, 2**63 + 7):  # either key word differs
        assert not bool((a == philox_normal(1000, other, device=dev)).any())
    assert torch.equal(philox_normal(50, -1, device=dev), philox_normal(50, 2**64 - 1, device=dev))
    for o in (0, 3, 2**33 + 1, 4 * 2**32 - 6):
        base = philox_normal(40, 11, o, device=dev)
        for k in (1, 2, 3, 4, 5, 17):
            assert torch.equal(base[k:], philox_normal(40 - k, 11, o + k, device=dev)), (o, k)
    # a shape only arranges the stream row-major
    assert torch.equal(philox_normal((6, 7), 5, 9, device=dev).reshape(-1), philox_normal(42, 5, 9, device=dev))
    assert philox_normal((0, 3), 1, device=dev).shape == (0, 3)
    assert philox_normal((), 1, device=dev).shape == ()


# ---------------------------------------------------------------------------------------------
# perturbed_masked against the reference
# ---------------------------------------------------------------------------------------------


def _check_forward(w, m, eps, seed, offset):
    out = perturbed_masked(w, m, eps, seed, offset)
    ref = perturbed_masked_reference(w, m, eps, seed, offset)
    assert out.shape == (2,) + tuple(w.shape) and out.dtype == w.dtype and out.device == w.device
    assert out.is_contiguous()
    assert torch.equal(out[0], w * m)  # no randomness: bit for bit
    torch.testing.assert_close(out, ref, **TOL[w.dtype])
    return out


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES[:-1])
def test_perturbed_masked_matches_reference(device, dtype, n):
    dev = kernel_device(device)
    gen = seeded("fwd", n, dtype)
    for lead in ((), (1,), (3,)):
        w, m = _inputs(gen, _mask_shape(n), lead, dtype, dev)
        for offset in OFFSETS:
            _check_forward(w, m, 0.37, 1234 + offset, offset)
        wn, mn = _inputs(gen, _mask_shape(n), lead, dtype, dev, noncontig=True)
        assert n == 1 or not (wn.is_contiguous() and mn.is_contiguous())
        _check_forward(wn, mn, 0.05, 2**64 - 2, 3)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("lead,offset", [((), 2), ((3,), 2**33 + 1)])
def test_perturbed_masked_large(device, lead, offset):
    dev = kernel_device(device)
    w, m = _inputs(seeded("large", lead), (SIZES[-1],), lead, torch.float32, dev)
    _check_forward(w, m, 0.1, 42, offset)


@pytest.mark.parametrize("device", devices)
def test_xi_is_the_stream_over_all_of_weight(device):
    # with leading draws, xi runs through weight row-major: draw p uses offset + p * mask.numel()
    dev = kernel_device(device)
    w, m = _inputs(seeded("xi"), (5, 7), (3, 2), torch.float64, dev)
    eps, seed, offset = 0.25, 77, 6
    out = perturbed_masked(w, m, eps, seed, offset)
    xi = (out[1] / m - w) / eps
    torch.testing.assert_close(xi, philox_normal(w.shape, seed, offset, dtype=torch.float64, device=dev),
                               rtol=1e-9, atol=1e-9)
    flat = w.reshape(-1, 5, 7)
    for p in range(flat.shape[0]):
        one = perturbed_masked(flat[p], m, eps, seed, offset + p * m.numel())
        assert torch.equal(one, out.reshape(2, -1, 5, 7)[:, p])


@pytest.mark.parametrize("device", devices)
def test_reference_with_stored_xi(device):
    dev = kernel_device(device)
    w, m = _inputs(seeded("stored"), (6, 5), (2,), torch.float32, dev)
    xi = philox_normal(w.shape, 21, 4, device=dev)
    # the kernel's forward is the plain formula on its own xi, rounding for rounding
    assert torch.equal(perturbed_masked_reference(w, m, 0.3, xi=xi), perturbed_masked(w, m, 0.3, 21, 4))
    with pytest.raises(ValueError, match="xi must match weight's shape"):
        perturbed_masked_reference(w, m, 0.3, xi=xi[0])
    with pytest.raises(ValueError, match="one of seed"):
        perturbed_masked_reference(w, m, 0.3, 21, xi=xi)


@pytest.mark.parametrize("device", devices)
def test_philox_tensor_form(device):
    dev = kernel_device(device)
    w, m = _inputs(seeded("ph"), (4, 6), (2,), torch.float32, dev)
    ph = torch.tensor([-9, 13], device=dev)
    a = perturbed_masked(w, m, 0.5, philox=ph)
    assert torch.equal(a, perturbed_masked(w, m, 0.5, 2**64 - 9, 13))
    ph[1] = 14  # a new offset without a new call signature (what a CUDA graph replay relies on)
    assert torch.equal(perturbed_masked(w, m, 0.5, philox=ph), perturbed_masked(w, m, 0.5, 2**64 - 9, 14))
    torch.testing.assert_close(perturbed_masked_reference(w, m, 0.5, philox=ph), perturbed_masked(w, m, 0.5, philox=ph))


@pytest.mark.parametrize("device", devices)
def test_empty_and_scalar_shapes(device):
    dev = kernel_device(device)
    for wshape, mshape in (((0, 5), (5,)), ((3, 0), (0,)), ((), ()), ((4,), ())):
        w = torch.randn(wshape, device=dev, requires_grad=True)
        m = (torch.rand(mshape, device=dev) + 0.5).requires_grad_()
        out = perturbed_masked(w, m, 0.3, 1, 2)
        assert out.shape == (2,) + wshape
        torch.testing.assert_close(out, perturbed_masked_reference(w, m, 0.3, 1, 2), **TOL[torch.float32])
        gw, gm = torch.autograd.grad(out.sum(), (w, m))
        rw, rm = torch.autograd.grad(perturbed_masked_reference(w, m, 0.3, 1, 2).sum(), (w, m))
        assert gw.shape == wshape and gm.shape == mshape
        torch.testing.assert_close(gw, rw, **TOL[torch.float32])
        torch.testing.assert_close(gm, rm, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices)
def test_gradcheck(device):
    dev = kernel_device(device)
    gen = seeded("gradcheck")
    for mshape, lead, offset in (((4, 5), (3,), 3), ((7,), (2, 2), 0), ((2, 3), (), 5)):
        w, m = _inputs(gen, mshape, lead, torch.float64, dev)
        w.requires_grad_()
        m.requires_grad_()
        fn = lambda a, b: perturbed_masked(a, b, 0.37, 11, offset)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (w, m))
        assert torch.autograd.gradcheck(lambda b: fn(w.detach(), b), (m,))
        assert torch.autograd.gradcheck(lambda a: fn(a, m.detach()), (w,))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_grads_match_autograd_through_reference(device, dtype):
    dev = kernel_device(device)
    gen = seeded("grads", dtype)
    for n, lead, offset in ((1, (), 0), (17, (3,), 1), (1000, (1,), 2**33 + 1), (4099, (3,), 2), (5, (2, 3), 3)):
        w, m = _inputs(gen, _mask_shape(n), lead, dtype, dev, noncontig=n == 1000)
        g = torch.randn((2,) + tuple(w.shape), generator=gen, dtype=torch.float64).to(device=dev, dtype=dtype)
        for need in ((True, True), (True, False), (False, True)):
            wg, mg = w.clone().requires_grad_(need[0]), m.clone().requires_grad_(need[1])
            wanted = [t for t, nd in zip((wg, mg), need) if nd]
            got = torch.autograd.grad(perturbed_masked(wg, mg, 0.2, 5, offset), wanted, g)
            ref = torch.autograd.grad(perturbed_masked_reference(wg, mg, 0.2, 5, offset), wanted, g)
            # grad_mask sums over the draws in float (float16 too): allow for the reference's roundings
            tol = dict(TOL[dtype])
            if dtype == torch.float16:
                tol = dict(rtol=1e-2, atol=2e-2 * max(1, w.numel() // max(m.numel(), 1)))
            for a, b in zip(got, ref):
                assert a.shape == b.shape and a.dtype == dtype
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", devices)
def test_backward_op_output_mask(device):
    dev = kernel_device(device)
    w, m = _inputs(seeded("bwd"), (3, 4), (2,), torch.float32, dev)
    g = torch.randn((2,) + tuple(w.shape), device=dev)
    ph = torch.tensor([3, 4], device=dev)
    gw, gm = torch.ops.ntkfast.perturbed_masked_backward(g, w, m, 0.1, ph, [True, True])
    torch.testing.assert_close(gw, (g[0] + g[1]) * m)
    xi = philox_normal(w.shape, 3, 4, device=dev)
    torch.testing.assert_close(gm, (g[0] * w + g[1] * (w + 0.1 * xi)).sum(0))
    only_w = torch.ops.ntkfast.perturbed_masked_backward(g, w, m, 0.1, ph, [True, False])
    only_m = torch.ops.ntkfast.perturbed_masked_backward(g, w, m, 0.1, ph, [False, True])
    neither = torch.ops.ntkfast.perturbed_masked_backward(g, w, m, 0.1, ph, [False, False])
    assert torch.equal(only_w[0], gw) and only_w[1].shape == (0,)
    assert torch.equal(only_m[1], gm) and only_m[0].shape == (0,)
    assert neither[0].shape == (0,) and neither[1].shape == (0,)
    # any strides in
    gt = g.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(torch.ops.ntkfast.perturbed_masked_backward(gt, w, m, 0.1, ph, [True, True])[1], gm)


# ---------------------------------------------------------------------------------------------
# pruned entries: NaN / inf in weight where the mask is zero (issue 25)
# ---------------------------------------------------------------------------------------------
#
# A weight under a zero mask entry contributes nothing, whatever it holds: out[:, i] is exactly 0
# there (a select, not weight * 0, which is NaN for inf), grad_weight is exactly 0 there and the
# other entries of both outputs and of grad_mask do not change. grad_mask at a pruned entry itself
# is the derivative of the product at mask 0, sum over draws of g0 w + g1 (w + eps xi): what
# un-pruning the entry would change, which does depend on its weight (and is not finite for a
# weight that is not).

BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def _pruned_inputs(gen, mask_shape, lead, dtype, device):
    w, m = _inputs(gen, mask_shape, lead, dtype, device)
    pruned = torch.rand(tuple(mask_shape), generator=gen) < 0.4
    pruned.view(-1)[0] = True
    pruned = pruned.to(device)
    return w, m.masked_fill(pruned, 0), pruned


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_non_finite_weights_under_a_zero_mask_contribute_nothing(device, dtype, path, bad):
    fn = perturbed_masked if path == "kernel" else perturbed_masked_reference
    dev = kernel_device(device) if path == "kernel" else torch.device(device)
    eps, seed, offset = 0.3, 9, 5
    for mask_shape, lead in (((1,), ()), ((7,), ()), ((4, 10), (3,)), ((33,), (2, 2))):
        gen = seeded("pruned", mask_shape, lead, dtype)
        w, m, pruned = _pruned_inputs(gen, mask_shape, lead, dtype, dev)
        where = pruned.expand(w.shape)
        finite = (1e2 * torch.randn(w.shape, generator=gen, dtype=torch.float64)).to(device=dev, dtype=dtype)
        versions = [w.masked_fill(where, BAD[bad]), w.masked_fill(where, 0), torch.where(where, finite, w)]
        g = torch.randn((2,) + tuple(w.shape), generator=gen, dtype=torch.float64).to(device=dev, dtype=dtype)
        outs, gws, gms = [], [], []
        for v in versions:
            wl, ml = v.clone().requires_grad_(), m.clone().requires_grad_()
            out = fn(wl, ml, eps, seed, offset)
            gw, gm = torch.autograd.grad(out, (wl, ml), g)
            outs.append(out.detach())
            gws.append(gw)
            gms.append(gm)
        what = f"{mask_shape} {lead}"
        assert bool(torch.isfinite(outs[0]).all()), what
        assert bool((outs[0][:, where] == 0).all()), what
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), what
        assert bool(torch.isfinite(gws[0]).all()), what
        assert bool((gws[0][where] == 0).all()), what
        assert torch.equal(gws[0], gws[1]) and torch.equal(gws[0], gws[2]), what
        kept = ~pruned
        assert bool(torch.isfinite(gms[0][kept]).all()), what
        assert torch.equal(gms[0][kept], gms[1][kept]) and torch.equal(gms[0][kept], gms[2][kept]), what
        # at a pruned entry: the product rule, with that entry's own (finite) weight
        xi = philox_normal_reference((seed, offset), w.shape, dtype, dev).double()
        v = versions[2].double()
        want = (g[0].double() * v + g[1].double() * (v + eps * xi)).reshape(-1, *mask_shape).sum(0)
        tol = dict(rtol=1e-2, atol=1.0) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(gms[2][pruned].double(), want[pruned], **tol)


@needs_extension
def test_writing_philox_before_backward_raises():
    w = torch.randn(4, 5, requires_grad=True)
    m = (torch.rand(5) + 0.5).requires_grad_()
    ph = torch.tensor([1, 0])
    out = perturbed_masked(w, m, 0.1, philox=ph)
    ph[1] = 8  # the backward would regenerate other numbers
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# opcheck, errors, fallback
# ---------------------------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("device", devices)
def test_opcheck(device):
    dev = kernel_device(device)
    w, m = _inputs(seeded("opcheck"), (3, 4), (2,), torch.float32, dev)
    ph = torch.tensor([5, 7], device=dev)
    torch.library.opcheck(torch.ops.ntkfast.perturbed_masked.default, (w, m, 0.3, ph))
    torch.library.opcheck(torch.ops.ntkfast.perturbed_masked.default,
                          (w.clone().requires_grad_(), m.clone().requires_grad_(), 0.3, ph))
    torch.library.opcheck(torch.ops.ntkfast.perturbed_masked.default, (w[0].double(), m.double(), 0.3, ph))
    g = torch.randn((2,) + tuple(w.shape), device=dev)
    for output_mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.ntkfast.perturbed_masked_backward.default, (g, w, m, 0.3, ph, output_mask))
    torch.library.opcheck(torch.ops.ntkfast.philox_normal.default, (ph, [3, 5], torch.float32))
    torch.library.opcheck(torch.ops.ntkfast.philox_normal.default, (ph, [7], torch.float64))


@pytest.mark.parametrize("fn", [perturbed_masked, perturbed_masked_reference])
def test_bad_arguments(fn):
    w, m = torch.randn(3, 4, 5), torch.rand(4, 5) + 0.5
    cases = [
        ((w, torch.rand(5, 4), 0.1, 1), "mask has shape"),
        ((w, torch.rand(2, 4, 5), 0.1, 1), "mask has shape"),
        ((torch.randn(5), torch.rand(3, 5), 0.1, 1), "mask has shape"),
        ((w, m.double(), 0.1, 1), "mask must have weight's dtype"),
        ((w.long(), m.long(), 0.1, 1), "weight's dtype must be"),
        ((w, m.to("meta"), 0.1, 1), "mask is on meta"),
        ((w, m, float("nan"), 1), "epsilon must be finite"),
        ((w, m, float("inf"), 1), "epsilon must be finite"),
        ((w, m, 10**400, 1), "epsilon must be finite"),  # was an OverflowError from float()
        ((w, m, 0.1, 2**64), "seed must be in"),
        ((w, m, 0.1, -(2**63) - 1), "seed must be in"),
        ((w, m, 0.1, 1, -1), "offset must be in"),
        ((w, m, 0.1, 1, 2**62), "offset must be in"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(*args)
    with pytest.raises(ValueError, match="philox must be an int64 tensor"):
        fn(w, m, 0.1, philox=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="philox must be an int64 tensor"):
        fn(w, m, 0.1, philox=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="philox is on meta"):
        fn(w, m, 0.1, philox=torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match=r"philox\[1\] \(the offset\) must be in"):
        fn(w, m, 0.1, philox=torch.tensor([1, -2]))
    with pytest.raises(ValueError, match="either seed"):
        fn(w, m, 0.1, 1, philox=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="offset must be left at 0"):
        fn(w, m, 0.1, offset=3, philox=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seed"):
        fn(w, m, 0.1)
    with pytest.raises(TypeError, match="seed must be an int"):
        fn(w, m, 0.1, 1.5)
    with pytest.raises(TypeError, match="epsilon must be a real number"):
        fn(w, m, "0.1", 1)


def test_philox_normal_bad_arguments():
    with pytest.raises(ValueError, match="size must not have negative"):
        philox_normal((3, -1), 1)
    with pytest.raises(TypeError, match="size must be"):
        philox_normal((3, 1.5), 1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        philox_normal(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="seed must be in"):
        philox_normal(3, 2**64)
    with pytest.raises(ValueError, match="offset must be in"):
        philox_normal(3, 1, -1)
    with pytest.raises(ValueError, match="offset must be in"):
        philox_normal_reference((1, 2**62), 3)
    # more numbers than the stream's offsets reach: named, not an int64 overflow in the op schema
    with pytest.raises(ValueError, match=r"size .* at most 2\*\*62"):
        philox_normal(10**30, 1)
    with pytest.raises(ValueError, match=r"size .* at most 2\*\*62"):
        philox_normal_reference((1, 0), (2**31, 2**31))


@needs_extension
def test_op_level_errors_are_value_errors():
    w, m, ph = torch.randn(3, 4), torch.rand(4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="mask has shape"):
        torch.ops.ntkfast.perturbed_masked(w, torch.rand(3), 0.1, ph)
    with pytest.raises(ValueError, match="epsilon must be finite"):
        torch.ops.ntkfast.perturbed_masked(w, m, float("nan"), ph)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.ntkfast.perturbed_masked(w, m, 0.1, torch.tensor([1, -2]))
    with pytest.raises(ValueError, match="philox must have shape"):
        torch.ops.ntkfast.philox_normal(torch.tensor([1, 2, 3]), [3], torch.float32)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.ntkfast.perturbed_masked_backward(torch.randn(3, 4), w, m, 0.1, ph, [True, True])
    with pytest.raises(ValueError, match="dtype must be"):
        torch.ops.ntkfast.philox_normal(ph, [3], torch.int64)


def test_fallback_without_extension_warns_and_matches(monkeypatch):
    w = torch.randn(2, 3, 4, requires_grad=True)
    m = (torch.rand(3, 4) + 0.5).requires_grad_()
    compiled = perturbed_masked(w, m, 0.2, 9, 1) if ops.extension_loaded() else None
    monkeypatch.setattr(loader.STATE, "module", None)
    monkeypatch.setattr(loader.STATE, "error", "ImportError: simulated")
    monkeypatch.setattr(loader.STATE, "warned", False)
    with pytest.warns(RuntimeWarning, match="falls back to its pure-PyTorch reference"):
        out = perturbed_masked(w, m, 0.2, 9, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = philox_normal(10, 9, 1)
    assert torch.equal(z, philox_normal_reference((9, 1), 10))
    assert torch.equal(out, perturbed_masked_reference(w, m, 0.2, 9, 1))
    gw, gm = torch.autograd.grad(out.sum(), (w, m))
    assert gw.shape == w.shape and gm.shape == m.shape
    if compiled is not None:
        torch.testing.assert_close(out, compiled, **TOL[torch.float32])


@needs_extension
def test_extension_without_these_ops_falls_back(monkeypatch):
    monkeypatch.setattr(FAMILY, "available", False)
    monkeypatch.setattr(FAMILY, "warned", False)
    w, m = torch.randn(3, 4), torch.rand(4) + 0.5
    with pytest.warns(RuntimeWarning, match="predates philox_normal"):
        out = perturbed_masked(w, m, 0.2, 9, 1)
    assert torch.equal(out, perturbed_masked_reference(w, m, 0.2, 9, 1))
    assert torch.equal(philox_normal(5, 9, 1), philox_normal_reference((9, 1), 5))


# ---------------------------------------------------------------------------------------------
# CUDA only: kernels against the CPU kernel, and CUDA graph capture with the philox tensor
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA kernels cannot run here")


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu_kernel():
    kernel_device("cuda")
    gen = seeded("cuda-cpu")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for n, lead, offset in ((4099, (3,), 2**33 + 1), (1000, (), 3), (17, (5,), 2)):
            w, m = _inputs(gen, _mask_shape(n), lead, dtype, "cpu")
            cpu = perturbed_masked(w, m, 0.3, 8, offset)
            gpu = perturbed_masked(w.cuda(), m.cuda(), 0.3, 8, offset).cpu()
            assert torch.equal(gpu[0], cpu[0])
            torch.testing.assert_close(gpu, cpu, **TOL[dtype])
            g = torch.randn(cpu.shape, generator=gen).to(dtype)
            a = torch.ops.ntkfast.perturbed_masked_backward(g, w, m, 0.3, torch.tensor([8, offset]), [True, True])
            b = torch.ops.ntkfast.perturbed_masked_backward(g.cuda(), w.cuda(), m.cuda(), 0.3,
                                                            torch.tensor([8, offset], device="cuda"), [True, True])
            assert torch.equal(b[0].cpu(), a[0])
            tol = TOL[dtype] if dtype != torch.float16 else dict(rtol=1e-2, atol=2e-2)
            torch.testing.assert_close(b[1].cpu(), a[1], **tol)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_reads_philox_on_the_device():
    kernel_device("cuda")
    w, m = _inputs(seeded("graph"), (64, 33), (3,), torch.float32, "cuda")
    w.requires_grad_()
    m.requires_grad_()
    ph = torch.tensor([5, 0], device="cuda")
    g = torch.randn((2,) + tuple(w.shape), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())

    def calls():
        out = perturbed_masked(w, m, 0.1, philox=ph)
        z = torch.ops.ntkfast.philox_normal(ph, [100], torch.float32)
        gm = torch.ops.ntkfast.perturbed_masked_backward(g, w.detach(), m.detach(), 0.1, ph, [False, True])[1]
        return out, z, gm

    with torch.cuda.stream(stream):  # warm-up outside the graph (module loading, allocator)
        calls()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # would fail if any of them synchronised with the host
        out, z, gm = calls()
    for seed, offset in ((5, 0), (6, 3), (2**40, 2**33 + 1)):
        ph.copy_(torch.tensor([seed, offset]))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, perturbed_masked(w, m, 0.1, seed, offset))
        assert torch.equal(z, philox_normal(100, seed, offset, device="cuda"))
        ph_eager = torch.tensor([seed, offset], device="cuda")
        want = torch.ops.ntkfast.perturbed_masked_backward(g, w.detach(), m.detach(), 0.1, ph_eager, [False, True])[1]
        assert torch.equal(gm, want)
