"""reproduce: a preset's cells through the study, the budget, and the comparison with the paper."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ntkfast import data as D
from ntkfast import presets
from ntkfast.cli import main
from ntkfast.reproduce import compare, format_comparison, reproduce
from testing import internal


def _mnist_like(n, seed):
    g = torch.Generator().manual_seed(seed)
    return D.ImageDataset(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (n,), generator=g), classes=[str(i) for i in range(10)],
                          mean=(0.13,), std=(0.31,), name="mnist")


SETS = (_mnist_like(64, 1), _mnist_like(32, 2))


def _small_synflow_preset():
    # Synaptic-Flow's protocol (Nesterov SGD, pad-and-crop augmentation) on a net that runs in a second
    return dataclasses.replace(presets.get("synflow-vgg16-cifar10"), model="lenet300_100", dataset="mnist")


def test_a_reduced_run_keeps_the_schedules_shape():
    from ntkfast.reproduce import scaled_milestones

    assert scaled_milestones([80, 120], 160, 10) == [5, 8]  # NTK-SAP's drops at 1/2 and 3/4 of the run
    assert scaled_milestones([80, 120], 160, 160) == [80, 120]
    assert scaled_milestones([80, 120], 160, 100) == [50, 75]
    assert scaled_milestones([80, 120], 160, 2) == [1]  # both land on epoch 1: one drop
    assert scaled_milestones([80, 120], 160, 1) == []
    assert scaled_milestones([], 160, 10) == []


def test_cells_run_through_the_study_with_the_presets_protocol(tmp_path):
    out = tmp_path / "r.jsonl"
    p = _small_synflow_preset()
    recs = reproduce(p, None, out, methods=["random", "magnitude"], densities=[0.1], seeds=[0, 1], epochs=1,
                     max_batches=2, datasets=SETS, progress=False)
    assert sorted((r["method"], r["seed"]) for r in recs) == [("magnitude", 0), ("magnitude", 1), ("random", 0),
                                                               ("random", 1)]
    proto = recs[0]["protocol"]
    assert proto["nesterov"] is True and proto["augment"] == "pad4-crop-flip" and proto["epochs"] == 1
    assert proto["lr_milestones"] == [] and proto["weight_decay"] == pytest.approx(1e-4)
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    # resumed: nothing runs again
    again = reproduce(p, None, out, methods=["random", "magnitude"], densities=[0.1], seeds=[0, 1], epochs=1,
                      max_batches=2, datasets=SETS, progress=False)
    assert len(again) == 4 and out.read_text().splitlines() == lines
    rows = compare(again, p)
    assert [(r.method, r.seeds) for r in rows] == [("magnitude", 2), ("random", 2)]
    for r in rows:
        assert r.published == pytest.approx(p.published[r.method][0.1])
        assert r.difference == pytest.approx(r.ours - r.published)
        assert (r.z is None) == (not r.ours_std)
    text = format_comparison(rows, p, reduced=True)
    assert "a reduced run" in text and "| random | 0.1 | 2 |" in text


def test_the_budget_stops_between_cells_and_refuses_what_cannot_fit(tmp_path):
    out = tmp_path / "r.jsonl"
    p = presets.get("ntt-lenet300_100-mnist")
    recs = reproduce(p, None, out, methods=["random"], seeds=[0, 1, 2], epochs=1, max_batches=1, datasets=SETS,
                     progress=False, budget_s=1e-6)
    assert len(recs) == 1  # the first cell always runs; it then says no other fits
    before = out.read_bytes()
    with pytest.raises(ValueError, match="^budget_s: .* less than one cell"):
        reproduce(p, None, out, methods=["random"], seeds=[1], epochs=1, max_batches=1, datasets=SETS,
                  progress=False, budget_s=1e-6)
    assert out.read_bytes() == before


@pytest.mark.parametrize("kwargs,match", [
    ({"methods": ["snip"]}, "^methods: 'snip' is not in the preset's grid"),
    ({"densities": [0.5]}, "^densities: 0.5 is not in the preset's grid"),
    ({"seeds": ["a"]}, "^seeds: invalid entry 'a'"),
    ({"seeds": [2 ** 64 - 1]}, "^seeds: invalid entry"),  # beyond what torch's generators take
    ({"train_subset": 0}, "^train_subset: expected a positive int"),
    ({"test_subset": -3}, "^test_subset: expected a positive int"),
    ({"max_batches": 0}, "^max_batches: expected a positive int"),
    ({"device": "bogus"}, "^device: not a device"),
    ({"epochs": 0}, "^epochs: expected a positive int"),
    ({"budget_s": -1}, "^budget_s: expected a positive number"),
])
def test_bad_choices_are_named_before_any_work(tmp_path, kwargs, match, monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("the data was read before the arguments were checked")

    monkeypatch.setattr(D, "load_dataset", no_reading)
    out = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match=match):
        reproduce("ntt-lenet300_100-mnist", tmp_path / "data", out, **{"progress": False, **kwargs})
    assert list(tmp_path.iterdir()) == []  # no results file, no claims folder


def test_a_bad_progress_is_named_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="^progress: expected None"):
        reproduce("ntt-lenet300_100-mnist", tmp_path / "data", tmp_path / "r.jsonl", progress="yes")
    assert list(tmp_path.iterdir()) == []


def test_the_budget_is_checked_before_the_data_is_read_and_only_when_cells_are_left(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    p = presets.get("ntt-lenet300_100-mnist")
    reproduce(p, None, out, methods=["random"], seeds=[0], epochs=1, max_batches=1, datasets=SETS, progress=False)
    before = out.read_bytes()
    reads = []
    monkeypatch.setattr(D, "load_dataset", lambda name, root, train=True, **kw: reads.append(train) or SETS[not train])
    # every cell asked for is there: nothing to run, nothing to refuse, and the records come back
    recs = reproduce(p, tmp_path, out, methods=["random"], seeds=[0], epochs=1, max_batches=1, progress=False,
                     budget_s=1e-9)
    assert [r["seed"] for r in recs] == [0] and out.read_bytes() == before
    reads.clear()
    with pytest.raises(ValueError, match="^budget_s: .* less than one cell"):
        reproduce(p, tmp_path, out, methods=["random"], seeds=[0, 1], epochs=1, max_batches=1, progress=False,
                  budget_s=1e-9)
    assert reads == [] and out.read_bytes() == before


def test_the_cli_refuses_a_figure_that_would_overwrite_the_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results.png"
    out.write_text("")  # a study file (empty) the user named .png
    for plot in (str(out), str(tmp_path / "results")):
        rc = main(["reproduce", "ntt-lenet300_100-mnist", "--data-dir", str(tmp_path), "--out", str(out),
                   "--plot", plot, "--methods", "random", "--seeds", "0", "--epochs", "1", "--quiet"])
        assert rc == 2 and "--plot: the figure" in capsys.readouterr().err
    assert out.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["results.png"]


def test_an_unknown_preset_is_named(tmp_path):
    with pytest.raises(ValueError, match="^preset: unknown 'nope'"):
        reproduce("nope", None, tmp_path / "r.jsonl")


def test_cli_runs_a_reduced_preset_and_prints_the_comparison(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "load_dataset", lambda name, root, train=True, **kw: SETS[0] if train else SETS[1])
    out = tmp_path / "r.jsonl"
    rc = main(["reproduce", "ntt-lenet300_100-mnist", "--data-dir", str(tmp_path), "--out", str(out),
               "--methods", "random", "--seeds", "0", "--epochs", "1", "--max-batches", "1", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "| random | 0.03 | 1 |" in text and "93.15" in text and "a reduced run" in text
    assert json.loads(out.read_text().splitlines()[0])["method"] == "random"
    assert main(["reproduce", "nope", "--data-dir", ".", "--out", str(out)]) == 2


def test_densities_as_printed_find_their_grid_point(tmp_path):
    p = presets.get("ntksap-resnet20-cifar10")
    rep = internal("reproduce")
    assert rep._pick("densities", [0.2621, 0.01801], p.densities, rep._same_density) == [0.8 ** 6, 0.8 ** 18]


def test_nesterov_needs_momentum(tmp_path):
    from ntkfast.study import run_study

    with pytest.raises(ValueError, match="^nesterov: needs a momentum above 0"):
        run_study("lenet300_100", "mnist", None, ["random"], [0.5], [0], tmp_path / "r.jsonl", nesterov=True,
                  momentum=0.0, datasets=SETS, progress=False)
    with pytest.raises(ValueError, match="^augment: it turns"):
        run_study("lenet300_100", "mnist", None, ["random"], [0.5], [0], tmp_path / "r.jsonl",
                  augment="resized-crop-flip-224", datasets=SETS, progress=False)
    assert not (tmp_path / "r.jsonl").exists() or not (tmp_path / "r.jsonl").read_text()


def test_the_comparison_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from ntkfast.reproduce import Comparison, plot_comparison

    p = _small_synflow_preset()
    rows = [Comparison("synflow", 0.1, 2, 0.9, 0.01, 0.9326, 0.9 - 0.9326, -3.26),
            Comparison("random", 0.1, 1, 0.88, None, 0.9115, 0.88 - 0.9115, None)]
    fig = plot_comparison(rows, p, tmp_path / "cmp.png", formats=("png", "pdf"))
    assert (tmp_path / "cmp.png").stat().st_size > 0 and (tmp_path / "cmp.pdf").stat().st_size > 0
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "SynFlow (ours)" in labels and "SynFlow (published)" in labels and "Random (published)" in labels
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    assert plot_comparison(rows, p, ax=ax) is ax.figure  # draws into the given axes, writes nothing
    with pytest.raises(TypeError, match="^ax: expected a matplotlib Axes"):
        plot_comparison(rows, p, ax="left")
    # the CLI checks --plot before the work: a folder given as the path is refused, nothing runs
    out = tmp_path / "r.jsonl"
    (tmp_path / "adir.png").mkdir()
    rc = main(["reproduce", "ntt-lenet300_100-mnist", "--data-dir", str(tmp_path), "--out", str(out),
               "--plot", str(tmp_path / "adir.png"), "--quiet"])
    assert rc == 2 and "--plot" in capsys.readouterr().err and not out.exists()


def test_the_cli_names_its_out_flag(tmp_path, capsys):
    rc = main(["reproduce", "ntt-lenet300_100-mnist", "--data-dir", str(tmp_path), "--out",
               str(tmp_path / "missing" / "r.jsonl")])
    assert rc == 2 and "--out: the folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_cli_names_the_flags_the_library_refuses(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    for argv, flag in ((["--seeds", str(2 ** 63)], "--seeds: invalid entry"),
                       (["--densities", "0.5"], "--densities: 0.5 is not in the preset's grid"),
                       ([], "--data-dir: mnist")):  # the reader's 'root' is the --data-dir flag
        rc = main(["reproduce", "ntt-lenet300_100-mnist", "--data-dir", str(tmp_path / "none"), "--out", str(out),
                   "--methods", "random", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and f"ntkfast: error: {flag}" in err, err
    assert list(tmp_path.iterdir()) == []
