"""Figures (issue 26): one style per method in every figure, ``ax=`` and ``formats=`` on every
plotting function, legends that hide no data, a zoomed panel where accuracy curves crowd,
per-layer densities on a categorical axis, the NTT history on linear axes where it is flat."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from ntkfast import methods, plot_style, plots, report, study  # noqa: E402
from ntkfast.plot_style import METHOD_STYLES, method_style  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "results" / "study"
# the nine methods of the committed studies: each must be told apart from the others by colour,
# by marker and (for a greyscale print) by line
STUDY_METHODS = ("random", "magnitude", "snip", "grasp", "synflow", "synflow_l2", "ntksap", "iterative_snip", "ntt")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _records(methods_=("random", "synflow", "ntksap"), densities=(0.1, 0.03, 0.01), layers=4):
    recs = []
    for i, m in enumerate(methods_):
        for d in densities:
            for seed in (0, 1):
                recs.append({"model": "lenet5", "dataset": "fashion-mnist", "method": m, "density": d, "seed": seed,
                             "rounds": study.DEFAULT_ROUNDS.get(m, 1), "options": {},
                             "protocol": {"epochs": 2, "optimizer": "adam", "lr": 0.001, "momentum": 0.9,
                                          "weight_decay": 0.0, "batch_size": 128, "lr_milestones": [],
                                          "scope": "global", "prune_samples": 100, "train_subset": None,
                                          "test_subset": None, "max_batches": None},
                             "final_test_accuracy": 0.9 - 0.1 * i - d + 0.01 * seed, "best_test_accuracy": None,
                             "test_accuracy": [0.5],
                             "layer_density": {f"features.{k}.weight": min(1.0, d * (k + 1)) for k in range(layers)}})
    return recs


def _study(name):
    return study.read_results(STUDY / name)


def _legend_colours(handles_labels):
    """label -> hex colour of its legend handle (a line, an error-bar container or a scatter)."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import ErrorbarContainer

    out = {}
    for h, label in zip(*handles_labels):
        if isinstance(h, ErrorbarContainer):
            h = h[0]  # its data line
        out[label] = to_hex(h.get_facecolor()[0] if isinstance(h, PathCollection) else h.get_color())
    return out


# -- the style table ---------------------------------------------------------------------------------

def test_every_registered_method_has_its_own_style():
    # the package's own methods (test files register methods of their own, which need no style)
    own = {n for n in methods.available() if getattr(methods.get(n).fn, "__module__", "").startswith("ntkfast.")}
    missing = sorted(own - set(METHOD_STYLES))
    assert not missing, f"methods without an entry in ntkfast.plot_style.METHOD_STYLES: {missing}"
    looks = [(s.color, s.marker, str(s.linestyle)) for s in METHOD_STYLES.values()]
    assert len(set(looks)) == len(looks), "two methods look the same"
    assert len({s.label for s in METHOD_STYLES.values()}) == len(METHOD_STYLES)
    nine = [METHOD_STYLES[m] for m in STUDY_METHODS]
    assert len({s.color for s in nine}) == 9 and len({s.marker for s in nine}) == 9
    assert [method_style(m).label for m in ("ntksap", "snip", "grasp", "synflow", "iterative_snip", "random",
                                            "magnitude", "ntt", "pathkernel")] == [
        "NTK-SAP", "SNIP", "GraSP", "SynFlow", "Iterative SNIP", "Random", "Magnitude", "NTT", "Path Kernel"]


def test_an_unknown_method_gets_a_fallback_style_that_is_stable_across_processes():
    s = method_style("my_pruner")
    assert s == method_style("my_pruner") and s.label == "my_pruner"
    assert (s.color, s.marker) not in {(t.color, t.marker) for t in METHOD_STYLES.values()}
    code = "from ntkfast.plot_style import method_style; s = method_style('my_pruner'); print(s.color, s.marker)"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {f"{s.color} {s.marker}\n"}
    with pytest.raises(TypeError, match="^method: "):
        method_style(3)


def test_display_names_of_models_datasets_and_layers():
    assert plot_style.model_name("lenet300_100") == "LeNet-300-100" and plot_style.model_name("mine") == "mine"
    assert plot_style.dataset_name("fashion-mnist") == "Fashion-MNIST"
    assert plot_style.dataset_name("cifar10") == "CIFAR-10"
    assert plot_style.layer_labels(["features.0.weight", "features.3.weight", "classifier.0.weight",
                                    "classifier.2.weight"]) == ["conv1", "conv2", "fc1", "fc2"]
    assert plot_style.layer_labels(["conv.weight", "blocks.3.conv1.weight", "blocks.3.shortcut.0.weight",
                                    "fc.weight"]) == ["conv", "block 3 conv1", "block 3 shortcut", "fc"]
    assert plot_style.layer_labels(["layers.0.conv.weight", "layers.2.conv.weight", "fc.weight"]) == \
        ["conv1", "conv2", "fc"]
    assert plot_style.layer_labels(["net.a.weight", "classifier.0.weight"]) == ["net.a", "fc"]
    # where the rules would give two layers one label, the ids stay
    assert plot_style.layer_labels(["fc1", "classifier.0.weight", "classifier.1.weight"]) == \
        ["fc1", "classifier.0", "classifier.1"]


def test_figure_labels_are_display_names():
    fig = report.plot_accuracy(_records(), zoom=False)
    ax = fig.axes[0]
    assert ax.get_title() == "LeNet-5 / Fashion-MNIST, 2 epochs"
    labels = fig.legends[0].get_texts()
    assert [t.get_text() for t in labels] == ["Random", "SynFlow", "NTK-SAP"]
    ntt = [{**r, "method": "ntt", "rounds": 1, "options": {"epochs": 1, "scope": "layerwise"}} for r in _records()[:6]]
    assert report.display_label(ntt[0]) == "NTT (1 transfer epoch)"
    fig = report.plot_layer_densities(_records(), density=0.03)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["conv1", "conv2", "conv3", "conv4"]


def test_a_method_has_the_same_colour_and_marker_in_every_figure():
    from benchmarks import pathkernel_study

    recs = _records(("random", "synflow", "ntksap", "snip"))
    acc = report.plot_accuracy(recs, zoom=False)
    layers = report.plot_layer_densities(recs, density=0.03, kind="bars")
    out = json.loads((ROOT / "benchmarks" / "results" / "pathkernel-study.json").read_text())
    kernel = pathkernel_study.plot(out)
    seen = [_legend_colours(acc.axes[0].get_legend_handles_labels()),
            _legend_colours(layers.axes[0].get_legend_handles_labels()),
            _legend_colours(kernel.axes[0].get_legend_handles_labels())]
    for method in ("random", "synflow", "ntksap", "snip"):
        label = METHOD_STYLES[method].label
        colours = {s[label] for s in seen if label in s}
        assert colours == {to_hex(METHOD_STYLES[method].color)}, (method, colours)
    # the marker, too: the accuracy line and the bar's marker
    line = acc.axes[0].containers[1][0]
    assert line.get_marker() == METHOD_STYLES["synflow"].marker


def test_a_method_run_twice_with_other_settings_keeps_its_colour_with_another_line():
    recs = _records(("synflow",)) + [{**r, "rounds": 10} for r in _records(("synflow",))]
    fig = report.plot_accuracy(recs, zoom=False)
    first, second = (c[0] for c in fig.axes[0].containers)
    assert first.get_color() == second.get_color() and first.get_linestyle() != second.get_linestyle()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["SynFlow", "SynFlow (10 rounds)"]


# -- ax= and formats= ----------------------------------------------------------------------------------

def test_ax_draws_into_the_given_axes_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig, (a, b, c) = plt.subplots(1, 3)
    before = plt.get_fignums()
    assert report.plot_accuracy(_records(), ax=a) is fig
    assert report.plot_layer_densities(_records(), density=0.03, ax=b) is fig
    assert plt.get_fignums() == before  # no figure of its own
    assert len(a.containers) == 3 and len(b.patches) == 3 * 4
    assert a.get_legend() is not None and a.get_legend().get_bbox_to_anchor().x0 > a.get_window_extent().x1 - 1
    fig2, axes = plt.subplots(1, 3)
    assert plots.plot_transfer_history({"step": [0, 1], "kernel_distance": [2, 1], "target_distance": [2, 1],
                                        "l2": [1, 1]}, ax=axes) is fig2
    assert all(a.lines for a in axes)
    assert not list(tmp_path.iterdir())
    # a zoomed panel goes into the Axes given for it
    fig3, (main, zoom) = plt.subplots(1, 2)
    report.plot_accuracy(_records(), ax=main, zoom_ax=zoom)
    assert zoom.lines and zoom.get_ylabel().startswith("difference from the best")


def test_ax_and_a_path_save_the_given_figure(tmp_path):
    fig, ax = plt.subplots()
    written = report.plot_accuracy(_records(), tmp_path / "acc.png", ax=ax)
    assert written is fig and (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    assert plt.fignum_exists(fig.number)  # the user's figure is left open


def test_formats_write_each_file_beside_the_other(tmp_path):
    from PIL import Image

    report.plot_accuracy(_records(), tmp_path / "acc.png", formats=["png", "pdf", "svg"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.pdf", "acc.png", "acc.svg"]
    png, pdf, svg = (tmp_path / f"acc.{f}" for f in ("png", "pdf", "svg"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in svg.read_bytes()[:2000]
    with Image.open(png) as im:
        assert round(im.info["dpi"][0]) >= 200
    # fonts embedded as TrueType, not Type 3 (refused by some publishers' checks)
    assert b"/FontFile2" in pdf.read_bytes() and b"/Type3" not in pdf.read_bytes()
    # the same figure gives the same bytes (no dates, fixed SVG ids): a re-render changes git only where it should
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report.plot_accuracy(_records(), tmp_path / "acc", formats=["pdf", "svg"])
    assert (tmp_path / "acc.pdf").read_bytes() == first["acc.pdf"]
    assert (tmp_path / "acc.svg").read_bytes() == first["acc.svg"]
    assert plots.figure_paths("a/b.v2", ["png"]) == [Path("a/b.v2.png")]


def test_write_report_writes_every_format_and_links_the_png(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    written = report.write_report([results], tmp_path / "rep")
    assert {p.suffix for p in written} == {".md", ".png", ".pdf", ".svg"} and len(written) == 7
    md = (tmp_path / "rep" / "report.md").read_text()
    png = next(p for p in written if p.suffix == ".png")
    assert f"![accuracy]({png.name})" in md and f"[PDF]({png.with_suffix('.pdf').name})" in md
    only = report.write_report([results], tmp_path / "pdf", formats=["pdf"])
    assert {p.suffix for p in only} == {".md", ".pdf"}
    assert "![" not in (tmp_path / "pdf" / "report.md").read_text()


def test_report_cli_formats(tmp_path, capsys):
    from ntkfast import cli

    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    assert cli.main(["report", str(results), "--out", str(tmp_path / "rep"), "--formats", "png"]) == 0
    assert {p.suffix for p in (tmp_path / "rep").iterdir()} == {".md", ".png"}
    # argparse's refusal of the choice: exit status 2 and nothing written
    assert cli.main(["report", str(results), "--out", str(tmp_path / "rep2"), "--formats", "tiff"]) == 2
    assert "tiff" in capsys.readouterr().err and not (tmp_path / "rep2").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"formats": "tiff"}, ValueError, "^formats: expected one or more of 'png'"),
    ({"formats": []}, ValueError, "^formats: "),
    ({"formats": 3}, TypeError, "^formats: "),
    ({"ax": "left"}, TypeError, "^ax: expected a matplotlib Axes"),
    ({"zoom": "yes"}, ValueError, "^zoom: "),
    ({"metric": "worst"}, ValueError, "^metric: "),
])
def test_bad_arguments_are_refused_by_name_before_anything_is_written(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        report.plot_accuracy(_records(), tmp_path / "acc.png", **kwargs)
    assert not list(tmp_path.iterdir())


def test_bad_paths_and_kinds_are_refused_before_drawing(tmp_path):
    one = plt.subplots()[1]
    two = plt.subplots(1, 2)[1]
    before = plt.get_fignums()
    with pytest.raises(ValueError, match="^path: the folder .* does not exist"):
        report.plot_accuracy(_records(), tmp_path / "missing" / "acc.png")
    with pytest.raises(ValueError, match="^kind: "):
        report.plot_layer_densities(_records(), tmp_path / "l.png", 0.03, kind="lines")
    with pytest.raises(ValueError, match=r"^density: no runs at density 0\.5"):
        report.plot_layer_densities(_records(), tmp_path / "l.png", 0.5)
    with pytest.raises(ValueError, match="^zoom_ax: "):
        report.plot_accuracy(_records(), ax=one, zoom=True)
    with pytest.raises(ValueError, match="^ax: expected 3 matplotlib Axes"):
        plots.plot_transfer_history({"step": [0], "kernel_distance": [1], "target_distance": [1], "l2": [1]}, ax=two)
    assert plt.get_fignums() == before and not one.lines and not any(a.lines for a in two)
    assert not list(tmp_path.iterdir())


# -- what the figures show -----------------------------------------------------------------------------

def _data_points(ax):
    """Every plotted point of ``ax`` in display coordinates."""
    import numpy as np

    pts = [line.get_xydata() for line in ax.lines if len(line.get_xdata())]
    pts += [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
    return ax.transData.transform(np.concatenate(pts))


def test_the_legend_hides_no_data_in_the_resnet20_figure():
    """The committed ResNet-20 study: a fixed lower-left legend inside the axes used to hide GraSP."""
    fig = report.plot_accuracy(_study("resnet20-cifar10-reduced.jsonl"))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
        assert not any(box.contains(x, y) for x, y in _data_points(ax))
    assert len(fig.axes) == 1  # its curves are apart: no zoomed panel


def test_crowded_curves_get_a_zoomed_panel():
    """LeNet-5: six methods lie within 2.5 points of the best down to 1% density."""
    fig = report.plot_accuracy(_study("lenet5-fashion-mnist.jsonl"))
    main, zoom = fig.axes
    low, high = zoom.get_ylim()
    assert -5 < low < -2 and 0 < high < 1  # a few points deep, not the main panel's 80
    assert main.get_ylim()[1] - main.get_ylim()[0] > 50
    assert len(zoom.lines) >= 9
    assert len(report.plot_accuracy(_study("lenet5-fashion-mnist.jsonl"), zoom=False).axes) == 1
    assert len(report.plot_accuracy(_records(), zoom=True).axes) == 2


def test_per_layer_densities_are_bars_or_a_heatmap_never_lines_across_layers():
    fig = report.plot_layer_densities(_study("lenet5-fashion-mnist.jsonl"), density=0.03)
    ax = fig.axes[0]
    assert len(ax.patches) == 4 * 9  # four layers, nine methods
    for line in ax.lines:  # markers on the bars, and the overall density as a reference line
        joined = line.get_linestyle() not in ("None", "none", "", " ") and len(line.get_xdata()) > 1
        assert not joined or line.get_label().startswith("overall density"), line.get_label()
    heat = report.plot_layer_densities(_study("resnet20-cifar10-reduced.jsonl"), density=0.05)
    ax = heat.axes[0]
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == (9, 22) and not ax.lines
    assert "block 3 shortcut" in [t.get_text() for t in ax.get_xticklabels()]
    forced = report.plot_layer_densities(_records(), density=0.03, kind="heatmap")
    assert len(forced.axes[0].images) == 1


def test_an_emptied_layer_is_marked_zero():
    recs = _records()
    for r in recs:
        if r["method"] == "random":
            r["layer_density"]["features.1.weight"] = 0.0
    ax = report.plot_layer_densities(recs, density=0.03).axes[0]
    assert "0" in [t.get_text() for t in ax.texts]
    ax = report.plot_layer_densities(recs, density=0.03, kind="heatmap").axes[0]
    assert "0" in [t.get_text() for t in ax.texts]


def test_transfer_history_is_linear_where_flat_and_labels_every_axis():
    h = {"step": [0, 100, 200, 300], "kernel_distance": [1500.0, 200.0, 40.0, 30.0],
         "target_distance": [0.13, 0.01, 0.003, 0.002], "l2": [21.3, 21.35, 21.31, 21.36]}
    fig = plots.plot_transfer_history(h)
    scales = [ax.get_yscale() for ax in fig.axes]
    assert scales == ["log", "log", "linear"]
    assert all(ax.get_ylabel() and ax.get_xlabel() == "step" for ax in fig.axes)
    assert plots.spans_decades([1, 10]) and not plots.spans_decades([1, 9.9]) and not plots.spans_decades([0, 5])


def test_pathkernel_figure_draws_into_given_axes_and_writes_its_formats(tmp_path):
    from benchmarks import pathkernel_study

    out = json.loads((ROOT / "benchmarks" / "results" / "pathkernel-study.json").read_text())
    fig, axes = plt.subplots(2, 4)
    assert pathkernel_study.plot(out, axes=axes) is fig and all(a.collections for a in axes.flat)
    assert "LeNet-300-100 / MNIST" in axes[0][0].get_title()
    pathkernel_study.plot(out, tmp_path / "pk.png", formats=["png", "pdf"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk.pdf", "pk.png"]
