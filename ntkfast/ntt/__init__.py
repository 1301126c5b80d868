"""Neural Tangent Transfer (Liu & Zenke, ICML 2020): a sparse student trained, without labels, to
match the dense teacher's outputs and empirical NTK.

- :func:`transfer` (``ntkfast.transfer``): the transfer loop; :class:`TransferResult`;
- :func:`teacher_targets`, :func:`transfer_loss`, :func:`select_masks`: one step's pieces;
- :mod:`~ntkfast.ntt.reference`: the same loss written with torch.func, as the authors' JAX code;
- ``method``: NTT registered as ``prune(model, "ntt", ...)``, masks and learned weights together.
"""
from .transfer import TransferResult, select_masks, teacher_targets, transfer, transfer_loss
from . import method  # noqa: F401  (registers prune(model, "ntt", ...))

__all__ = ["transfer", "TransferResult", "teacher_targets", "transfer_loss", "select_masks"]
