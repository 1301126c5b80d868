"""Tables and plots from the JSON lines of :mod:`ntkfast.study` (``ntkfast report``).

Per study (one model, dataset and training protocol): a markdown table of test accuracy, mean ±
standard deviation over seeds, methods down and densities across, the best mean of each density
in bold; a plot of accuracy against the fraction of weights kept (log axis, sparser to the right,
as in the SynFlow and NTK-SAP papers); and each method's per-layer densities at one density.
matplotlib is needed only for the plots.

The records are checked as :func:`ntkfast.study.read_results` checks them, so a malformed one is
an error naming its file and line. Text from the records (method names, options) is escaped for
the markdown table, where a ``|`` or a newline would break it, and for matplotlib, where ``$``
starts mathtext. Every file is written to a temporary file renamed into place: an error halfway
leaves the earlier report whole."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .core.checks import check_choice
from .core.options import Metric, choices
from .core.files import atomic_write, check_out_dir
from .study import DEFAULT_ROUNDS, cell_key, read_results

__all__ = ["group", "summarise", "markdown_table", "plot_accuracy", "plot_layer_densities", "write_report"]

_METRICS = dict(zip(choices(Metric), ("final_test_accuracy", "best_test_accuracy")))


def group(records: Sequence[dict]) -> "Dict[Tuple[str, str, str], List[dict]]":
    """Records split by (model, dataset, protocol): runs of one group are comparable. A cell
    present more than once (two files holding the same run) counts once."""
    out: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in _unique(records):
        out.setdefault((r["model"], r["dataset"], json.dumps(r["protocol"], sort_keys=True)), []).append(r)
    return out


def _unique(records: Sequence[dict]) -> List[dict]:
    seen, out = set(), []
    for r in records:
        k = cell_key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def row_label(record: dict) -> str:
    """The method, plus its rounds and options where they are not the defaults: runs of one
    method with other settings are other rows, never averaged together."""
    label = record["method"]
    if record["method"] != "ntt" and int(record["rounds"]) != DEFAULT_ROUNDS.get(record["method"], 1):
        label += f" ({record['rounds']} round{'s' if int(record['rounds']) != 1 else ''})"
    options = record["options"]
    if record["method"] == "ntt":  # the study's defaults for NTT are recorded too; show the rest
        options = {k: v for k, v in options.items() if k not in ("lambda_l2", "scope") and
                   not (k == "epochs" and v == 20)}
    if options:
        label += " [" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"
    return label


def _metric_key(metric: Metric) -> str:
    check_choice(metric, "metric", _METRICS)
    return _METRICS[metric]


def summarise(records: Sequence[dict], metric: Metric = "final") -> "Dict[str, Dict[float, Tuple[float, float, int]]]":
    """row (:func:`row_label`) -> density -> (mean, sample std (0 for one seed), number of seeds)
    of the accuracy."""
    key = _metric_key(metric)
    values: Dict[str, Dict[float, List[float]]] = {}
    for r in _unique(records):
        per = values.setdefault(row_label(r), {})
        if r[key] is not None:  # a run without a best epoch (none evaluated) has no value to average
            per.setdefault(float(r["density"]), []).append(float(r[key]))
    out: Dict[str, Dict[float, Tuple[float, float, int]]] = {}
    for method, per in values.items():
        out[method] = {}
        for d, v in per.items():
            mean = sum(v) / len(v)
            std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
            out[method][d] = (mean, std, len(v))
    return out


def _protocol_line(records: Sequence[dict]) -> str:
    p = records[0]["protocol"]
    lr = p["lr"] if p["lr"] is not None else ("0.1" if p["optimizer"] == "sgd" else "1e-3")
    parts = [f"{p['epochs']} epochs", f"{p['optimizer']} lr {lr}", f"batch {p['batch_size']}", f"{p['scope']} scope"]
    if p.get("weight_decay"):
        parts.append(f"weight decay {p['weight_decay']}")
    if p.get("lr_milestones"):
        parts.append(f"lr x0.1 after epochs {', '.join(map(str, p['lr_milestones']))}")
    limits = []
    if p.get("train_subset"):
        limits.append(f"first {p['train_subset']} training images")
    if p.get("test_subset"):
        limits.append(f"first {p['test_subset']} test images")
    if p.get("max_batches"):
        limits.append(f"at most {p['max_batches']} batches per epoch")
    if limits:
        parts.append("REDUCED: " + ", ".join(limits))
    seeds = sorted({r["seed"] for r in records})
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def markdown_table(records: Sequence[dict], metric: Metric = "final") -> str:
    """One study's table: test accuracy (%) mean ± std over seeds; best mean per density in bold."""
    records = _unique(records)
    stats = summarise(records, metric)
    methods = list(dict.fromkeys(row_label(r) for r in records))
    densities = sorted({float(r["density"]) for r in records}, reverse=True)
    best = {d: max((stats[m][d][0] for m in methods if d in stats[m]), default=None) for d in densities}
    r0 = records[0]
    lines = [_md_line(f"**{r0['model']} on {r0['dataset']}**: {metric} test accuracy (%), mean ± std over seeds "
                      f"({_protocol_line(records)})"), "",
             "| method | " + " | ".join(f"density {d:g}" for d in densities) + " |",
             "|---|" + "---:|" * len(densities)]
    for m in methods:
        cells = []
        for d in densities:
            if d not in stats[m]:
                cells.append("–")
                continue
            mean, std, n = stats[m][d]
            text = f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f} (1 seed)"
            cells.append(f"**{text}**" if mean == best[d] else text)
        lines.append(f"| {_md_cell(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_line(text: str) -> str:
    """``text`` on one line: a newline from a record would end the paragraph (or start a table)."""
    return re.sub(r"[\r\n]+", " ", text)


def _md_cell(text: str) -> str:
    """``text`` safe in a markdown table cell: an unescaped ``|`` would end the cell (a
    backslash is escaped first, so that ``\\|`` cannot unescape it)."""
    return _md_line(text.replace("\\", "\\\\").replace("|", "\\|"))


def _plain(text: str) -> str:
    """``text`` shown as it is by matplotlib, where a pair of ``$`` would start mathtext (and a
    malformed formula fail the plot)."""
    return str(text).replace("$", r"\$")


def _slug(*parts) -> str:
    """A file name part from the study's names: safe characters only; where that changed them, or
    they are long, a hash of the originals keeps two studies' files apart."""
    raw = "-".join(str(p) for p in parts)
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", raw).strip("-")
    if slug != raw or len(slug) > 100:
        slug = slug[:80].strip("-") + "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return slug.lstrip(".")


def plot_accuracy(records: Sequence[dict], path, metric: Metric = "final") -> None:
    """Accuracy against the percentage of weights kept, log axis, sparser to the right."""
    from .plots import _pyplot

    plt = _pyplot()
    stats = summarise(records, metric)
    fig, ax = plt.subplots(figsize=(6.0, 4.2), constrained_layout=True)
    for method, per in stats.items():
        ds = sorted(per, reverse=True)
        ax.errorbar([100 * d for d in ds], [100 * per[d][0] for d in ds], yerr=[100 * per[d][1] for d in ds],
                    marker="o", markersize=4, capsize=3, linewidth=1.3, label=_plain(method))
    ax.set_xscale("log")
    ax.invert_xaxis()
    # ticks at the study's own densities, in plain percent (not matplotlib's 3x10^0 log labels)
    ticks = sorted({100 * d for per in stats.values() for d in per}, reverse=True)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel(f"{metric} test accuracy (%)")
    r0 = records[0]
    _finish(plt, fig, ax, _plot_title(r0), path)


def plot_layer_densities(records: Sequence[dict], path, density: float) -> None:
    """Each method's per-layer density at ``density`` (mean over seeds), layers in network order."""
    from .plots import _pyplot

    chosen = [r for r in _unique(records) if float(r["density"]) == float(density)]
    if not chosen:
        raise ValueError(f"profile_density: no runs at density {density}")
    plt = _pyplot()
    layers = list(dict.fromkeys(n for r in chosen for n in r["layer_density"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.2), constrained_layout=True)
    for label in dict.fromkeys(row_label(r) for r in chosen):
        runs = [r for r in chosen if row_label(r) == label]
        mean = [sum(r["layer_density"].get(n, math.nan) for r in runs) / len(runs) for n in layers]
        ax.plot(range(len(layers)), [100 * v for v in mean], marker="o", markersize=3, linewidth=1.2,
                label=_plain(label))
    # symlog: an emptied layer (density 0, a layer collapse) stays on the plot at 0
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([_plain(n.removesuffix(".weight")) for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("weights kept in the layer (%; log above 0.1)")
    r0 = chosen[0]
    _finish(plt, fig, ax, f"{_plot_title(r0)}: per-layer density at {100 * density:g}% overall", path)


def _is_reduced(protocol: dict) -> bool:
    return bool(protocol.get("train_subset") or protocol.get("test_subset") or protocol.get("max_batches"))


def _plot_title(record: dict) -> str:
    """Model, data and epochs, and REDUCED where the protocol cut the data: a plot copied out of
    the report must not pass for a full run."""
    p = record["protocol"]
    title = f"{record['model']} / {record['dataset']}, {p['epochs']} epochs"
    return title + (" (REDUCED)" if _is_reduced(p) else "")


def _finish(plt, fig, ax, title: str, path) -> None:
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        # the format named by the path's extension: the temporary file's own is .tmp
        fmt = Path(path).suffix[1:].lower() or None
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        plt.close(fig)


def write_report(paths: Sequence, out_dir, *, metric: Metric = "final", profile_density: Optional[float] = None,
                 plots: bool = True) -> List[Path]:
    """``report.md`` (every study's table) and, with ``plots``, its two PNGs per study, in
    ``out_dir`` (a folder, made if missing in an existing folder). Returns the files written."""
    _metric_key(metric)
    if profile_density is not None and (isinstance(profile_density, bool) or not isinstance(profile_density, numbers.Real)
                                        or not 0 < profile_density <= 1):
        raise ValueError(f"profile_density: expected a density in (0, 1] or None, got {profile_density!r}")
    out_dir = Path(check_out_dir(out_dir, "out_dir"))  # before reading and plotting
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: List[dict] = []
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"results: no file at {str(p)!r}")
        records.extend(read_results(p, name="results"))
    if not records:
        raise ValueError(f"results: no finished runs in {', '.join(map(str, paths))}")
    if plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("plots: matplotlib is not installed (pip install matplotlib); "
                              "plots=False (`ntkfast report --no-plots`) writes the tables alone")
    groups = group(records)
    if plots and profile_density is not None:  # before the first file is written
        for (model, dataset, _), runs in groups.items():
            if not any(float(r["density"]) == float(profile_density) for r in runs):
                have = ", ".join(f"{d:g}" for d in sorted({float(r["density"]) for r in runs}))
                raise ValueError(f"profile_density: {model} on {dataset} has no runs at density "
                                 f"{profile_density:g} (it has {have})")
    out_dir.mkdir(exist_ok=True)
    md = out_dir / "report.md"
    written, sections = [md], ["# Accuracy of networks pruned at initialisation", ""]
    for (model, dataset, _), runs in groups.items():
        sections += [markdown_table(runs, metric), ""]
        if plots:
            name = _slug(model, dataset, _protocol_tag(runs))
            acc = out_dir / f"accuracy-{name}.png"
            plot_accuracy(runs, acc, metric)
            densities = sorted({float(r["density"]) for r in runs})
            d = profile_density if profile_density is not None else densities[len(densities) // 2]
            layers = out_dir / f"layers-{name}-d{d:g}.png"
            plot_layer_densities(runs, layers, d)
            sections += [f"![accuracy]({acc.name})", f"![layer densities]({layers.name})", ""]
            written += [acc, layers]
    text = "\n".join(sections)
    atomic_write(md, lambda f: f.write(text.encode("utf-8")))
    return written


def _protocol_tag(runs: Sequence[dict]) -> str:
    """Short and readable, and unique per protocol (a hash of it), so two studies' plots never
    overwrite each other."""
    p = runs[0]["protocol"]
    tag = f"e{p['epochs']}"
    if _is_reduced(p):
        tag += "-reduced"
    return tag + "-" + hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:6]
