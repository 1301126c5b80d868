"""The `ntkfast` command: prune (defaults and data-based), train and its --out, listings, --help
and --version (without importing torch), errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ntkfast import Masks
from ntkfast.cli import main
from testing import internal

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


def test_prune_with_a_structure(tmp_path, capsys):
    out = tmp_path / "nm.pt"
    rc = main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--structure", "2:4", "--out", str(out),
               "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "2:4 structure: density 0.5 (target 0.5)" in text
    m = Masks.load(out)
    assert m.metadata["structure"] == "2:4" and m.density == 0.5
    for name, mask in m.items():
        assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
    assert main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--structure", "2:4", "--density",
                 "0.1", "--quiet"]) == 2  # a density other than N/M is refused
    assert "density: 0.1, but structure '2:4'" in capsys.readouterr().err


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

    assert cli._default_rounds("ntksap") == 20 and cli._default_rounds("snip") == 1
    assert main(["prune", "--method", "ntksap", "-o", "repeats"]) == 2  # not KEY=VALUE


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
    assert main(["models"]) == 0
    assert "resnet50" in capsys.readouterr().out
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] in ("compiled-cpu", "compiled-cuda", "reference")


@pytest.mark.parametrize("argv, match", [
    (["prune", "--method", "nope", "--quiet"], "argument --method: invalid choice: 'nope'"),
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


# -- train --out -----------------------------------------------------------------------------------

def test_train_out_saves_weights_masks_and_history_that_init_reads_back(data_dir, tmp_path, capsys):
    import torch

    from ntkfast import models

    masks_file = tmp_path / "m.pt"
    assert main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--density", "0.1", "--out",
                 str(masks_file), "--quiet"]) == 0
    out = tmp_path / "runs" / "a" / "trained.pt"  # folders that do not exist yet
    history = tmp_path / "runs" / "h.json"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--masks", str(masks_file), "--epochs",
                 "2", "--max-batches", "3", "--quiet", "--out", str(out), "--history-json", str(history)]) == 0
    assert "saved to" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "ntkfast.train/1" and saved["model"] == "lenet300_100"
    assert saved["input_shape"] == [1, 28, 28] and saved["num_classes"] == 10
    masks = Masks.load(masks_file)
    assert set(saved["masks"]) == set(masks) and all(torch.equal(saved["masks"][n], masks[n]) for n in masks)
    for name, m in masks.items():
        assert (saved["state_dict"][name][~m] == 0).all() and (saved["state_dict"][name][m] != 0).any()
    assert saved["history"]["epochs"] == 2 and len(saved["history"]["lr"]) == 2
    assert json.loads(history.read_text()) == saved["history"]
    assert saved["settings"]["epochs"] == 2 and saved["settings"]["masks"] == str(masks_file)
    model = models.get("lenet300_100")
    model.load_state_dict(saved["state_dict"])  # the whole trained network, as it was
    # --init starts from those weights and masks: with a learning rate of ~0 the weights stay
    again = tmp_path / "again.pt"
    assert main(["train", "--init", str(out), "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "1",
                 "--max-batches", "1", "--lr", "1e-30", "--quiet", "--out", str(again)]) == 0
    assert "density 0.1" in capsys.readouterr().out
    second = torch.load(again, weights_only=True)
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][k], v)
    assert all(torch.equal(second["masks"][n], masks[n]) for n in masks)


def test_train_out_is_checked_before_the_data_loads(tmp_path, capsys, monkeypatch):
    from ntkfast import data as D

    loaded = []
    monkeypatch.setattr(D, "load_dataset", lambda *a, **k: loaded.append(a))
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for flag in ("--out", "--history-json"):
        rc = main(["train", "--dataset", "mnist", "--data-dir", "nowhere", flag, str(blocker / "sub" / "x.pt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"ntkfast: error: {flag}: ") and "not a folder" in err[0]
    assert loaded == [] and blocker.read_text() == "mine"


def test_a_missing_out_folder_is_made_only_when_there_is_something_to_write(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "m.pt"
    # the method fails (unknown option): nothing written, no folder left behind
    assert main(["prune", "--model", "lenet300_100", "--method", "magnitude", "-o", "nope=1", "--out", str(out),
                 "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--out", str(out), "--quiet"]) == 0
    assert Masks.load(out).metadata["method"] == "magnitude"


def test_train_init_refuses_a_file_of_neither_format(tmp_path, capsys):
    import torch

    bad = tmp_path / "x.pt"
    torch.save({"format": "something/1"}, bad)
    assert main(["train", "--init", str(bad), "--dataset", "mnist", "--data-dir", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--init: " in err and "`ntkfast train --out`" in err


# -- --help, --version, choices, listings ------------------------------------------------------------

def test_version(capsys):
    from ntkfast import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ntkfast {__version__}\n"


def test_help_shows_defaults_and_the_choices_of_method_and_model(capsys):
    from ntkfast._catalog import BUILTIN_METHODS, ZOO_MODELS

    assert main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone
    for expected in ("(default: synflow)", "(default: 0.1)", "(default: resnet20)", "(default: global)",
                     "(default: 0)"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text
    method_help = text.split("--method METHOD", 1)[1]
    assert all(name in method_help for name in BUILTIN_METHODS)
    model_help = text.split("--model MODEL", 1)[1]
    assert all(name in model_help for name in ZOO_MODELS)
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT" in text and "--history-json FILE" in text and "(default: 2)" in text


def test_model_names_are_taken_as_the_zoo_spells_them_and_others_refused(capsys):
    from ntkfast import cli

    assert cli.build_parser().parse_args(["prune", "--model", "ResNet-20"]).model == "resnet20"
    assert cli.build_parser().parse_args(["study", "--model", "VGG_16", "--dataset", "mnist", "--data-dir", "d",
                                          "--methods", "snip", "--densities", "0.1", "--out", "r"]).model == "vgg16"
    assert main(["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", "d", "--methods", "snip",
                 "nope", "--densities", "0.1", "--out", "r"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_the_cli_name_tables_match_the_registries():
    from ntkfast import data, methods, models

    _catalog = internal("catalog")

    # the package's own methods: a test elsewhere may have registered one of its own meanwhile
    builtin = tuple(n for n in methods.available()
                    if getattr(methods.get(n).fn, "__module__", "").startswith("ntkfast."))
    assert _catalog.BUILTIN_METHODS == builtin
    assert _catalog.ZOO_MODELS == tuple(models.available())
    assert _catalog.DATASETS == tuple(data.available())


def test_help_and_version_do_not_import_torch():
    code = ("import contextlib, io, sys\n"
            "import ntkfast.cli as cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    codes = [cli.main(a) for a in (['--help'], ['--version'], ['prune', '--help'], ['train', '--help'],\n"
            "             ['study', '--help'], ['prune', '--seed', '3', '--model', 'ResNet-20', '--help'])]\n"
            "print(codes, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0, 0, 0, 0, 0, 0] False"


def test_methods_lists_aligned_columns_and_only_the_options_the_cli_can_set(capsys):
    from ntkfast import methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["METHOD", "DATA", "DESCRIPTION"]
    data_col, desc_col = lines[0].index("DATA"), lines[0].index("DESCRIPTION")
    rows = {line.split()[0]: line for line in lines[1:] if line[:1].strip()}
    assert list(rows) == list(methods.available())
    for name, line in rows.items():
        info = methods.get(name)
        assert line[data_col:desc_col].strip() == ("yes" if info.needs_data or info.raw_data else "-"), name
        assert line[desc_col - 1] == " " and line[desc_col] != " ", name  # every description in one column
    assert all(line[:desc_col].strip() == "" for line in lines[1:] if not line[:1].strip())
    text = "\n".join(lines)
    assert "epsilon=0.01" in text and "lambda_ker=0.001" in text and "temperature=200.0" in text
    for not_settable in ("dtype", "input_shape", "device", "init_fn", "inputs=", "weight_samples", "perturbations",
                         "input_mean", "validation"):
        assert not_settable not in text.split("DESCRIPTION", 1)[1], not_settable


def test_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    # `ntkfast methods | head -1`: the reader leaves after one line; no error line, no traceback
    proc = subprocess.run(f"{sys.executable} -m ntkfast methods | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.stdout.startswith("METHOD") and "Error" not in proc.stderr and "error" not in proc.stderr


def test_prune_with_channel_structure(tmp_path, capsys):
    out = tmp_path / "channels.pt"
    rc = main(["prune", "--model", "resnet20", "--method", "magnitude", "--structure", "channel", "--density", "0.5",
               "--channel-aggregate", "l2", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "channel structure" in text
    m = Masks.load(out)
    for name, mask in m.items():  # whole channels: a pruned filter is all zero, the kept ones read the same inputs
        rows = mask.reshape(mask.shape[0], -1)
        kept = rows[rows.any(1)]
        assert len(kept) and bool((kept == kept[0]).all()), name
    assert abs(m.pruned_density - 0.5) < 0.05
    assert main(["prune", "--model", "lenet300_100", "--method", "magnitude", "--channel-aggregate", "max",
                 "--quiet"]) == 2  # an aggregate without the channel structure is refused
    assert "channel_aggregate" in capsys.readouterr().err
