"""Models whose input is token ids (an ``nn.Embedding`` or ``nn.EmbeddingBag`` looks them up).

The data-free methods feed a made-up input (SynFlow: ones; NTK-SAP: Gaussian noise), which has no
meaning for token ids. An embedding is a Linear layer on one-hot vectors, and the choices each
method makes for it are stated in terms of that view: SynFlow's all-ones input is every token at
once, SynFlow-Dist's mean input is the token frequencies, NTK-SAP draws uniformly random ids.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

TOKEN_LAYERS = (nn.Embedding, nn.EmbeddingBag)
ID_DTYPES = (torch.int64, torch.int32)


def token_layers(model: nn.Module) -> "list[Tuple[str, nn.Module]]":
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TOKEN_LAYERS)]


def embeds_tokens(model: nn.Module) -> bool:
    return any(isinstance(m, TOKEN_LAYERS) for m in model.modules())


def input_embedding(model: nn.Module, shape, state=None,
                    failed: Optional[list] = None) -> Optional[Tuple[str, nn.Module]]:
    """The embedding that looks up the model's own input: the one whose call receives the input
    tensor (or a view of it) in a forward on zeros of ``shape`` (one sample; token 0 is valid for
    every table). None when no embedding does (the model transforms its ids first, or its input
    is real-valued) or the forward fails on ids; then ``failed`` (a list), where given, receives
    the forward's error, for the caller's message."""
    from .state import functional_forward

    x = torch.zeros((1,) + tuple(shape), dtype=torch.long, device=_device(model))
    storage = x.untyped_storage().data_ptr()
    found = []

    def seen(name):
        def hook(module, args):
            # the input itself, or a reshaped view of all of it in order (GPT-2 flattens its ids):
            # not a slice or a transpose, whose positions would not be the input's
            a = args[0] if args else None
            if not found and isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage \
                    and a.numel() == x.numel() and a.is_contiguous() and a.storage_offset() == 0:
                found.append(name)
        return hook

    layers = token_layers(model)
    handles = [m.register_forward_pre_hook(seen(n)) for n, m in layers]
    if state is None:
        state = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    try:
        with torch.no_grad():
            functional_forward(model, state, x)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if failed is not None:
            failed.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    finally:
        for h in handles:
            h.remove()
    return next(((n, m) for n, m in layers if found and n == found[0]), None)


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def every_token(net: nn.Module) -> list:
    """Forward hooks making every ``nn.Embedding`` of ``net`` output the sum of its rows (the weight
    it computes with, so |θ| ⊙ m under SynFlow's substitution) at every position it is asked for:
    all tokens present at once, the one-hot view's all-ones input. Returns the handles."""
    def all_rows(module, args, out):
        return module.weight.sum(0).to(out.dtype).expand_as(out)

    return [m.register_forward_hook(all_rows) for m in net.modules() if type(m) is nn.Embedding]


class TokenFrequencies:
    """The mean one-hot input of an embedding over a set of id sequences: per position, the
    fraction of sequences holding each token, kept as (position, token, fraction) triples."""

    def __init__(self, ids: torch.Tensor):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in ID_DTYPES or ids.dim() < 2 or not ids.numel():
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"data: expected token ids [N, ...] (int64 or int32, at least one), got {got}")
        n = ids.shape[0]
        self.shape = tuple(ids.shape[1:])
        flat = ids.reshape(n, -1).long()
        places = flat.shape[1]
        span = int(flat.max()) + 1 if flat.numel() else 1
        if int(flat.min()) < 0:
            raise ValueError("data: token ids must be >= 0")
        key = (torch.arange(places).expand(n, places) * span + flat).reshape(-1)
        unique, counts = torch.unique(key, return_counts=True)
        self.position, self.token = unique // span, unique % span
        self.fraction = counts.double() / n
        self.places = places
        self.largest = span - 1

    def hook(self, embedding: nn.Module) -> "torch.utils.hooks.RemovableHandle":
        """Makes ``embedding`` output, at every position, its rows weighted by the fractions (the
        weight it computes with, so the path network's transformed table)."""
        if self.largest >= embedding.num_embeddings:
            raise ValueError(f"data: token id {self.largest} is outside the embedding's {embedding.num_embeddings} rows")

        def mean_rows(module, args, out):
            w = module.weight
            rows = w.index_select(0, self.token.to(w.device)) * self.fraction.to(w.device, w.dtype).unsqueeze(1)
            mixed = w.new_zeros(self.places, w.shape[1]).index_add_(0, self.position.to(w.device), rows)
            return mixed.to(out.dtype).reshape(out.shape)

        return embedding.register_forward_hook(mean_rows)


def all_tokens_feed(model: nn.Module, caller: str, shape):
    """:func:`every_token` for a model whose input (of one-sample ``shape``) is token ids that an
    embedding looks up; None for one whose input is real-valued, embeddings or not (a table
    looking up a buffer computes as it is). An ``nn.EmbeddingBag`` is refused by name (it sums a
    bag of ids: no all-tokens input is defined)."""
    layers = token_layers(model)
    if not layers or input_embedding(model, shape) is None:
        return None
    for name, m in layers:
        if type(m) is not nn.Embedding:
            raise ValueError(f"model: {caller} feeds each embedding every token at once, but {type(m).__name__} "
                             f"{name!r} sums a bag of ids, for which no such input is defined")
    return every_token
