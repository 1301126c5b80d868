"""The compiled contractions the NTK engine calls (ntkfast.ops), behind one import: the fused
masked Gram contraction and the per-sample convolution weight gradient. Each falls back to its
PyTorch reference when the extension or the device has no kernel."""
from __future__ import annotations

from ..ops import conv_weight_grad_per_sample, masked_gram

__all__ = ["conv_weight_grad_per_sample", "masked_gram"]
