"""Every registered method gives what it gave when tests/golden/methods.json was written: the same
masks bit for bit, and the same scores (NTT: learned weights) up to summation order. Set
NTKFAST_GOLDEN_EXACT=1 to demand the scores bit for bit too (same machine and thread count)."""
import json
import math
import os

import pytest

from golden.methods import GOLDEN, compute

EXPECTED = json.loads(GOLDEN.read_text())
RESULTS = {}


def _result(key):
    if not RESULTS:
        RESULTS.update(compute())
    return RESULTS[key]


def _close(a, b, scale):
    # Another CPU moves LeNet-5's statistics by up to 1e-8 of their value (an Intel Xeon against the
    # machine that wrote the file, the masks bit for bit the same): its vectorised kernels round
    # differently somewhere below the float64 scores. 1e-7 keeps a tenfold margin over that; a
    # change of what a method computes moves the scores far more, and the masks are compared exactly.
    return math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-12 * max(scale, 1.0))


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_method_result_is_unchanged(key):
    got, want = _result(key), EXPECTED[key]
    assert got.keys() == want.keys()
    for name, w in want["masks"].items():
        g = got["masks"][name]
        assert (g["shape"], g["kept"], g["sha256"]) == (w["shape"], w["kept"], w["sha256"]), f"{key}: mask {name}"
    part = "weights" if "weights" in want else "scores"
    exact = os.environ.get("NTKFAST_GOLDEN_EXACT") == "1"
    for name, w in want[part].items():
        g = got[part][name]
        assert g["shape"] == w["shape"], f"{key}: {part} {name}"
        if exact:
            assert g["sha256"] == w["sha256"], f"{key}: {part} {name} differ in some bit"
        scale = math.sqrt(w["sumsq"])
        for stat in ("sum", "sumsq", "wsum"):
            assert _close(g[stat], w[stat], scale if stat != "sumsq" else w["sumsq"]), \
                f"{key}: {part} {name} {stat} {g[stat]!r} != {w[stat]!r}"


def test_every_registered_method_has_a_golden_entry():
    from ntkfast import scores

    assert {k.split("/")[1] for k in EXPECTED} == {m for m in scores.available() if not m.startswith("_")}
