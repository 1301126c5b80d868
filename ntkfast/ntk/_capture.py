"""One forward pass with taps on every planned module, then the cotangents of every output: the
inputs ``a`` and output cotangents ``b`` (for each output k, d f_k / d output) of each call of
each module, from which the per-layer NTK contractions are built.

The cotangents of kk outputs come from vmap's batched backward over one-hot cotangents, or a
loop over the outputs where an op has no batching rule, or where the graph is recorded for a
second derivative of a convolutional network (see :func:`_has_convolution`). A third way, the
batch repeated kk times in one forward and one backward in which copy i gets output ks[i]'s
cotangent (:func:`replicates`), is exact but measured 1.3-3.3x slower on the CPU
(``benchmarks/explore_ntk_cotangent_pass.py``); it is kept, off, to be measured on a GPU, where
one convolution at batch kk * n may beat kk small ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..core.state import output_tensor
from ._plan import Plan


@dataclass
class Call:
    """One call of a module: its input (args[0]) and, per captured output k, the cotangent of
    its output: ``b`` is [kk, n, *output.shape[1:]]."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Capture:
    x: torch.Tensor
    ks: List[int]
    outputs: int  # K, outputs per sample
    calls: Dict[str, List[Call]]  # module name -> its calls

    @property
    def n(self) -> int:
        return self.x.shape[0]


def model_outputs(model, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    out = output_tensor(functional_call(model, plan.forward_values, (x,)))
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model: the NTK needs a tensor output, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise ValueError(f"model: output shape {tuple(out.shape)} has no batch dimension of {x.shape[0]} samples")
    return out.reshape(out.shape[0], -1)


def capture(model, plan: Plan, x: torch.Tensor, ks: Sequence[int], *, create_graph: bool) -> Capture:
    ks = list(ks)
    kk = len(ks) if len(ks) > 1 and replicates(model) else 1
    n_given = x.shape[0]
    names = [r.module_name for r in plan.rules]
    pending: Dict[str, list] = {name: [] for name in names}
    handles = []

    def tap(name):
        def hook(module, args, kwargs, output):
            if (not isinstance(output, torch.Tensor) or len(args) != 1 or kwargs
                    or not isinstance(args[0], torch.Tensor)):
                raise _Untappable(name)
            # The rules read dimension 0 of a call's input and output as the samples. A call with
            # other rows (a learned query or buffer [1, d] broadcast over the samples later, a
            # flattened [n * t, d]) gets cotangents that mix samples, and the per-sample kernel
            # cannot be taken apart from them: such a module goes through the whole-model path.
            if args[0].dim() == 0 or output.dim() == 0 or args[0].shape[0] != n_samples \
                    or output.shape[0] != n_samples:
                raise _Untappable(name)
            # A call on constants (a buffer, an RNN's zero initial state) gives an output outside the
            # graph; as a leaf of its own it still gets its d f / d output.
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            # The clone keeps the tapped tensor out of reach of later in-place ops (ReLU(inplace),
            # out += shortcut), which would otherwise change what d f / d output refers to.
            pending[name].append((args[0], args[0]._version, output))
            return output.clone()
        return hook

    n_samples = kk * n_given
    modules = dict(model.named_modules(remove_duplicate=False))
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(tap(name), with_kwargs=True))
        with torch.enable_grad():
            # token ids (an Embedding's input) cannot require grad, and need not: the NTK differentiates weights
            xg = x.detach().requires_grad_(True) if x.is_floating_point() else x
            if kk > 1:
                xg = xg.repeat(kk, *([1] * (x.dim() - 1)))
            f = model_outputs(model, plan, xg)
    finally:
        for h in handles:
            h.remove()
    K = f.shape[1]
    taps = [(name, i, y) for name in names for i, (_, _, y) in enumerate(pending[name])]
    live = [i for i, (_, _, y) in enumerate(taps) if y.requires_grad]  # all of them (see tap)
    tensors = [taps[i][2] for i in live]
    grads: List[List[torch.Tensor]] = [[] for _ in taps]
    batched = None
    with torch.enable_grad():
        if kk > 1:
            batched = _replicated_backward(f, tensors, ks, n_given, create_graph) if tensors else None
        else:
            batched = (_batched_backward(f, tensors, ks, create_graph)
                       if tensors and len(ks) > 1 and not (create_graph and _has_convolution(model)) else None)
        if batched is not None:
            # kept whole ([kk, *y.shape]): unbinding and re-stacking would copy every cotangent
            for i, gi in zip(live, batched):
                grads[i].append(gi)
        elif tensors:
            for k in ks:
                g = torch.autograd.grad(f[:, k].sum(), tensors, retain_graph=True, create_graph=create_graph,
                                        allow_unused=True)
                for i, gi in zip(live, g):
                    grads[i].append(gi)
    for i, (_, _, y) in enumerate(taps):
        if batched is not None:
            if not grads[i] or grads[i][0] is None:
                shape = (len(ks), n_given) + tuple(y.shape[1:]) if kk > 1 else (len(ks),) + tuple(y.shape)
                grads[i] = [torch.zeros(shape, dtype=y.dtype, device=y.device)]
        else:
            grads[i] = [torch.zeros_like(y) if gi is None else gi for gi in grads[i]] or \
                [torch.zeros_like(y) for _ in ks]
    calls: Dict[str, List[Call]] = {name: [] for name in names}
    for (name, i, _), slot in zip(taps, grads):
        a, version, _ = pending[name][i]
        if a._version != version:
            raise RuntimeError(
                f"model: the input of module {name!r} was modified in place after the module read it; "
                "the NTK needs it unchanged (avoid in-place operations on that tensor)"
            )
        b = slot[0] if batched is not None else torch.stack(slot)
        if kk > 1:  # the first copy of the batch is the batch
            a = a[:n_given]
        if not create_graph:
            a, b = a.detach(), b.detach()
        calls[name].append(Call(a, b))
    return Capture(x, ks, K, calls)


def _has_convolution(model) -> bool:
    # vmap's rule for convolution_backward runs one convolution per output, selecting each from
    # the batched cotangent. Under create_graph every such select's backward writes a zero tensor
    # of the whole batched cotangent, so differentiating the captured cotangents again costs
    # outputs^2 times their size: a plain loop over outputs is faster there (NTT step, 2-core
    # CPU: ResNet-20 4.3 s looped against 5.8 s batched, LeNet-5 229 against 237 ms;
    # benchmarks/explore_ntk_cotangent_pass.py). MLPs keep the batched pass: there it has no
    # convolution loop.
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def replicates(model) -> bool:
    """Whether captures of several outputs repeat the batch once per output (see the module's
    notes): off, as it measured slower on the CPU; a benchmark switches it on to measure it. The
    chunk planner does not count its kk copies of the activations."""
    return False


def _replicated_backward(f, tensors, ks, n, create_graph):
    """f [kk * n, K] from the batch repeated kk times: one backward pass, copy i of the batch with
    output ks[i]'s one-hot cotangent; each tensor's gradient as [kk, n, ...]."""
    kk = len(ks)
    cot = torch.zeros(kk, n, f.shape[1], dtype=f.dtype, device=f.device)
    cot[torch.arange(kk), :, torch.tensor(ks)] = 1
    grads = torch.autograd.grad(f, tensors, grad_outputs=cot.reshape(kk * n, -1), retain_graph=create_graph,
                                create_graph=create_graph, allow_unused=True)
    return [None if g is None else g.reshape(kk, n, *g.shape[1:]) for g in grads]


def _batched_backward(f, tensors, ks, create_graph):
    """All outputs' cotangents in one vmapped backward pass (one-hot cotangents); None when an
    op of the model has no batching rule, and the caller loops over outputs instead."""
    cots = torch.zeros(len(ks), *f.shape, dtype=f.dtype, device=f.device)
    cots[torch.arange(len(ks)), :, torch.tensor(ks)] = 1
    try:
        return torch.autograd.grad(f, tensors, grad_outputs=cots, is_grads_batched=True, retain_graph=True,
                                   create_graph=create_graph, allow_unused=True)
    except RuntimeError:
        return None


class _Untappable(ValueError):
    def __init__(self, name):
        super().__init__(name)
        self.module_name = name


# what reads a tensor's description, not its values: a layer whose weight a parent only asks
# for its dtype or shape (x.to(self.conv.weight.dtype)) keeps its per-call rule
_METADATA = frozenset({"dtype", "device", "shape", "requires_grad", "is_leaf", "layout", "ndim", "is_cuda",
                       "is_sparse", "is_quantized", "is_meta", "names", "grad_fn", "size", "dim", "numel",
                       "nelement", "element_size", "stride", "is_floating_point", "is_complex", "is_contiguous",
                       "data_ptr", "__len__", "get_device"})


def _reads_values(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: Tensor.dtype.__get__, Tensor.T.__get__
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name not in _METADATA


class _ReadWatch(TorchFunctionMode):
    """Notes every torch function that reads a watched parameter while its module is not running:
    ``outside`` the module names, ``stale`` those whose read tensor is a weight torch.nn.utils.prune
    recomputes in the module's own pre-hook, read before any call recomputed it."""

    def __init__(self, watched: Dict[int, tuple], active: Dict[str, int], outside: set, stale: set):
        super().__init__()
        self.watched, self.active, self.outside, self.stale = watched, active, outside, stale

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_values(func):
            for t in tree_leaves((args, kwargs)):
                seen = self.watched.get(id(t)) if isinstance(t, torch.Tensor) else None
                if seen is not None and not self.active.get(seen[0]):
                    (self.stale if seen[1] else self.outside).add(seen[0])
        return func(*args, **kwargs)


def read_outside_their_module(model, plan: Plan, x: torch.Tensor) -> List[str]:
    """The planned modules whose parameters the forward on ``x`` reads while the module itself is
    not running (``F.linear(h, self.lm_head.weight)`` in a parent's forward, an embedding table
    reused as the output layer, nn.MultiheadAttention reading ``out_proj.weight``). A tap on the
    module sees only its own calls, so such a module's per-call contraction would miss the other
    use: it goes through the whole-model path instead. One extra forward without gradients, under
    a torch-function mode; reading a weight's dtype or shape is not a read.

    A weight that torch.nn.utils.prune recomputes from ``weight_orig`` in the module's pre-hook,
    read by a parent before the module has run, is last forward's tensor, not a function of the
    values the NTK differentiates: that is refused (ValueError naming the module)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    rules = [r for r in plan.rules if r.module_name in modules]
    active: Dict[str, int] = {}
    outside: set = set()
    stale: set = set()
    watched: Dict[int, tuple] = {}
    # every watched tensor is held until the forward ends: an id is unique only among live
    # objects, and a freed weight's id may come back as some other tensor's
    held: List[torch.Tensor] = []

    def watch(t: torch.Tensor, name: str, old: bool) -> None:
        held.append(t)
        watched[id(t)] = (name, old)

    def hooked(module):  # the attributes torch.nn.utils.prune recomputes: weight from weight_orig
        return [a[:-5] for a in module._parameters if a.endswith("_orig") and a[:-5] + "_mask" in module._buffers]

    def collect(module, args):
        # after functional_call has put the forward's values in place: these are the tensors read
        watched.clear()
        for r in rules:
            m = modules[r.module_name]
            for entry in r.params.values():
                t = m._parameters.get(entry.attr)
                if t is not None:
                    watch(t, r.module_name, False)
            for a in hooked(m):
                t = m.__dict__.get(a)
                if isinstance(t, torch.Tensor):
                    watch(t, r.module_name, True)

    def enter(name):
        def hook(module, args):
            active[name] = active.get(name, 0) + 1
        return hook

    def recomputed(name):
        def hook(module, args):  # after prune's own pre-hook: the weight this call computes with
            for a in hooked(module):
                t = module.__dict__.get(a)
                if isinstance(t, torch.Tensor):
                    watch(t, name, False)
        return hook

    def leave(name):
        def hook(module, args, output):
            active[name] -= 1
        return hook

    handles = [model.register_forward_pre_hook(collect, prepend=True)]
    try:
        for r in rules:
            m = modules[r.module_name]
            # first in, last out: a prune hook's recomputation of the weight counts as the module's own
            handles.append(m.register_forward_pre_hook(enter(r.module_name), prepend=True))
            if hooked(m):
                handles.append(m.register_forward_pre_hook(recomputed(r.module_name)))
            handles.append(m.register_forward_hook(leave(r.module_name), always_call=True))
        with torch.no_grad(), _ReadWatch(watched, active, outside, stale):
            functional_call(model, plan.forward_values, (x,))
    finally:
        for h in handles:
            h.remove()
    if stale:
        name = sorted(stale)[0]
        raise ValueError(f"model: module {name!r} is re-parametrised by torch.nn.utils.prune, and the forward reads "
                         "its weight without calling it (as nn.MultiheadAttention reads out_proj.weight), so that "
                         "weight is not recomputed from weight_orig; pass the mask as masks= instead of the "
                         "re-parametrisation (torch.nn.utils.prune.remove)")
    return [r.module_name for r in rules if r.module_name in outside]
