"""matplotlib for ntkfast: loading it, saving figures, and the plot of a transfer's history.

matplotlib is an optional dependency (``pip install "ntkfast[plots]"`` or ``pip install
matplotlib``), imported only here and only when a plot is asked for.

Every plotting function of ntkfast follows the same rules: it takes ``ax=`` (draw into your own
Axes; then nothing is written unless a path is given too) and ``path=`` with ``formats=`` (the
figure saved as each format beside the other, :func:`save_figure`); methods, models and datasets
look as :mod:`ntkfast.plot_style` says."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from .core.files import atomic_write, check_out_path

__all__ = ["FORMATS", "DPI", "check_formats", "check_axes", "figure_paths", "save_figure", "spans_decades",
           "plot_transfer_history"]

#: the file formats a figure can be saved in
FORMATS = ("png", "pdf", "svg", "eps")
#: the resolution of raster output (PNG): sharp in print at a column's width
DPI = 200

# Fonts embedded as TrueType (42), not Type 3, which several publishers' checks refuse; fixed
# metadata and SVG ids, so that the same figure gives the same bytes (a re-rendered figure in
# git shows a change only where the figure changed).
_SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "ntkfast"}
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "eps": {"CreationDate": None}}

_PANELS = (("kernel_distance", "kernel distance", "‖Θₛ − Θₜ‖² / (n₁n₂K²)"),
           ("target_distance", "target distance", "‖fₛ − fₜ‖² / (BK)"),
           ("l2", "squared norm of the masked weights", "Σ ‖m ⊙ W‖²"))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("ntkfast.plots needs matplotlib: pip install matplotlib") from None
    return plt


def check_formats(formats, name: str = "formats") -> Tuple[str, ...]:
    """``formats`` (one format name or several, from :data:`FORMATS`, case and a leading dot
    ignored) as a tuple without repeats, in the order given."""
    if isinstance(formats, str):
        formats = [formats]
    try:
        items = list(formats)
    except TypeError:
        raise TypeError(f"{name}: expected a format name or a list of them, got {type(formats).__name__}") from None
    allowed = ", ".join(map(repr, FORMATS))
    if not items:
        raise ValueError(f"{name}: expected one or more of {allowed}, got none")
    out = []
    for f in items:
        if not isinstance(f, str) or f.lower().lstrip(".") not in FORMATS:
            raise ValueError(f"{name}: expected one or more of {allowed}, got {f!r}")
        out.append(f.lower().lstrip("."))
    return tuple(dict.fromkeys(out))


def figure_paths(path, formats=None) -> List[Path]:
    """The files a figure saved at ``path`` goes to: ``path`` itself without ``formats``;
    otherwise one file per format, ``path`` with its extension (where it names a format) replaced:
    ``figure_paths("acc.png", ["png", "pdf"])`` is ``[acc.png, acc.pdf]``."""
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise TypeError(f"path: expected a path (str or os.PathLike), got {type(path).__name__}") from None
    if formats is None:
        return [p]
    stem = p.with_suffix("") if p.suffix[1:].lower() in FORMATS else p
    return [stem.with_name(f"{stem.name}.{fmt}") for fmt in check_formats(formats)]


def save_figure(fig, path, formats=None) -> List[Path]:
    """Save ``fig`` to :func:`figure_paths` ``(path, formats)``: PNG at :data:`DPI`, PDF and EPS
    with TrueType fonts, SVG; each written to a temporary file renamed into place. Every path is
    checked before the first is written. Returns the files written."""
    paths = figure_paths(path, formats)
    for p in paths:
        check_out_path(p, "path")
    import matplotlib

    with matplotlib.rc_context(_SAVE_RC):
        for p in paths:
            fmt = p.suffix[1:].lower() or "png"  # the temporary file's own extension is .tmp
            atomic_write(p, lambda f: fig.savefig(f, format=fmt, dpi=DPI, metadata=_METADATA.get(fmt),
                                                  bbox_inches="tight", pad_inches=0.04))
    return paths


def check_axes(ax, name: str = "ax", count: Optional[int] = None):
    """``ax`` as a matplotlib Axes (or, with ``count``, a list of that many Axes)."""
    from matplotlib.axes import Axes

    if count is None:
        if not isinstance(ax, Axes):
            raise TypeError(f"{name}: expected a matplotlib Axes, got {type(ax).__name__}")
        return ax
    try:
        items = list(getattr(ax, "flat", ax))  # a numpy array of Axes from plt.subplots too
    except TypeError:
        raise TypeError(f"{name}: expected {count} matplotlib Axes, got {type(ax).__name__}") from None
    if len(items) != count or not all(isinstance(a, Axes) for a in items):
        raise ValueError(f"{name}: expected {count} matplotlib Axes, got {len(items)} items")
    return items


def spans_decades(values: Sequence[float], decades: float = 1.0) -> bool:
    """Whether ``values`` are all positive and their largest is at least 10**``decades`` times
    their smallest: a log axis shows such data; flatter data reads better on a linear one."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if v == v and v not in (float("inf"), float("-inf"))]
    if not finite or any(v <= 0 for v in finite):
        return False
    return max(finite) >= 10 ** decades * min(finite)


def plot_transfer_history(history: Mapping[str, Sequence[float]], path=None, *, title: str = "", ax=None,
                          formats=None):
    """The validation losses of :func:`ntkfast.transfer` (its result's ``.history``) against the
    step, one panel each: kernel distance, target distance and the squared norm of the masked
    weights. A panel is on a log scale where its values span a decade or more, linear where they
    are flatter.

    ``ax``: three Axes to draw into (e.g. ``plt.subplots(1, 3)[1]``); without it a figure is made.
    ``path``: where to save it (with ``formats``, one file per format, :func:`save_figure`); a
    figure made here is then closed. Returns the matplotlib Figure."""
    missing = [k for k in ("step",) + tuple(k for k, _, _ in _PANELS) if k not in history]
    if missing:
        raise ValueError(f"history: missing {', '.join(missing)} (expected TransferResult.history)")
    steps = list(history["step"])
    if not steps:
        raise ValueError("history: no validation records (was the transfer run with validation=0?)")
    if path is not None:
        for p in figure_paths(path, formats):
            check_out_path(p, "path")
    plt = _pyplot()
    own = ax is None
    if own:
        fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.0 * len(_PANELS), 3.3), layout="constrained")
    else:
        axes = check_axes(ax, "ax", len(_PANELS))
        fig = axes[0].figure
    for a, (key, name, formula) in zip(axes, _PANELS):
        values = [float(v) for v in history[key]]
        a.plot(steps, values, color="#0072B2", marker="o", markersize=2.5, linewidth=1.2)
        if spans_decades(values):
            a.set_yscale("log")
        a.set_xlabel("step")
        a.set_ylabel(formula + (" (log scale)" if a.get_yscale() == "log" else ""), fontsize=8)
        a.set_title(name, fontsize=9)
        a.grid(True, which="major", alpha=0.3)
    if title:
        fig.suptitle(title.replace("$", r"\$"), fontsize=10)
    if path is not None:
        save_figure(fig, path, formats)
        if own:
            plt.close(fig)  # saved: pyplot need not keep it alive (the Figure object stays usable)
    return fig
