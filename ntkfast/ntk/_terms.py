"""Per-parameter NTK terms and their pairwise contractions.

A term holds what one parameter contributes to the Jacobian rows of one captured sample set, in
the cheapest form its layer allows; ``pair(t1, t2, mode)`` contracts two such terms into that
parameter's block of the kernel. Modes: "full" [n1, n2, kk, kk], "trace" [n1, n2] (sum over
k = l), "diagonal" [n, kk, kk] (pairs i = j), "diagonal_trace" [n].

Forms:
- DenseTerm: the materialised (masked) per-sample gradient g [n, kk, P]; its Gram is a GEMM.
- LinearTerm: a dense layer applied once per sample, a [n, C], b [n, kk, O]: the block is
  (a1 a2^T) * (b1 b2^T) without a mask, the fused masked Gram contraction with one.
- PositionsTerm: a layer applied at S positions (convolutions, Linear on sequences), a [n, S, D],
  b [n, kk, S, O]: either the S x S position Grams are contracted, or the per-sample gradient
  sum_s b_s a_s^T is materialised; chosen per pair by counting multiply-adds.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _kernels

from ..core.options import NTKMode, choices

MODES = choices(NTKMode)
# Elements of the largest temporary a chunked contraction may build (8 bytes each in float64).
_CHUNK_ELEMENTS = 1 << 25


# Below this fraction of kept entries, a masked per-sample gradient is contracted on its kept
# entries only (a gather), not multiplied by the mask and contracted whole.
_GATHER_BELOW = 0.5


class DenseTerm:
    path = "per-sample gradient"

    def __init__(self, g: Optional[torch.Tensor] = None, why: str = "", *, unmasked: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None,
                 kept_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        # Either g [n, kk, P] (already masked), or the unmasked gradient and its flat 0/1 mask [P]:
        # then the masked g is formed only if asked for (per_sample_jacobian), and Grams use
        # the kept entries alone. With a sparse mask, kept_fn(keep) may compute just the kept
        # entries [n, kk, len(keep)] without the unmasked gradient ever being formed.
        self._g, self._unmasked, self._mask = g, unmasked, mask
        self.why = why
        self._keep = self._compact = None
        if mask is not None and float(mask.count_nonzero()) < _GATHER_BELOW * mask.numel():
            self._keep = mask.nonzero().squeeze(1)
        self._kept_fn = kept_fn if self._keep is not None else None
        if unmasked is None and g is None and self._kept_fn is None:
            raise ValueError("DenseTerm: needs g, the unmasked gradient, or kept entries for a sparse mask")

    @property
    def g(self) -> torch.Tensor:
        if self._g is None:
            if self._unmasked is not None:
                self._g = self._unmasked * self._mask
            else:  # scattered back from the kept entries: zero elsewhere, as the mask makes it
                c = self.compact()
                self._g = c.new_zeros(c.shape[:2] + self._mask.shape).index_copy(2, self._keep, c)
        return self._g

    def compact(self) -> torch.Tensor:
        """The entries of g that can be nonzero: all of them, or the kept ones of a sparse mask."""
        if self._keep is None:
            return self.g
        if self._compact is None:  # a chunked assembly pairs one capture with several
            self._compact = (self._kept_fn(self._keep) if self._unmasked is None
                             else self._unmasked.index_select(2, self._keep))
        return self._compact

    def dense(self) -> "DenseTerm":
        return self


class LinearTerm:
    def __init__(self, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]):
        self.a, self.b, self.mask = a, b, mask  # [n, C], [n, kk, O], [O, C] or None
        self.path = "masked Gram contraction" if mask is not None else "Gram product (A A^T) * (B B^T)"
        self._dense = None

    def dense(self) -> DenseTerm:
        if self._dense is None:
            g = torch.einsum("nko,nc->nkoc", self.b, self.a)
            if self.mask is not None:
                g = g * self.mask
            self._dense = DenseTerm(g.reshape(g.shape[0], g.shape[1], -1))
        return self._dense


class PositionsTerm:
    def __init__(self, a_fn: Callable[[], torch.Tensor], b: torch.Tensor, mask: Optional[torch.Tensor],
                 S: int, D: int, dense_fn: Optional[Callable[[], torch.Tensor]] = None,
                 positions_ok: bool = True, why: str = ""):
        # a_fn builds a [n, S, D] (an unfold for convolutions) only if the position path is taken
        # or a sparse mask's kept entries are gathered from it; dense_fn builds g [n, kk, O, D...]
        # (a compiled kernel for convolutions).
        self._a_fn, self.b, self.mask = a_fn, b, mask  # b: [n, kk, S, O]
        self.S, self.D = S, D
        self.O = b.shape[-1]
        self._dense_fn = dense_fn
        self._a_is_exact = positions_ok  # a covers every weight entry (no groups, at most 2-d)
        self.positions_ok = positions_ok and mask is None
        self.why = why
        self._a = None
        self._dense = None
        self.path = None

    @property
    def n(self):
        return self.b.shape[0]

    @property
    def kk(self):
        return self.b.shape[1]

    def a(self) -> torch.Tensor:
        if self._a is None:
            self._a = self._a_fn()
        return self._a

    def dense(self) -> DenseTerm:
        if self._dense is None:
            if self._dense_fn is not None:
                g = self._dense_fn()
            else:
                n, kk, S, O = self.b.shape
                g = torch.bmm(self.b.transpose(2, 3).reshape(n, kk * O, S), self.a())
            g = g.reshape(self.n, self.kk, -1)
            self._dense = (DenseTerm(g) if self.mask is None
                           else DenseTerm(unmasked=g, mask=self.mask.reshape(-1).to(g.dtype)))
        return self._dense

    def _kept_entries(self, keep: torch.Tensor) -> torch.Tensor:
        """g[n, k, e] = sum_s b[n, k, s, o_e] a[n, s, d_e] for the kept entries e = (o_e, d_e)
        only: per output channel o, one small batched GEMM over the inputs d it keeps (padded
        to the largest count), so a mask keeping a fraction of the entries costs about that
        fraction of the full per-sample gradient."""
        n, kk, S, O = self.b.shape
        D = self.D
        o, d = keep // D, keep % D
        counts = torch.bincount(o, minlength=O)
        M = max(int(counts.max()), 1)
        slot = torch.arange(keep.numel(), device=keep.device) - (torch.cumsum(counts, 0) - counts)[o]
        cols = torch.zeros(O, M, dtype=torch.long, device=keep.device)  # padding reads input 0, then is dropped
        cols[o, slot] = d
        a_t = self.a().transpose(1, 2)  # [n, D, S]: for convolutions, the unfold itself
        a_sel = a_t.index_select(1, cols.reshape(-1)).view(n * O, M, S).transpose(1, 2)  # [n O, S, M]
        b_o = self.b.permute(0, 3, 1, 2).reshape(n * O, kk, S)
        g = torch.bmm(b_o, a_sel).view(n, O, kk, M).transpose(1, 2).reshape(n, kk, O * M)
        return g.index_select(2, o * M + slot)

    def sparse_dense(self) -> DenseTerm:
        """The per-sample gradient term, its kept entries gathered without the full gradient
        when the mask is sparse enough for that to pay."""
        if (self._dense is None and self.mask is not None and self._a_is_exact
                and float(self.mask.count_nonzero()) < _GATHER_BELOW * self.mask.numel()):
            self._dense = DenseTerm(mask=self.mask.reshape(-1).to(self.b.dtype), kept_fn=self._kept_entries)
        return self._dense if self._dense is not None else self.dense()


def _positions_cost(n1, n2, kk, S, D, O, mode) -> float:
    if mode == "full":
        return n1 * S * n2 * S * (D + kk * kk * O + kk * kk)
    if mode == "trace":
        return n1 * S * n2 * S * (D + kk * O + 1)
    if mode == "diagonal":
        return n1 * S * S * (D + kk * kk * O + kk * kk)
    return n1 * S * S * (D + kk * O)


def _dense_cost(n1, n2, kk, S, D, O, mode, materialised: int) -> float:
    P = O * D
    make = materialised * kk * S * P
    if mode == "full":
        return make + n1 * kk * n2 * kk * P
    if mode == "trace":
        return make + n1 * n2 * kk * P
    if mode == "diagonal":
        return make + n1 * kk * kk * P
    return make + n1 * kk * P


def choose(t1: PositionsTerm, t2: PositionsTerm, mode: str) -> str:
    if not (t1.positions_ok and t2.positions_ok):
        return "per-sample gradient"
    same = t1 is t2
    todo = (0 if t1._dense is not None else t1.n) + (0 if same or t2._dense is not None else t2.n)
    n2 = t1.n if mode.startswith("diagonal") else t2.n
    pos = _positions_cost(t1.n, n2, t1.kk, t1.S, t1.D, t1.O, mode)
    den = _dense_cost(t1.n, n2, t1.kk, t1.S, t1.D, t1.O, mode, todo)
    t1.why = (f"S={t1.S} positions, D={t1.D}, O={t1.O}: position Grams {pos:.3g} vs per-sample gradient "
              f"{den:.3g} multiply-adds")
    return "position Grams" if pos < den else "per-sample gradient"


def pair(t1, t2, mode: str) -> torch.Tensor:
    if isinstance(t1, LinearTerm) and isinstance(t2, LinearTerm):
        return _linear_pair(t1, t2, mode)
    if isinstance(t1, PositionsTerm) and isinstance(t2, PositionsTerm):
        path = choose(t1, t2, mode)
        t1.path = path
        if path == "position Grams":
            return _positions_pair(t1.a(), t1.b, t2.a(), t2.b, mode)
    return _dense_pair(as_dense(t1).compact(), as_dense(t2).compact(), mode)


def as_dense(t) -> DenseTerm:
    """A term's per-sample gradient form; sparse masks gather their kept entries directly."""
    return t.sparse_dense() if isinstance(t, PositionsTerm) else t.dense()


def _dense_pair(g1: torch.Tensor, g2: torch.Tensor, mode: str) -> torch.Tensor:
    n1, kk1, P = g1.shape
    n2, kk2, _ = g2.shape
    if mode == "full":
        return (g1.reshape(n1 * kk1, P) @ g2.reshape(n2 * kk2, P).T).view(n1, kk1, n2, kk2).permute(0, 2, 1, 3)
    if mode == "trace":
        return g1.reshape(n1, kk1 * P) @ g2.reshape(n2, kk2 * P).T
    if mode == "diagonal":
        return torch.bmm(g1, g2.transpose(1, 2))
    # per sample one dot product of the flattened gradients, without a g1 * g2 temporary; a
    # term with itself as a squared norm, which reads it once
    if g1 is g2:
        return torch.linalg.vector_norm(g1.reshape(n1, kk1 * P), dim=1).square()
    return torch.bmm(g1.reshape(n1, 1, kk1 * P), g2.reshape(n2, kk2 * P, 1)).view(n1)


def _linear_pair(t1: LinearTerm, t2: LinearTerm, mode: str) -> torch.Tensor:
    if t1.mask is not None:
        b1, b2 = t1.b, t2.b
        kk1, kk2 = b1.shape[1], b2.shape[1]
        if kk1 != kk2:  # output chunks of unequal size: the kernel wants one K, so pad with zeros
            kk = max(kk1, kk2)
            b1 = torch.nn.functional.pad(b1, (0, 0, 0, kk - kk1))
            b2 = torch.nn.functional.pad(b2, (0, 0, 0, kk - kk2))
            return _kernels.masked_gram(t1.a, b1, t2.a, b2, t1.mask, mode=mode)[..., :kk1, :kk2]
        return _kernels.masked_gram(t1.a, b1, t2.a, b2, t1.mask, mode=mode)
    a1, b1, a2, b2 = t1.a, t1.b, t2.a, t2.b
    n1, kk1, O = b1.shape
    n2, kk2, _ = b2.shape
    if mode == "full":
        ga = a1 @ a2.T
        gb = (b1.reshape(n1 * kk1, O) @ b2.reshape(n2 * kk2, O).T).view(n1, kk1, n2, kk2).permute(0, 2, 1, 3)
        return ga[:, :, None, None] * gb
    if mode == "trace":
        return (a1 @ a2.T) * (b1.reshape(n1, kk1 * O) @ b2.reshape(n2, kk2 * O).T)
    if mode == "diagonal":
        return (a1 * a2).sum(1)[:, None, None] * torch.bmm(b1, b2.transpose(1, 2))
    return (a1 * a2).sum(1) * (b1 * b2).sum((1, 2))


def _positions_pair(a1, b1, a2, b2, mode: str) -> torch.Tensor:
    # a: [n, S, D]; b: [n, kk, S, O]
    n1, kk, S, O = b1.shape
    n2 = b2.shape[0]
    D = a1.shape[2]
    if mode in ("diagonal", "diagonal_trace"):
        ga = torch.bmm(a1, a2.transpose(1, 2))  # [n, S, S]
        if mode == "diagonal":
            gb = torch.bmm(b1.reshape(n1, kk * S, O), b2.reshape(n1, kk * S, O).transpose(1, 2))
            gb = gb.view(n1, kk, S, kk, S)
            return (gb * ga[:, None, :, None, :]).sum((2, 4))
        bt1 = b1.transpose(1, 2).reshape(n1, S, kk * O)
        bt2 = b2.transpose(1, 2).reshape(n1, S, kk * O)
        return (ga * torch.bmm(bt1, bt2.transpose(1, 2))).sum((1, 2))
    a2f = a2.reshape(n2 * S, D)
    per_row = S * n2 * S * (kk * kk if mode == "full" else 1)
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    blocks = []
    if mode == "full":
        b2f = b2.reshape(n2 * kk * S, O)
        for i in range(0, n1, step):
            a1c, b1c = a1[i:i + step], b1[i:i + step]
            c = a1c.shape[0]
            ga = (a1c.reshape(c * S, D) @ a2f.T).view(c, 1, S, n2, 1, S)
            gb = (b1c.reshape(c * kk * S, O) @ b2f.T).view(c, kk, S, n2, kk, S)
            blocks.append((gb * ga).sum((2, 5)).permute(0, 2, 1, 3))
    else:
        bt2 = b2.transpose(1, 2).reshape(n2 * S, kk * O)
        for i in range(0, n1, step):
            a1c, b1c = a1[i:i + step], b1[i:i + step]
            c = a1c.shape[0]
            ga = (a1c.reshape(c * S, D) @ a2f.T).view(c, S, n2, S)
            gb = (b1c.transpose(1, 2).reshape(c * S, kk * O) @ bt2.T).view(c, S, n2, S)
            blocks.append((ga * gb).sum((1, 3)))
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]
