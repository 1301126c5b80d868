"""Plots of ntkfast results. matplotlib is an optional dependency, imported only here and only
when a plot is asked for (``pip install matplotlib``)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

_PANELS = (("kernel_distance", "kernel distance ‖Θs − Θt‖² / (n₁n₂K²)"),
           ("target_distance", "target distance ‖fs − ft‖² / (BK)"),
           ("l2", "Σ ‖m ⊙ W‖²"))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("ntkfast.plots needs matplotlib: pip install matplotlib") from None
    return plt


def plot_transfer_history(history: Mapping[str, Sequence[float]], path: Optional[str] = None, *, title: str = ""):
    """The validation losses of :func:`ntkfast.transfer` (its result's ``.history``) against the
    step: kernel distance, target distance and the squared norm of the masked weights, each on a
    log scale. Saves a PNG when ``path`` is given; returns the matplotlib Figure."""
    missing = [k for k in ("step",) + tuple(k for k, _ in _PANELS) if k not in history]
    if missing:
        raise ValueError(f"history: missing {', '.join(missing)} (expected TransferResult.history)")
    steps = list(history["step"])
    if not steps:
        raise ValueError("history: no validation records (was the transfer run with validation=0?)")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.4), constrained_layout=True)
    for ax, (key, label) in zip(axes, _PANELS):
        values = list(history[key])
        ax.plot(steps, values, marker="o", markersize=2.5, linewidth=1.2)
        if all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)  # saved: pyplot need not keep it alive (the Figure object stays usable)
    return fig
