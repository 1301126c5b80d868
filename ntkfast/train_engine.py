"""How the trainer runs its steps on a device: precision, TF32, compilation, resident data.

The numerics of training are fixed by the optimiser and the data; these settings only choose how
the arithmetic is done. Every one is off (or automatic) by default and, when on, is named in the
run's record (``TrainResult.engine``), so that two accuracies are never compared across settings
without a word:

- ``amp="bf16"``: the forward and the loss under ``torch.autocast`` in bfloat16 (weights,
  gradients and optimiser state stay in their own dtype). Off: full precision.
- ``tf32``: lets CUDA matmuls and convolutions use TF32 tensor cores. PyTorch allows TF32 in
  cuDNN convolutions by default; the trainer turns it off unless asked, so float32 means float32.
  Restored afterwards. (Process-wide flags: another thread's CUDA work sees them meanwhile.)
- ``compile``: the model's forward through ``torch.compile`` (True: the default backend; a string:
  that backend). The compiled module shares the model's tensors.
- ``resident``: an in-memory image dataset copied to the device once, so that batches are cut,
  augmented and normalised there with no host copy per step. None: on CUDA when it is an ntkfast
  image dataset.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from .core.checks import check_choice
from .core.options import choices, Amp

__all__ = ["Engine", "check_engine", "device_flags", "autocast", "compiled", "resident_source"]

AMPS = choices(Amp)


@dataclass(frozen=True)
class Engine:
    amp: Optional[str] = None
    tf32: bool = False
    compile: Union[bool, str] = False
    resident: Optional[bool] = None

    def record(self, device: torch.device, resident: bool, channels_last: bool) -> dict:
        """What the run used, for its record: the settings that are on, and the layout."""
        out = {}
        if self.amp:
            out["amp"] = self.amp
        if self.tf32 and device.type == "cuda":
            out["tf32"] = True
        if self.compile:
            out["compile"] = self.compile if isinstance(self.compile, str) else "inductor"
        if resident:
            out["resident"] = True
        if channels_last:
            out["channels_last"] = True
        return out


def check_engine(amp, tf32, compile, resident) -> Engine:
    """The settings, each refused by name when it is not one of its values."""
    if amp is not None:
        check_choice(amp, "amp", AMPS)
    for name, value in (("tf32", tf32),):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    if resident is not None and not isinstance(resident, bool):
        raise TypeError(f"resident: expected True, False or None, got {type(resident).__name__}")
    if not isinstance(compile, (bool, str)) or (isinstance(compile, str) and not compile):
        raise TypeError(f"compile: expected True, False or the name of a torch.compile backend, got {compile!r}")
    if isinstance(compile, str):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if compile not in known:
            raise ValueError(f"compile: torch.compile knows no backend {compile!r}; known: {', '.join(sorted(known))}")
    return Engine(amp=amp, tf32=tf32, compile=compile, resident=resident)


@contextlib.contextmanager
def device_flags(engine: Engine, device: torch.device) -> Iterator[None]:
    """TF32 on CUDA as ``engine`` says, for the duration; the flags as they were afterwards."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = engine.tf32
    torch.backends.cudnn.allow_tf32 = engine.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def autocast(engine: Engine, device: torch.device):
    """The forward's precision context: bfloat16 autocast when asked, else nothing."""
    if engine.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled(model: torch.nn.Module, engine: Engine):
    """The callable the steps run: the model, or its ``torch.compile``'d wrapper."""
    if not engine.compile:
        return model
    backend = engine.compile if isinstance(engine.compile, str) else "inductor"
    return torch.compile(model, backend=backend)


def resident_source(source, device: torch.device, engine: Engine):
    """(the source to read, whether it now lies on ``device``). An in-memory ntkfast image dataset
    moves there once where ``resident`` is True, or None on CUDA; anything else is read as it is
    (True with another kind of data is refused by name)."""
    from .data.datasets import ImageDataset
    from .core.sources import BatchSource

    data = source.data
    if engine.resident is False or device.type == "cpu":
        return source, False
    if not isinstance(data, ImageDataset):
        if engine.resident:
            raise ValueError(f"resident: {source.name} is not an in-memory ntkfast image dataset; only those can be "
                             "moved to the device whole")
        return source, False
    return BatchSource(data.to(device), source.name, source.kind), True
