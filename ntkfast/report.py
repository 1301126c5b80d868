"""Tables and plots from the JSON lines of :mod:`ntkfast.study` (``ntkfast report``).

Per study (one model, dataset and training protocol): a markdown table of test accuracy, mean ±
standard deviation over seeds, methods down and densities across, the best mean of each density
in bold; a plot of accuracy against the fraction of weights kept (log axis, sparser to the right,
as in the SynFlow and NTK-SAP papers; a zoomed second panel where methods crowd); and each
method's per-layer densities at one density (grouped bars, or a heatmap for deep networks).
matplotlib is needed only for the plots. Each method looks as :mod:`ntkfast.plot_style` says;
every plotting function takes ``ax=`` and saves through :func:`ntkfast.plots.save_figure`
(``formats=``).

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

__all__ = ["group", "summarise", "markdown_table", "row_label", "display_label", "plot_accuracy",
           "plot_layer_densities", "write_report", "REPORT_FORMATS"]

#: the files of each figure ``write_report`` makes: PNG (shown in report.md), PDF and SVG
REPORT_FORMATS = ("png", "pdf", "svg")

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


def _row_parts(record: dict) -> "Tuple[str, Optional[int], dict]":
    """(method, rounds where they are not the method's default (else None), the options that set
    it apart): what makes a run of a method another row."""
    rounds = None
    if record["method"] != "ntt" and int(record["rounds"]) != DEFAULT_ROUNDS.get(record["method"], 1):
        rounds = int(record["rounds"])
    options = record["options"]
    if record["method"] == "ntt":  # the study's defaults for NTT are recorded too; show the rest
        options = {k: v for k, v in options.items() if k not in ("lambda_l2", "scope") and
                   not (k == "epochs" and v == 20)}
    return record["method"], rounds, dict(sorted(options.items()))


def row_label(record: dict) -> str:
    """The method, plus its rounds and options where they are not the defaults: runs of one
    method with other settings are other rows, never averaged together."""
    method, rounds, options = _row_parts(record)
    label = method
    if rounds is not None:
        label += f" ({rounds} round{'s' if rounds != 1 else ''})"
    if options:
        label += " [" + ", ".join(f"{k}={v}" for k, v in options.items()) + "]"
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


# -- figures -----------------------------------------------------------------------------------------

# Two means closer than this fraction of the accuracy axis's span overlap at a figure's size; a
# zoomed panel is worth drawing where it magnifies them at least _MIN_ZOOM times.
_CROWD = 0.06
_MIN_ZOOM = 4.0
# the line styles of a method's second, third... row (other rounds or options): its colour and
# marker say which method, the line which setting
_VARIANT_LINES = (":", "-.", (0, (1, 1)), (0, (3, 1, 1, 1)), "--")


def display_label(record: dict) -> str:
    """The row's name in a figure: the method's display name (:mod:`ntkfast.plot_style`), then
    its rounds and options where they are not the defaults (``"NTT (1 transfer epoch)"``,
    ``"SNIP (3 rounds)"``)."""
    from .plot_style import method_name

    method, rounds, options = _row_parts(record)
    extras = [f"{rounds} round{'s' if rounds != 1 else ''}"] if rounds is not None else []
    if method == "ntt" and "epochs" in options:
        epochs = options.pop("epochs")
        extras.append(f"{epochs} transfer epoch{'s' if epochs != 1 else ''}")
    extras += [f"{k}={v}" for k, v in options.items()]
    return method_name(method) + (f" ({', '.join(extras)})" if extras else "")


def _row_styles(records: Sequence[dict]) -> dict:
    """row (:func:`row_label`) -> its Style: a method's first row has the method's style, a
    further row of it (other rounds or options) the same colour and marker with another line."""
    from .plot_style import Style, method_style

    out, rows_of = {}, {}
    for r in records:
        key = row_label(r)
        if key in out:
            continue
        base = method_style(r["method"])
        n = rows_of[r["method"]] = rows_of.get(r["method"], -1) + 1
        lines = [ls for ls in _VARIANT_LINES if ls != base.linestyle]
        linestyle = base.linestyle if n == 0 else lines[(n - 1) % len(lines)]
        out[key] = Style(_plain(display_label(r)), base.color, base.marker, linestyle)
    return out


def _best_means(stats: dict) -> Dict[float, float]:
    best: Dict[float, float] = {}
    for per in stats.values():
        for d, (mean, _, _) in per.items():
            best[d] = max(best.get(d, mean), mean)
    return best


def _zoom_depth(stats: dict, force: bool = False) -> Optional[float]:
    """How far below the best mean of each density (a fraction of accuracy) the zoomed panel
    reaches, or None where no means crowd: at some density at least three means lie within
    _CROWD of the axis's span of the best one, and a panel that deep would magnify them at least
    _MIN_ZOOM times. ``force``: a depth even where none crowd (all the gaps, at least 0.01)."""
    best = _best_means(stats)
    gaps = [(d, best[d] - mean) for per in stats.values() for d, (mean, _, _) in per.items()]
    if not gaps:
        return None
    means = [mean for per in stats.values() for mean, _, _ in per.values()]
    span = max(means) - min(means)
    close = [(d, g) for d, g in gaps if g < _CROWD * span]
    depth = max((g for _, g in close), default=0.0)
    crowded = any(sum(1 for d2, _ in close if d2 == d) >= 3 for d in best)
    if crowded and depth > 0 and span / depth >= _MIN_ZOOM:
        return depth
    return max(max(g for _, g in gaps), 0.01) if force else None


def _density_axis(ax, ticks: Sequence[float]) -> None:
    """x: the percentage of weights kept, log scale, sparser to the right, ticks at the study's
    own densities in plain percent (not matplotlib's 3x10^0 labels)."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("weights remaining (%)")
    ax.grid(True, which="major", alpha=0.3)


def _errorbars(ax, stats: dict, styles: dict) -> None:
    """One line per row, mean ± std over seeds, in the row's style."""
    for row, per in stats.items():
        ds = sorted(per, reverse=True)
        if ds:
            ax.errorbar([100 * d for d in ds], [100 * per[d][0] for d in ds], yerr=[100 * per[d][1] for d in ds],
                        markersize=5, capsize=2.5, linewidth=1.3, elinewidth=0.8, **styles[row].line_kwargs())


def _gap_lines(ax, stats: dict, styles: dict, depth: float) -> None:
    """The zoomed panel: each row's distance below the best mean of each density, in points.
    The rows are shifted sideways a little (a few hundredths of a decade) so that their markers
    and error bars do not hide each other; error bars are drawn only for means inside the panel,
    whose limits would cut the others into lines that cross it whole."""
    best = _best_means(stats)
    rows = [r for r in stats if stats[r]]
    for i, row in enumerate(rows):
        per = stats[row]
        ds = sorted(per, reverse=True)
        shift = 10 ** (0.006 * (i - (len(rows) - 1) / 2))
        xs = [100 * d * shift for d in ds]
        ys = [100 * (per[d][0] - best[d]) for d in ds]
        errs = [100 * per[d][1] for d in ds]
        ax.plot(xs, ys, markersize=5, linewidth=1.3, **styles[row].line_kwargs())
        inside = [k for k, y in enumerate(ys) if y >= -100 * depth * 1.1]
        ax.errorbar([xs[k] for k in inside], [ys[k] for k in inside], yerr=[errs[k] for k in inside], fmt="none",
                    ecolor=styles[row].color, elinewidth=0.8, capsize=2.5, alpha=0.8)


def _own_figure_legend(fig, ax, ncol: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(handles)), fontsize=8,
                   frameon=False)


def _axes_legend(ax) -> None:
    """The legend of a user's Axes: outside it, to the right, so that it hides no data (a
    figure saved with bbox_inches="tight", as :func:`ntkfast.plots.save_figure` does, keeps it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)


def _check_zoom(zoom) -> None:
    if zoom is not None and not isinstance(zoom, bool):
        raise ValueError(f"zoom: expected True, False or None (decided from the data), got {zoom!r}")


def _check_paths(path, formats) -> None:
    """Every file a figure will be saved to, checked before anything is drawn."""
    from .core.files import check_out_path
    from .plots import check_formats, figure_paths

    if formats is not None:
        check_formats(formats)
    if path is not None:
        for p in figure_paths(path, formats):
            check_out_path(p, "path")


def plot_accuracy(records: Sequence[dict], path=None, metric: Metric = "final", *, ax=None, zoom: Optional[bool] = None,
                  zoom_ax=None, formats=None, legend: bool = True):
    """Accuracy against the percentage of weights kept (log axis, sparser to the right), one line
    per method (mean ± std over seeds), each in its :mod:`ntkfast.plot_style` style.

    Where several methods crowd into one band of the axis (their means closer than the eye can
    part), a second panel shows each method's distance below the best method of each density,
    zoomed to that band: ``zoom=None`` decides from the data, True or False forces it.

    ``ax``: an Axes to draw into (then no figure is made, the legend goes to the right of ``ax``,
    and the zoomed panel is drawn only into a ``zoom_ax`` you give). ``path``: where to save the
    figure, as each of ``formats`` (:func:`ntkfast.plots.save_figure`); nothing is written
    without it; a figure made here is closed once saved. Returns the matplotlib Figure."""
    from .plots import _pyplot, check_axes

    _metric_key(metric)
    _check_zoom(zoom)
    records = _unique(records)
    if not records:
        raise ValueError("records: no runs to plot")
    _check_paths(path, formats)
    plt = _pyplot()
    if ax is not None:
        check_axes(ax, "ax")
    if zoom_ax is not None:
        check_axes(zoom_ax, "zoom_ax")
        if ax is None:
            raise ValueError("zoom_ax: give ax too (the main panel's Axes), or neither")
    stats = summarise(records, metric)
    styles = _row_styles(records)
    if zoom and ax is not None and zoom_ax is None:
        raise ValueError("zoom_ax: zoom=True with ax needs the Axes of the zoomed panel (zoom_ax=)")
    if zoom is False:
        depth = None
    elif ax is None:
        depth = _zoom_depth(stats, force=bool(zoom))
    else:  # the user's own layout: a zoom_ax given is drawn into, whether or not the means crowd
        depth = _zoom_depth(stats, force=True) if zoom_ax is not None else None
    own = ax is None
    if own:
        if depth is not None:
            fig, (ax, zoom_ax) = plt.subplots(1, 2, figsize=(10.0, 4.6), layout="constrained",
                                              gridspec_kw={"width_ratios": [1.0, 1.0]})
        else:
            fig, ax = plt.subplots(figsize=(6.4, 4.9), layout="constrained")
    fig = ax.figure
    ticks = sorted({100 * d for per in stats.values() for d in per}, reverse=True)
    _errorbars(ax, stats, styles)
    _density_axis(ax, ticks)
    ax.set_ylabel(f"{metric} test accuracy (%)")
    ax.set_title(_plain(_plot_title(records[0])), fontsize=10)
    if zoom_ax is not None and depth is not None:
        _gap_lines(zoom_ax, stats, styles, depth)
        zoom_ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
        zoom_ax.set_ylim(-100 * depth * 1.1, 100 * depth * 0.1)
        _density_axis(zoom_ax, ticks)
        zoom_ax.set_ylabel("difference from the best method (points)")
        zoom_ax.set_title(f"zoom: the methods within {100 * depth:.2g} points of the best", fontsize=10)
    return _legend_and_save(plt, fig, ax, own=own, legend=legend, ncol=5 if depth is not None else 3, path=path,
                            formats=formats)


def _legend_and_save(plt, fig, ax, *, own: bool, legend: bool, ncol: int, path, formats):
    """The end of a plotting function: the legend (below a figure of our own, beside the caller's
    axes), then the files when a path is given; a figure of our own is closed once saved."""
    if legend:
        if own:
            _own_figure_legend(fig, ax, ncol=ncol)
        else:
            _axes_legend(ax)
    if path is not None:
        from .plots import save_figure

        save_figure(fig, path, formats)
        if own:
            plt.close(fig)
    return fig


def _layer_means(chosen: Sequence[dict], layers: Sequence[str]) -> "Dict[str, List[float]]":
    """row -> its mean density per layer over seeds (NaN where no run of the row has the layer)."""
    out: Dict[str, List[float]] = {}
    for key in dict.fromkeys(row_label(r) for r in chosen):
        runs = [r for r in chosen if row_label(r) == key]
        means = []
        for n in layers:
            vals = [float(r["layer_density"][n]) for r in runs if n in r["layer_density"]]
            means.append(sum(vals) / len(vals) if vals else math.nan)
        out[key] = means
    return out


def _fmt_percent(v: float) -> str:
    if math.isnan(v):
        return "–"
    if v == 0:
        return "0"
    return f"{v:.0f}" if v >= 9.95 else f"{v:.2g}"


def _layer_bars(ax, means: dict, styles: dict, labels: Sequence[str], density: float) -> None:
    """Grouped bars, one group per layer, one bar per row in the row's colour with its marker on
    top (the marker tells the methods apart where colour cannot); no line joins the layers."""
    from matplotlib.lines import Line2D

    n = len(means)
    width = 0.8 / max(n, 1)
    for i, (row, vals) in enumerate(means.items()):
        st = styles[row]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(labels))]
        heights = [100 * v for v in vals]
        ax.bar(xs, heights, width=width * 0.92, color=st.color, alpha=0.85, linewidth=0)
        ax.plot(xs, heights, linestyle="none", marker=st.marker, markersize=4, color=st.color,
                markeredgecolor="black", markeredgewidth=0.4)
        for x, h in zip(xs, heights):
            if h == 0:  # an emptied layer has no bar to see: say so
                ax.annotate("0", (x, 0), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=7,
                            color=st.color)
        # the legend shows the marker and colour together, as the bars carry them
        ax.add_line(Line2D([], [], linestyle="none", marker=st.marker, markersize=6, color=st.color,
                           markeredgecolor="black", markeredgewidth=0.4, label=st.label))
    ax.axhline(100 * density, color="0.35", linestyle="--", linewidth=0.9, zorder=0,
               label=f"overall density ({100 * density:g}%)")
    # symlog: an emptied layer (density 0, a layer collapse) stays on the axis, at 0
    ax.set_yscale("symlog", linthresh=0.1, linscale=0.5)
    ax.set_ylim(0, 130)
    ax.set_yticks([0, 0.1, 1, 10, 100], ["0", "0.1", "1", "10", "100"])
    ax.set_xticks(range(len(labels)), [_plain(x) for x in labels])
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel("weights kept in the layer (%)\n(log scale above 0.1)")
    ax.grid(True, axis="y", which="major", alpha=0.3)


def _luminance(rgba) -> float:
    """WCAG relative luminance; below 0.179 white text has the better contrast, above it black."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _layer_heatmap(ax, means: dict, styles: dict, labels: Sequence[str]) -> None:
    """Methods down, layers across, the colour the density on a log scale, each cell labelled
    with its value; an emptied layer (0) is light grey, marked 0."""
    import matplotlib
    import matplotlib.ticker
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.array([[100 * v for v in vals] for vals in means.values()], dtype=float)
    positive = data[np.isfinite(data) & (data > 0)]
    lo = max(float(positive.min()) if positive.size else 0.1, 1e-3)
    norm = LogNorm(vmin=lo, vmax=max(100.0, lo * 10))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#E0E0E0")
    shown = np.ma.masked_where(~np.isfinite(data) | (data <= 0), data)
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            cell = cmap(norm(v)) if np.isfinite(v) and v > 0 else cmap.get_bad()
            ax.text(j, i, _fmt_percent(v), ha="center", va="center", fontsize=6.5,
                    color="white" if _luminance(cell) < 0.179 else "black")
    ax.set_xticks(range(len(labels)), [_plain(x) for x in labels], rotation=55, ha="right",
                  rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(means)), [styles[r].label for r in means], fontsize=8)
    ax.tick_params(length=0)
    cbar = ax.figure.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
    cbar.set_label("weights kept in the layer (%, log scale)")
    cbar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def plot_layer_densities(records: Sequence[dict], path=None, density: Optional[float] = None, *, kind: str = "auto",
                         ax=None, formats=None, legend: bool = True):
    """Each method's per-layer density at ``density`` (mean over seeds; default the study's middle
    density), layers in network order on a categorical axis: grouped bars (``kind="bars"``) or a
    heatmap of methods by layers (``kind="heatmap"``); ``"auto"`` draws bars up to 60 bars
    (e.g. LeNet-5's 4 layers by 9 methods), a heatmap beyond (ResNet-20's 22 layers).

    ``ax``, ``path``, ``formats`` and ``legend`` as in :func:`plot_accuracy`. Returns the Figure."""
    from .plot_style import layer_labels
    from .plots import _pyplot, check_axes

    check_choice(kind, "kind", ("auto", "bars", "heatmap"))
    records = _unique(records)
    if not records:
        raise ValueError("records: no runs to plot")
    densities = sorted({float(r["density"]) for r in records})
    if density is None:
        density = densities[len(densities) // 2]
    elif isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density: expected a number, got {type(density).__name__}")
    chosen = [r for r in records if float(r["density"]) == float(density)]
    if not chosen:
        raise ValueError(f"density: no runs at density {density:g} (the runs have "
                         f"{', '.join(f'{d:g}' for d in densities)})")
    _check_paths(path, formats)
    plt = _pyplot()
    if ax is not None:
        check_axes(ax, "ax")
    layers = list(dict.fromkeys(n for r in chosen for n in r["layer_density"]))
    labels = layer_labels(layers)
    means = _layer_means(chosen, layers)
    styles = _row_styles(chosen)
    if kind == "auto":
        kind = "bars" if len(layers) * len(means) <= 60 else "heatmap"
    own = ax is None
    if own:
        if kind == "bars":
            size = (max(6.4, 0.55 * len(layers) * max(len(means), 4) / 4 + 2.0), 4.6)
        else:
            size = (max(6.4, 0.42 * len(layers) + 3.2), max(3.2, 0.32 * len(means) + 2.0))
        fig, ax = plt.subplots(figsize=size, layout="constrained")
    fig = ax.figure
    if kind == "bars":
        _layer_bars(ax, means, styles, labels, density)
    else:
        _layer_heatmap(ax, means, styles, labels)
    ax.set_xlabel("layer (network order)")
    ax.set_title(_plain(f"{_plot_title(chosen[0])}: per-layer density at {100 * density:g}% overall"), fontsize=10)
    return _legend_and_save(plt, fig, ax, own=own, legend=legend and kind == "bars", ncol=5, path=path,
                            formats=formats)


def _is_reduced(protocol: dict) -> bool:
    return bool(protocol.get("train_subset") or protocol.get("test_subset") or protocol.get("max_batches"))


def _plot_title(record: dict) -> str:
    """Model, data and epochs, by their display names, and REDUCED where the protocol cut the
    data: a plot copied out of the report must not pass for a full run."""
    from .plot_style import dataset_name, model_name

    p = record["protocol"]
    title = f"{model_name(record['model'])} / {dataset_name(record['dataset'])}, {p['epochs']} epochs"
    return title + (" (REDUCED)" if _is_reduced(p) else "")


def write_report(paths: Sequence, out_dir, *, metric: Metric = "final", profile_density: Optional[float] = None,
                 plots: bool = True, formats=REPORT_FORMATS) -> List[Path]:
    """``report.md`` (every study's table) and, with ``plots``, its two figures per study, each
    saved in every one of ``formats`` (default PNG, which ``report.md`` shows, PDF and SVG for a
    paper or an editor), in ``out_dir`` (a folder, made if missing in an existing folder).
    Returns the files written."""
    from .plots import check_formats

    _metric_key(metric)
    formats = check_formats(formats)
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
            from .plots import figure_paths

            name = _slug(model, dataset, _protocol_tag(runs))
            densities = sorted({float(r["density"]) for r in runs})
            d = profile_density if profile_density is not None else densities[len(densities) // 2]
            acc, layers = out_dir / f"accuracy-{name}", out_dir / f"layers-{name}-d{d:g}"
            plot_accuracy(runs, acc, metric, formats=formats)
            plot_layer_densities(runs, layers, d, formats=formats)
            for what, stem in (("accuracy", acc), ("layer densities", layers)):
                files = figure_paths(stem, formats)
                sections.append(_figure_markdown(what, files))
                written += files
    text = "\n".join(sections)
    atomic_write(md, lambda f: f.write(text.encode("utf-8")))
    return written


def _figure_markdown(what: str, files: Sequence[Path]) -> str:
    """The figure shown (its PNG, else its SVG), with links to every file of it."""
    shown = next((f for f in files if f.suffix in (".png", ".svg")), None)
    links = " · ".join(f"[{f.suffix[1:].upper()}]({f.name})" for f in files)
    return (f"![{what}]({shown.name})\n\n{what}: {links}\n" if shown else f"{what}: {links}\n")


def _protocol_tag(runs: Sequence[dict]) -> str:
    """Short and readable, and unique per protocol (a hash of it), so two studies' plots never
    overwrite each other."""
    p = runs[0]["protocol"]
    tag = f"e{p['epochs']}"
    if _is_reduced(p):
        tag += "-reduced"
    return tag + "-" + hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:6]
