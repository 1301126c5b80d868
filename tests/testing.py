"""What the test files share: devices to parametrise over, seeded generators, the skip for a case
whose kernel is missing, small models, the datasets' directory, and the few internals tests may
touch (each named here, with why)."""
from __future__ import annotations

import importlib
import os
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from ntkfast import ops

REPO = Path(__file__).resolve().parent.parent

#: "cpu", plus "cuda" when a CUDA device is usable: ``@pytest.mark.parametrize("device", devices)``.
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: the floating dtypes the kernels take
dtypes = [torch.float32, torch.float64]

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not loaded")


def data_root() -> Path:
    """The dataset directory: $NTKFAST_DATA if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("NTKFAST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def seeded(*key) -> torch.Generator:
    """A CPU generator seeded from ``key``: every case draws its own inputs, never zeros."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def kernel_device(device, family=None) -> torch.device:
    """``device``, or a skip when the compiled kernel of ``family`` (an ``ntkfast.ops.<op>.FAMILY``)
    cannot run there: the case would otherwise hold the reference to itself."""
    if not ops.extension_loaded():
        pytest.skip("compiled extension not loaded")
    if family is not None and not family.available:
        pytest.skip(f"the extension predates {family.what}")
    if torch.device(device).type == "cuda" and not ops.cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    return torch.device(device)


def mlp(seed: int = 0) -> nn.Module:
    """A small bias-carrying ReLU MLP, 12 -> 20 -> 10 -> 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))


class AuthorsLinear(nn.Linear):
    """A masked layer in the Synaptic-Flow / NTK-SAP authors' style: ``weight * weight_mask``."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("weight_mask", torch.ones_like(self.weight))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.weight_mask, self.bias)



@pytest.fixture
def one_thread():
    """One intra-op thread for the test (a module does ``pytestmark = pytest.mark.usefixtures(
    "one_thread")`` after importing it): tiny models gain nothing from a second thread and, on a
    busy machine, OpenMP spin-waiting can make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# The internals a test may touch, and why: white-box tests of paths the public face cannot steer
# (an engine's inner pass, a planner's chunking, a probe), reached through :func:`internal` so that
# this table is the one place that names them.
INTERNALS = {
    "ntksap_engine": ("ntkfast.scores._ntksap._engine", "the grouped pass, pass sizing and the CUDA-graph check"),
    "ntksap_graph": ("ntkfast.scores._ntksap._graph", "the captured pass body, run eagerly on the CPU"),
    "ntksap_grouped": ("ntkfast.core.grouped", "the grouped network and its convolution layouts"),
    "ntksap_draws": ("ntkfast.scores._ntksap._draws", "the draws a pass is fed"),
    "ntk_empirical": ("ntkfast.ntk._empirical", "the chunk planner under a small memory budget"),
    "ntk_terms": ("ntkfast.ntk._terms", "the gathered convolution path below its density threshold"),
    "ntk_capture": ("ntkfast.ntk._capture", "the batched backward the transfer step uses, and the ways to the cotangents"),
    "pathkernel_network": ("ntkfast.pathkernel._network", "how often the path network is built"),
    "training": ("ntkfast.training", "the channels-last probe, and the shuffling seed of an epoch"),
    "kept_entries": ("ntkfast.core.kept_entries", "which weights the named optimisers compact"),
    "transfer": ("ntkfast.ntt.transfer", "freeing memory between transfer steps"),
    "masked_gram": ("ntkfast.ops.masked_gram", "the reference's chunk size"),
    "synflow": ("ntkfast.scores._synflow", "SynFlow-Dist's mean input of a dataset"),
    "ntk_trace": ("ntkfast.ntk._trace", "the trace estimators' names, against their Literal type"),
    "cli": ("ntkfast.cli", "the context that shows the library's messages on the terminal"),
    "reproduce": ("ntkfast.reproduce", "how a density as printed finds its grid point"),
    "catalog": ("ntkfast._catalog", "the name tables the CLI reads without importing torch"),
}


def internal(name: str):
    """The module of internal ``name`` (a key of :data:`INTERNALS`)."""
    return importlib.import_module(INTERNALS[name][0])
