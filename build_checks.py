"""Checks setup.py runs on the toolchain before building ntkfast._C (kept apart so tests can run them).

The one that matters: a C++ compiler that links libstdc++ statically into a shared object gives
the extension a private copy of the C++ runtime whose locale is never initialised, so the first
error message that formats a number (``std::ostream << long``) crashes the Python process. Seen on
a GPU image whose CXX was a wrapper adding -static-libstdc++.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile

_PROBE = r"""
#include <sstream>
#include <string>
std::string ntkfast_probe(long v) { std::ostringstream s; s << v; return s.str(); }
"""


def links_libstdcxx_statically(cxx: str) -> bool | None:
    """True when `cxx -shared` leaves libstdc++ out of a shared object's dynamic dependencies
    (linked in statically), False when it is a dependency, None when that cannot be told (no such
    compiler, the probe does not build, no readelf, or a runtime other than libstdc++)."""
    argv = shlex.split(cxx)
    if not argv or shutil.which(argv[0]) is None or shutil.which("readelf") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ntkfast-probe-") as d:
        src, out = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE)
        try:
            r = subprocess.run(argv + ["-shared", "-fPIC", "-O0", src, "-o", out], capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                return None
            dyn = subprocess.run(["readelf", "-d", out], capture_output=True, text=True, timeout=30).stdout
            # the full symbol table: a wrapper may also hide the copied runtime's symbols
            syms = subprocess.run(["readelf", "-W", "-s", out], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    if "libstdc++" in dyn:
        return False
    if "libc++" in dyn:  # clang's runtime: not what this check is about
        return None
    # no libstdc++ dependency: static, if the stream code is defined inside the probe itself
    return any("_M_insert" in line and " UND " not in line for line in syms.splitlines())


def choose_cxx(environ=os.environ, log=print) -> str | None:
    """The C++ compiler to build with: $CXX unless it links libstdc++ statically and a compiler
    on PATH (c++, g++) does not, in which case that one, with a warning. Raises RuntimeError when
    every candidate links it statically. Returns None when $CXX is unset and the default is fine."""
    cxx = environ.get("CXX")
    first = cxx or "c++"
    if links_libstdcxx_statically(first) is not True:
        return cxx
    for alt in ("c++", "g++", "/usr/bin/c++", "/usr/bin/g++"):
        path = shutil.which(alt)
        if path and os.path.realpath(path) != os.path.realpath(shutil.which(shlex.split(first)[0]) or "") \
                and links_libstdcxx_statically(path) is False:
            log(f"ntkfast: the C++ compiler {first!r} links libstdc++ statically into shared objects, which makes "
                f"the extension crash on its first error message; building with {path} instead "
                "(set CXX to choose another)")
            return path
    raise RuntimeError(
        f"ntkfast: the C++ compiler {first!r} links libstdc++ statically into shared objects (a wrapper adding "
        "-static-libstdc++?), and no other compiler on PATH links it as a shared library. The extension would "
        "crash on its first error message. Set CXX (and CC) to a compiler that links libstdc++ dynamically.")
