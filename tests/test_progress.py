"""Progress bars (tqdm) and library messages (logging): when a bar shows, what it shows, how it is
silenced, and where the messages go."""
import io
import logging
import re
import sys
import time

import pytest
import torch
from torch import nn

from ntkfast import prune, transfer
from ntkfast.core import progress
from ntkfast.core.progress import check_progress, env_disabled, progress_bar
from testing import internal


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    yield
    assert progress._stack() == []  # every bar a test opened is closed


def _tty(monkeypatch):
    # set in the test itself: pytest sets its own sys.stderr again after the fixtures
    stream = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _prune(**kw):
    return prune(_net(), "magnitude", 0.2, rounds=3, **kw)


# -- when a bar shows ----------------------------------------------------------------------------

def test_auto_prints_nothing_for_a_short_job_outside_a_terminal(capsys):
    _prune()  # progress=None, the default
    assert capsys.readouterr().err == ""


def test_auto_shows_a_long_job_outside_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.05)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.05)
    with progress_bar(3, "work") as bar:
        for _ in range(3):
            time.sleep(0.1)
            bar.update(1, loss=0.5)
    err = capsys.readouterr().err
    assert "work:" in err and "3/3" in err and "loss=0.5" in err


def test_auto_on_a_terminal_shows_at_once(monkeypatch):
    tty = _tty(monkeypatch)
    _prune()
    text = tty.getvalue()
    assert "prune magnitude: 100%" in text and "3/3" in text and "density=0.2" in text


def test_true_prints_a_bar_with_its_rate_and_fields(capsys):
    _prune(progress=True)
    err = capsys.readouterr().err
    assert re.search(r"prune magnitude: 100%.*3/3 \[[^\]]*(round/s|s/round), density=0\.2\]", err), err


def test_true_to_a_log_prints_a_few_records_however_many_steps(capsys):
    with progress_bar(500, "work", progress=True) as bar:
        for i in range(500):
            bar.update(1, value=float(i))
    err = capsys.readouterr().err
    # the first draw and the last (redraws at most every LOG_INTERVAL seconds), one line
    assert err.count("\r") <= 3 and err.count("\n") == 1 and "500/500" in err


def test_false_prints_nothing_even_on_a_terminal(monkeypatch):
    tty = _tty(monkeypatch)
    _prune(progress=False)
    with progress_bar(3, "work", progress=False) as bar:
        bar.update(3)
    assert tty.getvalue() == ""


@pytest.mark.parametrize("value, silent", [("1", True), ("true", True), ("0", False), ("", False)])
def test_tqdm_disable_silences_every_bar(monkeypatch, value, silent):
    tty = _tty(monkeypatch)
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert env_disabled() is silent
    _prune(progress=True)
    assert (tty.getvalue() == "") is silent


def test_a_bad_progress_value_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^progress: expected None \(auto\), True or False, got 'yes'"):
        _prune(progress="yes")
    with pytest.raises(TypeError, match="^progress:"):
        transfer(_net(), 0.5, torch.randn(32, 12), steps=1, progress=1)
    assert check_progress(None) is None and check_progress(True) is True


# -- inner bars ----------------------------------------------------------------------------------

def test_an_inner_bar_waits_its_delay_and_is_cleared(monkeypatch):
    tty = _tty(monkeypatch)
    with progress_bar(2, "outer") as outer:
        with progress_bar(2, "inner") as inner:  # short: never drawn
            inner.update(2)
        outer.update(2)
    text = tty.getvalue()
    assert "outer" in text and "inner" not in text


def test_an_inner_bar_is_silenced_with_its_outer_bar(monkeypatch):
    tty = _tty(monkeypatch)
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)
    with progress_bar(1, "outer", progress=False):
        with progress_bar(1, "inner", progress=True) as inner:
            inner.update(1)
    assert tty.getvalue() == ""


def test_closing_a_bar_closes_the_inner_bars_an_exception_left_open(monkeypatch):
    tty = _tty(monkeypatch)
    with pytest.raises(RuntimeError):
        with progress_bar(2, "outer"):
            progress_bar(2, "inner")  # never closed by its own code
            raise RuntimeError("stop")
    assert progress._stack() == []
    with progress_bar(1, "after") as bar:  # a bar of its own again, not an inner one
        bar.update(1)
    assert "after: 100%" in tty.getvalue()


def test_prune_of_ntt_shows_the_transfer_inside(monkeypatch):
    tty = _tty(monkeypatch)
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)
    prune(_net(), "ntt", 0.5, data=torch.randn(32, 12), steps=3, batch_size=8, validation=0)
    text = tty.getvalue()
    assert "prune ntt: 100%" in text and re.search(r"transfer: .*/3 \[[^\]]*(step/s|s/step)", text)


def test_the_empirical_ntk_shows_its_blocks_when_long(monkeypatch):
    tty = _tty(monkeypatch)
    from ntkfast.ntk import empirical_ntk

    x = torch.randn(8, 12)
    empirical_ntk(_net(), x, mode="trace", memory_budget=4096)  # several blocks, but fast: nothing
    assert tty.getvalue() == ""
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)
    empirical_ntk(_net(), x, mode="trace", memory_budget=4096)
    assert re.search(r"NTK blocks:.*\d+/\d+ \[", tty.getvalue())
    tty.seek(0)
    tty.truncate()
    with progress_bar(1, "outer", progress=False):  # prune(progress=False) silences the NTK inside
        empirical_ntk(_net(), x, mode="trace", memory_budget=4096)
    assert tty.getvalue() == ""


def test_a_study_shows_its_cells_and_the_running_cells_inner_work(monkeypatch, tmp_path):
    tty = _tty(monkeypatch)
    from ntkfast import data as D
    from ntkfast import study

    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)
    sets = D.GaussianNoise((1, 8, 8), 64, seed=1), D.GaussianNoise((1, 8, 8), 32, seed=2)
    study.run_study("lenet300_100", "noise", None, ["magnitude"], [0.2], [0], tmp_path / "r.jsonl", epochs=1,
                    batch_size=32, datasets=sets)
    text = tty.getvalue()
    assert "study: 100%" in text and "1/1" in text and ("cell/s" in text or "s/cell" in text)
    assert "prune magnitude:" in text and "train:" in text and "epoch 1:" in text


# -- library messages ----------------------------------------------------------------------------

def test_the_ntkfast_logger_has_a_null_handler():
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("ntkfast").handlers)


def test_transfer_logs_its_validations_and_resume(caplog, tmp_path, capsys):
    kw = dict(steps=4, batch_size=8, validation=8, log_every=2, progress=False)
    with caplog.at_level(logging.INFO, logger="ntkfast"):
        transfer(_net(), 0.5, torch.randn(48, 12), **kw)
    steps = [r.getMessage() for r in caplog.records if r.name == "ntkfast.ntt.transfer"]
    assert [m.split(":")[1].strip() for m in steps] == ["step 0 of 4", "step 2 of 4", "step 4 of 4"]
    assert "validation loss" in steps[-1]
    caplog.clear()
    path = tmp_path / "t.ckpt"
    with caplog.at_level(logging.INFO, logger="ntkfast"):
        transfer(_net(), 0.5, torch.randn(48, 12), checkpoint=path, callback=lambda info: info["step"] < 2, **kw)
        caplog.clear()
        transfer(_net(), 0.5, torch.randn(48, 12), checkpoint=path, **kw)
    assert any("resuming from" in r.getMessage() and "at step 2 of 4" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().err == ""  # logged, not printed: nothing configured a handler


def test_the_cli_prints_the_library_messages_unless_quiet(capsys):
    _library_messages = internal("cli")._library_messages
    log = logging.getLogger("ntkfast.somewhere")
    with _library_messages(quiet=False):
        log.info("hello")
        log.debug("not shown")
    assert capsys.readouterr().err == "ntkfast: hello\n"
    with _library_messages(quiet=True):
        log.info("hidden")
        log.warning("shown")
    assert capsys.readouterr().err == "ntkfast: shown\n"
    log.info("after")  # restored: the library is quiet again outside the command
    assert capsys.readouterr().err == ""
    assert logging.getLogger("ntkfast").level == logging.NOTSET


def test_a_resumed_cli_study_says_so_on_stderr(tmp_path, monkeypatch, capsys):
    from ntkfast import cli, study

    def fake_cell(model, method, density, seed, rounds, options, train_set, test_set, protocol, device, engine=None):
        return {"final_test_accuracy": 0.5, "best_test_accuracy": 0.5, "test_accuracy": [0.5], "train_loss": [1.0],
                "achieved_density": density, "layer_density": {"a.weight": density}, "empty_layers": [],
                "prune_seconds": 0.0, "train_seconds": 0.1}

    monkeypatch.setattr(study, "_run_cell", fake_cell)
    from ntkfast import data as D

    sets = D.GaussianNoise((1, 28, 28), 64, seed=1), D.GaussianNoise((1, 28, 28), 32, seed=2)
    monkeypatch.setattr(D, "load_dataset", lambda name, root, train=True: sets[0 if train else 1])

    def args(*densities):
        return ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(tmp_path),
                "--methods", "random", "--densities", *densities, "--epochs", "1", "--out", str(tmp_path / "r.jsonl")]

    assert cli.main(args("0.5")) == 0
    capsys.readouterr()
    assert cli.main(args("0.5", "0.2")) == 0
    assert "ntkfast: study: 1 of 2 cells already in" in capsys.readouterr().err
    assert cli.main(args("0.5", "0.2", "0.1") + ["--quiet"]) == 0
    assert "already in" not in capsys.readouterr().err
