"""NTK-SAP (Wang, Li, Sun, ICLR 2023): the saliency of each mask entry for the NTK's trace,
estimated by finite differences of the network's output under perturbed weights.

- ``_engine``: the scorer and its engines (grouped, sequential, the authors' reference loop);
- ``_draws``: the weight draws, inputs and Philox perturbations of every piece;
- the grouped network (one network at many weight sets in a single pass) is ``ntkfast.core.grouped``, shared with the grouped trainer;
- ``_graph``: that pass captured in a CUDA graph;
- ``_reference``: the authors' loop, written plainly.
"""
from ._engine import ntksap, ntksap_trace_estimate

__all__ = ["ntksap", "ntksap_trace_estimate"]
