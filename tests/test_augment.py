"""Batched augmentation (ntkfast.augment) against per-image references of torchvision's transforms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ntkfast import augment as A


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n, c, h, w, dtype=torch.uint8, seed=1):
    g = _gen(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return torch.rand(n, c, h, w, generator=g, dtype=dtype) * 255


@pytest.mark.parametrize("shape,padding,size", [((7, 3, 32, 32), 4, None), ((5, 1, 9, 13), 2, (8, 11)),
                                                ((4, 2, 6, 6), 0, (3, 5)), ((3, 3, 5, 4), 3, (11, 10))])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_crop_flip_is_the_per_image_pad_crop_flip(shape, padding, size, dtype):
    x = _images(*shape, dtype=dtype)
    aug = A.RandomCropFlip(padding=padding, size=size)
    got = aug(x, _gen(7))
    top, left, flip = aug.draw(shape[0], shape[2], shape[3], _gen(7))
    h, w = size or shape[2:]
    assert got.shape == (shape[0], shape[1], h, w) and got.dtype == dtype
    assert 0 < flip.sum() < shape[0] or shape[0] < 4  # both kinds occur on these seeds
    for i in range(shape[0]):
        img = F.pad(x[i], (padding,) * 4)
        want = img[:, top[i]:top[i] + h, left[i]:left[i] + w]
        if flip[i]:
            want = want.flip(-1)
        assert torch.equal(got[i], want)


def test_crop_flip_keeps_every_pixel_in_range_and_uses_all_offsets():
    aug = A.RandomCropFlip(padding=4)
    top, left, flip = aug.draw(20_000, 32, 32, _gen(3))
    assert set(top.tolist()) == set(range(9)) and set(left.tolist()) == set(range(9))
    assert abs(flip.float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("box,out", [((3, 5, 17, 11), (8, 8)),  # shrink: the antialiased filter
                                     ((0, 0, 5, 7), (16, 12)),  # grow: plain bilinear
                                     ((2, 1, 9, 9), (9, 9)),  # the identity
                                     ((10, 4, 14, 20), (64, 5))])  # one axis each way
def test_resize_matrices_equal_interpolate_on_the_cropped_box(box, out):
    top, left, bh, bw = box
    x = torch.rand(1, 2, 24, 25, generator=_gen(2), dtype=torch.float64)
    ry = A._resize_matrix(torch.tensor([top]), torch.tensor([bh]), out[0], 24)
    rx = A._resize_matrix(torch.tensor([left]), torch.tensor([bw]), out[1], 25)
    got = ry[0] @ x[0] @ rx[0].T
    crop = x[:, :, top:top + bh, left:left + bw]
    want = F.interpolate(crop, size=out, mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,size,scale,ratio", [((6, 3, 64, 64), 64, (0.1, 1.0), (0.8, 1.25)),
                                                    ((5, 3, 40, 30), 24, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                    ((4, 1, 16, 20), (10, 14), (0.3, 0.6), (0.5, 2.0))])
def test_resized_crop_is_the_per_image_crop_resize_flip(shape, size, scale, ratio):
    x = _images(*shape)
    aug = A.RandomResizedCropFlip(size, scale=scale, ratio=ratio)
    got = aug(x, _gen(11))
    top, left, bh, bw, flip = aug.draw(shape[0], shape[2], shape[3], _gen(11))
    out = (size, size) if isinstance(size, int) else size
    assert got.shape == (shape[0], shape[1], *out) and got.dtype == torch.float32
    for i in range(shape[0]):
        crop = x[i:i + 1, :, top[i]:top[i] + bh[i], left[i]:left[i] + bw[i]].double()
        want = F.interpolate(crop, size=out, mode="bilinear", align_corners=False, antialias=True)[0]
        if flip[i]:
            want = want.flip(-1)
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-3)  # float32 of 0..255


def test_resized_crop_boxes_follow_torchvision_rules():
    aug = A.RandomResizedCropFlip(32, scale=(0.1, 0.5), ratio=(0.5, 2.0))
    top, left, bh, bw, _ = aug.draw(5000, 48, 40, _gen(4))
    assert bool(((top >= 0) & (left >= 0) & (top + bh <= 48) & (left + bw <= 40)).all())
    frac = (bh * bw).double() / (48 * 40)
    assert frac.min() > 0.09 and frac.max() < 0.52  # rounding of the sides
    aspect = bw.double() / bh.double()
    assert aspect.min() > 0.45 and aspect.max() < 2.2
    assert len(set(top.tolist())) > 20 and len(set(left.tolist())) > 20


@pytest.mark.parametrize("h,w,ratio,box", [(10, 100, (1.0, 1.0), (10, 10)),  # too wide: the largest square
                                           (100, 10, (2.0, 3.0), (5, 10)),  # too tall: width / 2 high
                                           (30, 40, (1.0, 1.5), (30, 40))])  # inside the range: all of it
def test_resized_crop_falls_back_to_the_central_box(h, w, ratio, box):
    # an area fraction above what any box of these ratios can have makes all ten draws fail
    aug = A.RandomResizedCropFlip(8, scale=(0.999, 1.0), ratio=ratio)
    top, left, bh, bw, _ = aug.draw(6, h, w, _gen(5))
    if box == (h, w):
        return  # the whole image fits the ratio, so the draws succeed as well
    assert bh.tolist() == [box[0]] * 6 and bw.tolist() == [box[1]] * 6
    assert top.tolist() == [(h - box[0]) // 2] * 6 and left.tolist() == [(w - box[1]) // 2] * 6


@pytest.mark.parametrize("aug", [A.RandomCropFlip(4), A.RandomResizedCropFlip(16, scale=(0.2, 1.0))])
def test_a_seed_repeats_and_another_differs(aug):
    x = _images(8, 3, 16, 16)
    a, b, c = aug(x, _gen(1)), aug(x, _gen(1)), aug(x, _gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the layout of the input does not change the numbers
    assert torch.equal(aug(x.contiguous(memory_format=torch.channels_last), _gen(1)), a)


def test_presets_are_the_authors():
    assert isinstance(A.for_dataset("cifar10"), A.RandomCropFlip) and A.for_dataset("cifar100").padding == 4
    tiny = A.for_dataset("tiny-imagenet")
    assert tiny.size == (64, 64) and tiny.scale == (0.1, 1.0) and tiny.ratio == (0.8, 1.25)
    net = A.for_dataset("imagenet")
    assert net.size == (224, 224) and net.scale == (0.08, 1.0) and math.isclose(net.ratio[1], 4 / 3)
    assert A.for_dataset("mnist") is None
    with pytest.raises(ValueError, match="^name: no augmentation preset for 'svhnx'"):
        A.for_dataset("svhnx")


@pytest.mark.parametrize("make,match", [
    (lambda: A.RandomCropFlip(padding=-1), "^padding"),
    (lambda: A.RandomCropFlip(flip=1.5), "^flip"),
    (lambda: A.RandomCropFlip(size=(3, 4, 5)), "^size"),
    (lambda: A.RandomResizedCropFlip(0), "^size"),
    (lambda: A.RandomResizedCropFlip("big"), "^size"),
    (lambda: A.RandomResizedCropFlip(8, scale=(0.5, 0.2)), "^scale"),
    (lambda: A.RandomResizedCropFlip(8, scale=(float("nan"), 1.0)), "^scale"),
    (lambda: A.RandomResizedCropFlip(8, ratio=(0, 1)), "^ratio"),
    (lambda: A.RandomResizedCropFlip(8, flip=True), "^flip"),
])
def test_bad_options_are_named(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_calls_are_named_and_leave_the_batch_alone():
    x = _images(2, 3, 8, 8)
    before = x.clone()
    aug = A.RandomCropFlip(2, size=(20, 20))
    with pytest.raises(ValueError, match="^size: a 20x20 window"):
        aug(x, _gen())
    with pytest.raises(ValueError, match="^images: expected a batch"):
        A.RandomCropFlip(2)(x[0], _gen())
    with pytest.raises(ValueError, match="^generator: expected a CPU torch.Generator"):
        A.RandomCropFlip(2)(x, 0)
    assert torch.equal(x, before)


def test_recipes_by_name():
    assert A.recipes() == ["ntksap-tiny-resized-crop-flip", "pad4-crop-flip", "resized-crop-flip-224"]
    assert A.get("pad4-crop-flip").padding == 4
    with pytest.raises(ValueError, match="^augment: unknown recipe 'crop'"):
        A.get("crop")
