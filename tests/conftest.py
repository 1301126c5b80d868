"""Shared fixtures: ``data_dir`` (the real datasets, or a skip) and the ``devices`` list."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# TF32 off in every test (cuDNN allows it by default): float32 results on a GPU are compared with
# tolerances set for true float32 arithmetic. A test that means TF32 turns it on itself.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testing import data_root, devices  # noqa: E402,F401

__all__ = ["devices"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Directory with mnist/, fashion-mnist/, cifar-10-batches-py/ (read-only: never write there)."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"dataset directory {root} not found (set NTKFAST_DATA to the directory holding "
                    "mnist/, fashion-mnist/ and cifar-10-batches-py/)")
    return root


def pytest_terminal_summary(terminalreporter):
    """The bad-input suite's counts, in CI's log (tried / clear error / state unchanged)."""
    suite = sys.modules.get("test_bad_input")
    if suite is not None and suite.TALLY["tried"]:
        t = suite.TALLY
        terminalreporter.write_line(f"bad-input suite: {t['tried']} tried, {t['clear error']} refused with a clear "
                                    f"error naming the argument, {t['state unchanged']} left model, masks and files "
                                    "unchanged")
