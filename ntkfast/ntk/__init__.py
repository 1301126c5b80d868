"""The empirical neural tangent kernel, by structure.

Θ(x_i, x_j)[k, l] = Σ_p ∂f_k(x_i)/∂θ_p · ∂f_l(x_j)/∂θ_p over the trainable parameters (or
``params``), restricted to unmasked entries when ``masks`` are given (the NTK of the sparse
network, whose forward uses ``weight * mask``). No N·K×P Jacobian is formed: each layer's block is
contracted from Gram matrices of its inputs and output cotangents (see ``explain=True``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..distributed import resolve as resolve_shard
from ._empirical import empirical_ntk_impl, per_sample_jacobian_impl
from ._sharded import sharded_ntk
from ._spectrum import NTKSpectrum, ntk_spectrum_impl
from ._trace import ntk_trace_impl
from ..core.concurrency import holds_model
from ..core.options import NTKMode, SpectrumMethod, TraceMethod
from ..core.state import finite_weights

__all__ = ["empirical_ntk", "per_sample_jacobian", "ntk_trace", "ntk_spectrum", "NTKSpectrum"]


@holds_model
@finite_weights
def empirical_ntk(model: torch.nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, masks=None,
                  mode: NTKMode = "full", params=None, memory_budget: Optional[int] = None,
                  create_graph: bool = False, explain: bool = False, process_group=None, gather: bool = True):
    """The empirical NTK of ``model`` between the samples of ``x1`` and ``x2`` (default ``x1``).

    mode: "full" -> [N1, N2, K, K]; "trace" -> [N1, N2] (sum over k = l); "diagonal" ->
    [N, K, K], the blocks Θ(x1_i, x2_i); "diagonal_trace" -> [N]. K is the number of outputs per
    sample (the output is flattened after the batch dimension).
    masks: {name: 0/1 tensor} as ntkfast.Masks (torch.nn.utils.prune masks are read from the
    model too). params: names of the parameters to differentiate (default: those requiring
    grad), or {name: tensor} to use other values, as torch.func.functional_call.
    memory_budget: bytes the work may use besides the result (default: a quarter of the RAM, half
    the free GPU memory); samples and outputs are chunked to stay under it.
    create_graph: keep the graph so that the kernel can be differentiated with respect to the
    parameters (Neural Tangent Transfer); otherwise the result is detached.
    explain: also return {parameter name: how its block was computed and why}.

    Supported by structure: Linear, Conv1d/2d/3d, eval-mode BatchNorm; any other module with
    parameters is differentiated by torch.func for that module alone, and shared (tied)
    parameters through the whole model. Train-mode BatchNorm and dropout are refused.

    process_group: split the rows of x1 in contiguous blocks over the group's processes (default:
    the world group when torch.distributed is initialised; False: no split); each computes its
    block against every column. gather=True (default) returns the whole kernel on every process
    (one all-gather); gather=False returns only this process's rows,
    ``ntkfast.distributed.local_rows(len(x1), process_group)``, for kernels too large for one
    device (and then create_graph may be used). Every process passes the same x1, x2 and model.
    """
    if not isinstance(gather, bool):
        raise ValueError(f"gather: expected True or False, got {gather!r}")
    shard = resolve_shard(process_group)
    if shard.split:
        return sharded_ntk(shard, model, x1, x2, masks=masks, mode=mode, params=params,
                           memory_budget=memory_budget, create_graph=bool(create_graph), explain=bool(explain),
                           gather=gather)
    return empirical_ntk_impl(model, x1, x2, masks=masks, mode=mode, params=params, memory_budget=memory_budget,
                              create_graph=bool(create_graph), explain=bool(explain))


@holds_model
@finite_weights
def per_sample_jacobian(model: torch.nn.Module, x: torch.Tensor, *, masks=None, params=None,
                        create_graph: bool = False):
    """{parameter name: ∂f_k(x_i)/∂θ as [N, K, *param.shape]} (masked entries zero), built per
    layer from inputs and output cotangents (materialises N·K·P numbers: for small nets)."""
    return per_sample_jacobian_impl(model, x, masks=masks, params=params, create_graph=bool(create_graph))


@holds_model
@finite_weights
def ntk_trace(model: torch.nn.Module, x: torch.Tensor, *, masks=None, method: TraceMethod = "exact", params=None,
              n_probes: int = 64, epsilon: float = 1e-3, seed: Optional[int] = None,
              memory_budget: Optional[int] = None) -> torch.Tensor:
    """tr Θ(x, x) = Σ_i Σ_k ||∂f_k(x_i)/∂θ||².

    method: "exact" (by structure); "hutchinson" (mean of ||J^T v||² over ``n_probes`` Rademacher
    v, one backward pass each); "finite_difference" (mean of ||(f(θ+εξ) − f(θ−εξ)) / 2ε||² over
    ``n_probes`` Gaussian ξ on the unmasked entries, forward passes only; ``epsilon`` = ε).
    ``seed`` fixes the probes."""
    return ntk_trace_impl(model, x, masks=masks, method=method, params=params, n_probes=n_probes,
                          epsilon=epsilon, seed=seed, memory_budget=memory_budget)


@holds_model
@finite_weights
def ntk_spectrum(model: torch.nn.Module, x: torch.Tensor, *, masks=None, k: Optional[int] = None, params=None,
                 method: SpectrumMethod = "auto", memory_budget: Optional[int] = None, steps: Optional[int] = None,
                 seed: Optional[int] = None) -> NTKSpectrum:
    """Eigenvalues (descending) of the (N·K)×(N·K) kernel and its condition number.

    method "dense" forms the kernel and diagonalises it (all eigenvalues, or the top ``k``);
    "lanczos" finds the top ``k`` from kernel-vector products Θv = J(J^T v) (``steps`` Lanczos
    steps, default max(2k + 20, 40), full reorthogonalisation); "auto" forms the kernel when
    three copies fit ``memory_budget``, else uses Lanczos (then ``k`` is required)."""
    return ntk_spectrum_impl(model, x, masks=masks, k=k, params=params, method=method,
                             memory_budget=memory_budget, steps=steps, seed=seed)
