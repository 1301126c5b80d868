"""The pruning loop: score, threshold, repeat over a density schedule."""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from .core.checks import check_choice, check_density, check_int, check_mask, check_seed
from .methods import get as method_info
from ._version import __version__
from .core.compiled import plain_name, unwrap
from .core.exclude import ExcludeSpec, resolve_exclude
from .core.options import KeepRule, NmLayout, OnEmptyLayer, OnIndivisible, Schedule, Scope, choices
from .core.batches import cast_input
from .core.state import RunCache, output_tensor
from .core.targets import mask_buffer_name
from .masks import (Masks, _nm_round, _nm_short_groups, nm_misfit, parse_structure, prunable_parameters,
                    round_density, threshold, unpruned_weights)
from .core.concurrency import holds_model
from .core.progress import check_progress, progress_bar

_log = logging.getLogger(__name__)

_SCHEDULES = choices(Schedule)
_SCOPES = choices(Scope)
_ON_EMPTY = choices(OnEmptyLayer)
_NM_LAYOUTS = choices(NmLayout)
_ON_INDIVISIBLE = choices(OnIndivisible)


class LayerCollapseError(RuntimeError):
    """A layer lost all its weights while on_empty_layer='error'."""


# set by the loop itself, never a method option (scope and process_group are prune()'s own
# arguments; a cache the user passes is used instead of the loop's fresh one)
_SUPPLIED = ("target_density",)


def _check_start_masks(masks: Mapping, start: Masks) -> Masks:
    """The start masks: ``masks`` where given (any subset of the prunable weights, keyed by the
    original names or a compiled model's), ``start`` (all kept) for the weights it leaves out."""
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a mapping name -> bool tensor, got {type(masks).__name__}")
    given = {}
    for key in masks:
        name = plain_name(key) if isinstance(key, str) else key
        if name not in start:
            raise ValueError(f"masks: {key!r} is not a prunable weight of the model (those are "
                             f"{', '.join(list(start)[:6])}{' ...' if len(start) > 6 else ''})")
        if name in given:
            raise ValueError(f"masks: {key!r} and another key name the same weight {name!r}")
        given[name] = key
    out = {}
    for name in start:
        if name not in given:
            out[name] = start[name].clone()
            continue
        key = given[name]
        m = masks[key]
        if not isinstance(m, torch.Tensor) or m.shape != start[name].shape:
            raise ValueError(f"masks[{key!r}] must be a tensor of shape {tuple(start[name].shape)}")
        out[name] = check_mask(m, f"masks[{key!r}]").to(device=start[name].device).clone()
    return Masks(out)


def _existing_masks(model: nn.Module, masks: Masks) -> Masks:
    """``masks`` AND the ``<attr>_mask`` buffers the model already carries (torch.nn.utils.prune
    hooks, or masked layers in the authors' style), so weights pruned there never come back."""
    buffers = {plain_name(n): b for n, b in model.named_buffers()}  # a compiled submodule's too
    out = {}
    for name, m in masks.items():
        bname = mask_buffer_name(buffers, name, m.shape)
        out[name] = m & check_mask(buffers[bname], f"model: buffer {bname}").to(m.device) if bname is not None else m
    return Masks(out)


def _fused_in_proj(model: nn.Module, names) -> list:
    """The names among ``names`` of nn.MultiheadAttention's fused q/k/v weights."""
    mods = {plain_name(n): m for n, m in unwrap(model).named_modules()}  # a compiled submodule's too
    return [n for n in names if n.endswith(".in_proj_weight") and
            isinstance(mods.get(n[: -len(".in_proj_weight")]), nn.MultiheadAttention)]


def _split_qkv(tensors: Mapping[str, torch.Tensor], fused) -> dict:
    """``tensors`` with each fused q/k/v weight in ``fused`` as three entries ``<name>[q]``, ``[k]``,
    ``[v]`` (its row blocks), in place of the one, the order otherwise kept."""
    if not fused:
        return dict(tensors)
    out = {}
    for n, t in tensors.items():
        if n in fused:
            out.update({f"{n}[{part}]": rows for part, rows in zip("qkv", t.chunk(3, 0))})
        else:
            out[n] = t
    return out


def _merge_qkv(tensors: Mapping[str, torch.Tensor], fused) -> dict:
    out = {n: t for n, t in tensors.items() if not n.endswith(("[q]", "[k]", "[v]"))}
    for n in fused:
        out[n] = torch.cat([tensors[f"{n}[{part}]"] for part in "qkv"], 0)
    return out


def _check_data_fits(model: nn.Module, batches) -> None:
    """One no-grad eval-mode forward of a single example, so a wrong input shape fails here, named."""
    x, y = batches[0]
    # the scorers cast floating inputs to the dtype they compute in (the model's): so does the probe
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    x = cast_input(x, p.dtype) if p is not None else x
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(x[:1])
    except Exception as exc:
        raise ValueError(f"data: inputs of shape {tuple(x.shape)} do not fit the model: {exc}") from None
    finally:
        for m, t in flags.items():
            m.training = t
    out = output_tensor(out)
    # per-sample classes [N, classes], or per-position ones with targets [N, T]: [N, T, classes]
    # (Hugging Face's) or [N, classes, T] (PyTorch's cross_entropy layout)
    sequence = isinstance(out, torch.Tensor) and out.dim() == 3 and y.dim() == 2
    last = sequence and out.shape[1] == y.shape[1]
    if not isinstance(out, torch.Tensor) or (out.dim() != 2 and not (last or (sequence and out.shape[2] == y.shape[1]))):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"data: the model's output for these inputs is {shape}, expected a tensor [N, classes] (or "
                         "[N, T, classes] with targets [N, T])")
    if last and out.shape[2] == y.shape[1]:
        raise ValueError(f"data: the model's output {tuple(out.shape)} with targets {tuple(y.shape)} can be read two "
                         "ways (classes last or second); use a sequence length other than the number of classes")
    classes = out.shape[-1] if last else out.shape[1]
    for xb, yb in batches:
        if yb.numel() and (int(yb.min()) < 0 or int(yb.max()) >= classes):
            raise ValueError(f"data: targets must lie in [0, {classes}), got range [{int(yb.min())}, {int(yb.max())}]")


def _method_masks(method: str, result, current: Masks):
    """(masks, learned weights) from a method declared ``returns="masks"``, its masks held to the
    model's prunable weights and to what was already pruned."""
    masks = getattr(result, "masks", None)
    if not isinstance(masks, Mapping) or set(masks) != set(current):
        got = sorted(masks) if isinstance(masks, Mapping) else type(result).__name__
        raise RuntimeError(f"method {method!r} returned masks for {got}, expected {sorted(current)}")
    for n in current:
        m = masks[n]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(current[n].shape):
            raise RuntimeError(f"method {method!r} returned for {n!r} "
                               f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}, expected a "
                               f"mask of shape {tuple(current[n].shape)}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise RuntimeError(f"method {method!r} returned for {n!r} values other than 0 and 1: masks, not scores")
    out = Masks({n: masks[n].to(current[n].device).bool() & current[n] for n in current})
    return out, getattr(result, "weights", None)


def _structured_density(density, structure: str, n: int, m: int) -> float:
    """The density of an N:M structure, N/M: ``density`` may be None or N/M itself, nothing else
    (a different number would be overridden silently, or mean a structure the user did not ask
    for)."""
    if density is None:
        return n / m
    density = check_density(density)
    if not math.isclose(density, n / m, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"density: {density:g}, but structure {structure!r} keeps {n} of every {m} weights, a density "
                         f"of {n / m:g}; pass density=None (or {n / m:g})")
    return n / m


def _round_seeds(seed: int, rounds: int) -> Iterator[int]:
    """The seed of each round, drawn as the rounds go (the CPU generator's stream is the same in
    blocks as at once): memory stays flat however many rounds are asked for."""
    g = torch.Generator().manual_seed(int(seed))
    left = rounds
    while left > 0:
        block = min(left, 1024)
        yield from (int(s) for s in torch.randint(0, 2**62, (block,), generator=g).tolist())
        left -= block


@holds_model
def prune(
    model: nn.Module,
    method: str,
    density: Optional[float],
    *,
    rounds: int = 1,
    schedule: Schedule = "exponential",
    scope: Scope = "global",
    data=None,
    seed: int = 0,
    progress: Optional[bool] = None,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    exclude: Optional[ExcludeSpec] = None,
    include_bias: bool = False,
    include_norm: bool = False,
    include: Optional[ExcludeSpec] = None,
    split_qkv: bool = False,
    on_empty_layer: OnEmptyLayer = "warn",
    keep_rule: KeepRule = "exact",
    process_group=None,
    invert: bool = False,
    structure: Optional[str] = None,
    channel_aggregate: str = "sum",
    nm_layout: NmLayout = "channels",
    on_indivisible: OnIndivisible = "error",
    **method_options,
) -> Masks:
    """Prune ``model`` to ``density`` (fraction of prunable weights kept) with a registered scorer.

    Each of ``rounds`` rounds rescores the masked network and keeps the highest scores at the
    round's density: exponential d_t = density^(t/rounds) (default) or linear
    d_t = 1 - (1 - density) t / rounds; ``scope`` "global" thresholds all weights at once,
    "layerwise" each tensor. Pruned weights never come back. ``data`` is a labelled batch
    ``(inputs, targets)`` or an iterable of them, for the methods that need one. ``masks`` starts
    from existing masks (any subset of the prunable weights; those left out start with every
    weight kept). Extra keyword arguments go to the scorer (``ntkfast methods`` lists them).

    ``exclude`` keeps layers dense, as Synaptic-Flow's ``--dense-classifier`` and torch-pruning's
    ``ignored_layers`` do: layer or weight names (shell patterns such as ``"classifier.*"``
    allowed), module types (``nn.Linear``), modules of the model, a predicate
    ``f(name, module) -> bool``, or a list of these (see :mod:`ntkfast.core.exclude`; a name that
    picks nothing is refused). The method still runs the whole network, excluded layers included;
    their masks are left as the start masks have them (all kept by default). ``density`` is the
    fraction kept of the *other* weights, as in the Synaptic-Flow and NTK-SAP code, where a dense
    layer is not among the masked parameters at all. The result holds every prunable weight, the
    excluded ones too: ``masks.density`` counts them as kept, ``masks.pruned_density`` is the
    density over the pruned weights, and ``masks.metadata["exclude"]`` names them.
    :func:`ntkfast.masks.last_linear` names the classifier of most networks.

    ``include`` makes weights prunable that are not by default: an ``nn.Embedding``'s table, a
    ``ConvTranspose``'s weight, an RNN/LSTM/GRU's ``weight_ih_l*`` / ``weight_hh_l*``,
    ``nn.MultiheadAttention``'s fused ``in_proj_weight`` (one mask over its q, k and v rows), any
    parameter of two or more dimensions; picked as ``exclude`` picks (names, patterns, module
    types, modules, a predicate). They are then scored and pruned like the rest
    (``masks.metadata["include"]`` names them). ``exclude`` acts after ``include``: a weight
    picked by both stays dense. A method that chooses its own masks gets the included names
    where it takes them (NTT does) and otherwise refuses ``include``.
    ``split_qkv=True`` ranks the query, key and value rows of each included ``in_proj_weight`` as
    three layers (a layerwise scope prunes each to the density; emptied ones are named
    ``<name>[q]``, ``[k]``, ``[v]``); the default treats the fused tensor as one layer.

    A model compiled with ``torch.compile`` is pruned as its original module, and the masks are
    keyed by the original names: they apply to the compiled model and to the plain one.

    ``keep_rule="exact"`` keeps exactly round(d_t * numel) weights each round (ties broken by
    position); ``"authors"`` reproduces the Synaptic-Flow / NTK-SAP masking step bit for bit
    (their count, and every weight tied at the threshold pruned), see
    :func:`ntkfast.masks.threshold`.

    ``invert=True`` is the inverted-scores sanity check (Frankle et al. 2021; ``--invert`` of the
    NTK-SAP and Synaptic-Flow code): each round keeps the *lowest*-scoring weights. The authors
    rank by 1/score, which for the positive scores of SNIP, SynFlow, NTK-SAP and magnitude is the
    same order as ours, -score; for GraSP's signed scores we keep the lowest, where 1/score would
    rank each sign apart. See also :mod:`ntkfast.sanity`.

    ``structure="N:M"`` (e.g. ``"2:4"``) makes the masks N:M semi-structured: exactly N kept in
    every group of M consecutive weights along each weight's input dimension (where the groups run,
    and ``nm_layout`` for convolutions: :func:`ntkfast.masks.nm_masks`). The density of the pruned
    weights is then N/M by construction: pass ``density=None`` or N/M itself; any other value is
    refused rather than silently overridden. With ``rounds > 1`` each round still rescores and
    prunes along the schedule toward N/M, but never below N alive weights in any group: a round
    keeps every group's N best and then the best of the rest up to the round's density (over all
    structured layers or per layer, as ``scope`` says); the last round keeps exactly the N best of
    each group. So the result is exactly N:M whatever the schedule, while the scores still respond to
    the earlier pruning, which is what iterative methods are for. ``scope`` cannot change the
    structure, since each group's selection is its own: with one round it changes nothing, with
    several it decides where the earlier rounds prune. A weight whose input dimension is not a
    multiple of M is named in a ValueError before any scoring (``on_indivisible="error"``); with
    ``on_indivisible="unstructured"`` it is pruned without the structure, to the same density N/M
    along the same schedule (thresholded as ``scope`` says among such weights alone), and named in
    ``masks.metadata["unstructured"]``. ``exclude`` keeps weights dense as usual. Refused with a
    structure: ``keep_rule="authors"`` (a tie rule with no N:M form) and methods that choose their
    own masks. Start masks (``masks=``, or the model's mask buffers) that leave a group fewer than
    N weights leave it fewer than N kept, with a warning naming the weights.

    ``progress``: a bar of the rounds with their rate, ETA and density; None (default) shows it
    on a terminal, elsewhere only once the pruning has run a couple of seconds; False never (see
    :mod:`ntkfast.core.progress`).

    The model is never changed: apply the result with ``masks.apply(model)``. A layer that loses
    every weight is reported by name (``on_empty_layer``: "warn", "error" or "ignore").

    ``process_group`` (default: the world group when ``torch.distributed`` is initialised; False:
    none): the scorers that split their work (ntksap, snip, iterative_snip, grasp; ntt trains one
    student data-parallel) split it over the group's processes; the others compute on every
    process and rank 0's scores are broadcast. Every process must pass the same model, masks and data
    (checked) and ends with the same masks. See :mod:`ntkfast.distributed`.

    ``structure="channel"``: whole output channels (filters) of the Conv/Linear layers kept or
    pruned, channels that must go together (a convolution and the layers summed with it in a
    residual block) together, each round ranking channels by ``channel_aggregate`` ("sum",
    "mean", "l2", "max") of their weights' scores; see :func:`ntkfast.structured.channel_masks`.
    ``density`` is then the fraction of the Conv/Linear weights kept, pruned channels' filters and
    the input slices that read them counted; whole channels reach it in steps, and
    ``masks.metadata["achieved_density"]`` reports where they land. The classifier's outputs are
    never pruned. The model is traced once with the first batch of ``data`` (or random inputs of
    ``model.input_shape``). :func:`ntkfast.structured.export_torch_pruning` removes the pruned
    channels physically.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)  # a torch.compile'd model: its original module, whose names the masks take
    info = method_info(method)
    check_choice(nm_layout, "nm_layout", _NM_LAYOUTS)
    check_choice(on_indivisible, "on_indivisible", _ON_INDIVISIBLE)
    # "channel" is ntkfast.structured's; any other structure is read as N:M
    nm = parse_structure(structure) if structure is not None and structure != "channel" else None
    if nm is None and (nm_layout != "channels" or on_indivisible != "error"):
        raise ValueError(f"{'nm_layout' if nm_layout != 'channels' else 'on_indivisible'}: applies to an N:M "
                         f"structure, and structure is {structure!r}")
    density = _structured_density(density, structure, *nm) if nm is not None else check_density(density)
    rounds = check_int(rounds, "rounds", lo=1)
    check_choice(schedule, "schedule", _SCHEDULES)
    check_choice(scope, "scope", _SCOPES)
    check_choice(on_empty_layer, "on_empty_layer", _ON_EMPTY)
    check_choice(keep_rule, "keep_rule", choices(KeepRule))
    seed = check_seed(seed)
    check_progress(progress)
    if not isinstance(invert, bool):
        raise TypeError(f"invert: expected True or False, got {type(invert).__name__}")
    if invert and info.returns == "masks":
        raise ValueError(f"invert: {method} chooses its masks itself; it has no scores to invert")
    if nm is not None and info.returns == "masks":
        raise ValueError(f"structure: {method} chooses its masks itself; it has no scores to select N:M from")
    if nm is not None and keep_rule == "authors":
        raise ValueError("keep_rule: 'authors' reproduces the Synaptic-Flow / NTK-SAP masking step, which has no N:M "
                         "form; use keep_rule='exact' with a structure")
    supplied = [k for k in _SUPPLIED if k in method_options]
    if supplied:
        raise ValueError(f"{supplied[0]}: set by prune() itself (its density schedule and scope), not a method option")
    info.check_options(method_options)
    from .distributed import resolve as resolve_shard

    shard = resolve_shard(process_group)
    if include is not None and info.returns == "masks" and "include" not in info.takes:
        raise ValueError(f"include: method {method!r} chooses its own masks over the Linear and Conv weights; it does "
                         "not take include")
    current = _existing_masks(model, Masks.ones(model, include_bias=include_bias, include_norm=include_norm,
                                                include=include))
    prunable = prunable_parameters(model, include_bias=include_bias, include_norm=include_norm, include=include)
    if include is None:
        included = []
    else:
        default = set(prunable_parameters(model, include_bias=include_bias, include_norm=include_norm))
        included = [n for n in prunable if n not in default]
    excluded = resolve_exclude(model, exclude, list(current))
    dense = frozenset(excluded)
    scored = [n for n in current if n not in dense]
    if not scored:
        raise ValueError(f"exclude: keeps every prunable weight dense ({', '.join(excluded[:6])}"
                         f"{' ...' if len(excluded) > 6 else ''}); nothing is left to prune")
    if not isinstance(split_qkv, bool):
        raise ValueError(f"split_qkv: expected True or False, got {split_qkv!r}")
    fused = _fused_in_proj(model, scored) if split_qkv else []
    if split_qkv and not fused:
        raise ValueError("split_qkv: no nn.MultiheadAttention in_proj_weight is pruned (include it with "
                         "include=nn.MultiheadAttention)")
    if include is not None and structure == "channel":
        raise ValueError("include: structure='channel' ranks the output channels of Conv and Linear layers; the "
                         "weights include= adds have none it traces")
    if fused and structure is not None:
        raise ValueError(f"split_qkv: applies to unstructured masks, and structure is {structure!r}")
    structured = list(scored)
    if nm is not None:
        misfits = {k: why for k in scored if (why := nm_misfit(current[k].shape, nm[1], nm_layout)) is not None}
        # a weight include= added (an embedding table, transformers' Conv1D stored [in, out]): where
        # its input dimension lies is not known, so N:M groups along dimension 1 could run across outputs
        mods = {plain_name(n): m for n, m in unwrap(model).named_modules()}
        for k in scored:
            owner = mods.get(k.rpartition(".")[0])
            if (k not in misfits and current[k].dim() >= 2 and k.endswith(".weight")
                    and not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd))):
                misfits[k] = f"{type(owner).__name__} weight: N:M cannot tell which dimension is its input"
        if misfits and on_indivisible == "error":
            listed = ", ".join(f"{k!r} ({why})" for k, why in misfits.items())
            raise ValueError(f"structure: {structure} groups run along each weight's input dimension ({nm_layout} "
                             f"layout), whose length must be a multiple of {nm[1]}; not so for {listed}. Keep them "
                             f"dense with exclude={list(misfits)!r}, or prune them without the structure with "
                             "on_indivisible='unstructured'")
        structured = [k for k in scored if k not in misfits]
    if excluded and info.returns == "masks" and "exclude" not in info.takes:
        raise ValueError(f"exclude: method {method!r} chooses its own masks and does not take exclude")
    left = unpruned_weights(model, prunable)
    if left:
        listed = ", ".join(f"{n} ({t})" for n, t in list(left.items())[:8]) + (" ..." if len(left) > 8 else "")
        warnings.warn(f"prune: {len(left)} weight tensor(s) of layers ntkfast does not prune stay dense: {listed}. "
                      "Prunable are the weights of Linear and Conv1d/2d/3d modules (and their subclasses); "
                      "include= adds others.",
                      RuntimeWarning, stacklevel=2)
    if info.single_shot and (rounds > 1 or masks is not None):
        # such a method (NTT) learns its mask in one go from the dense model: refuse before it runs
        raise ValueError(f"rounds: method {method!r} runs once from the dense model; use rounds=1 and no start masks")
    if info.needs_data and data is None:
        raise ValueError(f"data: method {method!r} needs a labelled batch (inputs, targets) or an iterable of them")

    def checked_inputs():
        start, batches = current, data
        if masks is not None:
            start = _existing_masks(model, _check_start_masks(masks, start))
        if batches is not None and not info.raw_data:
            from .core.batches import as_batches
            from .core.targets import model_device

            # once: a generator can be read only once, and every round must score the same batches;
            # moved to the model's device only for methods that compute on it (SynFlow reads a shape)
            batches = as_batches(batches, name="data", device=model_device(model) if info.needs_data else None)
            _check_data_fits(model, batches)
        return start, batches

    # checks whose outcome may differ between processes (their own masks and data): agreed on, so
    # that no process goes on into a collective that another has left
    current, data = shard.run(checked_inputs)
    if shard.split:
        shard.check_same_model(model)
        shard.check_same("masks", current)
        if data is not None and not info.raw_data:
            shard.check_same("data", {f"batch {i} {part}": t for i, batch in enumerate(data)
                                      for part, t in zip(("inputs", "targets"), batch)})

    # -- structure="channel": whole channels (ntkfast.structured) ---------------------------------
    channel_plan = None
    if structure == "channel" or channel_aggregate != "sum":
        from .structured.prune_support import channel_plan_for

        channel_plan = channel_plan_for(model, None if nm else structure, channel_aggregate, method=method, info=info,
                                        keep_rule=keep_rule, data=data)
    # -------------------------------------------------------------------------------------------

    # the loop's values a method declared it takes (ntkfast.methods): the scope, a per-run cache
    # for work that does not change between rounds, and the process group (every method has one:
    # methods.register gives it to those whose work does not split)
    run_options = dict(method_options)
    if "scope" in info.takes:
        run_options["scope"] = scope
    if "cache" in info.takes and "cache" not in run_options:
        run_options["cache"] = RunCache()
    run_options["process_group"] = process_group
    if excluded:  # every method takes it (methods.register): scores only for the other weights
        run_options["exclude"] = list(excluded)
    if included and "include" in info.takes:
        run_options["include"] = list(included)

    densities = (round_density(density, t, rounds, schedule) for t in range(1, rounds + 1))
    # a method that runs once gets the seed as given (prune(..., "ntt", seed=s) is transfer(..., seed=s));
    # iterative ones a seed per round drawn from it
    seeds = [seed] if info.single_shot else _round_seeds(seed, rounds)
    bar = progress_bar(rounds, f"prune {method}", progress=progress, active=shard.rank == 0, unit="round")
    score_s = 0.0
    learned = None
    try:
        for t, (d, s) in enumerate(zip(densities, seeds), start=1):
            t0 = time.perf_counter()
            if "target_density" in info.takes:  # a method that chooses its own mask of this density
                run_options["target_density"] = d
            out = info.fn(model, current, data=data, seed=s, **run_options)
            score_s += time.perf_counter() - t0
            if info.returns == "masks":
                chosen, learned = _method_masks(method, out, current)
                current = Masks({n: current[n] if n in excluded else m for n, m in chosen.items()})
            else:
                if set(out) != set(scored):
                    raise RuntimeError(f"scorer {method!r} returned scores for {sorted(out)}, expected {sorted(scored)}")
                if channel_plan is not None:  # structure="channel": the plan ranks (and inverts) whole channels
                    new = channel_plan.select(out, d, keep=current, scope=scope, invert=invert)
                else:
                    if invert:  # the sanity check: rank from the bottom (pruned ones stay pruned: keep=)
                        out = {n: -v for n, v in out.items()}
                    # the density is of the scored weights: the excluded ones are not in the count
                    alive = {n: current[n] for n in scored}
                    if nm is not None:
                        new = _nm_round(out, d, *nm, keep=alive, structured=structured, scope=scope,
                                        layout=nm_layout, last=t == rounds)
                    else:
                        new = _merge_qkv(threshold(_split_qkv(out, fused), d, keep=_split_qkv(alive, fused),
                                                   scope=scope, keep_rule=keep_rule), fused)
                current = Masks({n: new.get(n, m) for n, m in current.items()})
            # the density is a host sync per mask tensor: only worked out for a bar or log that shows it
            if bar.silenced:
                bar.update(1)
            else:
                bar.update(1, density=current.density)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("prune %s: round %d of %d, density %.4g, %.2f s scoring", method, t, rounds,
                           current.density, score_s)
    finally:
        bar.close()

    current.learned_weights = learned
    current.metadata = {
        "method": method,
        "version": __version__,
        "density": density,
        "rounds": rounds,
        "schedule": schedule,
        "scope": scope,
        "keep_rule": keep_rule,
        "seed": seed,
        "score_seconds": score_s,
        "options": {k: v for k, v in method_options.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "processes": shard.size,
    }
    if excluded:
        current.metadata["exclude"] = list(excluded)
    if included:
        current.metadata["include"] = included
    if fused:
        current.metadata["split_qkv"] = True
    if invert:
        current.metadata["invert"] = True
    if channel_plan is not None:  # structure="channel"
        current.metadata.update(channel_plan.last_metadata)
    if nm is not None:
        current.metadata.update(structure=f"{nm[0]}:{nm[1]}", nm_layout=nm_layout)
        loose = [k for k in scored if k not in structured]
        if loose:
            current.metadata["unstructured"] = loose
    if shard.split:
        shard.check_same("prune: the resulting masks", current)
    if nm is not None:
        short = [k for k in structured if _nm_short_groups(current[k], *nm, nm_layout)]
        if short:
            warnings.warn(f"prune: some {nm[0]}:{nm[1]} groups of {', '.join(short)} keep fewer than {nm[0]} weights: the "
                          f"start masks (masks=, or the model's mask buffers) left them fewer than {nm[0]} that may be "
                          "kept", RuntimeWarning, stacklevel=2)
    empty = current.empty_layers()
    empty += [f"{n}[{part}]" for n in fused if n not in empty
              for part, rows in zip("qkv", current[n].chunk(3, 0)) if not rows.any()]
    if empty and on_empty_layer != "ignore":
        msg = f"prune: {len(empty)} layer(s) lost all their weights: {', '.join(empty)}"
        if on_empty_layer == "error":
            raise LayerCollapseError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return current
