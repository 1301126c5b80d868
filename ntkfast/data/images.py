"""Decoding image files (JPEG, PNG, ...) with Pillow, an optional dependency.

Every image comes out as RGB, as torchvision's ImageFolder loader gives it: a greyscale image
has its one channel repeated, an RGBA one loses its alpha, a palette one is expanded. A file
Pillow cannot read (corrupt, truncated, not an image) raises ValueError naming the dataset and
the file.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["require_pillow", "decode_rgb", "decode_array"]


def require_pillow(dataset: str):
    """Pillow's ``Image`` module; ImportError saying how to install it when it is missing."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"{dataset}: reading its image files needs Pillow, which is not installed: "
                          "pip install pillow, or the extra: pip install ntkfast[images]") from None
    return Image


def _resize_shorter(im, size: int, resample):
    # torchvision's Resize(int): the shorter side becomes `size`, the longer keeps the aspect
    # ratio, rounded down
    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        return im.resize((size, int(size * h / w)), resample)
    return im.resize((int(size * w / h), size), resample)


def _center_crop(im, crop: int):
    w, h = im.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def decode_array(path, dataset: str, size: Optional[int] = None, crop: Optional[int] = None,
                 Image=None) -> np.ndarray:
    """The image at ``path`` as a uint8 ``[H, W, 3]`` array; ``size`` and ``crop`` as for
    :func:`decode_rgb`. ``Image``: Pillow's module, when the caller has it already."""
    Image = Image or require_pillow(dataset)
    try:
        with Image.open(path) as im:
            im.load()  # reads the whole file: a truncated one fails here
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                # Pillow's convert("RGB") clips these to 0..255 (a 16-bit 30000 becomes white):
                # silently wrong pixels, so they are refused rather than guessed at
                raise ValueError(f"{im.mode!r} pixels (16-bit or 32-bit); ntkfast reads 8-bit images: convert it")
            if im.mode != "RGB":
                im = im.convert("RGB")
            if size is not None:
                im = _center_crop(_resize_shorter(im, size, Image.BILINEAR), crop or size)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{dataset}: {path}: not a readable image ({type(e).__name__}: {e})") from None


def decode_rgb(path, dataset: str, size: Optional[int] = None, crop: Optional[int] = None) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``[3, H, W]`` tensor. With ``size``: its shorter side
    resized to ``size`` (bilinear, antialiased), then the centre ``crop`` x ``crop`` square
    (``crop`` defaults to ``size``)."""
    arr = decode_array(path, dataset, size, crop)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
