"""ntkfast.study and ntkfast.report against hostile and careless input (issue 25): a file that is
not a study's is never written, --out is checked before the work, processes sharing a study run
each cell once, malformed records are named by file and line, and the report's files are
replaced whole."""
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from ntkfast import cli, report, study
from ntkfast import data as D

ROOT = Path(__file__).resolve().parents[1]
METHODS, DENSITIES, SEEDS = ["random", "magnitude"], [0.5, 0.2, 0.1], [0, 1]


def _sets():
    return D.GaussianNoise((1, 28, 28), 16, seed=1), D.GaussianNoise((1, 28, 28), 16, seed=2)


def _fake_cell(calls):
    """A cell runner that trains nothing: records its call and returns a result of the right form."""
    def run(model, method, density, seed, *a, **k):
        calls.append((method, density, seed))
        return {"final_test_accuracy": 0.5, "best_test_accuracy": 0.5, "test_accuracy": [0.5],
                "layer_density": {"w": density}}
    return run


def _study(out, methods=("random",), densities=(0.5,), seeds=(0,), **kw):
    return study.run_study("lenet300_100", "noise", None, list(methods), list(densities), list(seeds), out,
                           datasets=_sets(), progress=False, epochs=1, **kw)


def _record(**over):
    rec = {"model": "lenet300_100", "dataset": "mnist", "method": "random", "density": 0.1, "seed": 0,
           "rounds": 1, "options": {},
           "protocol": {"epochs": 20, "optimizer": "sgd", "lr": None, "momentum": 0.9, "weight_decay": 0.0,
                        "batch_size": 128, "lr_milestones": [], "scope": "global", "prune_samples": 100,
                        "train_subset": None, "test_subset": None, "max_batches": None},
           "final_test_accuracy": 0.9, "best_test_accuracy": 0.91, "test_accuracy": [0.9],
           "layer_density": {"0.weight": 0.05, "2.weight": 0.2, "4.weight": 0.1}}
    rec.update(over)
    return rec


def _boom(*a, **k):
    raise AssertionError("a cell ran")


def _cli(capsys, args):
    rc = cli.main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


GOOD = json.dumps(_record())
FOREIGN = {
    "text": b"hello\nworld",  # today: "world" was cut off as an interrupted write
    "text with its newline": b"hello\nworld\n",
    "pretty JSON": b'{\n  "a": 1\n}\n',
    "minified JSON without newline": b'{"a": 1}',  # today: a newline was appended before any check
    "JSON lines that are not records": b'{"a": 1}\n{"b": 2}\n',
    "a brace and text": b"{notes",  # today: truncated to nothing
    "binary": bytes(range(256)) * 4,
    "records then text": (GOOD + "\nhello").encode(),
    "a malformed record then a cut one": (json.dumps(_record(density="abc")) + '\n{"model": "le').encode(),
}


@pytest.mark.parametrize("content", FOREIGN.values(), ids=list(FOREIGN))
def test_a_file_that_is_not_a_study_is_refused_and_left_byte_for_byte(tmp_path, monkeypatch, capsys, content):
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    monkeypatch.setattr(study, "_run_cell", _boom)
    with pytest.raises(ValueError, match="notes.txt' line"):
        study.read_results(out, repair=True)
    assert out.read_bytes() == content
    with pytest.raises(ValueError, match="^out: .*left as it was"):
        _study(out)
    assert out.read_bytes() == content
    rc, err = _cli(capsys, ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir",
                            str(tmp_path / "no-data"), "--methods", "random", "--densities", "0.1",
                            "--quiet", "--out", str(out)])
    assert rc == 2 and len(err) == 1 and err[0].startswith("ntkfast: error: --out: ")
    assert out.read_bytes() == content
    assert not (tmp_path / "notes.txt.claims").exists()


def test_what_proves_a_file_ours_is_then_mended(tmp_path):
    out = tmp_path / "r.jsonl"
    for content, after in [(b"", b""), (b"\n\n", b"\n\n"),
                           (b'{"model": "lenet3', b""),  # a first record cut short: as run_study writes one
                           (b'{"mo', b""),
                           ((GOOD + '\n{"a": 2, "b"').encode(), (GOOD + "\n").encode())]:
        out.write_bytes(content)
        study.read_results(out, repair=True)
        assert out.read_bytes() == after, content


def test_a_folder_as_out_is_refused(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    monkeypatch.setattr(study, "_run_cell", _boom)
    with pytest.raises(ValueError, match="^out: .* is a folder"):
        _study(folder)
    rc, err = _cli(capsys, ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", "nowhere",
                            "--methods", "random", "--densities", "0.1", "--out", str(folder)])
    assert rc == 2 and len(err) == 1 and "--out: " in err[0] and "is a folder" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="results: .* is a folder"):
        study.read_results(folder, name="results")


def test_out_in_a_missing_folder_is_refused_by_the_library_and_made_by_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "no" / "such" / "r.jsonl"
    loaded = []

    def no_data(*a, **k):
        loaded.append(a)
        raise ValueError("no data here")

    monkeypatch.setattr(D, "load_dataset", no_data)
    with pytest.raises(ValueError, match="^out: .*does not exist"):
        study.run_study("lenet300_100", "mnist", "nowhere", ["random"], [0.1], [0], out, progress=False)
    assert loaded == [] and not (tmp_path / "no").exists()
    # the CLI makes the folders (mkdir -p) before the data loads
    rc, err = _cli(capsys, ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", "nowhere",
                            "--methods", "random", "--densities", "0.1", "--out", str(out)])
    assert rc == 2 and err == ["ntkfast: error: no data here"]
    assert (tmp_path / "no" / "such").is_dir() and len(loaded) == 1


def test_out_under_a_file_is_refused_before_the_data_loads(tmp_path, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(D, "load_dataset", lambda *a, **k: loaded.append(a) or _boom())
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    rc, err = _cli(capsys, ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", "nowhere",
                            "--methods", "random", "--densities", "0.1", "--out", str(blocker / "sub" / "r.jsonl")])
    assert rc == 2 and len(err) == 1 and err[0].startswith("ntkfast: error: --out: ") and "is not a folder" in err[0]
    rc, err = _cli(capsys, ["report", "r.jsonl", "--out", str(blocker / "rep")])
    assert rc == 2 and len(err) == 1 and err[0].startswith("ntkfast: error: --out: ") and "is not a folder" in err[0]
    assert loaded == [] and blocker.read_text() == "mine"


def test_an_unwritable_out_is_named(tmp_path, monkeypatch, capsys):
    import ntkfast.core.files as files

    real = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if mode & os.W_OK else real(p, mode))
    rc, err = _cli(capsys, ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", "nowhere",
                            "--methods", "random", "--densities", "0.1", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2 and len(err) == 1 and "--out: " in err[0] and "permission denied" in err[0]
    rc, err = _cli(capsys, ["report", "r.jsonl", "--out", str(tmp_path / "rep")])
    assert rc == 2 and len(err) == 1 and "--out: " in err[0] and "permission denied" in err[0]


def test_report_out_must_be_a_folder(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text(GOOD + "\n")
    target = tmp_path / "report.md"
    target.write_bytes(b"my notes")
    rc, err = _cli(capsys, ["report", str(results), "--out", str(target), "--no-plots"])
    assert rc == 2 and len(err) == 1 and err[0].startswith("ntkfast: error: --out: ") and "is a file" in err[0]
    assert target.read_bytes() == b"my notes"
    with pytest.raises(ValueError, match="^out_dir: .* is a file"):
        report.write_report([results], target, plots=False)
    # in a folder that does not exist yet: the CLI makes it (the library refuses, as for a file)
    with pytest.raises(ValueError, match="^out_dir: .*does not exist"):
        report.write_report([results], tmp_path / "a" / "b", plots=False)
    assert not (tmp_path / "a").exists()
    rc, err = _cli(capsys, ["report", str(results), "--out", str(tmp_path / "a" / "b"), "--no-plots"])
    assert rc == 0 and (tmp_path / "a" / "b" / "report.md").is_file()


@pytest.mark.parametrize("value", ["nan", "0", "1.5", "-0.1"])
def test_report_profile_density_is_checked_before_anything_is_written(tmp_path, capsys, value):
    results = tmp_path / "r.jsonl"
    results.write_text(GOOD + "\n")
    with pytest.raises(ValueError, match="^profile_density: "):
        report.write_report([results], tmp_path / "rep", profile_density=float(value))
    rc, err = _cli(capsys, ["report", str(results), "--out", str(tmp_path / "rep"), "--profile-density", value])
    assert rc == 2 and len(err) == 1 and "profile_density" in err[0]
    assert not (tmp_path / "rep").exists()


def test_report_profile_density_without_runs_there_writes_nothing(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.jsonl"
    results.write_text(GOOD + "\n")
    with pytest.raises(ValueError, match=r"^profile_density: .* no runs at density 0\.77"):
        report.write_report([results], tmp_path / "rep", profile_density=0.77)
    assert not (tmp_path / "rep").exists() or not any((tmp_path / "rep").iterdir())


BAD_RECORDS = {
    "missing fields": json.dumps({"method": "snip", "density": 0.1}),
    "density a string": json.dumps(_record(density="abc")),
    "options a list": json.dumps(_record(options=["a"])),
    "seed a bool": json.dumps(_record(seed=True)),
    "layer densities not numbers": json.dumps(_record(layer_density={"w": "x"})),
    "protocol without epochs": json.dumps(_record(protocol={"optimizer": "sgd", "lr": 0.1, "batch_size": 1,
                                                            "scope": "global"})),
    "accuracy NaN": json.dumps(_record(final_test_accuracy=float("nan"))),
    "accuracy in percent": json.dumps(_record(final_test_accuracy=93.1)),
    "best accuracy infinite": json.dumps(_record(best_test_accuracy=float("inf"))),
    "layer density NaN": json.dumps(_record(layer_density={"w": float("nan")})),
    "a JSON array": "[1, 2]",
    "deep nesting": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("line", BAD_RECORDS.values(), ids=list(BAD_RECORDS))
def test_report_names_the_file_and_line_of_a_malformed_record(tmp_path, capsys, line):
    results = tmp_path / "r.jsonl"
    results.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"^results: '.*r\.jsonl' line 2 is not a"):
        report.write_report([results], tmp_path / "rep", plots=False)
    rc, err = _cli(capsys, ["report", str(results), "--out", str(tmp_path / "rep"), "--no-plots"])
    assert rc == 2 and len(err) == 1 and "r.jsonl' line 2" in err[0]
    assert len(err[0]) < 300  # a hostile value is not echoed whole


def test_report_escapes_what_would_break_the_table(tmp_path):
    recs = [_record(method="snip|x\ny", options={"tag": "a|b\r\nc\\|d"}),
            _record(method="random", seed=1)]
    text = report.markdown_table(recs)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 4  # header, rule, two methods: no row broken by a newline

    def cells(row):  # GFM splits a row at the pipes no backslash escapes
        n, i = 0, 0
        while i < len(row):
            if row[i] == "\\":
                i += 2
                continue
            n += row[i] == "|"
            i += 1
        return n

    assert {cells(r) for r in rows} == {3}
    assert "| snip\\|x y [tag=a\\|b c\\\\\\|d] |" in text


def test_report_plots_a_dollar_in_a_name(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(_record(method=m, density=d, layer_density={"$\\frac$": d})) + "\n"
                               for m in ("$\\frac{$", "random") for d in (0.1, 0.05)))
    written = report.write_report([results], tmp_path / "rep")
    assert len(written) == 1 + 2 * len(report.REPORT_FORMATS) and all(p.stat().st_size > 1000 for p in written[1:])


def test_report_files_are_replaced_whole(tmp_path):
    """A reader holding the earlier report (here: a hard link to it) keeps it whole: the new one
    is written aside and renamed over it, never rewritten in place."""
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(_record(density=d, seed=s)) + "\n" for d in (0.1, 0.05) for s in (0, 1)))
    out = tmp_path / "rep"
    first = report.write_report([results], out)
    kept = {p: (tmp_path / f"old-{p.name}") for p in first}
    for p, link in kept.items():
        os.link(p, link)
    old = {p: link.read_bytes() for p, link in kept.items()}
    results.write_text("".join(json.dumps(_record(density=d, seed=s, final_test_accuracy=0.5,
                                                  layer_density={"0.weight": 0.5, "2.weight": 0.01})) + "\n"
                               for d in (0.1, 0.05) for s in (0, 1)))
    assert report.write_report([results], out) == first
    for p, link in kept.items():
        assert link.read_bytes() == old[p] and p.read_bytes() != old[p], p.name
    assert sorted(x.name for x in out.iterdir()) == sorted(p.name for p in first)  # no temporary files left


def test_a_record_is_appended_by_one_write_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    out.write_text(GOOD + "\n")
    rec = _record(seed=5, test_accuracy=[0.5] * 20_000)  # far beyond any buffer
    line = (json.dumps(rec) + "\n").encode()
    real, writes = os.write, []
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real(fd, data))
    study._append(out, rec)
    assert writes == [line]
    assert out.read_bytes() == (GOOD + "\n").encode() + line
    before = out.read_bytes()
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[: len(data) // 2]))  # a disk filling up
    with pytest.raises(OSError, match="whole"):
        study._append(out, _record(seed=6))
    assert out.read_bytes() == before  # no cut line left for another process to read


def test_a_file_replaced_while_a_cell_runs_is_not_appended_to(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"

    def replace_then_finish(*a, **k):
        out.write_bytes(b"my notes\n")  # the user reused the name meanwhile
        return _fake_cell([])(*a, **k)

    monkeypatch.setattr(study, "_run_cell", replace_then_finish)
    with pytest.raises(ValueError, match="line 1 is not a JSON record"):
        _study(out)
    assert out.read_bytes() == b"my notes\n"
    assert not list(Path(str(out) + ".claims").glob("*.claim"))


def test_a_failed_cell_releases_its_claim_so_a_rerun_runs_it(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    calls = []

    def fail_on_magnitude(model, method, *a, **k):
        if method == "magnitude":
            raise RuntimeError("out of memory")
        return _fake_cell(calls)(model, method, *a, **k)

    monkeypatch.setattr(study, "_run_cell", fail_on_magnitude)
    with pytest.raises(RuntimeError, match="out of memory"):
        _study(out, methods=METHODS)
    assert not list(Path(str(out) + ".claims").glob("*.claim"))
    monkeypatch.setattr(study, "_run_cell", _fake_cell(calls))
    recs = _study(out, methods=METHODS)
    assert calls == [("random", 0.5, 0), ("magnitude", 0.5, 0)]
    assert [r["method"] for r in recs] == METHODS
    assert not Path(str(out) + ".claims").exists()  # tidied once every cell is in


def _head(method, density, seed):
    """The cell as :func:`_study` makes it."""
    return {"model": "lenet300_100", "dataset": "noise", "method": method, "density": density, "seed": seed,
            "rounds": 1, "options": {},
            "protocol": study._protocol(epochs=1, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0,
                                        batch_size=128, lr_milestones=[], scope="global", prune_samples=100,
                                        train_subset=None, test_subset=None, max_batches=None)}


def _claim_of(out, method, density, seed, holder, age=0.0):
    """Write a claim of that cell held by ``holder``, ``age`` seconds old; (the cell, its path)."""
    head = _head(method, density, seed)
    path = study._Claims(Path(out), 600.0).path(head)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"token": "theirs", **holder}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return head, path


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claim_left_by_a_dead_process_is_taken_over_at_once(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    _, path = _claim_of(out, "random", 0.5, 0, {"pid": _dead_pid(), **study._this_machine()})
    calls = []
    monkeypatch.setattr(study, "_run_cell", _fake_cell(calls))
    monkeypatch.setattr(study, "_POLL_SECONDS", 30.0)  # no waiting: the claim is stale at once
    t0 = time.monotonic()
    _study(out)
    assert calls == [("random", 0.5, 0)] and time.monotonic() - t0 < 20
    assert not path.exists() and not path.parent.exists()


def test_a_live_claim_is_waited_for_and_its_record_used(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    holder = {"pid": os.getppid(), **study._this_machine()}  # a live process of this machine
    head, path = _claim_of(out, "random", 0.5, 0, holder)
    calls = []
    monkeypatch.setattr(study, "_run_cell", _fake_cell(calls))
    monkeypatch.setattr(study, "_POLL_SECONDS", 0.05)
    theirs = {**head, "final_test_accuracy": 0.77, "best_test_accuracy": 0.77, "layer_density": {"w": 0.5}}

    def other_process_finishes():
        time.sleep(0.5)
        study._append(out, theirs)
        path.unlink(missing_ok=True)  # the waiting study may have tidied it already

    t = threading.Thread(target=other_process_finishes)
    t.start()
    recs = _study(out, methods=METHODS)
    t.join()
    assert calls == [("magnitude", 0.5, 0)]  # its own cell first, then waited for the other
    assert recs[0]["final_test_accuracy"] == 0.77


def test_a_silent_claim_of_another_machine_is_taken_over_after_the_timeout(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    _claim_of(out, "random", 0.5, 0, {"pid": os.getpid(), "host": "elsewhere", "pidns": None})
    calls = []
    monkeypatch.setattr(study, "_run_cell", _fake_cell(calls))
    monkeypatch.setattr(study, "_POLL_SECONDS", 0.05)
    t0 = time.monotonic()
    _study(out, claim_timeout=0.6)
    assert calls == [("random", 0.5, 0)] and time.monotonic() - t0 >= 0.5
    _claim_of(out, "random", 0.2, 0, {"pid": os.getpid(), "host": "elsewhere", "pidns": None}, age=3600)
    _study(out, densities=[0.2])  # the default timeout, and an hour-old heartbeat
    assert calls[-1] == ("random", 0.2, 0)


def test_a_running_cell_renews_its_claim(tmp_path):
    out = tmp_path / "r.jsonl"
    head = _head("random", 0.5, 0)
    mine = study._Claims(out, 0.3)
    other = study._Claims(out, 0.3)
    other.me = {**other.me, "host": "elsewhere"}
    with mine.take(head):
        time.sleep(1.0)  # three timeouts: only the heartbeat keeps the claim live
        assert other.take(head) is None
        assert mine.take(head) is None  # this process's own live claim
    claim = other.take(head)
    assert claim is not None
    with claim:
        pass


CHILD = """
import os, sys, time
sys.path.insert(0, sys.argv[4])
from ntkfast import study, data as D

log, out, go = sys.argv[1:4]

def fake(model, method, density, seed, *a, **k):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {method} {density} {seed}\\n")
    time.sleep(0.2)
    return {"final_test_accuracy": 0.5, "best_test_accuracy": 0.5, "layer_density": {"w": density}}

study._run_cell = fake
study._POLL_SECONDS = 0.05
sets = (D.GaussianNoise((1, 28, 28), 16, seed=1), D.GaussianNoise((1, 28, 28), 16, seed=2))
open(go + f".ready{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
recs = study.run_study("lenet300_100", "noise", None, %r, %r, %r, out, datasets=sets, progress=False, epochs=1)
print(len(recs))
""" % (METHODS, DENSITIES, SEEDS)


def test_two_processes_started_together_run_each_cell_once(tmp_path):
    script, log, out, go = tmp_path / "child.py", tmp_path / "log", tmp_path / "r.jsonl", tmp_path / "go"
    script.write_text(CHILD)
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", str(script), str(log), str(out), str(go), str(ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 2 and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()  # both at the same moment, on the same first cell
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    n = len(METHODS) * len(DENSITIES) * len(SEEDS)
    assert [int(r[0].split()[-1]) for r in results] == [n, n]  # each returns the whole study
    runs = [line.split() for line in log.read_text().splitlines()]
    assert len(runs) == n and set(Counter(tuple(r[1:]) for r in runs).values()) == {1}  # each cell once
    assert len({r[0] for r in runs}) == 2  # and both took part
    lines = study.read_results(out)
    assert len(lines) == n and len({study.cell_key(r) for r in lines}) == n
    assert not Path(str(out) + ".claims").exists()


def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\nworld")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "ntkfast", "study", "--model", "lenet300_100",
                           "--dataset", "mnist", "--data-dir", "nowhere", "--methods", "random", "--densities",
                           "0.1", "--out", str(notes)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("ntkfast: error: --out: ")
    assert notes.read_text() == "hello\nworld"


def test_cli_claim_timeout_is_a_positive_number_of_seconds():
    base = ["study", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", "d", "--methods", "random",
            "--densities", "0.1", "--out", "r.jsonl"]
    assert cli.build_parser().parse_args(base).claim_timeout == 600.0
    assert cli.build_parser().parse_args(base + ["--claim-timeout", "30"]).claim_timeout == 30.0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(base + ["--claim-timeout", "0"])
    with pytest.raises(ValueError, match="claim_timeout"):
        _study("unused.jsonl", claim_timeout=-1)
