"""ntkfast.study (resumable accuracy studies) and ntkfast.report (tables and plots)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ntkfast import cli, report, study
from ntkfast import data as D

def _noise_sets():
    return D.GaussianNoise((1, 28, 28), 256, seed=1), D.GaussianNoise((1, 28, 28), 128, seed=2)


def _lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def test_a_tiny_mnist_study_runs_end_to_end_and_is_not_run_twice(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    kw = dict(epochs=1, train_subset=512, test_subset=256, batch_size=64, progress=False)
    recs = study.run_study("lenet300_100", "MNIST", data_dir, ["random", "snip"], [0.1], [0], out, **kw)
    assert [r["method"] for r in recs] == ["random", "snip"]
    for r in recs:
        assert 0.0 <= r["final_test_accuracy"] <= 1.0 and r["best_test_accuracy"] >= r["final_test_accuracy"]
        assert len(r["test_accuracy"]) == 1
        assert r["achieved_density"] == pytest.approx(0.1, abs=1e-4)
        assert r["dataset"] == "mnist"  # the canonical name, whatever the spelling given
        assert len(r["layer_density"]) == 3 and all(0 < v <= 1 for v in r["layer_density"].values())
        assert 0 < r["effective_density"] <= r["achieved_density"]
        assert list(r["live_units"]) == list(r["layer_density"]) and r["live_units"]["classifier.4.weight"][1] == 10
        assert r["protocol"]["train_subset"] == 512 and r["protocol"]["prune_samples"] == 100
        assert r["protocol"]["lr"] == 0.1  # the default, written out
        assert r["machine"]["cpu_count"] >= 1 and r["prune_seconds"] >= 0 and r["train_seconds"] > 0
    assert len(_lines(out)) == 2

    def boom(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(study, "_run_cell", boom)
    # the same protocol spelt otherwise: lr given as the default, the dataset by its alias
    again = study.run_study("lenet300_100", "mnist", data_dir, ["random", "snip"], [0.1], [0], out, lr=0.1, **kw)
    assert [r["final_test_accuracy"] for r in again] == [r["final_test_accuracy"] for r in recs]
    assert len(_lines(out)) == 2


def test_a_killed_study_continues_where_it_stopped(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    densities = ["0.2", "0.1", "0.05"]
    args = ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(data_dir),
            "--methods", "random", "magnitude", "--densities", *densities, "--epochs", "1",
            "--train-subset", "8192", "--test-subset", "256", "--quiet", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "ntkfast"] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _lines(out)
    assert 1 <= len(before) < 6  # killed part-way
    ran = []
    real = study._run_cell
    monkeypatch.setattr(study, "_run_cell", lambda *a, **k: ran.append(a[1:3]) or real(*a, **k))
    assert cli.main(args) == 0
    after = _lines(out)
    assert len(ran) == 6 - len(before)
    assert after[:len(before)] == before
    cells = [(r["method"], r["density"]) for r in after]
    assert sorted(cells) == sorted((m, float(d)) for m in ("random", "magnitude") for d in densities)
    assert not Path(str(out) + ".claims").exists()  # the killed process's claim was taken over, then tidied


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    kw = dict(epochs=1, batch_size=64, datasets=_noise_sets(), progress=False)
    # what the other process wrote: the same study's cells, run first into a file of their own
    theirs = study.run_study("lenet300_100", "noise", None, ["random", "magnitude"], [0.2], [0],
                             tmp_path / "other.jsonl", **kw)
    other_lines = (tmp_path / "other.jsonl").read_text().splitlines(keepends=True)
    ran = []
    real = study._run_cell

    def run_then_other_process_appends(*a, **k):
        ran.append(a[1])
        result = real(*a, **k)
        if len(ran) == 1:  # while this cell ran, the other process finished magnitude
            with open(out, "a") as f:
                f.write(other_lines[1])
        return result

    monkeypatch.setattr(study, "_run_cell", run_then_other_process_appends)
    recs = study.run_study("lenet300_100", "noise", None, ["random", "magnitude", "snip"], [0.2], [0], out, **kw)
    assert ran == ["random", "snip"]
    assert recs[1] == theirs[1]
    assert [r["method"] for r in _lines(out)] == ["magnitude", "random", "snip"]


def test_an_interrupted_last_line_is_dropped_and_a_corrupt_one_named(tmp_path):
    out = tmp_path / "r.jsonl"
    rec = _fixed_records()[0]
    good = json.dumps(rec)
    out.write_text(good + "\n" + '{"a": 2, "b"')
    assert study.read_results(out) == [rec]
    assert out.read_text().endswith('"b"')  # reading alone changes nothing
    assert study.read_results(out, repair=True) == [rec]
    assert out.read_text() == good + "\n"
    out.write_text(good)  # complete but without its newline: kept, and the line ended
    assert study.read_results(out, repair=True) == [rec]
    assert out.read_text() == good + "\n"
    out.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(ValueError, match="line 2"):
        study.read_results(out)


def test_bad_arguments_are_named_before_any_cell_runs(tmp_path):
    sets = _noise_sets()
    out = tmp_path / "r.jsonl"
    base = dict(datasets=sets, progress=False)
    cases = [(("lenet300_100", ["random", "nope"], [0.1], [0]), {}, "nope"),
             (("lenet300_100", ["random"], [0.0], [0]), {}, "densities"),
             (("lenet300_100", ["random"], [0.1, 0.1], [0]), {}, "densities"),
             (("lenet300_100", ["random"], [0.1], []), {}, "seeds"),
             (("no_such_net", ["random"], [0.1], [0]), {}, "model"),
             (("lenet300_100", ["synflow"], [0.1], [0]), {"rounds": {"snip": 3}}, "rounds"),
             (("lenet300_100", ["random"], [0.1], [0]), {"optimizer": "lbfgs"}, "optimizer"),
             (("lenet300_100", ["random"], [0.1], [0]), {"epochs": 0}, "epochs"),
             (("lenet300_100", ["random"], [0.1], [0]), {"lr": -1.0}, "lr"),
             (("lenet300_100", ["random"], [0.1], [0]), {"device": "cuda:0"} if not __import__("torch").cuda.is_available()
              else {"momentum": -1.0}, "device|momentum"),
             (("lenet300_100", ["ntksap"], [0.1], [0]), {"method_options": {"ntksap": {"repats": 5}}}, "repats"),
             (("lenet300_100", ["snip"], [0.1], [0]), {"method_options": {"snip": {"seed": 1}}}, "snip:seed"),
             (("lenet300_100", ["ntt"], [0.1], [0]), {"method_options": {"ntt": {"progress": True}}}, "ntt:progress"),
             (("lenet300_100", ["ntt"], [0.1], [0]), {"method_options": {"ntt": {"epoch": 1}}}, "ntt:epoch")]
    for (model, methods, densities, seeds), extra, word in cases:
        with pytest.raises(ValueError, match=word):
            study.run_study(model, "noise", None, methods, densities, seeds, out, **base, **extra)
    assert not out.exists()


def test_ntt_cells_train_from_the_transferred_weights(tmp_path, monkeypatch):
    import torch

    import ntkfast.training as training
    from ntkfast import models

    calls = []
    real = training.train

    def spy(model, masks, *a, **k):
        calls.append({n: p.detach().clone() for n, p in model.named_parameters() if n in masks})
        calls[-1]["masks"] = dict(masks)
        return real(model, masks, *a, **k)

    monkeypatch.setattr(training, "train", spy)
    recs = study.run_study("lenet300_100", "noise", None, ["ntt", "synflow"], [0.2], [0], tmp_path / "r.jsonl",
                           epochs=1, batch_size=64, datasets=_noise_sets(), progress=False,
                           method_options={"ntt": {"steps": 2}}, rounds={"synflow": 3})
    # the options NTT ran with, the study's defaults included
    assert recs[0]["method"] == "ntt" and recs[0]["rounds"] == 1
    assert recs[0]["options"] == {"steps": 2, "lambda_l2": 1e-4, "scope": "layerwise"}
    assert recs[1]["rounds"] == 3
    assert recs[0]["achieved_density"] == pytest.approx(0.2, abs=1e-3)
    torch.manual_seed(0)
    init = dict(models.get("lenet300_100").named_parameters())
    ntt_call, synflow_call = calls
    for name, m in ntt_call["masks"].items():
        w = ntt_call[name]
        assert bool((w[~m] == 0).all()), name  # the transfer's sparse weights, not the dense init
        assert not torch.equal(w[m], init[name].detach()[m]), name  # learned, so moved from the init
    for name in synflow_call["masks"]:
        assert torch.equal(synflow_call[name], init[name].detach()), name  # score-based: the init itself


def _fixed_records():
    recs = []
    acc = {("random", 0.1): (0.90, 0.92), ("random", 0.01): (0.50, 0.60),
           ("synflow", 0.1): (0.95, 0.95), ("synflow", 0.01): (0.70, 0.80)}
    for (method, d), values in acc.items():
        for seed, a in enumerate(values):
            recs.append({"model": "lenet300_100", "dataset": "mnist", "method": method, "density": d, "seed": seed,
                         "rounds": 100 if method == "synflow" else 1, "options": {},
                         "protocol": {"epochs": 20, "optimizer": "sgd", "lr": None, "momentum": 0.9,
                                      "weight_decay": 0.0, "batch_size": 128, "lr_milestones": [], "scope": "global",
                                      "prune_samples": 100, "train_subset": None, "test_subset": None,
                                      "max_batches": None},
                         "final_test_accuracy": a, "best_test_accuracy": a + 0.01, "test_accuracy": [a],
                         "layer_density": {"0.weight": d * 0.5, "2.weight": d * 2, "4.weight": 1.0 if method == "synflow" else d}})
    return recs


def test_report_table_text():
    text = report.markdown_table(_fixed_records())
    assert "| method | density 0.1 | density 0.01 |" in text
    assert "| random | 91.00 ± 1.41 | 55.00 ± 7.07 |" in text
    assert "| synflow | **95.00 ± 0.00** | **75.00 ± 7.07** |" in text
    assert "20 epochs; sgd lr 0.1; batch 128; global scope; seeds 0, 1" in text
    best = report.markdown_table(_fixed_records(), metric="best")
    assert "**96.00 ± 0.00**" in best
    with pytest.raises(ValueError, match="metric"):
        report.markdown_table(_fixed_records(), metric="worst")


def test_report_labels_a_reduced_protocol_by_what_it_cut():
    full = report.markdown_table(_fixed_records())
    assert "REDUCED" not in full
    reduced = [{**r, "protocol": {**r["protocol"], "train_subset": 5000, "test_subset": 2000}} for r in _fixed_records()]
    text = report.markdown_table(reduced)
    assert "REDUCED: first 5000 training images, first 2000 test images; seeds 0, 1" in text
    assert "None" not in text
    capped = [{**r, "protocol": {**r["protocol"], "max_batches": 7}} for r in _fixed_records()]
    assert "REDUCED: at most 7 batches per epoch;" in report.markdown_table(capped)
    # the plots say it too, so that a PNG copied out of the report cannot pass for a full run
    assert report._plot_title(reduced[0]) == "LeNet-300-100 / MNIST, 20 epochs (REDUCED)"
    assert report._plot_title(_fixed_records()[0]) == "LeNet-300-100 / MNIST, 20 epochs"


def test_report_writes_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _fixed_records()))
    outdir = tmp_path / "report"
    assert cli.main(["report", str(results), "--out", str(outdir)]) == 0
    md = (outdir / "report.md").read_text()
    accuracy = sorted(outdir.glob("accuracy-lenet300_100-mnist-e20-*.png"))
    layers = sorted(outdir.glob("layers-lenet300_100-mnist-e20-*-d0.1.png"))
    assert len(accuracy) == 1 and len(layers) == 1
    assert "**lenet300_100 on mnist**" in md and f"![accuracy]({accuracy[0].name})" in md
    for png in accuracy + layers:
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["report", str(tmp_path / "missing.jsonl"), "--out", str(outdir)]) == 2
    # another protocol: its own table and its own plots, none overwritten
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "protocol": {**r["protocol"], "lr": 0.05}}) + "\n"
                             for r in _fixed_records()))
    assert cli.main(["report", str(results), str(other), "--out", str(outdir)]) == 0
    assert (outdir / "report.md").read_text().count("**lenet300_100 on mnist**") == 2
    assert len(list(outdir.glob("accuracy-*.png"))) == 2


def test_report_tables_alone_and_bad_files(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _fixed_records()))
    outdir = tmp_path / "tables"
    assert cli.main(["report", str(results), "--out", str(outdir), "--no-plots"]) == 0
    assert "| random | 91.00 ± 1.41 |" in (outdir / "report.md").read_text()
    assert not list(outdir.glob("*.png"))
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"method": "snip"}) + "\n")
    with pytest.raises(ValueError, match="results: .* line 1 is not an ntkfast study record"):
        report.write_report([foreign], outdir)


def test_report_rows_keep_other_settings_apart_and_count_a_cell_once():
    recs = _fixed_records()
    tweaked = [{**r, "rounds": 10} for r in recs if r["method"] == "synflow"]
    text = report.markdown_table(recs + recs[:2] + tweaked)  # recs[:2]: the same cells again
    assert "| random | 91.00 ± 1.41 |" in text  # still two seeds, not four
    assert "| synflow (10 rounds) |" in text and text.count("| synflow") == 2


def test_cli_method_settings_parse():
    assert cli._method_settings(["synflow=10", "ntksap=5"], "--rounds", int) == {"synflow": 10, "ntksap": 5}
    assert cli._method_settings(["ntt:epochs=2", "ntt:lr=0.001", "ntksap:repeats=3"], "--method-option",
                                cli._option) == {"ntt": {"epochs": 2, "lr": 0.001}, "ntksap": {"repeats": 3}}
    with pytest.raises(SystemExit, match="METHOD=N"):
        cli._method_settings(["synflow"], "--rounds", int)
    with pytest.raises(SystemExit, match="METHOD:KEY=VALUE"):
        cli._method_settings(["epochs=2"], "--method-option", cli._option)


def test_prune_cell_starts_from_given_masks_and_refuses_them_for_ntt():
    from ntkfast import Masks, data, models

    noise = data.GaussianNoise((1, 28, 28), 16, num_classes=10)
    protocol = {"scope": "global", "prune_samples": 10}
    start = Masks.ones(models.lenet300_100())
    start["classifier.0.weight"][:, :392] = False  # the top half of the image may not be used
    net, masks = study.prune_cell("lenet300_100", "magnitude", 0.1, 0, 1, {}, noise, protocol, "cpu",
                                  start_masks=start)
    assert not masks["classifier.0.weight"][:, :392].any() and masks.density == pytest.approx(0.1, abs=1e-4)
    with pytest.raises(ValueError, match="start_masks"):
        study.prune_cell("lenet300_100", "ntt", 0.1, 0, 1, {}, noise, protocol, "cpu", start_masks=start)
