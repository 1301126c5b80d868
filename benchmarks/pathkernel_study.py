"""Path Kernel study: do tr Π and the top eigenvalue of Π of a network pruned at initialisation
predict how well it trains in its first epoch?

Gebhart et al. (2021) argue that the path kernel Π, the data-independent factor of the NTK,
governs the early convergence of gradient descent: a larger tr Π (or top eigenvalue) should mean
faster training. Here, per (model, dataset), one initialisation is pruned by several methods at
several densities; for each mask we record tr Π and λ_max(Π) (float64, before any training), then
train the masked network for one epoch (SGD; for conv4 one pass over a 12,000-image subset, see
EPOCH) and record its training loss: the cross-entropy of the trained network, in eval mode, on
the first 10,000 training images, and the running average over the epoch. We report Spearman's rank correlation of tr Π and λ_max with the loss (pooled over
every mask, and within each density, across methods), with permutation p-values, and the
correlation of the density alone with the loss, as the baseline tr Π has to beat.

    python -m benchmarks.pathkernel_study --data-dir ../shared/data

Results go to ``benchmarks/results/pathkernel-study.json`` after every run (an interrupted study
resumes from them) and the plot to ``benchmarks/results/pathkernel-study.png`` (with ``.pdf`` and
``.svg`` beside it; ``--formats``). ``--replot`` redraws the plot from the JSON alone.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .common import RESULTS_DIR, machine_info

# method -> rounds, as each method's authors prune (SynFlow: 100; NTK-SAP: 20; the rest one shot)
ROUNDS = {"random": 1, "magnitude": 1, "snip": 1, "grasp": 1, "synflow": 100, "synflow_l2": 100, "ntksap": 20}
PLAN = {
    "lenet300_100": (("random", "magnitude", "snip", "grasp", "synflow", "synflow_l2", "ntksap"),
                     (0.2, 0.05, 0.02, 0.01, 0.005)),
    "conv4": (("random", "magnitude", "snip", "synflow", "ntksap"), (0.1, 0.03, 0.01)),
}
DATASETS = ("mnist", "fashion-mnist")
TRAIN = dict(optimizer="sgd", lr=0.01, momentum=0.9)
# the "epoch" per model: lenet300_100 a full one (469 steps of 128); conv4, whose full epoch costs
# about 5 minutes on the 2-core CPU, one pass over the first 12,000 images in batches of 32
# (375 steps: about as many SGD steps as a full epoch, a fifth of the compute)
EPOCH = {"lenet300_100": dict(train_images=None, batch_size=128), "conv4": dict(train_images=12_000, batch_size=32)}
LABELLED_BATCH = 256  # SNIP and GraSP score one labelled batch of the training set
LOSS_SUBSET = 10_000  # training images the after-epoch loss is measured on


# -- statistics ----------------------------------------------------------------------------------

def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks; nan if either is constant."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def permutation_p(x: Sequence[float], y: Sequence[float], n_perm: int = 20_000, seed: int = 0) -> float:
    """Two-sided p-value of Spearman's ρ under random pairing (Monte Carlo, add-one smoothed)."""
    rho = spearman(x, y)
    if math.isnan(rho):
        return float("nan")
    rng = np.random.default_rng(seed)
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    perms = np.stack([rng.permutation(ry) for _ in range(n_perm)])
    null = perms @ rx / den
    return float((1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (n_perm + 1))


def correlations(runs: List[dict], loss_key: str = "train_loss_after") -> dict:
    """ρ of tr Π, λ_max and the density with the loss: pooled, and the mean over densities of the
    across-method ρ within one density (only densities with ≥ 3 masks). Runs with a non-finite
    loss or kernel value (a diverged training, say) are left out and counted."""
    finite = [r for r in runs if all(math.isfinite(r[k]) for k in (loss_key, "trace", "lambda_max"))]
    out = {"n": len(finite), "left_out_non_finite": len(runs) - len(finite), "loss": loss_key}
    runs = finite
    loss = [r[loss_key] for r in runs]
    for key in ("trace", "lambda_max", "density"):
        xs = [r[key] for r in runs]
        out[f"rho_{key}"] = spearman(xs, loss)
        out[f"p_{key}"] = permutation_p(xs, loss)
    for key in ("trace", "lambda_max"):
        within = {}
        for d in sorted({r["density"] for r in runs}, reverse=True):
            group = [r for r in runs if r["density"] == d]
            if len(group) >= 3:
                within[str(d)] = spearman([r[key] for r in group], [r[loss_key] for r in group])
        finite = [v for v in within.values() if not math.isnan(v)]
        out[f"rho_{key}_within_density"] = within
        out[f"rho_{key}_within_density_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


# -- one mask ------------------------------------------------------------------------------------

def study_one(model: torch.nn.Module, method: str, density: float, train_set, loss_set, *,
              labelled, seed: int = 0, batch_size: int = 128, max_batches: Optional[int] = None) -> dict:
    """Prune ``model`` (left untouched) by ``method`` to ``density``, measure tr Π and λ_max of the
    masked network, train a masked copy one epoch and measure its training loss."""
    import ntkfast
    from ntkfast import pathkernel
    from ntkfast.training import evaluate, train

    t0 = time.perf_counter()
    masks = ntkfast.prune(model, method, density, rounds=ROUNDS[method], data=labelled, seed=seed,
                          progress=False, on_empty_layer="ignore")
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = pathkernel.trace(model, masks, dtype=torch.float64)
    lam = float(pathkernel.spectrum(model, masks, k=1)[0]) if masks.kept > 0 else 0.0
    kernel_s = time.perf_counter() - t0
    student = copy.deepcopy(model)
    masks.apply(student)
    res = train(student, masks, train_set, None, 1, seed=seed, progress=False, max_batches=max_batches,
                batch_size=batch_size, **TRAIN)
    loss_after, acc_after = evaluate(student, loss_set, max_batches=max_batches)
    return {"method": method, "density": density, "rounds": ROUNDS[method], "kept": masks.kept,
            "empty_layers": masks.empty_layers(), "trace": tr, "lambda_max": lam,
            "train_loss_epoch": res.train_loss[0], "train_loss_after": loss_after, "train_accuracy_after": acc_after,
            "prune_s": prune_s, "kernel_s": kernel_s, "train_s": res.seconds,
            "train_images": len(train_set), "batch_size": batch_size}


def labelled_batch(train_set, n: int, seed: int):
    x, y = next(iter(train_set.batches(n, shuffle=True, seed=seed)))
    return x, y


# -- the study -----------------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return r["model"], r["dataset"], r["method"], r["density"]


def run(args) -> dict:
    from ntkfast import data as D
    from ntkfast import models

    path = Path(args.out)
    out = {"command": "python -m benchmarks.pathkernel_study " + " ".join(sys.argv[1:]),
           "machine": machine_info(torch.device("cpu")), "train": TRAIN, "epoch": EPOCH, "rounds": ROUNDS,
           "loss_subset": LOSS_SUBSET, "labelled_batch": LABELLED_BATCH, "seed": args.seed, "runs": []}
    if path.exists() and not args.fresh:
        previous = json.loads(path.read_text())
        same = ("train", "epoch", "rounds", "loss_subset", "labelled_batch", "seed")
        differ = [k for k in same if json.loads(json.dumps(out[k])) != previous.get(k)]
        if differ:
            raise SystemExit(f"--out: {path} was made with other settings ({', '.join(differ)} differ); "
                             "pass another --out, or --fresh to replace it")
        out["runs"] = previous["runs"]
    done = {_key(r) for r in out["runs"]}

    def save():
        out["correlations"] = {f"{m}/{d}": correlations(group) for (m, d), group in _groups(out["runs"]).items()
                               if len(group) >= 3}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))

    for dataset in args.datasets:
        train_set = D.load_dataset(dataset, args.data_dir, train=True)
        loss_set = train_set.subset(LOSS_SUBSET)
        labelled = labelled_batch(train_set, LABELLED_BATCH, args.seed)
        for model_name in args.models:
            methods, densities = PLAN[model_name]
            epoch = EPOCH[model_name]
            model_train = train_set.subset(epoch["train_images"]) if epoch["train_images"] else train_set
            torch.manual_seed(args.seed)
            model = models.get(model_name, input_shape=train_set.input_shape)
            for density in densities:
                for method in methods:
                    if (model_name, dataset, method, density) in done:
                        continue
                    r = {"model": model_name, "dataset": dataset}
                    r.update(study_one(model, method, density, model_train, loss_set, labelled=labelled,
                                       seed=args.seed, batch_size=epoch["batch_size"]))
                    out["runs"].append(r)
                    save()
                    print(f"{model_name} {dataset} {method:>10} d={density:<6} trΠ={r['trace']:.3e} "
                          f"λ={r['lambda_max']:.3e} loss={r['train_loss_after']:.4f} "
                          f"({r['prune_s']:.0f}+{r['kernel_s']:.0f}+{r['train_s']:.0f} s)", file=sys.stderr, flush=True)
    save()
    return out


def _groups(runs: List[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    return groups


def plot(out: dict, path: Optional[Path] = None, *, axes=None, formats=None):
    """tr Π (top row) and λ_max(Π) (bottom row) at initialisation against the training loss after
    one epoch, one column per (model, dataset); each method in its ntkfast.plot_style style, the
    marker's size growing with the density. ``axes``: a 2 x columns grid of Axes to draw into;
    ``path``: where to save the figure, as each of ``formats`` (ntkfast.plots.save_figure).
    Returns the Figure."""
    from ntkfast.plot_style import dataset_name, method_style, model_name
    from ntkfast.plots import _pyplot, check_axes, save_figure

    plt = _pyplot()
    groups = _groups(out["runs"])
    methods = [m for m in ROUNDS if any(r["method"] == m for r in out["runs"])]
    methods += sorted({r["method"] for r in out["runs"]} - set(methods))
    own = axes is None
    if own:
        fig, grid = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6.4), squeeze=False, layout="constrained")
    else:
        flat = check_axes(axes, "axes", 2 * len(groups))
        grid = [flat[:len(groups)], flat[len(groups):]]
        fig = flat[0].figure
    for col, ((model, dataset), runs) in enumerate(groups.items()):
        corr = out["correlations"].get(f"{model}/{dataset}", {})
        densities = sorted({r["density"] for r in runs})
        for row, (key, label) in enumerate((("trace", "tr Π"), ("lambda_max", "λ_max(Π)"))):
            ax = grid[row][col]
            for method in methods:
                # a collapsed network (no input-output path) has no place on a log axis
                mine = [r for r in runs if r["method"] == method and r[key] > 0]
                if not mine:
                    continue
                style = method_style(method)
                sizes = [16 + 56 * densities.index(r["density"]) / max(1, len(densities) - 1) for r in mine]
                ax.scatter([r[key] for r in mine], [r["train_loss_after"] for r in mine], s=sizes, alpha=0.85,
                           linewidths=0.8, **style.scatter_kwargs())
            ax.set_xscale("log")
            ax.set_xlabel(f"{label} at initialisation (log scale)", fontsize=9)
            ax.set_ylabel("training loss after 1 epoch", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            rho = corr.get(f"rho_{key}", float("nan"))
            within = corr.get(f"rho_{key}_within_density_mean", float("nan"))
            ax.set_title(f"{model_name(model)} / {dataset_name(dataset)}\n"
                         f"ρ = {rho:+.2f} (within a density {within:+.2f})", fontsize=9)
    if own:
        handles = {}
        for a in fig.axes:
            for h, l in zip(*a.get_legend_handles_labels()):
                handles.setdefault(l, h)
        legend = fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=len(handles),
                            fontsize=8, frameon=False, title="marker size grows with the density", title_fontsize=8)
        for h in legend.legend_handles:  # one size in the legend: there it names the method only
            h.set_sizes([36])
    if path is not None:
        save_figure(fig, path, formats)
        if own:
            plt.close(fig)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="the datasets' folder (not needed with --replot)")
    p.add_argument("--models", nargs="+", default=list(PLAN), choices=list(PLAN))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="ignore the finished runs in --out")
    p.add_argument("--out", default=str(RESULTS_DIR / "pathkernel-study.json"))
    p.add_argument("--plot", default=str(RESULTS_DIR / "pathkernel-study.png"))
    p.add_argument("--formats", nargs="+", default=["png", "pdf", "svg"], help="files of the plot, beside each other")
    p.add_argument("--replot", action="store_true", help="only plot the results already in --out (no runs)")
    args = p.parse_args(argv)
    if not args.replot and not args.data_dir:
        p.error("--data-dir is required (except with --replot)")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = json.loads(Path(args.out).read_text()) if args.replot else run(args)
    plot(out, Path(args.plot), formats=args.formats)
    for name, c in out["correlations"].items():
        print(f"{name} (n={c['n']}): ρ(trΠ, loss) = {c['rho_trace']:+.3f} (p={c['p_trace']:.3g}), "
              f"ρ(λmax, loss) = {c['rho_lambda_max']:+.3f} (p={c['p_lambda_max']:.3g}), "
              f"ρ(density, loss) = {c['rho_density']:+.3f}; within density: trΠ {c['rho_trace_within_density_mean']:+.3f}, "
              f"λmax {c['rho_lambda_max_within_density_mean']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
