"""Public entry points of the compiled ops (with pure-PyTorch fallbacks)."""
from ._ops import (  # noqa: F401
    build_info,
    extension_loaded,
    topk_mask,
    topk_mask_layerwise,
    topk_mask_reference,
    topk_mask_layerwise_reference,
    philox_normal,
    philox_normal_reference,
    philox_words_reference,
    perturbed_masked,
    perturbed_masked_reference,
    conv_weight_grad_per_sample,
    conv_weight_grad_per_sample_reference,
)

__all__ = [
    "build_info",
    "extension_loaded",
    "topk_mask",
    "topk_mask_layerwise",
    "topk_mask_reference",
    "topk_mask_layerwise_reference",
    "philox_normal",
    "philox_normal_reference",
    "philox_words_reference",
    "perturbed_masked",
    "perturbed_masked_reference",
    "conv_weight_grad_per_sample",
    "conv_weight_grad_per_sample_reference",
]
