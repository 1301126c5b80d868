"""SynFlow (Tanaka et al. 2020; Synaptic-Flow's ``SynFlow``): data-free synaptic saliency, and
the SynFlow variants the Path Kernel paper motivates (Gebhart, Saxena, Schrater, 2021), on the
path network of :mod:`ntkfast.pathkernel`:

- ``synflow_l2`` (the authors' code): |θ| · S_SynFlow = |θ² ⊙ ∂R₁/∂|θ||.
- ``synflow_l2_squared`` (later public code, e.g. PHEW's): the network with weights θ² is fed ones,
  R₂ = Σ_p π_p², S = |θ| ⊙ ∂R₂/∂(θ²) = Σ_{p∋e} π_p² / |θ_e|.
- ``synflow_dist``: SynFlow with the mean training input x̄ (un-normalised, ≥ 0) fed instead of ones.
- ``synflow_l2_dist``: |θ| · S_SynFlow-Dist, the authors' L2 variant fed x̄.

The transformed state is built once per pruning run (the per-run cache) and only the scored
weights are rebuilt each round: iterative pruning never copies the model per round.
"""
from __future__ import annotations

import math
import warnings

from collections import OrderedDict
from typing import Literal, Mapping, Optional

import torch
from torch import nn

from ..methods import register
from ..pathkernel import PathNetwork
from ..core.batches import resolve_input_shape
from ..core.checks import check_choice
from ..core.numerics import grad_dict, remember_float64, with_float64_fallback
from ..core.state import functional_forward, output_tensor, private_copy, run_notes, state_copy, substitute
from ..core.targets import finish, model_device, remask, resolve_targets
from ..core.tokens import TOKEN_LAYERS, TokenFrequencies, all_tokens_feed, embeds_tokens, every_token, input_embedding


_TOKEN_INPUTS = ("all", "refuse")
TokenInput = Literal["all", "refuse"]


def _check_continuous_input(model: nn.Module, scorer: str, why: str = "") -> None:
    """SynFlow and its variants feed the network a made-up real input (ones, or the mean input); a
    layer taking token ids cannot be fed one, so the model is refused by name, not failed inside."""
    for name, m in model.named_modules():
        if isinstance(m, TOKEN_LAYERS):
            raise ValueError(f"model: {scorer} feeds the network a real-valued input (ones or the mean input), but "
                             f"{type(m).__name__} {name!r} takes token ids{why}; use a data-based method (snip, "
                             "grasp, ntksap) or score the layers after the embedding")


def _token_feed(model: nn.Module, token_input: str, scorer: str, shape, cache=None):
    """For a model whose input is token ids (an embedding looks it up): the hooks feeding every
    nn.Embedding all its tokens at once (token_input "all"), or a refusal by name. None for a model
    whose input is real-valued, embeddings or not (one looking up a buffer computes as it is).
    Worked out once per run (a probe forward) where a run cache is given."""
    check_choice(token_input, "token_input", _TOKEN_INPUTS)
    if not embeds_tokens(model):
        return None
    notes = run_notes(cache)
    key = ("token feed", token_input, tuple(shape))
    if notes is not None and key in notes:
        return notes[key]
    feed = all_tokens_feed(model, scorer, shape)
    if feed is not None and token_input == "refuse":
        _check_continuous_input(model, scorer, " (token_input='refuse')")
    if notes is not None:
        notes[key] = feed
    return feed


@register("synflow", "SynFlow: |theta * dR/dtheta|, R = sum of the |state|-network's output on ones (data-free)", takes=("cache",))
def synflow(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    data=None,
    seed: int = 0,
    dtype=None,
    input_shape=None,
    train_mode: bool = False,
    cache: Optional[dict] = None,
    token_input: TokenInput = "all",
) -> "OrderedDict[str, torch.Tensor]":
    """SynFlow: every parameter and buffer is replaced by its absolute value (BatchNorm running
    statistics included, as the authors' |state_dict|), the masked network (|theta| * m) in eval mode
    (train mode with ``train_mode``) is fed an all-ones input of batch 1, R = sum of the outputs and
    S = |theta * dR/dtheta| (gradient w.r.t. the raw weight, so pruned entries score 0); for a
    bias-free ReLU MLP S_e = sum over input-output paths through e of |product of the path's weights|.

    ``input_shape`` (one example, no batch dimension): the argument, else ``model.input_shape``,
    else the shape of ``data``'s inputs. ``dtype=torch.float64`` computes in double; a float32
    computation that overflows (deep networks) is redone in float64 with a warning. ``cache``: a
    dict kept across calls on the same, unchanged model (the pruning loop passes one), in which the
    |state| network is built once instead of every call. ``seed`` is ignored.

    ``token_input``: what a layer taking token ids (``nn.Embedding``) is fed. "all" (default):
    every token at once, so the layer outputs the sum of its rows at every position. An
    embedding is a Linear layer on a one-hot vector, and this is that layer's all-ones input,
    which is what SynFlow feeds every other layer. The input is then token ids of ``input_shape``
    (e.g. ``(sequence length,)``); position and token-type tables get the same treatment.
    "refuse" raises ValueError naming the layer instead."""
    # what does not change between the rounds of one pruning run is worked out in its first round:
    # per round, walking the modules and looking the parameters up again cost as much as the forward
    notes = run_notes(cache)
    shape = tuple(resolve_input_shape(model, input_shape, data))
    setup = notes.get(("synflow", token_input, shape)) if notes is not None else None
    if setup is None:
        tokens = _token_feed(model, token_input, "synflow", shape) is not None
        setup = {"tokens": tokens, "device": model_device(model), "targets": None, "inputs": {}}
        if notes is not None:
            notes[("synflow", token_input, shape)] = setup
    tokens, device = setup["tokens"], setup["device"]
    targets = remask(model, setup["targets"], masks) if setup["targets"] is not None and masks is not None \
        else resolve_targets(model, masks)
    setup["targets"] = targets

    def compute(dt):
        # The scored weights' effective value W = |theta| * m is the leaf itself. The authors
        # differentiate w.r.t. the raw weight, dR/dtheta = m * dR/dW, and |theta * m * dR/dW| =
        # |W * dR/dW| exactly (m is 0 or 1).
        x = setup["inputs"].get((shape, dt))
        if x is None:  # never written to: the same input serves every round
            x = setup["inputs"][(shape, dt)] = (
                torch.zeros((1,) + shape, dtype=torch.long, device=device) if tokens
                else torch.ones((1,) + shape, dtype=dt, device=device))
        prepared = _prepared(model, targets, dt, train_mode, cache)
        if prepared is not None:
            dup, slots, absw = prepared
            with torch.no_grad():
                for n, t in targets.items():
                    torch.mul(absw[n], t.mask, out=slots[n].data)
            w = slots
        else:
            state = state_copy(model, dt, transform=torch.abs, skip={t.param_name for t in targets.values()})
            # (|theta| * m, not torch.where(m, |theta|, 0): where with a bool mask is several times slower)
            w = OrderedDict(
                (n, t.param.detach().to(dt).abs().mul_(t.mask).requires_grad_(True)) for n, t in targets.items()
            )
        hooks = every_token(prepared[0] if prepared is not None else model) if tokens else []
        try:
            if prepared is not None:
                out = output_tensor(dup(x))
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"model: expected the forward to return a tensor, got {type(out).__name__}")
            else:
                out = functional_forward(model, substitute(state, targets, w), x, train_mode=train_mode)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # shape mismatches surface as RuntimeError from the first layer that sees them
            if tokens:  # e.g. an Embedding inside a model whose input is real-valued
                emb = next(n for n, m in model.named_modules() if type(m) is nn.Embedding)
                raise ValueError(f"model: synflow fed token ids of shape {tuple(shape)} (token_input='all', for the "
                                 f"Embedding {emb!r}) and the forward failed on them; if the model's input is not "
                                 "token ids, SynFlow's all-ones input cannot reach that embedding: use a data-based "
                                 f"method ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
            raise ValueError(f"input_shape: the forward failed for an input of shape {tuple(shape)} "
                             f"(a wrong input_shape?): {exc}") from exc
        finally:
            for h in hooks:
                h.remove()
        r = out.sum()
        grads = grad_dict(r, w)
        scores = OrderedDict((n, (w[n].detach() * g).abs_()) for n, g in grads.items())
        # one reduction per tensor and one host sync: finiteness, and which tensors scored all zero
        sums = torch.stack([v.sum().double() for v in scores.values()] + [r.detach().double()]).tolist()
        zero[:] = [n for n, v in zip(scores, sums) if v == 0.0]
        return scores, all(math.isfinite(v) for v in sums)

    zero: list = []
    result = with_float64_fallback(compute, targets, dtype, scorer="synflow", cache=cache)
    first = next(iter(result.values())).dtype
    # Underflow: in float32 a tensor with alive weights can score exactly 0 everywhere although it
    # carries flow. A tensor can also score 0 because the network is cut through behind it: only a
    # float64 recomputation tells the two apart.
    suspects = [n for n in zero if bool(targets[n].mask.any())] if first != torch.float64 else []
    if suspects:
        result64 = compute(torch.float64)[0]
        if any(bool(result64[n].any()) for n in suspects):
            warnings.warn(f"synflow: the {str(first).replace('torch.', '')} computation underflowed (e.g. "
                          f"{suspects[0]} scored 0 throughout); using float64", RuntimeWarning, stacklevel=2)
            remember_float64(cache, "synflow", first)
            result = result64
    return finish(result, targets)


def _prepared(model, targets, dt, train_mode, cache):
    """The cached |state| copy of ``model`` in ``dt`` with the targets' |theta|, or None when there
    is no cache, in train mode (BatchNorm would carry statistics from one call to the next), or
    when the model cannot be copied."""
    if cache is None or train_mode:
        return None
    key = ("synflow", dt)
    if key not in cache:
        made = private_copy(model, targets, dt, transform=torch.abs)
        if made is None:
            cache[key] = None
        else:
            dup, slots = made
            cache[key] = (dup, slots, OrderedDict((n, p.detach().clone()) for n, p in slots.items()))
    return cache[key]


# -- the Path Kernel variants ----------------------------------------------------------------------
def _network(model, masks, power, dtype, input_shape, data, cache, inputs=None, key=None, feed=None):
    dt = torch.float64 if dtype is None else dtype
    if cache is None:
        return PathNetwork(model, masks, power, dt, input_shape=input_shape, inputs=inputs, data=data, feed=feed)
    key = ("path network", key, power, str(dt))
    net = cache.get(key)
    if net is None:
        net = cache[key] = PathNetwork(model, masks, power, dt, input_shape=input_shape, inputs=inputs, data=data,
                                       reuse=True, feed=feed)
    else:  # the state is unchanged; only the masks move between rounds
        net.targets = remask(model, net.targets, masks) if masks is not None else resolve_targets(model, masks)
    return net


def _flow(net, weight_power: int) -> "OrderedDict[str, torch.Tensor]":
    """|θ|^weight_power ⊙ m ⊙ ∂R₁/∂(|θ| ⊙ m), as a magnitude like the authors' ``abs_()``:
    weight_power 1 is the flow through each kept weight (SynFlow), 2 its L2 variant."""
    return OrderedDict((n, s.abs_()) for n, s in net.scores(weight_power).items())


def mean_input(data) -> torch.Tensor:
    """x̄ over ``data``: an ntkfast image dataset gives its un-normalised mean image; otherwise the
    mean of the inputs as given (tensor, labelled pair, dataset or batches)."""
    from .. import data as D
    from ..core.unlabelled import Unlabelled

    if isinstance(data, (D.ImageDataset, D.ImageFolder)):
        return D.mean_input(data).double()
    source = Unlabelled(data)
    n = len(source)
    total = None
    for start in range(0, n, 4096):
        chunk = source.take(torch.arange(start, min(n, start + 4096))).double().sum(0)
        total = chunk if total is None else total + chunk
    return total / n


def _dist_feed(model, data, input_mean, cache, scorer):
    """SynFlow-Dist's input for a model that embeds token ids: the mean one-hot input of the
    embedding that looks the model's input up, i.e. each token's frequency at each position in
    ``data``, fed as that embedding's frequency-weighted rows (the other embeddings, looking up
    what the model makes itself, such as positions, look it up as usual). Returns (ids shape, the
    hook installer), or None for a model without embeddings."""
    if not embeds_tokens(model):
        return None
    if input_mean is not None:
        if isinstance(input_mean, torch.Tensor) and input_embedding(model, tuple(input_mean.shape)) is not None:
            raise ValueError(f"input_mean: {scorer} of a model whose input is token ids feeds each token's "
                             "frequency in data=, not a mean input")
        return None
    if data is None:
        raise ValueError(f"data: {scorer} feeds the mean training input (for token ids, their frequencies); pass "
                         "data= (or input_mean=)")
    key = ("token frequencies", id(data))
    known = cache.get(key) if cache is not None else None
    if known is None:
        from ..core.unlabelled import Unlabelled

        source = Unlabelled(data, ids=True)
        ids = source.take(torch.arange(len(source)))
        if ids.is_floating_point():  # a real-valued input (an embedding looks up something else): x̄
            return None
        freq = TokenFrequencies(ids)
        found = input_embedding(model, freq.shape)
        if found is None or type(found[1]) is not nn.Embedding:
            _check_continuous_input(model, scorer, " but no nn.Embedding looks up the model's input itself")
        known = (freq, found[0])
        if cache is not None:
            cache[key] = known
    freq, name = known

    def feed(net):
        return [freq.hook(net.get_submodule(name))]

    return freq.shape, feed


def _dist_input(data, input_mean, cache):
    if input_mean is not None:
        if not isinstance(input_mean, torch.Tensor):
            raise ValueError(f"input_mean: expected a tensor (one input, no batch dimension), got {type(input_mean).__name__}")
        x = input_mean
    elif data is None:
        raise ValueError("data: the Dist variants feed the mean training input; pass data= (or input_mean=)")
    else:
        key = ("mean input", id(data))
        x = cache.get(key) if cache is not None else None
        if x is None:
            x = mean_input(data)
            if cache is not None:
                cache[key] = x
    if bool((x < 0).any()):
        raise ValueError("data: the mean input has negative entries (normalised inputs?); SynFlow-Dist feeds the "
                         "un-normalised mean (ntkfast datasets give it whatever their normalisation), or pass "
                         "input_mean=")
    return x


@register("synflow_l2", "SynFlow-L2 (Path Kernel authors' code): |theta| * SynFlow score (data-free)", takes=("cache",))
def synflow_l2(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None, seed: int = 0,
               dtype=None, input_shape=None, cache: Optional[dict] = None,
               token_input: TokenInput = "all") -> "OrderedDict[str, torch.Tensor]":
    """|θ| · |θ ⊙ ∂R₁/∂θ| with R₁ the |state| network's output on ones (float64 unless ``dtype``).
    ``token_input``: as for :func:`synflow` (an embedding fed every token at once). ``seed`` is
    ignored."""
    feed = _token_feed(model, token_input, "synflow_l2", resolve_input_shape(model, input_shape, data), cache)
    net = _network(model, masks, 1, dtype, input_shape, data, cache, feed=feed)
    return finish(_flow(net, 2), net.targets)


@register("synflow_l2_squared", "SynFlow-L2, squared paths (PHEW-style code): |theta| * dR2/d(theta^2), "
                                "the theta^2 network fed ones (data-free)", takes=("cache",))
def synflow_l2_squared(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None,
                       seed: int = 0, dtype=None, input_shape=None, cache: Optional[dict] = None,
                       token_input: TokenInput = "all") -> "OrderedDict[str, torch.Tensor]":
    """|θ| ⊙ ∂R₂/∂(θ²), R₂ = Σ outputs of the squared network on ones = Σ_p π_p² (the path
    kernel's diagonal times |θ|). ``token_input``: as for :func:`synflow` (an embedding fed every
    token at once: the sum of its squared rows). ``seed`` is ignored."""
    feed = _token_feed(model, token_input, "synflow_l2_squared", resolve_input_shape(model, input_shape, data),
                       cache)
    net = _network(model, masks, 2, dtype, input_shape, data, cache, feed=feed)
    return finish(net.scores(1), net.targets)


@register("synflow_dist", "SynFlow-Dist: SynFlow fed the mean (un-normalised) training input instead of ones",
          raw_data=True, takes=("cache",))
def synflow_dist(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None,
                 input_mean: Optional[torch.Tensor] = None, seed: int = 0, dtype=None,
                 cache: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """|θ ⊙ ∂R₁/∂θ| with the |state| network fed x̄, the mean training input of ``data`` (an ntkfast
    image dataset gives its un-normalised mean image) or ``input_mean``. A model that embeds token
    ids is fed the mean of their one-hot vectors: each token's frequency at each position of
    ``data``. ``seed`` is ignored."""
    net = _dist_network(model, masks, data, input_mean, dtype, cache, "synflow_dist")
    return finish(_flow(net, 1), net.targets)


def _dist_network(model, masks, data, input_mean, dtype, cache, scorer):
    tokens = _dist_feed(model, data, input_mean, cache, scorer)
    if tokens is not None:
        shape, feed = tokens
        return _network(model, masks, 1, dtype, shape, None, cache, key="dist", feed=feed)
    x = _dist_input(data, input_mean, cache)
    return _network(model, masks, 1, dtype, None, None, cache, inputs=x, key="dist")


@register("synflow_l2_dist", "SynFlow-L2-Dist: |theta| * SynFlow-Dist score (the authors' L2 variant fed the mean "
                             "training input)", raw_data=True, takes=("cache",))
def synflow_l2_dist(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *, data=None,
                    input_mean: Optional[torch.Tensor] = None, seed: int = 0, dtype=None,
                    cache: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """|θ| · |θ ⊙ ∂R₁/∂θ| with the |state| network fed x̄ (see :func:`synflow_dist`)."""
    net = _dist_network(model, masks, data, input_mean, dtype, cache, "synflow_l2_dist")
    return finish(_flow(net, 2), net.targets)
