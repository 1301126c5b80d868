"""Training-time augmentation of whole batches, on the device where the batch lives.

The authors of NTK-SAP and Synaptic-Flow train with torchvision's per-image PIL transforms:
CIFAR: ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip``; Tiny-ImageNet (NTK-SAP):
``RandomResizedCrop(64, scale=(0.1, 1), ratio=(0.8, 1.25))`` then the flip; ImageNet:
``RandomResizedCrop(224)`` then the flip. Here each is one batched operation on raw pixel values
(before normalisation, as there), so a GPU-resident dataset never leaves the GPU:

- :class:`RandomCropFlip` pads with zeros, takes one random window per image and flips half of
  them: the same pixels as the per-image transforms, bit for bit.
- :class:`RandomResizedCropFlip` draws torchvision's crop boxes (ten tries on the area and
  log-aspect-ratio, then the central fallback) and resizes each box with separable
  interpolation matrices: bilinear with PIL's antialiasing when a box shrinks, plain bilinear
  when it grows, as ``torch.nn.functional.interpolate(..., antialias=True)`` on the cropped box.
  It returns float32 pixel values in [0, 255] (PIL would round them to uint8).

The random draws (offsets, boxes, flips) come from a CPU ``torch.Generator`` the caller seeds, so
a run repeats exactly and draws the same boxes on every device. :func:`for_dataset` gives the
authors' augmentation for a dataset name.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .core.checks import check_int

__all__ = ["RandomCropFlip", "RandomResizedCropFlip", "for_dataset", "get", "recipes"]


def _check_batch(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a batch [N, C, H, W], got {got}")
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"images: expected pixel values (uint8 or floating), got {images.dtype}")
    return images


def _check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator (the draws are made on the CPU so "
                         f"they repeat on every device), got {generator!r}")
    return generator


def _flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


class RandomCropFlip:
    """Zero-pad each image by ``padding`` on every side, cut a random ``size`` window from it and
    flip it left-right with probability ``flip`` (torchvision's ``RandomCrop(size, padding)`` and
    ``RandomHorizontalFlip(flip)``). ``size`` defaults to the images' own height and width."""

    def __init__(self, padding: int = 4, size: Optional[Tuple[int, int]] = None, flip: float = 0.5):
        self.padding = check_int(padding, "padding", lo=0)
        if size is not None:
            size = tuple(check_int(s, "size", lo=1) for s in ((size, size) if isinstance(size, int) else size))
            if len(size) != 2:
                raise ValueError(f"size: expected (height, width), got {size}")
        self.size = size
        if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
            raise ValueError(f"flip: expected a probability in [0, 1], got {flip!r}")
        self.flip = float(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, size={self.size}, flip={self.flip})"

    def draw(self, n: int, height: int, width: int, generator: torch.Generator):
        """The window offsets (rows, columns; into the padded image) and flips of ``n`` images."""
        h, w = self.size or (height, width)
        ph, pw = height + 2 * self.padding, width + 2 * self.padding
        if h > ph or w > pw:
            raise ValueError(f"size: a {h}x{w} window does not fit a {height}x{width} image padded by {self.padding}")
        top = torch.randint(0, ph - h + 1, (n,), generator=generator)
        left = torch.randint(0, pw - w + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < self.flip
        return top, left, flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, generator = _check_batch(images), _check_generator(generator)
        n, _, height, width = images.shape
        top, left, flip = self.draw(n, height, width, generator)
        h, w = self.size or (height, width)
        p = self.padding
        padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
        dev = images.device
        rows = (top.to(dev).view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (left.to(dev).view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
        batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
        chan = torch.arange(images.shape[1], device=dev).view(1, -1, 1, 1)
        return _flip_where(padded[batch, chan, rows, cols], flip)


def _resize_matrix(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """[n, out, size] rows that resample the span ``start .. start + length`` of an axis of
    ``size`` pixels to ``out`` pixels: a triangle filter widened by the shrink factor (PIL's
    antialiased bilinear), its taps renormalised inside the span, so the box's edge pixels are
    repeated rather than its neighbours read."""
    start, length = start.to(torch.float64), length.to(torch.float64)
    scale = (length / out).view(-1, 1, 1)  # input pixels per output pixel
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale  # within the box
    pix = torch.arange(size, dtype=torch.float64).view(1, 1, -1) - start.view(-1, 1, 1)  # box coords
    wgt = (1 - ((pix + 0.5 - centre) / support).abs()).clamp(min=0)
    wgt = wgt * ((pix >= 0) & (pix < length.view(-1, 1, 1)))
    return wgt / wgt.sum(-1, keepdim=True)


class RandomResizedCropFlip:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` (antialiased bilinear) and
    ``RandomHorizontalFlip(flip)`` on a batch: a box of a random fraction ``scale`` of the area and
    aspect ratio in ``ratio`` (log-uniform), resized to ``size``. Returns float32 pixel values."""

    def __init__(self, size, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip: float = 0.5):
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        try:
            self.size = tuple(check_int(s, "size", lo=1) for s in size)
        except TypeError:
            raise ValueError(f"size: expected an int or (height, width), got {size!r}") from None
        if len(self.size) != 2:
            raise ValueError(f"size: expected (height, width), got {size!r}")
        self.scale = self._pair(scale, "scale", 0.0, 1.0)
        self.ratio = self._pair(ratio, "ratio", 0.0, math.inf)
        if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
            raise ValueError(f"flip: expected a probability in [0, 1], got {flip!r}")
        self.flip = float(flip)

    @staticmethod
    def _pair(value, name: str, lo: float, hi: float) -> Tuple[float, float]:
        try:
            a, b = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a pair (low, high), got {value!r}") from None
        if not (lo < a <= b <= hi) or not math.isfinite(a * b):
            raise ValueError(f"{name}: expected {lo} < low <= high{f' <= {hi}' if math.isfinite(hi) else ''}, "
                             f"got {value!r}")
        return a, b

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"

    def draw(self, n: int, height: int, width: int, generator: torch.Generator, tries: int = 10):
        """Boxes (top, left, box height, box width) and flips of ``n`` images, torchvision's way:
        the first of ``tries`` draws that fits the image, else the central box of the largest
        aspect ratio within ``ratio`` (the whole image when the image's own ratio is inside it)."""
        area = height * width
        u_area = torch.rand(n, tries, generator=generator, dtype=torch.float64)
        u_ratio = torch.rand(n, tries, generator=generator, dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
        h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(fits.any(1), fits.to(torch.int8).argmax(1), torch.full((n,), -1))
        u_top = torch.rand(n, generator=generator, dtype=torch.float64)
        u_left = torch.rand(n, generator=generator, dtype=torch.float64)
        flip = torch.rand(n, generator=generator) < self.flip
        # the fallback box: the image cropped to the nearest allowed aspect ratio, centred
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fh, fw = height, int(round(height * self.ratio[1]))
        else:
            fw, fh = width, height
        pick = first.clamp(min=0).view(n, 1)
        bh = torch.where(first >= 0, h.gather(1, pick).view(n), torch.full((n,), fh))
        bw = torch.where(first >= 0, w.gather(1, pick).view(n), torch.full((n,), fw))
        # a uniform integer offset in 0 .. free (torch.randint has no per-element bounds)
        top = torch.where(first >= 0, (u_top * (height - bh + 1)).floor().to(torch.int64), (height - bh) // 2)
        left = torch.where(first >= 0, (u_left * (width - bw + 1)).floor().to(torch.int64), (width - bw) // 2)
        return top, left, bh, bw, flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, generator = _check_batch(images), _check_generator(generator)
        n, _, height, width = images.shape
        top, left, bh, bw, flip = self.draw(n, height, width, generator)
        dev = images.device
        ry = _resize_matrix(top, bh, self.size[0], height).to(device=dev, dtype=torch.float32)
        rx = _resize_matrix(left, bw, self.size[1], width).to(device=dev, dtype=torch.float32)
        x = images.to(torch.float32)
        out = torch.matmul(torch.matmul(ry.unsqueeze(1), x), rx.transpose(1, 2).unsqueeze(1))
        return _flip_where(out, flip)


# The authors' recipes by name, and which one NTK-SAP's Utils/load.py trains each dataset with
# (Synaptic-Flow: the same for CIFAR; "pad4-crop-flip" for Tiny-ImageNet too). MNIST-like sets
# train without augmentation there.
_RECIPES = {
    "pad4-crop-flip": lambda: RandomCropFlip(padding=4),
    "ntksap-tiny-resized-crop-flip": lambda: RandomResizedCropFlip(64, scale=(0.1, 1.0), ratio=(0.8, 1.25)),
    "resized-crop-flip-224": lambda: RandomResizedCropFlip(224),
}
_BY_DATASET = {"cifar10": "pad4-crop-flip", "cifar100": "pad4-crop-flip",
               "tiny-imagenet": "ntksap-tiny-resized-crop-flip", "imagenet": "resized-crop-flip-224",
               "mnist": None, "fashion-mnist": None}


def recipes():
    """The names :func:`get` knows."""
    return sorted(_RECIPES)


def get(name: str):
    """A new augmentation of the recipe ``name`` (see :func:`recipes`)."""
    if name not in _RECIPES:
        raise ValueError(f"augment: unknown recipe {name!r}; known: {', '.join(recipes())}")
    return _RECIPES[name]()


def for_dataset(name: str):
    """The training augmentation the NTK-SAP authors use for dataset ``name`` (None: none)."""
    if name not in _BY_DATASET:
        raise ValueError(f"name: no augmentation preset for {name!r}; known: {', '.join(sorted(_BY_DATASET))}")
    recipe = _BY_DATASET[name]
    return None if recipe is None else get(recipe)
