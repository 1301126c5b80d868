"""Shared pieces of the model zoo: the base class, shape arithmetic and initialisers."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.checks import check_choice, check_int
from ..core.options import ZooInit, choices

# Standard deviation of a standard normal truncated to (-2, 2): JAX/Keras divide by it so that
# their "truncated normal" variance-scaling initialisers reach the intended variance.
_TRUNC2_STD = 0.87962566103423978


class ZooModel(nn.Module):
    """Base class of every model in :mod:`ntkfast.models`.

    Attributes:
        input_shape: the shape of one input, without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: the number of outputs (logits).
    """

    input_shape: Tuple[int, ...]
    num_classes: int

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        self.input_shape = check_input_shape(input_shape)
        self.num_classes = check_num_classes(num_classes)

    @torch.no_grad()
    def reinitialize(self) -> "ZooModel":
        """Re-draw every parameter in place with this model's initialisation (global torch RNG).

        BatchNorm running statistics are reset too. Shapes, devices and dtypes are kept; where
        torch.nn.utils.prune has re-parametrised a weight, ``weight_orig`` is re-drawn (its mask is
        left alone). Returns the model.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, num_classes={self.num_classes}"


def check_input_shape(input_shape) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive ints (C, H, W), got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape) or any(int(s) != s for s in input_shape):
        raise ValueError(f"input_shape must be a sequence of positive ints (C, H, W), got {input_shape!r}")
    return shape


def check_image_shape(input_shape, model: str) -> Tuple[int, int, int]:
    shape = check_input_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) for {model}, got {tuple(input_shape)!r}")
    return shape  # type: ignore[return-value]


def check_num_classes(num_classes) -> int:
    return check_int(num_classes, "num_classes", lo=1)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a convolution or pooling (floor mode, no dilation)."""
    return (size + 2 * padding - kernel) // stride + 1


def too_small(model: str, input_shape, where: str) -> ValueError:
    return ValueError(f"input_shape {tuple(input_shape)} is too small for {model}: "
                      f"the feature map vanishes {where}")


# -- initialisers ------------------------------------------------------------------------------

def param(module: nn.Module, attr: str) -> Optional[torch.Tensor]:
    """``module.<attr>`` as a parameter, or ``<attr>_orig`` under torch.nn.utils.prune hooks."""
    p = module._parameters.get(attr)
    if p is None:
        p = module._parameters.get(attr + "_orig")
    return p


def fans(w: torch.Tensor) -> Tuple[int, int]:
    """(fan_in, fan_out) of a Linear [out, in] or Conv [out, in, *kernel] weight."""
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def glorot_normal_truncated_(w: torch.Tensor) -> torch.Tensor:
    """JAX's ``glorot_normal``: a normal truncated to +-2 sigma, scaled so that the final standard
    deviation is sqrt(2 / (fan_in + fan_out)) (variance_scaling(1, "fan_avg", "truncated_normal"))."""
    fan_in, fan_out = fans(w)
    sigma = math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC2_STD
    return truncated_normal_(w, sigma)


@torch.no_grad()
def truncated_normal_(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """N(0, sigma^2) truncated to (-2 sigma, 2 sigma), in place, by the inverse CDF: one uniform draw
    per entry. (torch.nn.init.trunc_normal_ redraws the whole tensor until no entry is out of
    range, several full draws per call: NTK-SAP re-initialises the model for every batch.)"""
    edge = math.erf(2.0 / math.sqrt(2.0))  # 2 Phi(2) - 1
    if w.dtype in (torch.float16, torch.bfloat16):
        t = torch.empty_like(w, dtype=torch.float32).uniform_(-edge, edge)
        return w.copy_(t.erfinv_().mul_(sigma * math.sqrt(2.0)).clamp_(-2.0 * sigma, 2.0 * sigma))
    w.uniform_(-edge, edge).erfinv_().mul_(sigma * math.sqrt(2.0))
    return w.clamp_(-2.0 * sigma, 2.0 * sigma)


def torch_default_(module: nn.Module) -> None:
    """What ``reset_parameters`` of nn.Linear / nn.ConvNd draws (kaiming_uniform(a=sqrt 5) weight,
    uniform(+-1/sqrt(fan_in)) bias), applied to the (possibly pruning-re-parametrised) tensors."""
    w = param(module, "weight")
    b = param(module, "bias")
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if b is not None:
        fan_in, _ = fans(w)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(b, -bound, bound)


def reset_batchnorm_(module: nn.Module) -> None:
    """BatchNorm: weight 1, bias 0, running statistics reset."""
    w = param(module, "weight")
    b = param(module, "bias")
    if w is not None:
        nn.init.ones_(w)
    if b is not None:
        nn.init.zeros_(b)
    if getattr(module, "track_running_stats", False):
        module.reset_running_stats()


_INITS = choices(ZooInit)


def check_init(init: ZooInit) -> str:
    check_choice(init, "init", _INITS)
    return init


@torch.no_grad()
def kaiming_reinit_(model: nn.Module, init: ZooInit) -> None:
    """The Synaptic-Flow / NTK-SAP CIFAR initialisation: Kaiming-normal (fan-in) weights of every
    Conv2d and Linear, BatchNorm weight 1 and bias 0; conv/linear biases zero with
    ``init="synflow"``, PyTorch's default uniform with ``init="ntksap"`` (NTK-SAP leaves them)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = param(m, "weight")
            b = param(m, "bias")
            nn.init.kaiming_normal_(w)
            if b is not None:
                if init == "synflow":
                    nn.init.zeros_(b)
                else:
                    bound = 1.0 / math.sqrt(fans(w)[0])
                    nn.init.uniform_(b, -bound, bound)
        elif isinstance(m, nn.BatchNorm2d):
            reset_batchnorm_(m)
