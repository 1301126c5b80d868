"""``conv_weight_grad_per_sample``: per-sample convolution weight gradients for K cotangents
per sample, by implicit im2col (csrc/cpu/conv_weight_grad_per_sample_cpu.cpp,
csrc/cuda/conv_weight_grad_per_sample.cu); its fake and autograd functions, and the reference."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..core.checks import check_int
from .loader import Family

# For sample n and cotangent k, the gradient of <grad_output[n, k], conv(input[n], weight)> with
# respect to the weight: the rows of the empirical NTK's Jacobian that belong to a conv layer,
# without forming per-sample Jacobians of the whole network.

FAMILY = Family("conv_weight_grad_per_sample", "conv_weight_grad_per_sample")


def _conv_weight(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K, O, Cg, *kernel] -> the weight [N * G * K * Og, Cg, *kernel] of the grouped convolution
    (groups = N * G) that applies every (sample, cotangent) gradient to its own sample: the output
    channels of convolution group (n, g) are that group's (k, o)."""
    N, K, O = grad.shape[:3]
    G = groups
    rest = grad.shape[3:]
    w = grad.reshape(N, K, G, O // G, *rest).transpose(1, 2)
    return w.reshape(N * G * K * (O // G), *rest)


def _conv_wgrad_grad_output_grad(grad, input, stride, padding, dilation, groups):
    """d<grad, out>/d grad_output: every sample convolved with its own K weights, i.e. conv2d of
    input[n] with grad[n, k], as one grouped convolution over the batch."""
    N, C, H, W = input.shape
    K, O = grad.shape[1:3]
    G = groups
    if N == 0:
        return grad.new_zeros((0, K, O) + tuple(_conv_out_size((H, W), grad.shape[4:], stride, padding, dilation)))
    y = F.conv2d(input.reshape(1, N * C, H, W), _conv_weight(grad, G), stride=stride, padding=padding,
                 dilation=dilation, groups=N * G)
    Ho, Wo = y.shape[-2:]
    return y.reshape(N, G, K, O // G, Ho, Wo).transpose(1, 2).reshape(N, K, O, Ho, Wo)


def _conv_wgrad_input_grad(grad, grad_output, input_shape, stride, padding, dilation, groups):
    """d<grad, out>/d input: sum over k of the transposed convolution of grad_output[n, k] with
    grad[n, k], as one grouped transposed convolution whose input channels are (n, g, k, o)."""
    N, C, H, W = input_shape
    K, O, Ho, Wo = grad_output.shape[1:]
    G = groups
    if N == 0:
        return grad.new_zeros(tuple(input_shape))
    kh, kw = grad.shape[4:]
    out_pad = tuple(size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                    for size, o, s, p, d, k in zip((H, W), (Ho, Wo), stride, padding, dilation, (kh, kw)))
    go = grad_output.reshape(N, K, G, O // G, Ho, Wo).transpose(1, 2).reshape(1, N * G * K * (O // G), Ho, Wo)
    x = F.conv_transpose2d(go, _conv_weight(grad, G), stride=stride, padding=padding, output_padding=out_pad,
                           groups=N * G, dilation=dilation)
    return x.reshape(N, C, H, W)


if FAMILY.defined:

    @torch.library.register_fake("ntkfast::conv_weight_grad_per_sample")
    def _conv_wgrad_fake(input, grad_output, kernel_size, stride, padding, dilation, groups):
        N, C = input.shape[:2]
        K, O = grad_output.shape[1:3]
        return input.new_empty((N, K, O, C // groups, kernel_size[0], kernel_size[1]))

    def _conv_wgrad_setup_context(ctx, inputs, output):
        input, grad_output, kernel_size, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, grad_output)
        ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), groups)

    def _conv_wgrad_backward(ctx, grad):
        input, grad_output = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_input = grad_grad_output = None
        if ctx.needs_input_grad[0]:
            grad_input = _conv_wgrad_input_grad(grad, grad_output, input.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_grad_output = _conv_wgrad_grad_output_grad(grad, input, stride, padding, dilation, groups)
        return grad_input, grad_grad_output, None, None, None, None, None

    torch.library.register_autograd("ntkfast::conv_weight_grad_per_sample", _conv_wgrad_backward,
                                    setup_context=_conv_wgrad_setup_context)


def _conv_tuple(value, d: int, name: str, lowest: int) -> tuple:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,) * d
    try:
        value = tuple(check_int(v, name, type_error=True) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of {d} ints, got {value!r}") from None
    if len(value) != d:
        raise ValueError(f"{name} must be an int or have {d} entries for a {d}-d convolution, got {value}")
    if any(v < lowest for v in value):
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return value


def _conv_out_size(size, kernel, stride, padding, dilation) -> tuple:
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(size, kernel, stride, padding, dilation))


def _check_conv_wgrad_args(input, grad_output, kernel_size, stride, padding, dilation, groups):
    """Checked and normalised (kernel_size, stride, padding, dilation, groups) as d-tuples."""
    for name, t in (("input", input), ("grad_output", grad_output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if input.dim() not in (3, 4, 5):
        raise ValueError(f"input must be [N, C, L], [N, C, H, W] or [N, C, D, H, W], got shape {tuple(input.shape)}")
    d = input.dim() - 2
    if grad_output.dim() != d + 3:
        raise ValueError(f"grad_output must be [N, K, O, *output size] ({d + 3} dimensions for a {d}-d input), "
                         f"got shape {tuple(grad_output.shape)}")
    if input.dtype not in (torch.float32, torch.float64):
        # named by its dtype, which a caller several layers up (an NTK of a float16 model) can act on
        raise ValueError(f"conv_weight_grad_per_sample computes in float32 or float64 only, got {input.dtype} "
                         f"inputs (the dtype of input, which grad_output must share); convert them, e.g. with "
                         f".float()")
    if grad_output.dtype != input.dtype:
        raise ValueError(f"grad_output has dtype {grad_output.dtype} but input has {input.dtype}")
    if grad_output.device != input.device:
        raise ValueError(f"grad_output is on {grad_output.device} but input is on {input.device}")
    kernel_size = _conv_tuple(kernel_size, d, "kernel_size", 1)
    stride = _conv_tuple(stride, d, "stride", 1)
    padding = _conv_tuple(padding, d, "padding", 0)
    dilation = _conv_tuple(dilation, d, "dilation", 1)
    groups = check_int(groups, "groups", type_error=True)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    N, C = input.shape[:2]
    K, O = grad_output.shape[1:3]
    if grad_output.shape[0] != N:
        raise ValueError(f"grad_output has {grad_output.shape[0]} samples but input has {N}")
    if K < 1:
        raise ValueError(f"grad_output must have at least one cotangent per sample (K = size(1)), "
                         f"got shape {tuple(grad_output.shape)}")
    if C < groups or C % groups:
        raise ValueError(f"input's channel count {C} must be a positive multiple of groups = {groups}")
    if O < groups or O % groups:
        raise ValueError(f"grad_output's channel count O = {O} must be a positive multiple of groups = {groups}")
    span = tuple(i + 2 * p - dl * (k - 1) - 1 for i, k, p, dl in zip(input.shape[2:], kernel_size, padding, dilation))
    if any(s < 0 for s in span):
        raise ValueError(f"the input {tuple(input.shape[2:])}, padded by {padding}, is smaller than the dilated "
                         f"kernel_size {kernel_size} (dilation {dilation})")
    want = _conv_out_size(input.shape[2:], kernel_size, stride, padding, dilation)
    if tuple(grad_output.shape[3:]) != want:
        raise ValueError(f"grad_output's spatial size {tuple(grad_output.shape[3:])} must be the convolution's "
                         f"output size {want}")
    return kernel_size, stride, padding, dilation, groups


def _as_2d(input, grad_output, kernel_size, stride, padding, dilation):
    """A 1-d convolution as a 2-d one of unit height."""
    return (input.unsqueeze(2), grad_output.unsqueeze(3), (1,) + kernel_size, (1,) + stride, (0,) + padding,
            (1,) + dilation)


def conv_weight_grad_per_sample(input: torch.Tensor, grad_output: torch.Tensor, kernel_size, stride=1, padding=0,
                                dilation=1, groups: int = 1) -> torch.Tensor:
    """Per-sample weight gradients of a convolution, for K cotangents per sample, by implicit
    im2col (the unfolded input is never built whole).

    ``input``: [N, C, H, W]; ``grad_output``: [N, K, O, Ho, Wo] (K >= 1 cotangents of the conv's
    output per sample); returns [N, K, O, C / groups, kh, kw] with ::

        out[n, k, o, c, r, s] = sum_{y, x} grad_output[n, k, o, y, x]
                                * input[n, g * C / groups + c, y * sh + r * dh - ph, x * sw + s * dw - pw]

    (g = o // (O / groups), the input zero outside the image): the gradient of
    ``<grad_output[n, k], F.conv2d(input[n:n+1], weight, None, stride, padding, dilation, groups)>``
    with respect to ``weight``. ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are ints
    or tuples, as for ``nn.Conv2d`` (padding as numbers only); ``(Ho, Wo)`` must be the convolution's
    output size. float32 or float64. Differentiable with respect to ``input`` and ``grad_output``.

    1-d convolutions too: ``input`` [N, C, L] and ``grad_output`` [N, K, O, Lo] give
    [N, K, O, C / groups, k] (run as 2-d ones of unit height). 3-d inputs ([N, C, D, H, W],
    [N, K, O, Do, Ho, Wo]) have no kernel: they run :func:`conv_weight_grad_per_sample_reference`.
    So do devices without ntkfast kernels, and everything when the extension is not built.
    """
    kernel_size, stride, padding, dilation, groups = _check_conv_wgrad_args(
        input, grad_output, kernel_size, stride, padding, dilation, groups)
    d = len(kernel_size)
    if d == 3 or not FAMILY.use(input.device):
        return _conv_wgrad_reference(input, grad_output, kernel_size, stride, padding, dilation, groups)
    if d == 1:
        x, go, k, s, p, dl = _as_2d(input, grad_output, kernel_size, stride, padding, dilation)
        out = torch.ops.ntkfast.conv_weight_grad_per_sample(x, go, list(k), list(s), list(p), list(dl), groups)
        return out.squeeze(4)
    return torch.ops.ntkfast.conv_weight_grad_per_sample(input, grad_output, list(kernel_size), list(stride),
                                                         list(padding), list(dilation), groups)


def conv_weight_grad_per_sample_reference(input: torch.Tensor, grad_output: torch.Tensor, kernel_size, stride=1,
                                          padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """:func:`conv_weight_grad_per_sample` in plain PyTorch ops, differentiable by autograd.

    1-d and 2-d: ``F.unfold`` (the whole im2col matrix) and one batched matmul per group; 3-d:
    windows of the padded input as strided views (``Tensor.unfold``) contracted by ``einsum``."""
    args = _check_conv_wgrad_args(input, grad_output, kernel_size, stride, padding, dilation, groups)
    return _conv_wgrad_reference(input, grad_output, *args)


def _conv_wgrad_reference(input, grad_output, kernel_size, stride, padding, dilation, groups):
    d = len(kernel_size)
    if d == 1:
        out = _conv_wgrad_reference(*_as_2d(input, grad_output, kernel_size, stride, padding, dilation), groups)
        return out.squeeze(4)
    if d == 3:
        return _conv_wgrad_reference_3d(input, grad_output, kernel_size, stride, padding, dilation, groups)
    N, C = input.shape[:2]
    K, O, Ho, Wo = grad_output.shape[1:]
    G = groups
    Cg, Og = C // G, O // G
    cols = F.unfold(input, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [N, C * kh * kw, L]
    cols = cols.reshape(N, G, Cg * kernel_size[0] * kernel_size[1], Ho * Wo)
    rows = grad_output.reshape(N, K, G, Og, Ho * Wo).transpose(1, 2).reshape(N, G, K * Og, Ho * Wo)
    out = torch.matmul(rows, cols.transpose(-1, -2))  # [N, G, K * Og, Cg * kh * kw]
    out = out.reshape(N, G, K, Og, Cg, *kernel_size).transpose(1, 2)
    return out.reshape(N, K, O, Cg, *kernel_size)


def _conv_wgrad_reference_3d(input, grad_output, kernel_size, stride, padding, dilation, groups):
    N, C = input.shape[:2]
    K, O = grad_output.shape[1:3]
    G = groups
    Cg, Og = C // G, O // G
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    win = F.pad(input, pad)
    for i, (k, s, dl) in enumerate(zip(kernel_size, stride, dilation)):
        win = win.unfold(2 + i, dl * (k - 1) + 1, s)  # appends the window as a last dimension
    win = win[..., :: dilation[0], :: dilation[1], :: dilation[2]]  # [N, C, Do, Ho, Wo, kd, kh, kw]
    win = win.reshape(N, G, Cg, *win.shape[2:])
    go = grad_output.reshape(N, K, G, Og, *grad_output.shape[3:])
    out = torch.einsum("nkgoxyz,ngcxyzabe->nkgocabe", go, win)
    return out.reshape(N, K, O, Cg, *kernel_size)
