"""Packaging: the sdist holds what a build needs, the metadata has one source, and run.sh keeps its
installs in a project environment. Nothing here compiles: .ci/sdist_check.sh builds and installs
the sdist (minutes); these checks take seconds."""
from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
needs_git = pytest.mark.skipif(
    shutil.which("git") is None
    or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode,
    reason="needs a git checkout (the file list comes from git)")


def _git_files(*paths):
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                          *paths], capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).exists()]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist setuptools makes (what `python -m build --sdist --no-isolation` calls), from a copy
    of what a clone holds, so that nothing is written into the checkout; -> (members, PKG-INFO)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for rel in _git_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    r = subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))",
                        str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path = out / r.stdout.strip().splitlines()[-1]
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        top = names[0].split("/", 1)[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
        entry_points = tar.extractfile(f"{top}/ntkfast.egg-info/entry_points.txt").read().decode()
    members = {n.split("/", 1)[1] for n in names}
    return members, email.parser.Parser().parsestr(pkg_info), entry_points


@needs_git
def test_sdist_holds_every_source_file_the_build_needs(sdist):
    members, _, _ = sdist
    # the CUDA sources and headers too: the sdist is made here, on a CPU machine
    csrc = set(_git_files("csrc"))
    assert {p for p in csrc if p.endswith((".cu", ".cuh"))}, "no CUDA source in csrc/?"
    assert csrc - members == set()
    assert {p for p in _git_files("ntkfast") if p.endswith(".py")} - members == set()
    for f in ("setup.py", "pyproject.toml", "build_checks.py", "LICENSE", "README.md", "ntkfast/py.typed"):
        assert f in members


@needs_git
def test_sdist_holds_no_build_output_and_no_partial_test_suite(sdist):
    members, _, _ = sdist
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc", ".pyd")) or m.startswith("build/")]
    assert not [m for m in members if m.startswith("tests/")]


@needs_git
def test_sdist_metadata(sdist):
    _, meta, entry_points = sdist
    from ntkfast._version import __version__

    assert meta["Name"] == "ntkfast"
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Requires-Python"] == ">=3.10"
    assert "the ntkfast authors" in meta["Author"]
    requires = [r.split(";")[0].strip() for r in meta.get_all("Requires-Dist")]
    assert {"numpy"} <= set(requires)
    assert any(r.startswith("torch") for r in requires) and any(r.startswith("tqdm") for r in requires)
    assert {"plots", "test", "docs"} <= set(meta.get_all("Provides-Extra"))
    assert meta.get_all("Project-URL")
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert "ntkfast = ntkfast.cli:main" in entry_points


def test_license_is_bsd_3_clause():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "the ntkfast authors" in text


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python >= 3.11")
def test_console_script_target_returns_the_exit_status(capsys):
    """The script pip writes runs sys.exit(main()): main must return the status, not print it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, attr = project["scripts"]["ntkfast"].partition(":")
    main = getattr(__import__(module, fromlist=[attr]), attr)
    assert main(["models"]) == 0
    assert "resnet20" in capsys.readouterr().out
    assert main(["prune", "--no-such-option"]) == 2  # argparse's usage error, returned as the status
    assert "--no-such-option" in capsys.readouterr().err


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python >= 3.11")
def test_metadata_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ntkfast._version.__version__"}
    setup_py = (ROOT / "setup.py").read_text()
    for field in ("name=", "version=", "install_requires=", "entry_points=", "python_requires="):
        assert field not in setup_py, f"setup.py repeats {field} (pyproject.toml's [project] has it)"


# --- run.sh's choice of Python, with stand-ins for python3 that only log what they are asked

_STUB = r"""#!/bin/sh
echo "$0 $*" >> "$STUB_LOG"
case "$*" in
  *version_info*) exit "${STUB_TOO_OLD:-0}" ;;
  "-V") echo "Python 3.11.0"; exit 0 ;;
  "-m venv"*)
    for last in "$@"; do :; done
    mkdir -p "$last/bin"; cp "$0" "$last/bin/python"; exit 0 ;;
  "-") cat > /dev/null; printf '\n\n'; exit 0 ;;
esac
exit 0
"""


def _run_sh(tmp_path, *args, env=None):
    """run.sh copied into tmp_path/proj, with a python3 stand-in first on PATH; -> (status, stderr, log)."""
    proj, bin_ = tmp_path / "proj", tmp_path / "bin"
    proj.mkdir(exist_ok=True)
    bin_.mkdir(exist_ok=True)
    shutil.copy2(ROOT / "run.sh", proj / "run.sh")
    stub = bin_ / "python3"
    stub.write_text(_STUB)
    stub.chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV")}
    base.update(PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), **(env or {}))
    r = subprocess.run(["bash", str(proj / "run.sh"), *args], cwd=tmp_path, env=base, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, r.stderr, log.read_text().splitlines()


def _asked_setup(log):
    """The interpreters that were given the set-up check (run.sh's `"$PY" -`)."""
    return [line.rsplit(" ", 1)[0] for line in log if line.endswith(" -")]


needs_bash = pytest.mark.skipif(shutil.which("bash") is None or os.name != "posix", reason="needs bash")


@needs_bash
def test_run_sh_makes_a_project_venv_once_and_reuses_it(tmp_path):
    status, err, log = _run_sh(tmp_path, "setup")
    assert status == 0, err
    venv = tmp_path / "proj" / ".venv"
    made = [line for line in log if " -m venv " in line]
    assert len(made) == 1 and "--system-site-packages" in made[0] and made[0].endswith(" .venv")
    assert _asked_setup(log) == [str(venv / "bin" / "python")]
    assert "making the project environment .venv" in err

    status, err, log = _run_sh(tmp_path, "setup")
    assert status == 0, err
    assert len([line for line in log if " -m venv " in line]) == 1  # reused, not made again
    assert _asked_setup(log) == [str(venv / "bin" / "python")] * 2


@needs_bash
def test_run_sh_commands_run_in_the_project_venv(tmp_path):
    status, err, log = _run_sh(tmp_path, "python", "-c", "pass")
    assert status == 0, err
    venv_python = str(tmp_path / "proj" / ".venv" / "bin" / "python")
    assert log[-1] == f"{venv_python} -c pass"


@needs_bash
@pytest.mark.parametrize("how", ["PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX"])
def test_run_sh_uses_the_python_or_environment_given(tmp_path, how):
    env_dir = tmp_path / "theirs"
    (env_dir / "bin").mkdir(parents=True)
    theirs = env_dir / "bin" / "python"
    theirs.write_text(_STUB)
    theirs.chmod(0o755)
    env = {"PYTHON": {"PYTHON": str(theirs)},
           "VIRTUAL_ENV": {"VIRTUAL_ENV": str(env_dir)},
           "CONDA_PREFIX": {"CONDA_PREFIX": str(env_dir), "CONDA_DEFAULT_ENV": "theirs"}}[how]
    status, err, log = _run_sh(tmp_path, "setup", env=env)
    assert status == 0, err
    assert _asked_setup(log) == [str(theirs)]
    assert not (tmp_path / "proj" / ".venv").exists()


@needs_bash
def test_run_sh_conda_base_is_not_used(tmp_path):
    env_dir = tmp_path / "conda"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "python").write_text(_STUB)
    (env_dir / "bin" / "python").chmod(0o755)
    status, err, log = _run_sh(tmp_path, "setup", env={"CONDA_PREFIX": str(env_dir), "CONDA_DEFAULT_ENV": "base"})
    assert status == 0, err
    assert _asked_setup(log) == [str(tmp_path / "proj" / ".venv" / "bin" / "python")]


@needs_bash
def test_run_sh_refuses_an_old_python_before_making_anything(tmp_path):
    status, err, log = _run_sh(tmp_path, "setup", env={"STUB_TOO_OLD": "1"})
    assert status == 1
    assert "needs Python >= 3.10" in err
    assert not (tmp_path / "proj" / ".venv").exists()
    assert not _asked_setup(log)


@needs_bash
def test_run_sh_remakes_its_own_broken_venv_but_not_someone_elses(tmp_path):
    venv = tmp_path / "proj" / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "keep-me").write_text("theirs")
    status, err, _ = _run_sh(tmp_path, "setup")
    assert status == 1
    assert "did not make it" in err
    assert (venv / "keep-me").read_text() == "theirs"  # left as it was

    (venv / ".made-by-run.sh").touch()  # ours: a Python that no longer runs is replaced
    status, err, log = _run_sh(tmp_path, "setup")
    assert status == 0, err
    assert "making it again" in err
    assert not (venv / "keep-me").exists()
    assert _asked_setup(log) == [str(venv / "bin" / "python")]
