"""Run a published setting (:mod:`ntkfast.presets`) and set our numbers beside the published ones.

:func:`reproduce` prunes and trains the preset's grid through :func:`ntkfast.study.run_study`, one
cell at a time, into a study file it resumes like ``ntkfast study``; with ``budget_s`` it starts a
cell only when the cells it has timed say it will end in time, so a short GPU window finishes
whole cells. :func:`compare` reads the records back and sets each cell's mean accuracy over seeds
beside the published figure, the difference also in units of the seeds' spread.

A reduced run (``epochs``, ``train_subset``, ``max_batches`` below the preset's) is recorded as
such in the protocol, and :func:`compare` says so: it is not the paper's protocol. Fewer epochs
keep the schedule's shape: the learning-rate drops move to the same fractions of the run
(:func:`scaled_milestones`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from . import presets as _presets

__all__ = ["reproduce", "compare", "Comparison", "format_comparison", "plot_comparison"]


@dataclass(frozen=True)
class Comparison:
    """One (method, density) cell: ours over ``seeds`` runs, and the published figure (None where
    the preset has none). ``z``: (ours - published) / our seeds' standard deviation, where there
    are two seeds or more and they differ."""

    method: str
    density: float
    seeds: int
    ours: float
    ours_std: Optional[float]
    published: Optional[float]
    difference: Optional[float]
    z: Optional[float]


def _pick(name: str, given, allowed: Sequence, same) -> list:
    if given is None:
        return list(allowed)
    if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
        raise ValueError(f"{name}: expected a list, got {given!r}")
    given = list(given)
    if not given:
        raise ValueError(f"{name}: expected at least one value")
    out = []
    for g in given:
        match = [a for a in allowed if same(a, g)]
        if not match:
            raise ValueError(f"{name}: {g!r} is not in the preset's grid ({', '.join(map(_short, allowed))})")
        out.append(match[0])
    return out


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _same_density(a: float, b) -> bool:
    # the grids' points lie 20% or more apart, so a value as printed (4 digits) finds its point
    return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isclose(a, float(b), rel_tol=1e-3)


def scaled_milestones(milestones: Sequence[int], epochs: int, run_epochs: int) -> List[int]:
    """The preset's learning-rate drops for a run of ``run_epochs`` instead of ``epochs``: at the
    same fractions of the run (rounded), so a reduced run keeps the schedule's shape rather than
    training at the first rate throughout; drops that fall on or past the last epoch are dropped."""
    if run_epochs >= epochs:
        return [m for m in milestones if m < run_epochs]
    return [m for m in sorted({max(1, round(m * run_epochs / epochs)) for m in milestones}) if m < run_epochs]


def _study_kwargs(p: "_presets.Preset", epochs: Optional[int], device, progress, train_subset,
                  test_subset, max_batches, datasets) -> dict:
    return dict(
        epochs=epochs or p.epochs, optimizer=p.optimizer, lr=p.lr,
        momentum=p.momentum if p.optimizer == "sgd" else 0.0, weight_decay=p.weight_decay,
        batch_size=p.batch_size, lr_milestones=scaled_milestones(p.lr_milestones, p.epochs, epochs or p.epochs),
        scope=p.scope, nesterov=p.nesterov, lr_gamma=p.lr_gamma, augment=p.augment,
        prune_samples=None,  # run_study's default: 10 per class, the authors' prune set (NTT reads its own data)
        train_subset=train_subset, test_subset=test_subset, max_batches=max_batches, device=device,
        progress=progress, datasets=datasets)


def cells_of(methods, densities, seeds):
    """The grid's cells (method, density, seed), seed-major: a stopped run leaves whole seeds of
    the grid behind it."""
    return [(m, d, seed) for seed in seeds for d in densities for m in methods]


def reproduce(preset, data_dir, out, *, methods: Optional[Sequence[str]] = None,
              densities: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None,
              epochs: Optional[int] = None, budget_s: Optional[float] = None, device=None,
              progress: Optional[bool] = None, train_subset: Optional[int] = None,
              test_subset: Optional[int] = None, max_batches: Optional[int] = None, datasets=None,
              engine: Optional[dict] = None) -> List[dict]:
    """Prune and train the cells of ``preset`` (a name or a :class:`~ntkfast.presets.Preset`)
    not yet in the study file ``out``; returns the records of the chosen cells that are there.

    ``methods``, ``densities``, ``seeds``: a part of the preset's grid (default: all of it; the
    seeds default to the preset's). ``epochs``, ``train_subset``, ``test_subset``,
    ``max_batches``: a reduced run, recorded in each cell's protocol. ``budget_s``: stop before a
    cell the cells timed so far say would not end within that many seconds of the call (the data
    reading included; the first cell always runs, unless ``out`` already holds a cell of this
    setting whose time says it cannot fit while cells asked for are still to run: then ValueError
    names the budget before any data is read). ``datasets``: an already
    loaded ``(train, test)`` pair instead of reading ``data_dir``. ``engine``: how the training
    steps run (``amp``, ``tf32``, ``compile``, ``channels_last``, ``resident``; see
    :func:`ntkfast.study.run_study`), named in each record where on."""
    from .core.checks import check_device
    from .core.progress import check_progress
    from .study import _check_engine_options, check_out, check_run_sizes, check_seeds, read_results, run_study

    p = _presets.get(preset) if isinstance(preset, str) else preset
    if not isinstance(p, _presets.Preset):
        raise TypeError(f"preset: expected a preset name or ntkfast.presets.Preset, got {type(preset).__name__}")
    methods = _pick("methods", methods, p.methods, lambda a, g: a == g)
    densities = _pick("densities", densities, p.densities, _same_density)
    seeds = check_seeds(list(p.seeds) if seeds is None else list(seeds) if hasattr(seeds, "__iter__") else seeds)
    check_run_sizes(epochs=epochs, train_subset=train_subset, test_subset=test_subset, max_batches=max_batches)
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))
                                 or not budget_s > 0 or not math.isfinite(budget_s)):
        raise ValueError(f"budget_s: expected a positive number of seconds, got {budget_s!r}")
    if device is not None:
        check_device(device)
    check_progress(progress)
    engine = _check_engine_options(engine) or None
    # everything above and the output file are checked before any data is read (a Tiny-ImageNet
    # decode takes minutes), and the budget against the cells already timed in it, so a refusal
    # comes at once and the clock starts before the reading, which the budget has to cover too
    start = time.perf_counter()
    check_out(out)
    if budget_s is not None and Path(out).exists():
        same = dict(epochs=epochs or p.epochs, train_subset=train_subset, max_batches=max_batches)
        mine = [r for r in read_results(out)
                if r.get("model") == p.model and r.get("dataset") == p.dataset and r.get("method") in methods
                and all(r["protocol"].get(k) == v for k, v in same.items())]
        have = {(r["method"], r["seed"], round(float(r["density"]), 6)) for r in mine}
        left = [c for c in cells_of(methods, densities, seeds) if (c[0], c[2], round(c[1], 6)) not in have]
        past = [r.get("prune_seconds", 0) + r.get("train_seconds", 0) for r in mine]
        if left and past and min(past) > budget_s:  # nothing left to run: nothing to refuse
            raise ValueError(f"budget_s: {budget_s:g} s is less than one cell of this setting took before "
                             f"({min(past):.0f} s); give more or reduce the run (epochs=, train_subset=)")
    if datasets is None:
        from . import data as D

        datasets = (D.load_dataset(p.dataset, data_dir, train=True), D.load_dataset(p.dataset, data_dir, train=False))
    kwargs = _study_kwargs(p, epochs, device, progress, train_subset, test_subset, max_batches, datasets)
    kwargs["engine"] = engine

    def run(m, d, seed):
        return run_study(p.model, p.dataset, data_dir, [m], [d], [seed], out,
                         rounds={m: p.rounds[m]} if m in p.rounds else None,
                         method_options={m: dict(p.method_options[m])} if m in p.method_options else None,
                         **kwargs)

    longest = 0.0
    records = []
    for m, d, seed in cells_of(methods, densities, seeds):
        elapsed = time.perf_counter() - start
        if budget_s is not None and longest and elapsed + longest > budget_s:
            break
        t0 = time.perf_counter()
        records += run(m, d, seed)
        longest = max(longest, time.perf_counter() - t0)
    return records


def compare(records: Sequence[dict], preset) -> List[Comparison]:
    """Our mean top-1 accuracy per (method, density) over the records' seeds beside the preset's
    published figure; cells in the preset's order."""
    p = _presets.get(preset) if isinstance(preset, str) else preset
    out = []
    for m in p.methods:
        for d in p.densities:
            accs = [float(r["final_test_accuracy"]) for r in records
                    if r.get("method") == m and _same_density(d, r.get("density")) and r.get("model") == p.model
                    and r.get("dataset") == p.dataset]
            if not accs:
                continue
            mean = sum(accs) / len(accs)
            std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else None
            pub = next((v for k, v in p.published.get(m, {}).items() if math.isclose(k, d, rel_tol=1e-6)), None)
            diff = None if pub is None else mean - pub
            z = diff / std if diff is not None and std else None
            out.append(Comparison(m, d, len(accs), mean, std, pub, diff, z))
    return out


def format_comparison(rows: Sequence[Comparison], preset, reduced: bool = False) -> str:
    """A markdown table of :func:`compare`'s rows."""
    p = _presets.get(preset) if isinstance(preset, str) else preset
    lines = [f"**{p.name}** ({p.paper}){' - a reduced run, not the paper protocol' if reduced else ''}", "",
             "| method | density | seeds | ours (%) | published (%) | difference (points) | in seed spreads |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours = f"{100 * r.ours:.2f}" + (f" ± {100 * r.ours_std:.2f}" if r.ours_std is not None else "")
        pub = "-" if r.published is None else f"{100 * r.published:.2f}"
        diff = "-" if r.difference is None else f"{100 * r.difference:+.2f}"
        z = "-" if r.z is None else f"{r.z:+.1f}"
        lines.append(f"| {r.method} | {r.density:.4g} | {r.seeds} | {ours} | {pub} | {diff} | {z} |")
    if p.published_metric:
        lines += ["", f"Published: {p.published_metric}."]
    return "\n".join(lines)


def plot_comparison(rows: Sequence[Comparison], preset, path=None, *, ax=None, formats=None):
    """Ours (markers, with the seeds' standard deviation as error bars) against the published
    figures (the same colour, dashed, hollow markers) per method, accuracy against the percentage
    of weights kept on a log axis, sparser to the right. Draws into ``ax`` when given; saves to
    ``path`` (see :func:`ntkfast.plots.save_figure`, ``formats``) when given. Returns the Figure."""
    from .plot_style import dataset_name, method_style, model_name
    from .plots import _pyplot, check_axes, save_figure

    p = _presets.get(preset) if isinstance(preset, str) else preset
    plt = _pyplot()
    if ax is not None:
        check_axes(ax)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for m in dict.fromkeys(r.method for r in rows):
        st = method_style(m)
        mine = sorted((r for r in rows if r.method == m), key=lambda r: -r.density)
        ax.errorbar([100 * r.density for r in mine], [100 * r.ours for r in mine],
                    yerr=[100 * (r.ours_std or 0.0) for r in mine], color=st.color, marker=st.marker,
                    linestyle=st.linestyle, markersize=5, capsize=2, label=f"{st.label} (ours)")
        pub = sorted(p.published.get(m, {}).items(), key=lambda kv: -kv[0])
        if pub:
            ax.plot([100 * d for d, _ in pub], [100 * a for _, a in pub], color=st.color, marker=st.marker,
                    markerfacecolor="none", linestyle="--", linewidth=1, alpha=0.8, label=f"{st.label} (published)")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy, top-1 (%)")
    ax.set_title(f"{model_name(p.model)} on {dataset_name(p.dataset)}: ours and {p.paper.split(' (')[0]}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if path is not None:
        save_figure(fig, path, formats)
    return fig
