"""ntkfast: fast NTK-based pruning at initialisation for PyTorch."""
from ._ops import build_info
from .masks import Masks, prunable_parameters
from .prune import prune
from . import ops, scores

__version__ = "0.1.0"

__all__ = ["Masks", "prunable_parameters", "prune", "build_info", "ops", "scores", "__version__"]
