"""ntkfast: fast NTK-based pruning at initialisation for PyTorch."""
import logging as _logging

# a library's convention: its messages go nowhere until the application configures logging
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from ._version import __version__
from .ops import build_info
from .masks import Masks, prunable_parameters
from .prune import prune
from .ntt import transfer, TransferResult
from . import methods, ops, scores, ntt  # importing scores and ntt registers every built-in method

__all__ = ["Masks", "prunable_parameters", "prune", "build_info", "methods", "ops", "scores", "ntt", "models", "data",
           "train", "transfer", "TransferResult", "__version__"]


def __getattr__(name):
    # The model zoo, the data readers and the trainer serve the CLI, tests and benchmarks; the
    # library core does not need them, so they load on first use.
    import importlib

    if name in ("models", "data"):
        return importlib.import_module(f".{name}", __name__)
    if name == "train":  # the function; its module is ntkfast.training
        fn = importlib.import_module(".training", __name__).train
        globals()["train"] = fn
        return fn
    raise AttributeError(f"module 'ntkfast' has no attribute {name!r}")
