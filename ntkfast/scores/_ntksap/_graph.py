"""One grouped NTK-SAP pass captured in a CUDA graph.

On a GPU a pass of a small network is a few hundred short kernel launches; replaying them from a
graph removes the launch overhead. The pass (fused weights, forward with its BatchNorm statistics,
backward to the masks) is captured once for a fixed number of pieces and shapes, with every input
in a static buffer: the stacked draws of theta, the inputs Z, the masks and one Philox (seed,
offset) tensor per scored weight, which the fused kernel reads on the device. Each later pass
copies its draws into those buffers and replays. The first replay is checked against the same pass
run eagerly; any disagreement or capture error turns graphs off for the run (with a warning).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

from ... import ops
from ...core.grouped import BatchNormPlan, GroupedNetwork

__all__ = ["GraphedPass", "graphed_pass", "disable"]

_INT64 = 1 << 63


def _as_int64(v: int) -> int:
    return v - (1 << 64) if v >= _INT64 else v


class GraphedPass:
    """A captured grouped pass for ``pieces`` pieces of input shape ``batch_shape``."""

    def __init__(self, net: GroupedNetwork, targets, keys, pieces: int, batch_shape, dtype, device, eps: float,
                 record_stats: bool, param_shapes: Dict[str, torch.Size], z_dtype: Optional[torch.dtype] = None):
        self.net, self.targets, self.keys = net, targets, keys
        self.P, self.eps, self.record = pieces, eps, record_stats
        # (token ids stay integers: an embedding refuses float indices)
        self.z = torch.zeros((pieces,) + tuple(batch_shape), dtype=z_dtype or dtype, device=device)
        self.theta: Dict[str, torch.Tensor] = {}
        for key, src in keys.items():
            shape = targets[src[1]].param.shape if src[0] == "target" else param_shapes[src[1]]
            self.theta[key] = torch.zeros((pieces,) + tuple(shape), dtype=dtype, device=device)
        self.philox = {n: torch.zeros(2, dtype=torch.int64, device=device) for n in targets}
        self.masks = OrderedDict((n, torch.ones(t.param.shape, dtype=dtype, device=device).requires_grad_(True))
                                 for n, t in targets.items())
        self.grads = OrderedDict((n, torch.zeros_like(m)) for n, m in self.masks.items())
        self.graph = None
        self.checked = False  # the first replay is compared with the eager pass

    def _body(self):
        P = self.P
        values = {}
        for key, src in self.keys.items():
            w = self.theta[key]
            if src[0] == "target":
                eff = ops.perturbed_masked(w, self.masks[src[1]], self.eps, philox=self.philox[src[1]])
                values[key] = eff.reshape(2 * P, *w.shape[1:])
            else:
                values[key] = torch.cat([w, w], 0)
        B = self.z.shape[1]
        x = self.z.unsqueeze(0).expand(2, *self.z.shape).reshape(2 * P * B, *self.z.shape[2:])
        plan = BatchNormPlan(mode="single_pass", pieces=P)
        if self.record:
            plan = BatchNormPlan(mode="record", pieces=P)
            with torch.no_grad():
                self.net(x[:P * B], {k: v[:P] for k, v in values.items()}, P, plan)
            plan.mode = "stored"
        out = self.net(x, values, 2 * P, plan)
        o = out.reshape(2, P, -1)
        loss = (o[0] - o[1]).pow(2).sum()
        grads = torch.autograd.grad(loss, list(self.masks.values()), allow_unused=True)
        with torch.no_grad():
            for n, g in zip(self.masks, grads):
                if g is None:
                    self.grads[n].zero_()
                else:
                    self.grads[n].copy_(g)

    def load(self, thetas: List[Dict[str, torch.Tensor]], z: torch.Tensor, philox: Dict[str, tuple], masks,
             buffers: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.z.copy_(z)
            for key, src in self.keys.items():
                if src[0] == "target":
                    pname = self.targets[src[1]].param_name
                    self.theta[key].copy_(torch.stack([th[pname] for th in thetas]))
                else:
                    v = torch.stack([th[src[1]] for th in thetas])
                    if src[2] is not None:
                        v = v * buffers[src[2]].to(v.device, v.dtype)
                    self.theta[key].copy_(v)
            for n, (seed, offset) in philox.items():
                self.philox[n].copy_(torch.tensor([_as_int64(seed), offset], dtype=torch.int64))
            for n, m in masks.items():
                self.masks[n].copy_(m)

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.enable_grad():
            for _ in range(2):  # warm-up outside the graph (allocator, cuDNN algorithm choice)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.enable_grad(), torch.cuda.graph(graph):
            self._body()
        self.graph = graph

    def replay(self) -> "OrderedDict[str, torch.Tensor]":
        self.graph.replay()
        return self.grads


def graphed_pass(store: dict, net, targets, keys, pieces, batch_shape, dtype, device, eps, record_stats,
                 param_shapes, z_dtype: Optional[torch.dtype] = None):
    """The cached GraphedPass for these shapes, or None when graphs are off or capture failed."""
    if store.get("graphs_off"):
        return None
    key = ("graph", pieces, tuple(batch_shape), float(eps), bool(record_stats), str(z_dtype))
    if key in store:
        return store[key]
    try:
        gp = GraphedPass(net, targets, keys, pieces, batch_shape, dtype, device, eps, record_stats, param_shapes,
                         z_dtype)
        gp.capture()
        store[key] = gp
        return gp
    except Exception as exc:  # pragma: no cover - needs a GPU
        disable(store, f"could not set up the CUDA graph ({type(exc).__name__}: {exc})")
        return None


def disable(store: dict, why: str) -> None:
    store["graphs_off"] = True
    for k in [k for k in store if isinstance(k, tuple) and k and k[0] == "graph"]:
        del store[k]
    warnings.warn(f"ntksap: CUDA graphs turned off for this run: {why}; passes run eagerly",
                  RuntimeWarning, stacklevel=4)
