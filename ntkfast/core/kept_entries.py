"""The trainer's named optimisers update only the weights the masks keep.

A pruned weight's gradient is masked to zero and its optimiser state starts at zero, so SGD's and
Adam's elementwise update leaves it exactly where it is: at density 0.1, nine tenths of the
optimiser's passes over a weight compute zeros. :class:`KeptEntries` gives the optimiser, in place
of each sparse weight, a shadow tensor holding only its kept entries (in the weight's logical
order). Before every step the weight's kept values and gradient are gathered into the shadow;
after it the shadow is scattered back. The optimiser is PyTorch's own, with its own defaults, and
its kernels are elementwise: each kept entry goes through the same operations as in a step over
the whole tensor, and the result is the same, bit for bit (``tests/test_train_fast.py`` holds it
to ``torch.optim`` over the whole tensors).

Only the weights worth it are compacted: a gather and a scatter cost about three passes over the
tensor, against seven to seventeen for the update itself; above half density the whole tensor is
cheaper.

Nothing but the scatter writes a compacted weight in a plain training step, which its version
counter (``Tensor._version``, bumped by every in-place write) shows: while it is unchanged, the
shadow already holds the kept values and the pruned entries are still the zeros the trainer wrote,
so neither the values are gathered again nor the weight is re-masked. A forward that writes its
own weights bumps the counter, and then both happen as in a step over the whole tensor. The
gradients of compacted weights are read at the kept entries only, so they are masked once, when
training ends (:meth:`KeptEntries.mask_grads`), not at every step.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["KeptEntries", "MAX_DENSITY"]

MAX_DENSITY = 0.5


class _Entry:
    __slots__ = ("param", "mask", "index", "shadow", "written", "_offsets", "_layout")

    def __init__(self, param: torch.Tensor, mask: torch.Tensor):
        self.param = param
        self.mask = mask
        self.written: Optional[Tuple[int, int]] = None  # (version, data_ptr) after the last scatter
        # logical (row-major) positions: they do not change when the layout does
        self.index = mask.reshape(-1).nonzero().squeeze(1).to(param.device)
        self.shadow = param.detach().reshape(-1).index_select(0, self.index).requires_grad_(True)
        self._offsets: Optional[torch.Tensor] = None
        self._layout: Optional[Tuple] = None

    def offsets(self, t: torch.Tensor) -> torch.Tensor:
        """Where the kept entries lie in the memory of ``t`` (dense, of the parameter's shape), in
        the shadow's order. Recomputed when the layout or the device changes (channels-last
        training converts the weights after the optimiser is made)."""
        layout = (t.stride(), t.device)
        if self._layout != layout:
            self.index = self.index.to(t.device)
            if t.is_contiguous():
                self._offsets = self.index
            else:  # unravel the logical positions and weigh each coordinate by its stride
                self._offsets = torch.zeros_like(self.index)
                rest = self.index
                for size, stride in zip(reversed(t.shape), reversed(t.stride())):
                    self._offsets += (rest % size) * stride
                    rest = rest // size
            self._layout = layout
        return self._offsets


def _dense(t: torch.Tensor) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.is_contiguous() or (t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()]))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The memory of a dense tensor as one dimension (a view)."""
    return t.as_strided((t.numel(),), (1,))


class KeptEntries:
    """Shadows of the sparse masked weights for a named optimiser; see the module's notes.

    ``params_for(trainable)``: the list to build the optimiser on (each compacted weight replaced by
    its shadow). In a step: ``zero_grad()`` beside the optimiser's (the model's gradients of the
    compacted weights are not the optimiser's to clear), then after the backward pass ``gather()``,
    the optimiser's step, ``scatter()``.
    """

    def __init__(self, masks: Mapping[torch.Tensor, torch.Tensor]):
        self.entries: List[_Entry] = []
        for p, m in masks.items():
            if not p.requires_grad or p.is_sparse or p.is_complex() or not _dense(p) or not m.numel():
                continue
            if int(m.sum()) > MAX_DENSITY * m.numel():
                continue
            self.entries.append(_Entry(p, m.to(p.device, torch.bool)))
        self._by_param: Dict[int, _Entry] = {id(e.param): e for e in self.entries}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def params_for(self, trainable: List[torch.Tensor]) -> List[torch.Tensor]:
        return [self._by_param[id(p)].shadow if id(p) in self._by_param else p for p in trainable]

    def to(self, device: torch.device) -> None:
        """The shadows on ``device`` (the model moved after the optimiser was made; its state is
        made at the first step, so only the values move)."""
        with torch.no_grad():
            for e in self.entries:
                if e.shadow.device != device:
                    e.shadow.data = e.shadow.data.to(device)
                    e.mask = e.mask.to(device)

    def compacts(self, param: torch.Tensor) -> bool:
        return id(param) in self._by_param

    def zero_grad(self) -> None:
        for e in self.entries:
            e.param.grad = None

    @torch.no_grad()
    def gather(self) -> None:
        for e in self.entries:
            p, g = e.param, e.param.grad
            if g is None:  # the forward did not reach it: the optimiser skips it, as it would the weight
                e.shadow.grad = None
                continue
            if g.stride() != p.stride() or g.is_sparse:  # autograd matches a dense weight's strides; others are copied
                g = torch.empty_like(p).copy_(g.to_dense() if g.is_sparse else g)
            where = e.offsets(p)
            if e.written != (p._version, p.data_ptr()):
                torch.index_select(_flat(p), 0, where, out=e.shadow.data)
            if e.shadow.grad is None or e.shadow.grad.shape != e.shadow.shape:
                e.shadow.grad = torch.empty_like(e.shadow)
            torch.index_select(_flat(g), 0, where, out=e.shadow.grad)

    @torch.no_grad()
    def scatter(self) -> None:
        for e in self.entries:
            p = e.param
            clean = e.written == (p._version, p.data_ptr())
            if e.shadow.grad is not None:
                _flat(p).index_copy_(0, e.offsets(p), e.shadow.detach())
            if not clean:  # written by someone else since our last scatter: its pruned entries too, perhaps
                p.mul_(e.mask.to(p.dtype))
            e.written = (p._version, p.data_ptr())

    @torch.no_grad()
    def mask_grads(self) -> None:
        """The compacted weights' gradients times their masks, as every other masked gradient is."""
        for e in self.entries:
            g = e.param.grad
            if g is not None:
                e.param.grad = g * e.mask.to(g.dtype) if g.is_sparse else g.mul_(e.mask.to(g.dtype))
