"""Helpers shared by the test files: devices to parametrise over, where the datasets are."""
from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

#: "cpu", plus "cuda" when a CUDA device is usable: ``@pytest.mark.parametrize("device", devices)``.
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def data_root() -> Path:
    """The dataset directory: $NTKFAST_DATA if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("NTKFAST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")
