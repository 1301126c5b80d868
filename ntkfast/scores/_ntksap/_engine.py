"""NTK-SAP (Wang, Li, Sun, ICLR 2023): data-free saliency from a finite-difference NTK-trace estimate.

S(m) = | d/dm sum over pieces || f(Z; theta_i * m) - f(Z; (theta_i + eps xi_i) * m) ||^2 | * [m != 0]

The fast engines evaluate a private copy of the model whose layers take stacked weight sets
(:class:`~ntkfast.core.grouped.GroupedNetwork`): "grouped" puts both branches of every piece of a
pass into one call (2P weight sets, group-stacked; the GPU path, optionally replayed from a CUDA
graph), "sequential" runs the two branches of one piece as two plain calls (the CPU path). Both
build the effective weights of each layer with the fused ``ops.perturbed_masked`` kernel (xi
regenerated from Philox in the backward, never stored) and skip the statistics pass for networks
without BatchNorm. The reference engine is the authors' loop (_reference.py).
"""
from __future__ import annotations

import numbers
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ...core.checks import check_choice, check_device, check_int, check_number
from ...core.tokens import embeds_tokens, input_embedding, token_layers
from ... import ops
from ...distributed import resolve as resolve_shard
from ...methods import register
from ...core.batches import resolve_input_shape
from ...core.targets import attribute_name, finish, mask_buffer_name, model_device, resolve_dtype, resolve_targets
from ...core.state import functional_forward
from ...core.grouped import BatchNormPlan, GroupedNetwork, NotGroupable
from ._draws import Draws, InitFailed, check_explicit, piece_list
from ._reference import reference_scores

_ENGINES = ("auto", "grouped", "sequential", "reference")
_BN_STATS = ("single_pass", "authors")
_TOKEN_INPUTS = ("random", "refuse")
# On CPU, larger passes run slower per sample once the activations leave the caches: a pass is
# kept under this many bytes of saved activations unless memory_budget says otherwise.
_CPU_PASS_BYTES = 192 << 20


@register("ntksap", "NTK-SAP: |d/dm sum ||f(Z; theta m) - f(Z; (theta + eps xi) m)||^2| over fresh "
                    "initialisations and Gaussian inputs (data-free; Wang et al. 2023)", takes=("cache", "process_group"))
@torch.enable_grad()
def ntksap(
    model: nn.Module,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    epsilon: float = 0.01,
    repeats: Optional[int] = None,
    batches: Optional[int] = None,
    batch_size: Optional[int] = None,
    input_shape=None,
    seed: int = 0,
    device=None,
    dtype=None,
    init_fn: Optional[Callable[[nn.Module], object]] = None,
    inputs: Optional[Sequence[torch.Tensor]] = None,
    weight_samples: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    perturbations: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    bn_stats: str = "authors",
    engine: str = "auto",
    memory_budget: Optional[int] = None,
    cuda_graph: bool = True,
    data=None,
    cache: Optional[dict] = None,
    process_group=None,
    token_input: str = "random",
) -> "OrderedDict[str, torch.Tensor]":
    """NTK-SAP saliency of every prunable weight under ``masks``.

    For each of ``repeats`` (default 5) x ``batches`` (default 1) pieces: theta is a fresh draw of
    the model's own initialisation (``model.reinitialize()``, or ``init_fn(copy)`` re-drawing a copy
    in place), Z ~ N(0, I) a batch of ``batch_size`` inputs (default: the batch size of ``data``,
    else 10 x ``model.num_classes``, else 100) of shape ``input_shape`` (default: the model's, else
    ``data``'s), xi ~ N(0, I) one per prunable weight. The score is
    |d/dm sum ||f(Z; theta m) - f(Z; (theta + epsilon xi) m)||^2| on unpruned weights, 0 on pruned
    ones, the gradient summed signed over pieces and |.| taken once, as the authors' code does.
    Parameters other than the scored weights are theta's in both branches.

    BatchNorm: both branches are evaluated in eval mode with statistics of Z through the
    unperturbed branch (mean and unbiased variance, no gradient through them). ``bn_stats``:
    "authors" (default) takes them in a separate train-mode pass without gradient, exactly as the
    authors' code; "single_pass" takes them inside the scoring pass, which saves that pass, but
    there the deeper layers' inputs were normalised with the unbiased rather than the biased
    variance: the scores move by O(1 / samples per channel), about 1% (relative norm) for ResNet-20
    at batch 100. Networks without BatchNorm compute the same either way.

    Explicit draws (then nothing of that kind is drawn): ``inputs`` a list of Z tensors,
    ``weight_samples`` a list of {parameter name: tensor} (parameters left out keep the model's
    values), ``perturbations`` a list of {mask name: xi} (unit variance; ``epsilon`` scales them).
    Their common length replaces repeats x batches.

    ``seed``: every draw of piece i depends on (seed, i) only, whatever the engine. ``device`` /
    ``dtype``: where and in what to compute (default: the model's). ``engine``:
    - "sequential": per piece, the unperturbed and the perturbed network one after the other;
    - "grouped": all pieces of a pass, both branches, in one group-stacked call (2R weight sets);
    - "reference": the authors' loop (two model copies, three passes per piece);
    - "auto" (default): sequential on CPU (one piece's activations at a time; stacking was not faster there), grouped on GPU,
      and the reference engine for a model the other two cannot evaluate (a warning says why).
    ``memory_budget``: bytes the saved activations of one grouped pass may take; pieces are split
    over several passes to respect it (default: 60% of the free GPU memory, 192 MiB on CPU).
    ``cuda_graph``: on CUDA, capture the grouped pass in a CUDA graph and replay it for every
    pass of the same shape (checked against the eager pass once; off on failure).
    ``process_group``: the pieces are split in contiguous blocks over its processes and the mask
    gradients all-reduced (see :mod:`ntkfast.distributed`; default: the world group when
    torch.distributed is initialised, False: no split).
    ``token_input``: what a model that looks its input up in an ``nn.Embedding`` is fed instead of
    Gaussian noise. "random" (default): token ids drawn uniformly from that embedding's table,
    fresh for every piece like Z (seeded the same way). The paper's inputs are data-free noise of
    the input's own kind, and for ids that is a uniform draw; the one-hot view's Gaussian (every
    row of the table mixed with N(0, 1) weights) would cost a vocabulary-sized product per
    position and feed the network sequences no tokenizer makes. "refuse": raise ValueError naming
    the embedding. Explicit ``inputs`` are used as given either way.
    The model is never changed.
    """
    targets = resolve_targets(model, masks)
    # above 1e3 the perturbation swamps every weight: not the finite difference NTK-SAP means
    eps = check_number(epsilon, "epsilon", lo=0.0, lo_open=True, hi=1e3)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if engine not in _ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(map(repr, _ENGINES))}, got {engine!r}")
    if bn_stats not in _BN_STATS:
        raise ValueError(f"bn_stats: expected one of {', '.join(map(repr, _BN_STATS))}, got {bn_stats!r}")
    check_choice(token_input, "token_input", _TOKEN_INPUTS)
    if memory_budget is not None:
        memory_budget = check_int(memory_budget, "memory_budget", lo=1)
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn: expected a callable init_fn(model), got {type(init_fn).__name__}")
    dt = resolve_dtype(targets, dtype)
    dev = check_device(device) if device is not None else model_device(model)

    shape = None if inputs is not None and input_shape is None else resolve_input_shape(model, input_shape, data)
    n_explicit = check_explicit(model, targets, inputs, weight_samples, perturbations, shape)
    if n_explicit is not None:
        for name, v in (("repeats", repeats), ("batches", batches)):
            if v is not None:
                check_int(v, name, lo=1)
        if (repeats is not None or batches is not None) and (repeats or 1) * (batches or 1) != n_explicit:
            raise ValueError(f"repeats x batches = {(repeats or 1) * (batches or 1)} but the explicit draws have "
                             f"{n_explicit} entries")
        pieces = n_explicit
    else:
        if batches is None and data is not None and not isinstance(data, torch.Tensor):
            from ...core.batches import as_batches

            batches = len(as_batches(data, "data"))  # the authors loop over every batch of the loader
        pieces = check_int(5 if repeats is None else repeats, "repeats", lo=1) * \
            check_int(1 if batches is None else batches, "batches", lo=1)
    if inputs is not None:
        if batch_size is not None and check_int(batch_size, "batch_size", lo=1) != inputs[0].shape[0]:
            raise ValueError(f"batch_size: {batch_size} but inputs[0] has {inputs[0].shape[0]} rows")
        batch_shape = tuple(inputs[0].shape)
    else:
        batch_shape = (_batch_size(model, batch_size, data),) + tuple(shape)
    if weight_samples is None and init_fn is None and not callable(getattr(model, "reinitialize", None)):
        raise ValueError(
            f"model: {type(model).__name__} has no reinitialize() method; NTK-SAP re-draws the "
            "initialisation for every batch: pass init_fn=<function re-initialising a model in place> "
            "(e.g. one calling torch.nn.init.kaiming_normal_ on each layer) or weight_samples=[...]")

    shard = resolve_shard(process_group)
    key = ("ntksap", dt, str(dev))
    store = cache.setdefault(key, {}) if cache is not None else {}
    vocab = None
    if inputs is None:  # what to draw is worked out once per run: it costs a probe forward
        drawn = ("drawn input", tuple(batch_shape[1:]), token_input)
        if drawn not in store:
            store[drawn] = _check_drawn_input(model, batch_shape[1:], dt, dev, token_input)
        vocab = store[drawn]
    draws = Draws(model, targets, seed=seed, pieces=pieces, batch_shape=batch_shape, dtype=dt, device=dev,
                  init_fn=init_fn, inputs=inputs, weight_samples=weight_samples, perturbations=perturbations,
                  init_copy=store.get("init_copy"), indices=shard.block(pieces), vocab=vocab)

    def local():
        try:
            return list(_local_scores(model, targets, draws, eps, dt, dev, bn_stats, memory_budget, store, engine,
                                      cuda_graph).values()), ()
        except InitFailed as exc:
            raise exc.original  # the user's own error, with its traceback
        except ValueError as exc:
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            # the statistics pass normalises each BatchNorm by its batch: a layer that sees one
            # value per channel (BatchNorm1d on [1, C], a 1 x 1 map) has no variance
            raise ValueError(f"batch_size: NTK-SAP's statistics pass normalises every BatchNorm by the batch's own "
                             f"statistics, and with batches of {batch_shape[0]} a BatchNorm layer sees one value per "
                             "channel; use larger batches (batch_size=, or more rows in inputs= / data=)") from None

    like = [torch.zeros(t.param.shape, dtype=dt, device=dev) for t in targets.values()]
    summed, _ = shard.all_sum(local, like)
    grads = OrderedDict(zip(targets, summed))
    sums = torch.stack([g.double().sum() for g in grads.values()])
    if not bool(torch.isfinite(sums).all()):
        raise ValueError("ntksap: the scores are not finite (a BatchNorm layer seeing a single value per "
                         "channel, or an overflowing network?); try a larger batch_size or dtype=torch.float64")
    scores = OrderedDict((n, g.abs_().mul_(targets[n].mask.to(device=g.device, dtype=g.dtype))) for n, g in grads.items())
    return finish(scores, targets)


@torch.enable_grad()
def ntksap_trace_estimate(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *,
                          inputs: torch.Tensor, weight_sample: Optional[Mapping[str, torch.Tensor]] = None,
                          samples: int = 100, epsilon: float = 1e-3, seed: int = 0, dtype=None,
                          bn_stats: str = "authors", memory_budget: Optional[int] = None) -> float:
    """The finite-difference NTK-trace estimate NTK-SAP differentiates, at one weight draw and one
    input batch: mean over ``samples`` draws of xi of ||f(Z; theta m) - f(Z; (theta + epsilon xi) m)||^2
    / epsilon^2, which approaches tr Theta(Z) of the masked network (the squared Frobenius norm of the
    Jacobian w.r.t. the unmasked weights) as epsilon -> 0. ``weight_sample`` defaults to the model's
    own parameters."""
    targets = resolve_targets(model, masks)
    # above 1e3 the perturbation swamps every weight: not the finite difference NTK-SAP means
    eps = check_number(epsilon, "epsilon", lo=0.0, lo_open=True, hi=1e3)
    samples = check_int(samples, "samples", lo=1)
    if bn_stats not in _BN_STATS:
        raise ValueError(f"bn_stats: expected one of {', '.join(map(repr, _BN_STATS))}, got {bn_stats!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("inputs: expected one batch tensor [B, ...]")
    dt = resolve_dtype(targets, dtype)
    dev = model_device(model)
    theta = dict(weight_sample) if weight_sample is not None else {}
    check_explicit(model, targets, [inputs], [theta], None, None)
    draws = Draws(model, targets, seed=seed, pieces=samples, batch_shape=tuple(inputs.shape), dtype=dt, device=dev,
                  inputs=[inputs] * samples, weight_samples=[theta] * samples)
    total = _grouped_scores(model, targets, draws, eps, dt, dev, bn_stats, memory_budget, {}, objective_only=True)
    return total / (samples * eps * eps)


def _check_drawn_input(model: nn.Module, shape, dt, dev, token_input: str) -> Optional[int]:
    """What NTK-SAP draws for ``model``: None for Gaussian noise (checked to fit, see
    :func:`_check_gaussian_input`), or the size of the table whose ids it draws, for a model that
    looks its input up in an embedding."""
    if not embeds_tokens(model):
        _check_gaussian_input(model, shape, dt, dev)
        return None
    name, layer = token_layers(model)[0]
    failed: list = []
    found = input_embedding(model, shape, failed=failed)
    if found is not None:
        if token_input == "refuse":
            raise ValueError(f"model: {type(found[1]).__name__} {found[0]!r} takes token ids and token_input='refuse'; "
                             "pass inputs=[...] (the batches to use), token_input='random', or score the layers "
                             "after the embedding")
        return found[1].num_embeddings
    try:  # an embedding used on something else (a class index, a buffer): the input may be real-valued
        _check_gaussian_input(model, shape, dt, dev)
    except ValueError:
        raise ValueError(f"model: {type(layer).__name__} {name!r} takes token ids, but no embedding looks up the "
                         f"model's input itself (ids of shape {tuple(shape)}), so ntksap cannot tell which ids "
                         "to draw, and a Gaussian input does not fit either; pass inputs=[...] (the batches to "
                         "use)" + (f"; the forward on ids failed with {failed[0]}" if failed else "")) from None
    return None


def _check_gaussian_input(model: nn.Module, shape, dt, dev) -> None:
    """NTK-SAP feeds Gaussian noise Z: a model that cannot take a real input of ``shape`` (another
    width) or gives no tensor output is refused by name, on one sample, before the passes; the
    model is evaluated on copies of its state and left as it was."""
    z = torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(0), dtype=dt).to(dev)
    state = {n: t.detach().to(dt) if t.is_floating_point() else t.detach()
             for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    try:
        with torch.no_grad():
            functional_forward(model, state, z)
    except TypeError as exc:  # the output is not a tensor
        raise ValueError(str(exc)) from None
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise ValueError(f"input_shape: the forward fails on a Gaussian input of shape {tuple(shape)} "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _local_scores(model, targets, draws: Draws, eps, dt, dev, bn_stats, memory_budget, store, engine, cuda_graph):
    """Signed mask gradients summed over this process's pieces (``draws.indices``)."""
    if not draws.indices:
        return OrderedDict((n, torch.zeros(t.param.shape, dtype=dt, device=dev)) for n, t in targets.items())
    grads = None
    if engine != "reference" and not (engine == "auto" and store.get("not_groupable")):
        strategy = engine if engine != "auto" else ("sequential" if dev.type == "cpu" else "grouped")
        try:
            grads = _grouped_scores(model, targets, draws, eps, dt, dev, bn_stats, memory_budget, store,
                                    strategy=strategy, cuda_graph=bool(cuda_graph))
            store["grouped_ran"] = True
        except InitFailed:
            raise
        except NotGroupable as exc:
            if engine != "auto":
                raise ValueError(f"engine={engine!r}: {exc}") from None
            _fall_back(store, str(exc))
        except Exception as exc:
            # a forward the wrapped copy cannot run (e.g. it reads a wrapped layer's .weight):
            # the reference engine runs the model as it is
            if engine != "auto" or store.get("grouped_ran") or isinstance(exc, torch.OutOfMemoryError):
                raise
            _fall_back(store, f"the {strategy} engine failed ({type(exc).__name__}: {exc})")
    if grads is None:
        grads = reference_scores(model, targets, draws, eps, dt, dev)
    if draws._init_copy is not None:
        store["init_copy"] = draws._init_copy
    return grads


def _fall_back(store: dict, why: str) -> None:
    warnings.warn(f"ntksap: {why}; using the reference engine (two copies, three passes)", RuntimeWarning,
                  stacklevel=4)
    store["not_groupable"] = True
    store.pop("net", None)


def _batch_size(model: nn.Module, batch_size, data) -> int:
    if batch_size is not None:
        return check_int(batch_size, "batch_size", lo=1)
    if data is not None:
        from ...core.batches import as_batches

        x = data if isinstance(data, torch.Tensor) else as_batches(data, "data")[0][0]
        return int(x.shape[0])
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        return 10 * k  # the authors' prune batch: 10 per class
    return 100


# -- the grouped engine -----------------------------------------------------------------------------
def _grouped_scores(model, targets, draws: Draws, eps, dt, dev, bn_stats, memory_budget, store,
                    objective_only: bool = False, strategy: str = "grouped", cuda_graph: bool = True):
    if store.get("not_groupable"):
        raise NotGroupable("the model was found not groupable before")
    net: GroupedNetwork = store.get("net")
    if net is None:
        ones = [t.mask_buffer for t in targets.values() if t.mask_buffer is not None]
        net = GroupedNetwork(model, dtype=dt, device=dev, ones_buffers=ones)
        store["net"] = net
    has_bn = net.has_batchnorm
    names = net.value_names()
    keys = _value_sources(model, targets, names)
    masks = OrderedDict((n, t.mask.to(device=dev, dtype=dt).requires_grad_(True)) for n, t in targets.items())
    total = OrderedDict((n, torch.zeros_like(m)) for n, m in masks.items())

    objective = 0.0
    sequential = strategy == "sequential"
    graphs = (cuda_graph and dev.type == "cuda" and not sequential and not objective_only and not net.shared
              and draws.perturbations is None and not store.get("graphs_off"))
    per_pass = 1 if sequential else _pieces_per_pass(net, draws, keys, masks, eps, has_bn, memory_budget, store,
                                                     graphs)
    for chunk in piece_list(draws.indices, per_pass):
        if graphs and len(chunk) == per_pass and _graphed(model, net, targets, keys, draws, chunk, masks, total, eps,
                                                          has_bn and bn_stats == "authors", store):
            continue
        with torch.set_grad_enabled(not objective_only):
            objective += _one_pass(net, targets, keys, draws, chunk, masks, total, eps, has_bn, bn_stats,
                                   objective_only, sequential)
    return (objective if objective_only else total)


def _graphed(model, net, targets, keys, draws, chunk, masks, total, eps, record, store) -> bool:
    """Run the pass of ``chunk`` by replaying its CUDA graph; False when graphs are off (the caller
    then runs it eagerly). The first replay is checked against the eager pass."""
    from . import _graph as G

    P = len(chunk)
    try:
        gp = G.graphed_pass(store, net, targets, keys, P, draws.batch_shape, draws.dtype, draws.device, eps, record,
                            {n: p.shape for n, p in model.named_parameters()}, z_dtype=draws.z_dtype)
        if gp is None:
            return False
        gp.load(*_piece_draws(draws, chunk),
                {n: draws.philox(n, chunk[0]) for n in targets}, {n: m.detach() for n, m in masks.items()},
                dict(model.named_buffers()))
        grads = gp.replay()
    except Exception as exc:  # capture refused by some op of the model: run eagerly
        G.disable(store, f"{type(exc).__name__}: {exc}")
        return False
    if not gp.checked:
        # the graph's pool and this eager pass are alive together: the one moment two passes are,
        # which _pieces_per_pass sizes for; if memory still runs out, graphs go and the caller
        # runs the pass eagerly with the graph's pool freed
        failed = None
        try:
            eager = OrderedDict((n, torch.zeros_like(m)) for n, m in masks.items())
            with torch.enable_grad():
                _one_pass(net, targets, keys, draws, chunk, masks, eager, eps, True,
                          "authors" if record else "single_pass", False, False)
        except RuntimeError as exc:  # OutOfMemoryError, or cuDNN / cuBLAS failing to allocate
            if not _out_of_memory(exc):
                raise
            failed = str(exc).splitlines()[0][:200]
        if failed is not None:  # outside the except: its traceback no longer holds the pass's tensors
            del gp, grads
            eager = None
            G.disable(store, f"out of memory checking the first replay against the eager pass ({failed})")
            torch.cuda.empty_cache()
            return False
        top = max(float(v.abs().max()) for v in eager.values()) or 1.0
        err = max(float((eager[n] - grads[n]).abs().max()) for n in eager) / top
        if not err < 1e-3:
            G.disable(store, f"the graph's first pass differs from the eager pass by {err:.2e} (relative)")
            for n in total:
                total[n] += eager[n]
            return True
        gp.checked = True
    for n in total:
        total[n] += grads[n]
    return True


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(
        s in str(exc) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def _one_pass(net, targets, keys, draws, chunk, masks, total, eps, has_bn, bn_stats, objective_only,
              sequential: bool) -> float:
    """Both branches of the pieces in ``chunk`` in one grouped call; adds the mask gradients to
    ``total`` and returns the summed squared distance."""
    P = len(chunk)
    thetas, z = _piece_draws(draws, chunk)
    values = _values(net, targets, keys, thetas, masks, draws, chunk, eps)
    x = z.unsqueeze(0).expand(2, *z.shape).reshape(2 * P * z.shape[1], *z.shape[2:])
    plan = BatchNormPlan(mode="single_pass", pieces=P)
    if has_bn and bn_stats == "authors":
        plan = BatchNormPlan(mode="record", pieces=P)
        with torch.no_grad():
            net(x[:P * z.shape[1]], {k: v[:P] for k, v in values.items()}, P, plan)
        plan.mode = "stored"
    if sequential:
        # The branches one after the other, each a plain single-network call: one piece's
        # activations at a time and no stacking copies (stacking was not faster on CPU).
        rows = P * z.shape[1]
        halves = {k: v.unbind(0) if P == 1 else v.split(P) for k, v in values.items()}
        first = {k: h[0].unsqueeze(0) if P == 1 else h[0] for k, h in halves.items()}
        second = {k: h[1].unsqueeze(0) if P == 1 else h[1] for k, h in halves.items()}
        out_a = net(x[:rows], first, P, plan)
        if plan.mode == "single_pass":
            plan.mode = "stored"
        out_b = net(x[rows:], second, P, plan)
        loss = (out_a - out_b).pow(2).sum()
    else:
        out = net(x, values, 2 * P, plan)
        o = out.reshape(2, P, -1)
        loss = (o[0] - o[1]).pow(2).sum()
    if not objective_only:
        grads = torch.autograd.grad(loss, list(masks.values()), allow_unused=True)
        for n, g in zip(masks, grads):
            if g is not None:
                total[n] += g
    return float(loss.detach())


def _piece_draws(draws: Draws, chunk):
    """theta of every piece of ``chunk`` and their inputs stacked [P, B, ...] (each piece drawn once)."""
    thetas, zs = [], []
    for i in chunk:
        thetas.append(draws.theta(i))
        zs.append(draws.z(i))
    return thetas, torch.stack(zs)


def _value_sources(model, targets, names):
    """For every value key the grouped network reads: ("target", mask name) or ("param", parameter
    name, own-mask buffer name or None)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    by_attr = {attribute_name(t.param_name): n for n, t in targets.items()}
    out = OrderedDict()
    for key in names:
        if key in by_attr:
            out[key] = ("target", by_attr[key])
        elif key in params:
            out[key] = ("param", key, None)
        elif key + "_orig" in params:
            out[key] = ("param", key + "_orig", mask_buffer_name(buffers, key, params[key + "_orig"].shape))
        else:
            raise NotGroupable(f"no parameter behind {key!r}")
    return out


def _values(net: GroupedNetwork, targets, keys, thetas: List[Dict[str, torch.Tensor]], masks, draws: Draws,
            chunk: List[int], eps: float) -> Dict[str, torch.Tensor]:
    """The [2P, ...] effective value of every key: the first P groups unperturbed, the last P perturbed."""
    values: Dict[str, torch.Tensor] = {}
    buffers = None
    for key, src in keys.items():
        if src[0] == "target":
            n = src[1]
            t = targets[n]
            w = torch.stack([th[t.param_name] for th in thetas])
            ph = draws.philox(n, chunk[0])
            if ph is not None:
                eff = ops.perturbed_masked(w, masks[n], eps, ph[0], ph[1])
            else:
                xi = torch.stack([draws.xi(n, i) for i in chunk])
                eff = torch.stack([w * masks[n], (w + eps * xi) * masks[n]])
            values[key] = eff.reshape(2 * len(chunk), *w.shape[1:])
        else:
            _, pname, buf = src
            v = torch.stack([th[pname] for th in thetas])
            if buf is not None:
                if buffers is None:
                    buffers = dict(draws.model.named_buffers())
                v = v * buffers[buf].to(v.device, v.dtype)
            values[key] = torch.cat([v, v], 0)
    if net.shared:
        net.set_shared(values)
    return values


def _pieces_per_pass(net, draws, keys, masks, eps, has_bn, memory_budget, store, graphs: bool = False) -> int:
    """How many pieces one pass evaluates: all, unless their saved activations would exceed the
    budget (memory_budget; on CPU also a cache-friendly size; on CUDA 60% of the free memory, shared
    by the passes alive at once: one eager pass, or with CUDA graphs the graph's private pool, the
    eager pass its first replay is checked against, and the capture's warm-up left in the cache)."""
    B = draws.batch_shape[0]
    per_row = store.get("bytes_per_row")
    if per_row is None:
        per_row = _saved_bytes_per_row(net, draws, keys, masks, eps, has_bn)
        store["bytes_per_row"] = per_row
    per_piece = 2 * B * per_row
    if memory_budget is not None:
        budget = memory_budget
    elif draws.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(draws.device)
        budget = int(free * 0.6) // (3 if graphs else 1)
    else:
        budget = _CPU_PASS_BYTES
    n = max(1, budget // max(per_piece, 1))
    if draws.device.type == "cuda" and memory_budget is None:
        # once per run: free memory shrinks after a CUDA graph's pool is made, and a new pass
        # size would capture another graph
        n = store.setdefault("per_pass_cuda", n)
    if memory_budget is not None and per_piece > memory_budget and not store.get("warned_budget"):
        store["warned_budget"] = True
        warnings.warn(f"memory_budget: one piece (both branches of a batch of {B}) needs about "
                      f"{per_piece / 2**20:.0f} MiB of saved activations, more than the {memory_budget / 2**20:.0f} MiB "
                      "given; evaluating one piece per pass", RuntimeWarning, stacklevel=4)
    return int(min(n, max(1, len(draws.indices))))


def _saved_bytes_per_row(net, draws: Draws, keys, masks, eps, has_bn) -> int:
    """Bytes autograd saves per input row: probes of one piece with 2 and with 4 rows per branch,
    whose difference leaves out what does not grow with the batch (the weights)."""
    theta = draws.theta(0)
    z0 = draws.z(0)
    if z0.shape[0] < 4:
        z0 = z0.repeat((4 + z0.shape[0] - 1) // z0.shape[0], *([1] * (z0.dim() - 1)))

    def saved(rows: int) -> int:
        seen: Dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except Exception:
                pass
            return t

        values = _values(net, draws.targets, keys, [theta], masks, draws, [0], eps)
        z = z0[:rows]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(torch.cat([z, z], 0), values, 2, BatchNormPlan(mode="single_pass", pieces=1))
            o = out.reshape(2, -1)
            (o[0] - o[1]).pow(2).sum()
        return sum(seen.values())

    return max(1, (saved(4) - saved(2)) // 4)
