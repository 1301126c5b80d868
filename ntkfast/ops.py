"""Public entry points of the compiled ops (with pure-PyTorch fallbacks)."""
from ._ops import (  # noqa: F401
    build_info,
    extension_loaded,
    topk_mask,
    topk_mask_layerwise,
    topk_mask_reference,
    topk_mask_layerwise_reference,
)

__all__ = [
    "build_info",
    "extension_loaded",
    "topk_mask",
    "topk_mask_layerwise",
    "topk_mask_reference",
    "topk_mask_layerwise_reference",
]
