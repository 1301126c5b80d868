"""Accuracy studies: prune at initialisation by several methods, densities and seeds, train each
pruned network, evaluate it, and append one JSON line per finished run (a *cell*).

A study is resumable: cells already in the output file with the same protocol are skipped, and a
line cut short by an interruption is dropped, so a killed study continues where it stopped and
never runs a finished cell twice. The file is read again before each cell, so several processes
may share one output file: a cell another process has finished is skipped (two processes that
start the same cell at the same moment both run it; the report counts it once).
``ntkfast report`` turns the file into tables and plots.

    from ntkfast.study import run_study
    run_study("lenet300_100", "mnist", "data/", ["random", "snip", "synflow"], [0.1, 0.01], [0, 1],
              "results.jsonl", epochs=20)
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from .core.checks import check_choice, check_number

__all__ = ["DEFAULT_ROUNDS", "run_study", "read_results", "cell_key"]

# each method's authors' iterative schedule (SynFlow and its L2 / Dist variants, iterative SNIP:
# 100 rounds; NTK-SAP: 20); every other method scores once
DEFAULT_ROUNDS = {"synflow": 100, "synflow_l2": 100, "synflow_l2_squared": 100, "synflow_dist": 100,
                  "synflow_l2_dist": 100, "iterative_snip": 100, "ntksap": 20}
NTT_DEFAULT_EPOCHS = 20.0  # the NTT authors' demos


def _protocol(**kwargs) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def cell_key(record: Mapping) -> Tuple:
    """What makes two runs the same cell: model, data, method and its settings, density, seed and
    the training protocol."""
    return (record["model"], record["dataset"], record["method"], float(record["density"]), int(record["seed"]),
            int(record["rounds"]), json.dumps(record["options"], sort_keys=True, default=str),
            json.dumps(record["protocol"], sort_keys=True))


_REQUIRED = ("model", "dataset", "method", "density", "seed", "rounds", "options", "protocol",
             "final_test_accuracy", "best_test_accuracy", "layer_density")


def read_results(path, *, repair: bool = False, name: str = "out") -> List[dict]:
    """The records of a JSON-lines results file ([] if it does not exist). A last line without its
    newline (a write cut short) is ignored, and removed from the file when ``repair`` is set; any
    other unreadable line, or a record that is not a study's, is an error naming the argument
    ``name``, the file and the line."""
    records = _read_lines(Path(path), repair, name)
    for i, rec in records:
        missing = [k for k in _REQUIRED if k not in rec] if isinstance(rec, dict) else list(_REQUIRED)
        if missing:
            raise ValueError(f"{name}: {str(path)!r} line {i + 1} is not an ntkfast study record "
                             f"(missing {', '.join(missing)})")
    return [rec for _, rec in records]


def _read_lines(path: Path, repair: bool, name: str) -> List[tuple]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_end = [], 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            if not last:
                good_end += len(line) + 1
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if last:  # the interrupted write of the last cell: it will be run again
                break
            raise ValueError(f"{name}: {str(path)!r} line {i + 1} is not a JSON record") from None
        if last:  # complete JSON but no newline: keep it, and end the line before appending
            records.append((i, rec))
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
            return records
        records.append((i, rec))
        good_end += len(line) + 1
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_list(name: str, values, kind, check) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: expected a non-empty list, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or not check(v):
            raise ValueError(f"{name}: invalid entry {v!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: duplicate entries in {values!r}")
    return out


def _prune_data(train_set, n: int, seed: int):
    """``n`` training samples drawn at random (seeded, not stratified by class), as one labelled
    batch: the pruning data of the data-based scorers (the Synaptic-Flow / NTK-SAP scripts draw
    10 × the number of classes this way)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_set), generator=g)[:n]
    x, y = next(iter(train_set.subset(idx).batches(n)))
    return x, y


def prune_cell(model_name: str, method: str, density: float, seed: int, rounds: int, options: dict,
               train_set, protocol: dict, device, start_masks=None):
    """(network, masks) of one study cell before training: the network the cell's seed draws,
    pruned as the cell prunes it (NTT: its transferred weights loaded). The same arguments give
    the same masks, so analyses of a finished study can rebuild them without storing them.
    ``start_masks`` (score-based methods only) prunes from those masks instead of the full
    network, for ablations of a cell."""
    from . import methods, models, prune

    torch.manual_seed(seed)
    net = models.get(model_name, input_shape=tuple(train_set.input_shape), num_classes=train_set.num_classes)
    net = net.to(device)
    info = methods.get(method)
    if info.single_shot and start_masks is not None:
        raise ValueError(f"start_masks: {method} selects its own masks from the dense network")
    options = dict(options)
    scope = options.pop("scope", protocol["scope"])  # NTT's cells record their own (layerwise, the authors')
    data = None
    if info.raw_data:
        data = train_set
    elif info.needs_data:
        data = _prune_data(train_set, protocol["prune_samples"], seed)
    masks = prune(net, method, density, rounds=rounds, scope=scope, data=data, seed=seed, masks=start_masks,
                  progress=False, on_empty_layer="ignore", **options)
    if masks.learned_weights is not None:  # a method that learned weights with its mask: train from both
        net.load_state_dict(masks.learned_weights)
    return net, masks


def train_cell(net, masks, train_set, test_set, protocol: dict, seed: int, device):
    """Train a pruned cell's network by the study's protocol (:func:`ntkfast.training.train`)."""
    from .training import train

    return train(net, masks, train_set, test_set, protocol["epochs"], optimizer=protocol["optimizer"],
                 lr=protocol["lr"], momentum=protocol["momentum"], weight_decay=protocol["weight_decay"],
                 batch_size=protocol["batch_size"], lr_milestones=protocol["lr_milestones"] or None,
                 device=device, seed=seed, progress=False, max_batches=protocol["max_batches"])


def _connectivity_fields(net, masks) -> dict:
    """The kept weights on an input-output path, and the live units per layer (see
    :mod:`ntkfast.connectivity`); empty where the network is beyond that analysis."""
    from .connectivity import connectivity

    try:
        c = connectivity(net, masks)
    except (ValueError, OverflowError, RuntimeError):
        return {}
    return {"effective_density": c.effective.density,
            "live_units": {n: [c.live_units[n], c.units[n]] for n in c.units}}


def _run_cell(model_name: str, method: str, density: float, seed: int, rounds: int, options: dict,
              train_set, test_set, protocol: dict, device) -> dict:
    t0 = time.perf_counter()
    net, masks = prune_cell(model_name, method, density, seed, rounds, options, train_set, protocol, device)
    prune_s = time.perf_counter() - t0
    res = train_cell(net, masks, train_set, test_set, protocol, seed, device)
    return {
        "final_test_accuracy": res.final_test_accuracy,
        "best_test_accuracy": max(res.test_accuracy) if res.test_accuracy else None,
        "test_accuracy": res.test_accuracy, "train_loss": res.train_loss,
        "achieved_density": masks.density, "layer_density": dict(masks.layer_density()),
        "empty_layers": masks.empty_layers(), **_connectivity_fields(net, masks),
        "prune_seconds": prune_s, "train_seconds": res.seconds,
    }


# set by the study itself for every cell, so not a method option
_RESERVED = {"seed", "scope", "rounds", "schedule", "data", "progress", "masks", "density", "target_density",
             "on_empty_layer", "model", "cache", "callback", "checkpoint", "checkpoint_every"}
_NTT_RESERVED = (_RESERVED - {"scope"})


def _ntt_options(model: torch.nn.Module, options: dict) -> dict:
    """The options the study's NTT cells run with: the user's, then the NTT demos' defaults (20
    epochs; λ_L2 1e-4 for an MLP, 1e-5 for a CNN; layerwise scope), recorded with each cell."""
    import inspect

    from .ntt import transfer

    bad = sorted(set(options) & _NTT_RESERVED)
    if bad:
        raise ValueError(f"method_options: ntt:{bad[0]} is set by the study itself")
    try:
        inspect.signature(transfer).bind_partial(**options)
    except TypeError:
        known = [n for n, p in inspect.signature(transfer).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n not in _NTT_RESERVED]
        unknown = sorted(set(options) - set(known))
        raise ValueError(f"method_options: ntt:{unknown[0] if unknown else '?'} is not an option of "
                         f"ntkfast.transfer (its options: {', '.join(known)})") from None
    out = dict(options)
    if "steps" not in out:
        out.setdefault("epochs", NTT_DEFAULT_EPOCHS)
    conv = any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in model.modules())
    out.setdefault("lambda_l2", 1e-5 if conv else 1e-4)  # the authors' MLP / CNN settings
    out.setdefault("scope", "layerwise")  # the authors'
    return out


def _check_method_options(method: str, options: dict) -> None:
    from . import methods as _methods

    bad = sorted(set(options) & _RESERVED)
    if bad:
        raise ValueError(f"method_options: {method}:{bad[0]} is set by the study itself")
    try:
        _methods.get(method).check_options(options)
    except ValueError as exc:
        raise ValueError(f"method_options: {method}: {exc}") from None


def run_study(model: str, dataset: str, data_dir, methods: Sequence[str], densities: Sequence[float],
              seeds: Sequence[int], out, *, epochs: int = 10, optimizer: str = "sgd", lr: Optional[float] = None,
              momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 128,
              lr_milestones: Optional[Sequence[int]] = None, scope: str = "global",
              rounds: Optional[Mapping[str, int]] = None, method_options: Optional[Mapping[str, dict]] = None,
              prune_samples: Optional[int] = None, train_subset: Optional[int] = None,
              test_subset: Optional[int] = None, max_batches: Optional[int] = None, device=None,
              progress: bool = True, datasets=None) -> List[dict]:
    """Run every (method, density, seed) cell not yet in ``out`` and append its record there.

    Per cell: a fresh ``model`` initialised with ``torch.manual_seed(seed)`` (so every method of one
    seed prunes the same network), pruned by ``method`` to ``density`` (``rounds[method]`` rounds,
    default :data:`DEFAULT_ROUNDS`; ``method_options[method]`` passed to it; data-based scorers
    see ``prune_samples`` random training samples, default 10 per class; "ntt" runs
    :func:`ntkfast.transfer` and trains from its learned weights), then trained ``epochs`` epochs
    by :func:`ntkfast.training.train` and evaluated on the test set after each.

    ``train_subset`` / ``test_subset`` use only the first N images (a reduced run, recorded as
    such). ``datasets``: an already loaded ``(train_set, test_set)`` instead of ``dataset`` and
    ``data_dir`` (``dataset`` is then only the label). Returns the records of the requested cells
    (earlier and new)."""
    from . import models
    from . import methods as _methods
    from .core.machine import machine_info
    from .core.progress import Progress
    from ._version import __version__
    from .training import DEFAULT_LR, OPTIMIZERS

    if model not in models.available():
        raise ValueError(f"model: unknown {model!r}; see ntkfast.models.available()")
    methods = _check_list("methods", methods, str, lambda m: True)
    for m in methods:
        if m != "ntt":
            _methods.get(m)  # an unknown method fails here, naming it, before any cell runs
    densities = [float(d) for d in _check_list("densities", densities, (int, float), lambda d: 0 < d <= 1)]
    seeds = _check_list("seeds", seeds, int, lambda s: True)
    rounds = dict(rounds or {})
    method_options = {k: dict(v) for k, v in (method_options or {}).items()}
    for name, where in (("rounds", rounds), ("method_options", method_options)):
        unknown = [k for k in where if k not in methods]
        if unknown:
            raise ValueError(f"{name}: {unknown} not among the study's methods {methods}")
    for k, r in rounds.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rounds: {k}={r!r} is not a positive int")
    if "ntt" in rounds:
        raise ValueError("rounds: ntt runs once (its options: method_options['ntt'], e.g. epochs)")
    for m, opts in method_options.items():
        if m != "ntt":
            _check_method_options(m, opts)
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("prune_samples", prune_samples),
                    ("train_subset", train_subset), ("test_subset", test_subset), ("max_batches", max_batches)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    # the trainer's own checks, before any cell runs; numbers normalised so that lr=None and
    # lr=0.1, or 0 and 0.0, are the same protocol when a study resumes
    lr = DEFAULT_LR[optimizer] if lr is None else check_number(lr, "lr", lo=0.0, lo_open=True)
    momentum = check_number(momentum, "momentum", lo=0.0)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0)
    try:
        lr_milestones = sorted(int(m) for m in (lr_milestones or []))
    except (TypeError, ValueError):
        raise ValueError(f"lr_milestones must be a sequence of epoch numbers, got {lr_milestones!r}") from None
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked, but torch.cuda.is_available() is False")

    if datasets is None:
        from . import data as D

        train_set = D.load_dataset(dataset, data_dir, train=True)
        test_set = D.load_dataset(dataset, data_dir, train=False)
        dataset = train_set.name or dataset  # "fmnist" and "fashion-mnist" are one study
    else:
        train_set, test_set = datasets
    if train_subset:
        train_set = train_set.subset(min(train_subset, len(train_set)))
    if test_subset:
        test_set = test_set.subset(min(test_subset, len(test_set)))
    protocol = _protocol(epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         batch_size=batch_size, lr_milestones=lr_milestones, scope=scope,
                         prune_samples=prune_samples or 10 * train_set.num_classes, train_subset=train_subset,
                         test_subset=test_subset, max_batches=max_batches)

    out = Path(out)
    existing = read_results(out, repair=True)
    done = {cell_key(r): r for r in existing}
    if "ntt" in methods:
        ntt_options = _ntt_options(models.get(model, input_shape=tuple(train_set.input_shape),
                                              num_classes=train_set.num_classes), method_options.get("ntt", {}))
    cells = []
    for seed in seeds:
        for density in densities:
            for method in methods:
                r = 1 if method == "ntt" else rounds.get(method, DEFAULT_ROUNDS.get(method, 1))
                options = ntt_options if method == "ntt" else method_options.get(method, {})
                head = {"model": model, "dataset": dataset, "method": method, "density": density, "seed": seed,
                        "rounds": r, "options": options, "protocol": protocol}
                cells.append(head)
    todo = [c for c in cells if cell_key(c) not in done]
    machine = machine_info(device)
    bar = Progress(len(todo), desc="study", enabled=progress)
    if progress and len(todo) < len(cells):
        bar.write(f"study: {len(cells) - len(todo)} of {len(cells)} cells already in {out}; running the other {len(todo)}")
    try:
        for head in todo:
            # another process appending to the same file may have finished this cell meanwhile;
            # not repairing here, since a last line without its newline may be its write in flight
            done.update((cell_key(r), r) for r in read_results(out))
            if cell_key(head) in done:
                bar.update(1, cell=f"{head['method']} d={head['density']:g} seed={head['seed']} (done elsewhere)")
                continue
            bar.update(0, cell=f"{head['method']} d={head['density']:g} seed={head['seed']}")
            result = _run_cell(model, head["method"], head["density"], head["seed"], head["rounds"], head["options"],
                               train_set, test_set, protocol, device)
            record = {**head, **result, "machine": machine, "ntkfast": __version__,
                      "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            _append(out, record)
            done[cell_key(record)] = json.loads(json.dumps(record, default=str))
            bar.update(1, acc=result["final_test_accuracy"])
    finally:
        bar.close()
    return [done[cell_key(c)] for c in cells]
