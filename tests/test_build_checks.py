"""build_checks.py: a C++ compiler that links libstdc++ statically is caught before the build.

The GPU image of the first H200 run had CXX set to such a wrapper; the extension it built
segfaulted on the first error message that formatted a number (benchmarks/results/gpu, run 2).
"""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import build_checks  # noqa: E402

GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None or shutil.which("readelf") is None, reason="needs g++ and readelf")


def _wrapper(tmp_path, extra):
    w = tmp_path / "wrapped-g++"
    w.write_text(f'#!/bin/sh\nexec {GXX} "$@" {extra}\n')
    w.chmod(w.stat().st_mode | stat.S_IEXEC)
    return str(w)


def _static_libstdcxx_available():
    out = subprocess.run([GXX, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.exists(out)


@needs_gxx
def test_plain_gxx_links_libstdcxx_dynamically():
    assert build_checks.links_libstdcxx_statically(GXX) is False


@needs_gxx
def test_a_static_libstdcxx_wrapper_is_detected_and_replaced(tmp_path):
    if not _static_libstdcxx_available():
        pytest.skip("no libstdc++.a to link statically against")
    wrapper = _wrapper(tmp_path, "-static-libstdc++")
    assert build_checks.links_libstdcxx_statically(wrapper) is True
    said = []
    chosen = build_checks.choose_cxx({"CXX": wrapper}, log=said.append)
    assert chosen is not None and os.path.realpath(chosen) != os.path.realpath(wrapper)
    assert build_checks.links_libstdcxx_statically(chosen) is False
    assert "statically" in said[0] and wrapper in said[0]


@needs_gxx
def test_no_dynamic_alternative_raises_naming_the_compiler(tmp_path, monkeypatch):
    if not _static_libstdcxx_available():
        pytest.skip("no libstdc++.a to link statically against")
    wrapper = _wrapper(tmp_path, "-static-libstdc++")
    real_which = shutil.which
    # every other compiler is gone from PATH
    monkeypatch.setattr(build_checks.shutil, "which",
                        lambda name: real_which(name) if name in (wrapper, "readelf") or name.endswith("wrapped-g++")
                        else None)
    with pytest.raises(RuntimeError, match="statically"):
        build_checks.choose_cxx({"CXX": wrapper}, log=lambda s: None)


def test_unknown_compiler_is_left_alone():
    assert build_checks.links_libstdcxx_statically("no-such-compiler-xyz") is None
    assert build_checks.choose_cxx({"CXX": "no-such-compiler-xyz"}) == "no-such-compiler-xyz"


@needs_gxx
def test_the_built_extension_does_not_carry_its_own_libstdcxx():
    so = list((Path(__file__).resolve().parent.parent / "ntkfast").glob("_C*.so"))
    if not so:
        pytest.skip("extension not built")
    dyn = subprocess.run(["readelf", "-d", str(so[0])], capture_output=True, text=True).stdout
    assert "libstdc++" in dyn, f"{so[0].name} links libstdc++ statically: error messages would crash"
