"""ntkfast's compiled ops, one module per kernel family (mirroring ``csrc/``), each with its
pure-PyTorch reference, which runs where the extension or a device's kernels are missing.

- :mod:`~ntkfast.ops.topk_mask`: ``topk_mask``, ``topk_mask_layerwise``
- :mod:`~ntkfast.ops.nm_mask`: ``nm_mask`` (N:M semi-structured selection)
- :mod:`~ntkfast.ops.perturbed_masked`: ``philox_normal``, ``perturbed_masked``
- :mod:`~ntkfast.ops.masked_gram`: ``masked_gram``
- :mod:`~ntkfast.ops.conv_weight_grad_per_sample`: ``conv_weight_grad_per_sample``
- :mod:`~ntkfast.ops.path`: ``path_chain``, ``path_score``
- :mod:`~ntkfast.ops.loader`: what of the extension is here (``build_info``)
"""
from .loader import build_info, cuda_kernels, extension_loaded
from .topk_mask import topk_mask, topk_mask_layerwise, topk_mask_reference, topk_mask_layerwise_reference
from .nm_mask import nm_mask, nm_mask_reference
from .perturbed_masked import (philox_normal, philox_normal_reference, philox_words_reference, perturbed_masked,
                               perturbed_masked_reference)
from .masked_gram import masked_gram, masked_gram_reference
from .conv_weight_grad_per_sample import conv_weight_grad_per_sample, conv_weight_grad_per_sample_reference
from .path import path_chain, path_chain_reference, path_score, path_score_reference

__all__ = [
    "build_info",
    "cuda_kernels",
    "extension_loaded",
    "topk_mask",
    "topk_mask_layerwise",
    "topk_mask_reference",
    "topk_mask_layerwise_reference",
    "nm_mask",
    "nm_mask_reference",
    "philox_normal",
    "philox_normal_reference",
    "philox_words_reference",
    "perturbed_masked",
    "perturbed_masked_reference",
    "masked_gram",
    "masked_gram_reference",
    "conv_weight_grad_per_sample",
    "conv_weight_grad_per_sample_reference",
    "path_chain",
    "path_chain_reference",
    "path_score",
    "path_score_reference",
]
