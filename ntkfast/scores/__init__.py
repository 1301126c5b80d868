"""The score-based pruning methods: functions ``scorer(model, masks, **options) -> OrderedDict[name,
Tensor]`` giving one score per prunable weight (higher = more worth keeping), registered by name
for :func:`ntkfast.prune`, the study and the CLI (:mod:`ntkfast.methods` holds the registry and
the contract). A scorer never leaves the model changed.

One module per method family: ``_random``, ``_magnitude``, ``_snip`` (SNIP and iterative SNIP),
``_grasp``, ``_synflow`` (SynFlow and the Path Kernel paper's variants), ``_ntksap`` (a package:
the scorer, its draws, the grouped engine, CUDA graphs and the authors' reference loop).
"""
from ..methods import MethodInfo, available, get, register
from ._random import random
from ._magnitude import magnitude
from ._snip import snip, iterative_snip
from ._grasp import grasp
from ._synflow import synflow, synflow_l2, synflow_l2_squared, synflow_dist, synflow_l2_dist
from ._ntksap import ntksap, ntksap_trace_estimate

#: the registry's entries were called this before methods that return masks existed
ScorerInfo = MethodInfo

__all__ = ["register", "get", "available", "MethodInfo", "ScorerInfo", "random", "magnitude", "snip", "iterative_snip",
           "grasp", "synflow", "synflow_l2", "synflow_l2_squared", "synflow_dist", "synflow_l2_dist", "ntksap",
           "ntksap_trace_estimate"]
