"""The `ntkfast` command: prune (defaults and data-based), train, listings, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ntkfast import Masks
from ntkfast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_prune_prints_table_and_saves(tmp_path, capsys):
    out = tmp_path / "m.pt"
    rc = main(["prune", "--model", "lenet300_100", "--method", "synflow", "--density", "0.1", "--rounds", "3",
               "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    for name in ("classifier.0.weight", "classifier.2.weight", "classifier.4.weight"):
        assert name in text  # one table row per prunable layer
    assert "300x784" in text and "235200" in text
    assert "total" in text and "scoring time" in text and "masks saved" in text
    m = Masks.load(out)
    assert m.metadata["method"] == "synflow" and m.metadata["rounds"] == 3 and m.metadata["model"] == "lenet300_100"
    assert abs(m.density - 0.1) < 1e-4


def test_prune_defaults_need_no_dataset(capsys):
    # the README's main job (resnet20, synflow, density 0.1) with fewer rounds to stay quick
    rc = main(["prune", "--rounds", "2", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "blocks." in text and "method synflow, 2 round(s), global scope" in text and "density 0.1" in text


def test_prune_ntksap_with_options(tmp_path, capsys):
    out = tmp_path / "ntksap.pt"
    rc = main(["prune", "--model", "lenet300_100", "--method", "ntksap", "--density", "0.2", "--quiet",
               "--rounds", "2", "-o", "repeats=2", "-o", "batch_size=8", "-o", "epsilon=0.02", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "method ntksap, 2 round(s)" in text
    m = Masks.load(out)
    assert m.metadata["options"] == {"repeats": 2, "batch_size": 8, "epsilon": 0.02}
    assert abs(m.density - 0.2) < 1e-3


def test_prune_ntksap_defaults_to_the_authors_rounds():
    from ntkfast import cli

    assert cli._ITERATIVE_DEFAULT_ROUNDS["ntksap"] == 20
    with pytest.raises(SystemExit):
        main(["prune", "--method", "ntksap", "-o", "repeats"])  # not KEY=VALUE


def test_data_method_without_dataset_uses_noise(capsys):
    rc = main(["prune", "--model", "lenet300_100", "--method", "snip", "--density", "0.2", "--quiet",
               "--batch-size", "16"])
    cap = capsys.readouterr()
    assert rc == 0 and "Gaussian-noise batch" in cap.err and "total" in cap.out


def test_prune_and_train_on_mnist(data_dir, tmp_path, capsys):
    out = tmp_path / "snip.pt"
    assert main(["prune", "--model", "lenet300_100", "--method", "snip", "--density", "0.05", "--dataset", "mnist",
                 "--data-dir", str(data_dir), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(data_dir),
                 "--masks", str(out), "--epochs", "1", "--max-batches", "30", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "density 0.05" in text and "test accuracy:" in text
    acc = float(text.rsplit("test accuracy:", 1)[1].strip().rstrip("%"))
    assert acc > 30.0  # 30 SGD steps on 5%-dense LeNet-300-100: far above chance


def test_train_takes_the_model_a_masks_file_was_made_for(data_dir, tmp_path, capsys):
    out = tmp_path / "conv.pt"
    assert main(["prune", "--model", "conv4", "--method", "magnitude", "--density", "0.1", "--input-shape",
                 "1,28,28", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    # no --model: the file's conv4 and its input shape, not the default lenet300_100
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--masks", str(out), "--epochs", "1",
                 "--max-batches", "2", "--quiet"]) == 0
    assert "density 0.1" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["train", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(data_dir),
                 "--masks", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "was made for a conv4, not a lenet300_100" in err and "--model conv4" in err
    assert out.read_bytes() == before


def test_prune_dist_variant_reads_the_dataset_mean(data_dir, tmp_path, capsys):
    """The Dist variants get the whole training set from the CLI, so they feed its un-normalised
    mean input (a normalised batch would have a negative mean and be refused)."""
    import torch

    import ntkfast
    from ntkfast import data as D, models

    out = tmp_path / "dist.pt"
    assert main(["prune", "--model", "lenet300_100", "--method", "synflow_dist", "--density", "0.1", "--dataset",
                 "mnist", "--data-dir", str(data_dir), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    torch.manual_seed(0)
    model = models.get("lenet300_100")
    # the CLI's default for the SynFlow variants is the authors' 100 rounds
    want = ntkfast.prune(model, "synflow_dist", 0.1, data=D.load_dataset("mnist", data_dir, train=True),
                         rounds=100, progress=False)
    got = Masks.load(out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_listings(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("random", "magnitude", "snip", "iterative_snip", "grasp", "synflow"):
        assert name in text
    assert "(needs data)" in text
    assert main(["models"]) == 0
    assert "resnet50" in capsys.readouterr().out
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] in ("compiled-cpu", "compiled-cuda", "reference")


@pytest.mark.parametrize("argv, match", [
    (["prune", "--method", "nope", "--quiet"], "method: unknown method 'nope'"),
    (["prune", "--density", "0", "--quiet"], "density: expected a finite number > 0.0"),
    (["prune", "--model", "alexnet", "--quiet"], "model"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/dir", "--epochs", "1"], "/nonexistent/dir"),
])
def test_errors_exit_2_with_named_message(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ntkfast", "methods"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "synflow" in r.stdout
