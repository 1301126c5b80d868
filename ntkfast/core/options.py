"""The string options of the public functions, as ``typing.Literal`` types.

Each type is used twice: in the signatures (so that a type checker and an editor know the
values) and, through :func:`choices`, in the runtime check that refuses any other value by name.
One definition for both, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Literal, Tuple, get_args

__all__ = ["Schedule", "Scope", "KeepRule", "OnEmptyLayer", "NmLayout", "OnIndivisible", "Optimizer", "Amp", "BNMode", "NTKMode", "TraceMethod", "SpectrumMethod", "GramMode",
           "InitMask", "TransferKernel", "ZooInit", "Metric", "choices"]

#: how the density falls over the rounds of :func:`ntkfast.prune`
Schedule = Literal["exponential", "linear", "expinv"]
#: thresholding over all prunable weights at once, or each tensor on its own
Scope = Literal["global", "layerwise"]
#: how many weights a threshold keeps (see :func:`ntkfast.masks.threshold`)
KeepRule = Literal["exact", "authors"]
#: what :func:`ntkfast.prune` does when a layer loses every weight
OnEmptyLayer = Literal["warn", "error", "ignore"]
#: how N:M groups run through a convolution's weight [out, in, *kernel]: along the input channels
#: at each kernel position (TensorRT's and NVIDIA ASP's layout), or along the flattened in * kernel
#: of ``weight.reshape(out, -1)`` (see :func:`ntkfast.masks.nm_masks`)
NmLayout = Literal["channels", "flat"]
#: what :func:`ntkfast.prune` does with a layer an N:M structure does not fit
OnIndivisible = Literal["error", "unstructured"]
#: the optimizers of :func:`ntkfast.train` and the study
Optimizer = Literal["sgd", "adam"]
#: the BatchNorm statistics a data-based scorer evaluates with (see :mod:`ntkfast.core.batchnorm`)
BNMode = Literal["eval", "train", "calibrate"]
#: the reduced precisions :func:`ntkfast.train` can run its forward in (autocast)
Amp = Literal["bf16"]
#: the shapes of :func:`ntkfast.ntk.empirical_ntk`
NTKMode = Literal["full", "trace", "diagonal", "diagonal_trace"]
#: how :func:`ntkfast.ntk.ntk_trace` computes the trace
TraceMethod = Literal["exact", "hutchinson", "finite_difference"]
#: how :func:`ntkfast.ntk.ntk_spectrum` finds the eigenvalues
SpectrumMethod = Literal["auto", "dense", "lanczos"]
#: the shapes of :func:`ntkfast.ops.masked_gram`
GramMode = Literal["full", "trace", "diagonal", "diagonal_trace"]
#: the first mask of :func:`ntkfast.transfer`
InitMask = Literal["magnitude", "logit_snip"]
#: which NTK :func:`ntkfast.transfer` matches
TransferKernel = Literal["sparse", "authors_code"]
#: the initialisation schemes of the model zoo
ZooInit = Literal["synflow", "ntksap"]
#: which test accuracy the study report ranks by
Metric = Literal["final", "best"]


def choices(option) -> Tuple[str, ...]:
    """The values of a Literal type, in order: what the runtime check accepts."""
    values = get_args(option)
    if not values:
        raise TypeError(f"option: expected a typing.Literal type, got {option!r}")
    return values
