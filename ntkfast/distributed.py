"""Splitting ntkfast's work over the processes of a ``torch.distributed`` process group.

Every public entry point that can split its work (``prune`` and the ntksap, snip, iterative_snip
and grasp scorers, ``transfer``, ``ntk.empirical_ntk``) takes ``process_group``:

- ``None`` (default): the world group when ``torch.distributed`` is initialised, else no split;
- a ``ProcessGroup``: that group;
- ``False``: no split, even when a group is initialised (each process computes alone).

What is split is always a sum over independent pieces (NTK-SAP's pieces, SNIP/GraSP batches or
rows, rows of an NTK or of the NTT loss); each process computes a contiguous block of them and one
all-reduce adds the blocks. Every process must call with the same arguments (same model weights,
masks and data): ``prune`` checks that it does. Draws depend on (seed, piece), never on the rank,
so results equal the single-process ones up to the order of floating-point summation.

Failures: a process whose share raises still joins the all-reduce, with an error flag; every
process then raises (the failing one its own exception, the others :class:`DistributedError`
naming the rank and the message), so nobody waits in a collective for a process that is gone. A
process that never arrives (killed, or stuck elsewhere) is caught by the process group's
``timeout`` (``init_process_group(timeout=...)``; ``ntkfast`` under ``torchrun`` sets it from
``--dist-timeout``). What the others see then depends on the backend:

- gloo: the collective raises (a RuntimeError from torch.distributed) after the timeout.
- NCCL: by default PyTorch's NCCL watchdog *aborts the process* (SIGABRT, no Python exception,
  no ``finally``) once a collective has waited longer than the timeout. With
  ``TORCH_NCCL_BLOCKING_WAIT=1`` the waiting call raises ``torch.distributed.DistBackendError``
  instead. :func:`init_from_env` sets that variable for NCCL groups unless it is already set; a
  group you initialise yourself keeps PyTorch's default unless you set it. (Not yet run on a
  machine with several GPUs: the ladder's GPU has one.)
"""
from __future__ import annotations

import datetime
import functools
import inspect
import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["Shard", "DistributedError", "resolve", "replicated", "split_sizes", "local_rows", "init_from_env",
           "is_main_process"]


class DistributedError(RuntimeError):
    """Another process of the group failed; this one stops with it instead of waiting."""


def split_sizes(n: int, parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous blocks of ``n`` items, differing by at most one (earlier blocks larger)."""
    q, r = divmod(int(n), int(parts))
    return [q + (1 if k < r else 0) for k in range(parts)]


def _available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Shard:
    """This process's part of a computation split over a process group (or the whole of it, for
    a group of one: then every method is the identity and nothing is communicated)."""

    def __init__(self, group=None, rank: int = 0, size: int = 1):
        self.group, self.rank, self.size = group, int(rank), int(size)

    @property
    def split(self) -> bool:
        return self.size > 1

    def __repr__(self):
        return f"Shard(rank={self.rank}, size={self.size})"

    # -- what this process computes -------------------------------------------------------------
    def block(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)``."""
        sizes = split_sizes(n, self.size)
        start = sum(sizes[: self.rank])
        return range(start, start + sizes[self.rank])

    # -- communication --------------------------------------------------------------------------
    def run(self, fn: Callable[[], object]):
        """``fn()`` on every rank, then agreement: if it raised anywhere, every rank raises (one
        small all-reduce; for steps not followed by :meth:`all_sum`)."""
        try:
            out, err = fn(), None
        except Exception as exc:  # noqa: BLE001 - passed on to every rank below
            out, err = None, exc
        if self.split:
            flag = torch.tensor([0.0 if err is None else 1.0], device=self._device())
            torch.distributed.all_reduce(flag, group=self.group)
            if float(flag) > 0:
                self._raise_together(err)
        elif err is not None:
            raise err
        return out

    def all_sum(self, compute: Callable[[], Tuple[Sequence[torch.Tensor], Sequence[float]]],
                like: Sequence[torch.Tensor], flags: int = 0) -> Tuple[List[torch.Tensor], List[float]]:
        """Sum over ranks of ``compute()`` -> (tensors shaped as ``like``, ``flags`` floats).

        One all-reduce per dtype; the flags and an error flag travel in the first float32/float64
        buffer (in a float64 buffer of their own otherwise). A rank whose ``compute`` raises
        contributes zeros and then every rank raises."""
        try:
            tensors, extra = compute()
            tensors, extra = list(tensors), [float(v) for v in extra]
            err = None
        except Exception as exc:  # noqa: BLE001 - passed on to every rank below
            if not self.split:
                raise
            tensors, extra, err = None, [0.0] * flags, exc
        if not self.split:
            return tensors, extra
        if tensors is None:
            tensors = [torch.zeros_like(t) for t in like]
        if len(tensors) != len(like) or len(extra) != flags:
            raise RuntimeError("internal: all_sum got a different number of tensors or flags than announced")
        groups: dict = {}
        for k, t in enumerate(tensors):
            groups.setdefault(t.dtype, []).append(k)
        status = [1.0 if err is not None else 0.0] + extra
        carrier = next((d for d in groups if d in (torch.float32, torch.float64)), None)
        out: List[Optional[torch.Tensor]] = [None] * len(tensors)
        tail = None
        dev = self._device()
        for dtype, idx in groups.items():
            parts = [tensors[k].detach().reshape(-1).to(dev) for k in idx]
            if dtype == carrier:
                parts.append(torch.tensor(status, dtype=dtype, device=dev))
            buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            torch.distributed.all_reduce(buf, group=self.group)
            offset = 0
            for k in idx:
                n = tensors[k].numel()
                out[k] = buf[offset:offset + n].view_as(tensors[k]).to(tensors[k].device)
                offset += n
            if dtype == carrier:
                tail = buf[offset:].double().cpu().tolist()
        if tail is None:  # no float32/float64 tensor to carry the flags
            buf = torch.tensor(status, dtype=torch.float64, device=dev)
            torch.distributed.all_reduce(buf, group=self.group)
            tail = buf.cpu().tolist()
        if tail[0] > 0:
            self._raise_together(err)
        return out, tail[1:]

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` (in place) with rank ``src``'s values, one broadcast per dtype."""
        if not self.split or not tensors:
            return
        groups: dict = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        root = torch.distributed.get_global_rank(self.group, src) if self.group is not None else src
        dev = self._device()
        for ts in groups.values():
            buf = torch.cat([t.detach().reshape(-1).to(dev) for t in ts])
            torch.distributed.broadcast(buf, src=root, group=self.group)
            offset = 0
            for t in ts:
                with torch.no_grad():
                    t.copy_(buf[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather_rows(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's ``local`` block along dim 0 (rank r has ``sizes[r]`` rows)."""
        if not self.split:
            return local
        top = max(sizes)
        dev = self._device()
        pad = torch.zeros((top,) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
        pad[: local.shape[0]] = local.to(dev)
        parts = [torch.empty_like(pad) for _ in range(self.size)]
        torch.distributed.all_gather(parts, pad, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0).to(local.device)

    def check_same_model(self, model: torch.nn.Module) -> None:
        """:meth:`check_same` on the model's floating-point and boolean state (weights, buffers, masks)."""
        self.check_same("model", {n: t for n, t in model.state_dict().items()
                                  if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.dtype == torch.bool)})

    def check_same(self, what: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError on every rank if ``tensors`` (name -> tensor, e.g. the model's weights)
        differ between ranks in names, shapes or values (a fingerprint of each is compared, its
        bit pattern, so NaN equals NaN). One small collective."""
        if not self.split:
            return
        mine = [(n, tuple(t.shape), _fingerprint(t)) for n, t in tensors.items()]
        everyone: list = [None] * self.size
        torch.distributed.all_gather_object(everyone, mine, group=self.group)
        for r, theirs in enumerate(everyone):
            if theirs == everyone[0]:
                continue
            names0 = [e[0] for e in everyone[0]]
            if [e[0] for e in theirs] != names0:
                missing = sorted(set(names0) ^ set(e[0] for e in theirs))
                bad = f"the set of tensors ({', '.join(missing[:3]) or 'their order'})"
            else:
                bad = repr(next(a[0] for a, b in zip(everyone[0], theirs) if a != b))
            raise ValueError(f"{what}: {bad} differs between rank 0 and rank {r}; every process must pass the "
                             "same model weights, masks and data (seed them alike, or broadcast rank 0's model "
                             "first)")

    # -- helpers ----------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        # NCCL communicates CUDA tensors only
        if torch.distributed.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _raise_together(self, err: Optional[BaseException]) -> None:
        msg = None if err is None else f"{type(err).__name__}: {err}"
        everyone: list = [None] * self.size
        torch.distributed.all_gather_object(everyone, msg, group=self.group)
        if err is not None:
            raise err
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
        r, m = failed[0]
        raise DistributedError(f"rank {r} of {self.size} failed ({m}); this rank stops too")


def replicated(scorer: Callable) -> Callable:
    """``scorer`` with a ``process_group`` argument, for a scorer whose work does not split (SynFlow,
    magnitude, random, or a user's): every process computes it, failures are agreed on, and rank
    0's scores are broadcast so that every process holds the same bits."""
    @functools.wraps(scorer)
    def wrapper(*args, process_group=None, **kwargs):
        shard = resolve(process_group)
        if not shard.split:
            return scorer(*args, **kwargs)
        scores = shard.run(lambda: scorer(*args, **kwargs))
        # own, dense copies: the scorer may return views of the model or expanded tensors
        scores = type(scores)((n, t.detach().clone().contiguous()) for n, t in scores.items())
        shard.broadcast_(list(scores.values()))
        return scores

    sig = inspect.signature(scorer)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("process_group", inspect.Parameter.KEYWORD_ONLY, default=None))
    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def _fingerprint(t: torch.Tensor) -> Tuple[str, str]:
    """Two float64 numbers, as exact hex strings, that change when any entry of ``t`` does: the sum
    and a sum weighted by a multiplicative hash of the position (no period below 2^32)."""
    v = t.detach().reshape(-1).to(torch.float64)
    idx = torch.arange(v.numel(), dtype=torch.int64, device=v.device)
    w = ((idx * 2654435761) % 4294967296).to(torch.float64).div_(4294967296.0).add_(0.5)
    return float(v.sum()).hex(), float((v * w).sum()).hex()


def resolve(process_group=None) -> Shard:
    """The :class:`Shard` of this process for ``process_group`` (None: the world group when one is
    initialised; False: no split)."""
    if process_group is False:
        return Shard()
    if process_group is None:
        if not _available():
            return Shard()
        group = torch.distributed.group.WORLD
    else:
        if process_group is True or not _available():
            raise ValueError("process_group: expected a torch.distributed ProcessGroup (after "
                             "torch.distributed.init_process_group), None or False, got "
                             f"{process_group!r}" + ("" if _available() else " (torch.distributed is not initialised)"))
        group = process_group
    try:
        rank = torch.distributed.get_rank(group)
        size = torch.distributed.get_world_size(group)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"process_group: not a usable process group ({exc})") from None
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the group it was given")
    return Shard(group, rank, size)


def local_rows(n: int, process_group=None) -> range:
    """The rows of an ``n``-row split this process computes (e.g. of
    ``empirical_ntk(..., gather=False)``'s x1)."""
    return resolve(process_group).block(n)


def is_main_process(process_group=None) -> bool:
    """True on rank 0 of ``process_group`` (or when nothing is distributed): the process that writes
    files and prints."""
    return resolve(process_group).rank == 0


def init_from_env(device: Optional[str] = None, timeout_s: float = 600.0) -> Optional[str]:
    """Initialise the default process group from ``torchrun``'s environment (WORLD_SIZE > 1); a no-op
    otherwise. Backend: NCCL for a CUDA ``device`` (each process takes GPU LOCAL_RANK), else gloo.
    Returns the device this process should use (``cuda:LOCAL_RANK`` for CUDA), or ``device``."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"dist_timeout: expected a positive number of seconds, got {timeout_s!r}")
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {exc}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _available():
        return device
    cuda = dev is not None and dev.type == "cuda"
    if cuda and dev.index is not None:
        raise ValueError(f"device: under torchrun give 'cuda', not {device!r}: each process takes GPU LOCAL_RANK")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        # a rank that never arrives makes the others raise after the timeout, rather than the NCCL
        # watchdog aborting them (read when the group is made; the user's own choice stands)
        if "TORCH_NCCL_BLOCKING_WAIT" not in os.environ and "NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(seconds=float(timeout_s)))
    return device
