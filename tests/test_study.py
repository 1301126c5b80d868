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

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST").exists() and not (DATA / "mnist").exists(),
                                 reason="../shared/data with MNIST is not beside the repository")


def _noise_sets():
    return D.GaussianNoise((1, 28, 28), 256, seed=1), D.GaussianNoise((1, 28, 28), 128, seed=2)


def _lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


@needs_mnist
def test_a_tiny_mnist_study_runs_end_to_end_and_is_not_run_twice(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    kw = dict(epochs=1, train_subset=512, test_subset=256, batch_size=64, progress=False)
    recs = study.run_study("lenet300_100", "mnist", DATA, ["random", "snip"], [0.1], [0], out, **kw)
    assert [r["method"] for r in recs] == ["random", "snip"]
    for r in recs:
        assert 0.0 <= r["final_test_accuracy"] <= 1.0 and r["best_test_accuracy"] >= r["final_test_accuracy"]
        assert len(r["test_accuracy"]) == 1
        assert r["achieved_density"] == pytest.approx(0.1, abs=1e-4)
        assert set(r["layer_density"]) == {"0.weight", "2.weight", "4.weight"} or len(r["layer_density"]) == 3
        assert r["protocol"]["train_subset"] == 512 and r["protocol"]["prune_samples"] == 100
        assert r["machine"]["cpu_count"] >= 1 and r["prune_seconds"] >= 0 and r["train_seconds"] > 0
    assert len(_lines(out)) == 2

    def boom(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(study, "_run_cell", boom)
    again = study.run_study("lenet300_100", "mnist", DATA, ["random", "snip"], [0.1], [0], out, **kw)
    assert [r["final_test_accuracy"] for r in again] == [r["final_test_accuracy"] for r in recs]
    assert len(_lines(out)) == 2


@needs_mnist
def test_a_killed_study_continues_where_it_stopped(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    args = ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(DATA),
            "--methods", "random", "magnitude", "--densities", "0.2", "0.05", "--epochs", "1",
            "--train-subset", "4096", "--test-subset", "256", "--quiet", "--out", str(out)]
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
    assert 1 <= len(before) <= 4
    ran = []
    real = study._run_cell
    monkeypatch.setattr(study, "_run_cell", lambda *a, **k: ran.append(a[1:3]) or real(*a, **k))
    assert cli.main(args) == 0
    after = _lines(out)
    assert len(ran) == 4 - len(before)
    assert after[:len(before)] == before
    cells = [(r["method"], r["density"]) for r in after]
    assert sorted(cells) == sorted({("random", 0.2), ("magnitude", 0.2), ("random", 0.05), ("magnitude", 0.05)})


def test_an_interrupted_last_line_is_dropped_and_a_corrupt_one_named(tmp_path):
    out = tmp_path / "r.jsonl"
    good = json.dumps({"a": 1})
    out.write_text(good + "\n" + '{"a": 2, "b"')
    assert study.read_results(out) == [{"a": 1}]
    assert out.read_text().endswith('"b"')  # reading alone changes nothing
    assert study.read_results(out, repair=True) == [{"a": 1}]
    assert out.read_text() == good + "\n"
    out.write_text(good)  # complete but without its newline: kept, and the line ended
    assert study.read_results(out, repair=True) == [{"a": 1}]
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
             (("lenet300_100", ["random"], [0.1], [0]), {"epochs": 0}, "epochs")]
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
    assert recs[0]["method"] == "ntt" and recs[0]["rounds"] == 1 and recs[0]["options"] == {"steps": 2}
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
                         "rounds": 1, "options": {},
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


def test_report_writes_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _fixed_records()))
    outdir = tmp_path / "report"
    assert cli.main(["report", str(results), "--out", str(outdir)]) == 0
    md = (outdir / "report.md").read_text()
    assert "**lenet300_100 on mnist**" in md and "![accuracy](accuracy-lenet300_100-mnist-e20.png)" in md
    for name in ("accuracy-lenet300_100-mnist-e20.png", "layers-lenet300_100-mnist-e20-d0.1.png"):
        png = outdir / name
        assert png.exists() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["report", str(tmp_path / "missing.jsonl"), "--out", str(outdir)]) == 2
