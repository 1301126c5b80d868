"""What of ntkfast's compiled extension is here, and when an op runs its kernel.

The extension ``ntkfast._C`` registers ``torch.ops.ntkfast.*`` as it loads. Every op family
(``topk_mask``, ``perturbed_masked``, ``masked_gram``, ``conv_weight_grad_per_sample``, ``path``)
asks its :class:`Family` whether to run the kernel on a device; when it may not (no extension, a
device without kernels, an extension built before the family existed) the op runs its
pure-PyTorch reference, after one warning saying why.

Tests play an absent or older build through the documented switches: ``STATE.module = None``
(with ``STATE.error`` and ``STATE.warned``), or ``family.available = False`` (with
``family.warned``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

__all__ = ["STATE", "Family", "extension_loaded", "build_info", "cuda_kernels", "use_kernel"]


class _State:
    def __init__(self):
        self.module = None
        self.error: Optional[str] = None
        self.warned = False  # the "extension not loaded" warning was given
        self.device_warned: set = set()
        try:  # loading registers torch.ops.ntkfast.*
            from .. import _C as module  # type: ignore[attr-defined]

            self.module = module
        except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
            self.error = f"{type(exc).__name__}: {exc}"
        self._cuda: Optional[bool] = None

    @property
    def cuda(self) -> bool:
        if self._cuda is None:
            self._cuda = self.module is not None and bool(self.module.build_info().get("cuda"))
        return self._cuda and self.module is not None


STATE = _State()


def extension_loaded() -> bool:
    """Whether ``ntkfast._C`` loaded (else every op runs its reference)."""
    return STATE.module is not None


def cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return STATE.cuda


def build_info() -> dict:
    """Which backend is active (``compiled-cuda``, ``compiled-cpu`` or ``reference``) and how the
    extension was built: version, the torch it was built against, CUDA architectures, OpenMP,
    compiler; ``error`` says why it did not load."""
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if STATE.module is None:
        info.update(backend="reference", extension=False, cuda=False, error=STATE.error)
        return info
    info.update(dict(STATE.module.build_info()))
    info["extension"] = True
    info["backend"] = "compiled-cuda" if info.get("cuda") else "compiled-cpu"
    info["threads"] = torch.get_num_threads()
    return info


def _warn(message: str, stacklevel: int) -> None:
    # stacklevel as warnings.warn counts it from here: 1 is this function
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def use_kernel(device: torch.device, depth: int = 1) -> bool:
    """Whether compiled kernels run on ``device``; the first time they cannot, one warning,
    pointing at the user's call ``depth`` frames of ntkfast above this one."""
    if STATE.module is None:
        if not STATE.warned:
            STATE.warned = True
            _warn(f"ntkfast: the compiled extension ntkfast._C could not be loaded ({STATE.error}); every op falls "
                  "back to its pure-PyTorch reference, which is slower. Rebuild with "
                  "`pip install --no-build-isolation -e .` against the installed torch.", 3 + depth)
        return False
    if device.type == "cpu":
        return True
    why = None
    if device.type == "cuda":
        if STATE.cuda:
            return True
        why = "the extension was built without CUDA kernels (build with FORCE_CUDA=1)"
    if device.type not in STATE.device_warned:
        STATE.device_warned.add(device.type)
        _warn(f"ntkfast: {device.type} tensors use the pure-PyTorch reference ops: "
              f"{why or 'ntkfast has no kernels for this device'}", 3 + depth)
    return False


def _has_ops(names) -> bool:
    try:
        return all(hasattr(torch.ops.ntkfast, n) for n in names)
    except RuntimeError:
        return False


class Family:
    """The ops of one kernel family (their schemas are in csrc/ntkfast.cpp). ``defined``: the
    loaded extension has them, so their fake and autograd functions can be registered;
    ``available``: their kernels run (False plays an extension built before them)."""

    def __init__(self, what: str, *ops: str):
        self.what, self.ops = what, ops
        self.defined = STATE.module is not None and _has_ops(ops)
        self.available = self.defined
        self.warned = False

    def use(self, device: torch.device) -> bool:
        """Whether this family's kernel runs on ``device`` (warning once where it cannot)."""
        if not use_kernel(device, depth=2):
            return False
        if not self.available and not self.warned:
            self.warned = True
            _warn(f"ntkfast: the compiled extension predates {self.what}; it runs on the pure-PyTorch reference. "
                  "Rebuild with `pip install --no-build-isolation -e .`.", 4)
        return self.available
