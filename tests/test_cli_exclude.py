"""`--exclude` and `--dense-classifier` on `ntkfast prune`, `transfer` and `study`."""
import json

import pytest
import torch

from ntkfast import Masks
from ntkfast import data as D
from ntkfast.cli import main


@pytest.fixture
def noise_data(monkeypatch):
    """--dataset anything reads Gaussian noise of MNIST's shape (no files needed)."""
    def load(name, root=None, train=True, **kwargs):
        return D.GaussianNoise((1, 28, 28), 256 if train else 128, seed=1 if train else 2)

    monkeypatch.setattr(D, "load_dataset", load)


def test_prune_keeps_the_classifier_and_named_layers_dense(tmp_path, capsys):
    out = tmp_path / "m.pt"
    rc = main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--density", "0.1", "--quiet",
               "--dense-classifier", "--exclude", "classifier.0", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "classifier.4.weight (excluded)" in text and "classifier.0.weight (excluded)" in text
    assert "classifier.2.weight (excluded)" not in text and "pruned (not excluded)" in text
    assert "density 0.1 (target 0.1) of the pruned weights" in text
    m = Masks.load(out)
    assert m.excluded == ("classifier.0.weight", "classifier.4.weight")
    assert bool(m["classifier.4.weight"].all()) and bool(m["classifier.0.weight"].all())
    assert m.pruned_density == pytest.approx(0.1) and m.density > 0.8


def test_prune_refuses_an_unknown_layer_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "m.pt"
    rc = main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--quiet", "--exclude", "clasifier.4",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("ntkfast: error: exclude: 'clasifier.4' names no prunable weight") and "'classifier.4'" in err


def test_transfer_dense_classifier(tmp_path, capsys, noise_data):
    out = tmp_path / "t.pt"
    rc = main(["transfer", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(tmp_path),
               "--density", "0.1", "--steps", "2", "--batch-size", "16", "--quiet", "--dense-classifier",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    obj = torch.load(out, weights_only=True)
    assert bool(obj["masks"]["classifier.4.weight"].all())
    assert obj["metadata"]["exclude"] == ["classifier.4.weight"]
    assert float(obj["masks"]["classifier.2.weight"].float().mean()) == pytest.approx(0.1)


def test_study_records_the_dense_layers_in_its_protocol(tmp_path, capsys, noise_data):
    out = tmp_path / "r.jsonl"
    rc = main(["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(tmp_path), "--methods",
               "magnitude", "--densities", "0.1", "--epochs", "1", "--max-batches", "1", "--quiet",
               "--dense-classifier", "--exclude", "classifier.0.weight", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (rec,) = [json.loads(s) for s in out.read_text().splitlines()]
    assert rec["protocol"]["exclude"] == ["classifier.0.weight", "classifier.4.weight"]
    assert rec["layer_density"]["classifier.4.weight"] == 1.0 and rec["layer_density"]["classifier.0.weight"] == 1.0
    assert rec["achieved_density"] == pytest.approx(0.1)  # of the pruned weights, as the cell's density
    rc = main(["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(tmp_path), "--methods",
               "magnitude", "--densities", "0.1", "--quiet", "--exclude", "fc9", "--out", str(tmp_path / "b.jsonl")])
    assert rc == 2 and "exclude: 'fc9' names no prunable weight" in capsys.readouterr().err


def test_run_study_refuses_an_exclude_that_is_not_a_list_of_names(tmp_path):
    from ntkfast import study

    sets = (D.GaussianNoise((1, 28, 28), 64, seed=1), D.GaussianNoise((1, 28, 28), 32, seed=2))
    for bad in ("classifier.0", [torch.nn.Linear], 3):
        with pytest.raises(ValueError, match="^exclude: expected a list of layer names"):
            study.run_study("lenet300_100", "noise", None, ["random"], [0.1], [0], tmp_path / "r.jsonl",
                            datasets=sets, exclude=bad, progress=False)
    assert not (tmp_path / "r.jsonl").exists()
