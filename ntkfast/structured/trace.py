"""Which output channels must be pruned together: the channel ties of a model, found by running
its forward once.

Every output channel of a Conv/Linear layer is a node. The forward runs under a torch function
mode that labels each tensor with the node carried at every index of its channel axis (the axis
a layer reads: 1 for convolutions, the last for Linear). Element-wise operations that combine two
labelled tensors (a residual ``out + shortcut``, a gate ``x * s``) join the nodes they align, since
a channel of the sum can leave the network only when every addend's channel does; concatenation
along the channel axis joins the labels end to end; flattening repeats a channel's node over the
features it becomes. Pass-through operations (activations, BatchNorm, pooling, dropout) keep the
label. The classes of joined nodes are the *units* of channel pruning: each is kept or pruned
whole, and its channels' readers (the input slices of the layers that consume them) go with it.

Kept whatever the scores (*pinned*): channels that reach the model's output (the classifier's
logits), that meet the model's input in an element-wise operation, or that an operation mixes
across the channel axis (softmax over channels, LayerNorm or GroupNorm over them, a sum over the
channel axis): a pruned channel's value there would change what the network computes.

An operation this module does not know, met by a channel that is not pinned, stops the analysis
with :class:`ChannelTraceError` (a ValueError naming the model and the operation) rather than
guessing: a wrong tie would give masks that cannot be removed physically, or masks whose removal
changes the outputs.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.compiled import plain_name, unwrap
from ..core.state import scoring_mode

__all__ = ["ChannelTraceError", "ChannelGraph", "trace_channels", "channel_layers"]

PINNED = 0  # the node every pinned channel is joined with

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear,) + _CONV
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

# operations that keep a tensor's channel axis and treat each channel on its own
_PASS = {
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "logsigmoid", "tanhshrink", "hardshrink",
    "softshrink", "threshold", "rrelu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "batch_norm", "instance_norm", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pad", "clone", "contiguous",
    "detach", "to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda", "abs", "neg",
    "negative", "exp", "square", "sqrt", "rsqrt", "clamp", "clip", "clamp_min", "clamp_max", "pow",
    "reciprocal", "log", "sign", "requires_grad",
}
# element-wise operations of two tensors (broadcasting)
_BINARY = {"add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "rsub", "maximum",
           "minimum", "fmax", "fmin"}
_CAT = {"cat", "concat", "concatenate"}
_RESHAPE = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "nansum", "nanmean"}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_MIXING_NORMS = {"layer_norm", "group_norm", "local_response_norm", "rms_norm"}
# results that take only a shape (or nothing) from their input
_FRESH = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
          "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel", "item",
          "tolist", "data_ptr", "is_floating_point", "is_contiguous", "element_size", "get_device", "eq", "ne",
          "isnan", "isinf", "isfinite", "all", "any"}
# properties (read through a descriptor's __get__) that hand back the tensor's own values
_PASS_PROPERTIES = {"data"}


class ChannelTraceError(ValueError):
    """The channel ties of a model could not be followed (an operation ntkfast does not know met a
    channel that could be pruned, or a layer it cannot prune by channel)."""


def _base_name(func) -> str:
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__") and name != "__get__":
        name = name[2:-2]
        if name[:1] in "ir" and name[1:] in _BINARY | {"truediv"}:  # __iadd__, __radd__, __rtruediv__
            name = name[1:]
        if name == "truediv":
            name = "div"
    elif name.endswith("_") and not name.startswith("_"):  # in-place: relu_, add_
        name = name[:-1]
    return name


def channel_layers(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The layers with output channels: every Conv1d/2d/3d and Linear module (subclasses too), by name."""
    return OrderedDict((plain_name(n), m) for n, m in model.named_modules() if isinstance(m, _LAYERS))


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = [PINNED]

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller index becomes the root, so PINNED (0) stays the root of its class
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is b:
            return
        pairs = np.unique(np.stack([a, b], 1), axis=0)
        for x, y in pairs.tolist():
            if x != y:
                self.union(x, y)

    def pinned(self, ids: np.ndarray) -> bool:
        return all(self.find(int(i)) == PINNED for i in np.unique(ids))


class _Label(NamedTuple):
    """The node carried at each index of a tensor's channel axis; axis None: the whole tensor
    derives from pinned channels (the model's input, or something past an unknown operation)."""

    axis: Optional[int]
    ids: Optional[np.ndarray]


_OPAQUE = _Label(None, None)


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


def _dims(arg, ndim: int) -> Optional[Tuple[int, ...]]:
    if arg is None:
        return None
    if isinstance(arg, int):
        arg = (arg,)
    return tuple(int(d) % ndim for d in arg)


class _Tracer(TorchFunctionMode):
    def __init__(self, model_name: str):
        super().__init__()
        self.model_name = model_name
        self.uf = _UnionFind()
        self.labels: Dict[int, Tuple[torch.Tensor, _Label]] = {}
        self.inside = 0

    # -- labels ------------------------------------------------------------------------------------
    def label(self, t: torch.Tensor) -> Optional[_Label]:
        hit = self.labels.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def set_label(self, t: torch.Tensor, label: Optional[_Label]) -> None:
        if label is None:
            self.labels.pop(id(t), None)
        else:
            self.labels[id(t)] = (t, label)  # the tensor is held, so its id is not reused

    def pin(self, label: _Label) -> None:
        if label.ids is not None:
            for i in np.unique(label.ids).tolist():
                self.uf.union(PINNED, i)

    def fail(self, what: str) -> None:
        raise ChannelTraceError(
            f"model: cannot follow the channels of {self.model_name} through {what}; channel masks need every "
            "operation between layers to be one ntkfast knows (activations, BatchNorm, pooling, dropout, "
            "element-wise sums and products, concatenation, flatten/view). Prune it without "
            "structure='channel', or keep the layers before that operation out of the scores")

    # -- the mode ----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        ins = [(t, lab) for t in _tensors((args, kwargs), []) for lab in (self.label(t),) if lab is not None]
        if not ins:
            return out
        outs = _tensors(out, [])
        name = _base_name(func)
        if name == "__get__":  # a property: x.data passes the values, x.T moves the channel axis
            prop = getattr(getattr(func, "__self__", None), "__name__", "property")
            name = "pass" if prop in _PASS_PROPERTIES else f"the property .{prop}"
        if name == "setitem":  # x[:, i] = v: channel indices shift once channels are cut
            self.unknown("an assignment into a slice", ins, None)
            return out
        if not outs or name in _FRESH:
            return out
        self.propagate(name, args, kwargs, ins, outs)
        return out

    def propagate(self, name: str, args, kwargs, ins, outs) -> None:
        result = outs[0]
        first, lab = ins[0]
        if name in _CAT:  # before the opaque rule: an opaque part of a cat along the channels is only pinned
            self.set_label(result, self.cat(args, kwargs, ins, result))
            return
        if any(lab.axis is None for _, lab in ins):
            for _, other in ins:
                self.pin(other)
            self.set_label(result, _OPAQUE)
            return
        if name in _BINARY:
            self.set_label(result, self.elementwise(name, [(t, lab) for t, lab in ins], result))
        elif name in _PASS or name == "pass":
            acted_on = args[0] if args else kwargs.get("input")
            if acted_on is not first:  # the labelled tensor is not the one acted on
                self.unknown(name, ins, result)
            elif result.dim() == first.dim() and result.shape[lab.axis] == first.shape[lab.axis]:
                self.set_label(result, lab)
            else:
                self.unknown(name, ins, result)
        elif name in _RESHAPE:
            self.set_label(result, self.reshape(name, first, lab, result, ins))
        elif name in _REDUCE:
            self.set_label(result, self.reduce(name, args, kwargs, first, lab, result, ins))
        elif name in _SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim is None or int(dim) % first.dim() == lab.axis:
                self.pin(lab)
            self.set_label(result, lab)
        elif name in _MIXING_NORMS:
            shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            if name != "layer_norm" or shape is None or lab.axis >= first.dim() - len(tuple(shape)):
                self.pin(lab)
            self.set_label(result, lab if result.shape == first.shape else _OPAQUE)
        else:
            self.unknown(name, ins, result)

    def unknown(self, what: str, ins, result) -> None:
        """An operation whose effect on channels is not known: harmless when every channel it
        receives is pinned anyway (its result is then opaque), an error otherwise."""
        for _, lab in ins:
            if lab.ids is not None and not self.uf.pinned(lab.ids):
                self.fail(f"{what} (on a tensor of shape {tuple(ins[0][0].shape)})")
        if result is not None:
            self.set_label(result, _OPAQUE)

    def elementwise(self, name, ins, result) -> Optional[_Label]:
        axis, ids = None, None
        for t, lab in ins:
            # broadcasting aligns trailing dimensions
            a = lab.axis + result.dim() - t.dim()
            if t.shape[lab.axis] != result.shape[a]:
                self.unknown(f"{name} broadcasting a channel axis", ins, result)
                return _OPAQUE
            if axis is None:
                axis, ids = a, lab.ids
            elif a != axis:
                self.unknown(f"{name} of tensors whose channels lie on different axes", ins, result)
                return _OPAQUE
            else:
                self.uf.union_arrays(ids, lab.ids)
        return _Label(axis, ids)

    def cat(self, args, kwargs, ins, result) -> Optional[_Label]:
        tensors = kwargs.get("tensors", args[0] if args else None)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        dim = int(dim) % result.dim()
        labs = [self.label(t) for t in tensors]
        axes = {lab.axis for lab in labs if lab is not None and lab.axis is not None}
        if len(axes) == 1 and dim in axes:
            # along the channel axis an opaque part is a run of pinned channels like any unlabelled one
            labs = [None if lab is not None and lab.axis is None else lab for lab in labs]
        elif any(lab is not None and lab.axis is None for lab in labs):
            for lab in labs:
                if lab is not None:
                    self.pin(lab)
            return _OPAQUE
        if len(axes) != 1:
            self.unknown("cat of tensors whose channels lie on different axes", ins, result)
            return _OPAQUE
        axis = axes.pop()
        if dim != axis:
            return self.elementwise("cat", [(t, lab) for t, lab in zip(tensors, labs) if lab is not None], result)
        # an unlabelled part (a constant, the model's input) joins with pinned channels
        parts = [lab.ids if lab is not None else np.zeros(t.shape[dim], dtype=np.int64) for t, lab in zip(tensors, labs)]
        return _Label(axis, np.concatenate(parts))

    def reshape(self, name, t, lab, result, ins) -> Optional[_Label]:
        a, src, dst = lab.axis, tuple(t.shape), tuple(result.shape)
        if dst[:a + 1] == src[:a + 1]:  # the trailing dimensions change, the channel axis does not
            return lab
        if dst[:a] == src[:a] and len(dst) > a and dst[a] == math.prod(src[a:]):
            # trailing dimensions merged into the channel axis (flatten): channel-major order
            return _Label(a, np.repeat(lab.ids, math.prod(src[a + 1:])))
        for k in range(len(dst)):  # leading dimensions added or removed (unsqueeze(0))
            if dst[k:] == src[a:] and math.prod(dst[:k]) == math.prod(src[:a]):
                return _Label(k, lab.ids)
        self.unknown(f"{name} from {src} to {dst}", ins, result)
        return _OPAQUE

    def reduce(self, name, args, kwargs, t, lab, result, ins) -> Optional[_Label]:
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None))
        if isinstance(dim, torch.Tensor):  # torch.max(a, b): element-wise
            return self.elementwise(name, ins, result)
        dims = _dims(dim, t.dim()) if t.dim() else ()
        if dims is None or lab.axis in dims:
            self.pin(lab)  # a reduction over the channels: every channel counts in it
            return _OPAQUE
        keep = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
        a = lab.axis if keep else lab.axis - sum(d < lab.axis for d in dims)
        if result.dim() <= a or result.shape[a] != t.shape[lab.axis]:
            self.unknown(f"{name} over {dims}", ins, result)
            return _OPAQUE
        return _Label(a, lab.ids)


class ChannelGraph:
    """The channel ties of a model, as found by :func:`trace_channels`.

    ``out_units[name]``: for each output channel of layer ``name``, the index of its unit, or -1
    where the channel is pinned (kept whatever the scores). ``in_units[name]``: the same for each
    index of the layer's input (input channel of a convolution, input feature of a Linear); -1
    where the input is not a prunable channel. ``norm_units[name]``: for each channel of a
    BatchNorm/InstanceNorm module. ``units``: for each unit, its (layer, channel) pairs.
    ``depthwise``: the depthwise convolutions, whose single input channel per filter is tied to
    the filter itself. ``unreached``: layers the forward never called (their channels are pinned).
    """

    def __init__(self, model_name, layers, out_units, in_units, norm_units, units, depthwise, unreached):
        self.model_name = model_name
        self.layers: "OrderedDict[str, nn.Module]" = layers
        self.out_units: Dict[str, np.ndarray] = out_units
        self.in_units: Dict[str, np.ndarray] = in_units
        self.norm_units: Dict[str, np.ndarray] = norm_units
        self.units: List[List[Tuple[str, int]]] = units
        self.depthwise = frozenset(depthwise)
        self.unreached: Tuple[str, ...] = tuple(unreached)

    @property
    def families(self) -> "OrderedDict[Tuple[str, ...], List[int]]":
        """Units grouped by the layers they span: the tied layers, each with its units."""
        out: "OrderedDict[Tuple[str, ...], List[int]]" = OrderedDict()
        order = {n: i for i, n in enumerate(self.layers)}
        for u, members in enumerate(self.units):
            key = tuple(sorted({n for n, _ in members}, key=order.__getitem__))
            out.setdefault(key, []).append(u)
        return out


def _check_groups(name: str, m: nn.Module) -> bool:
    """True for a depthwise convolution; ValueError for other grouped ones."""
    if isinstance(m, _CONV) and m.groups > 1:
        if m.groups == m.in_channels == m.out_channels:
            return True
        raise ValueError(f"model: {name} is a grouped convolution (groups={m.groups}, {m.in_channels} -> "
                         f"{m.out_channels} channels); channel masks support only groups=1 and depthwise ones")
    return False


@torch.no_grad()
def trace_channels(model: nn.Module, example_inputs) -> ChannelGraph:
    """Run ``model`` once on ``example_inputs`` (a tensor, or a tuple of positional inputs) in eval
    mode and return its channel ties. The model's parameters, buffers and mode are left as they were."""
    model = unwrap(model)
    model_name = type(model).__name__
    layers = channel_layers(model)
    if not layers:
        raise ValueError(f"model: {model_name} has no Conv or Linear layer; it has no channels to prune")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tracer = _Tracer(model_name)
    out_nodes = OrderedDict((n, tracer.uf.add(m.weight.shape[0])) for n, m in layers.items())
    in_nodes: Dict[str, np.ndarray] = {}
    norm_nodes: Dict[str, np.ndarray] = {}
    depthwise = [n for n, m in layers.items() if _check_groups(n, m)]
    called = set()
    handles = []

    def in_axis(m, x):
        return 1 if isinstance(m, _CONV) else x.dim() - 1

    def before(name, m):
        def hook(module, args):
            tracer.inside += 1
            if tracer.inside > 1 or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            called.add(name)
            size = x.shape[in_axis(m, x)] if x.dim() else 0
            lab = tracer.label(x)
            if lab is not None and lab.axis is not None and lab.axis != in_axis(m, x):
                tracer.unknown(f"{name}, which reads its input on axis {in_axis(m, x)} while the channels "
                               f"lie on axis {lab.axis}", [(x, lab)], x)
                lab = None
            ids = lab.ids if lab is not None and lab.axis is not None else np.zeros(size, dtype=np.int64)
            if name in in_nodes:  # a layer called twice drops an input index only if both calls can
                tracer.uf.union_arrays(in_nodes[name], ids)
            else:
                in_nodes[name] = ids
            if name in depthwise:  # filter c reads input channel c alone: they stand or fall together
                tracer.uf.union_arrays(out_nodes[name], ids)
        return hook

    def after(name, m):
        def hook(module, args, out):
            tracer.inside -= 1
            if tracer.inside == 0 and isinstance(out, torch.Tensor):
                tracer.set_label(out, _Label(1 if isinstance(m, _CONV) else out.dim() - 1, out_nodes[name]))
        return hook

    def norm_hook(name):
        def hook(module, args, out):
            if tracer.inside == 0 and args and isinstance(args[0], torch.Tensor):
                lab = tracer.label(args[0])
                if lab is not None and lab.axis == 1:
                    norm_nodes[name] = lab.ids
        return hook

    try:
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(before(n, m)))
            handles.append(m.register_forward_hook(after(n, m)))
        for n, m in model.named_modules():
            if isinstance(m, _PER_CHANNEL_NORMS):
                handles.append(m.register_forward_hook(norm_hook(plain_name(n))))
        with scoring_mode(model, train_mode=False):
            with tracer:
                for x in _tensors(inputs, []):
                    tracer.set_label(x, _OPAQUE)
                try:
                    out = model(*inputs)
                except ChannelTraceError:
                    raise
                except Exception as exc:
                    shapes = [tuple(x.shape) for x in _tensors(inputs, [])]
                    raise ValueError(f"example_inputs: the forward of {model_name} fails on inputs of shape "
                                     f"{', '.join(map(str, shapes))}: {type(exc).__name__}: {exc}") from None
            for t in _tensors(out, []):  # what reaches the output is kept: the logits, above all
                lab = tracer.label(t)
                if lab is not None:
                    tracer.pin(lab)
    finally:
        for h in handles:
            h.remove()
    unreached = [n for n in layers if n not in called]
    for n in unreached:
        tracer.pin(_Label(0, out_nodes[n]))
    return _units(tracer.uf, model_name, layers, out_nodes, in_nodes, norm_nodes, depthwise, unreached)


def _units(uf, model_name, layers, out_nodes, in_nodes, norm_nodes, depthwise, unreached) -> ChannelGraph:
    roots: Dict[int, int] = {}
    units: List[List[Tuple[str, int]]] = []

    def index(nodes: np.ndarray, members: Optional[str]) -> np.ndarray:
        out = np.full(len(nodes), -1, dtype=np.int64)
        for k, node in enumerate(nodes.tolist()):
            r = uf.find(node)
            if r == PINNED:
                continue
            if r not in roots:
                if members is None:  # a reader of a channel no layer makes prunable
                    continue
                roots[r] = len(units)
                units.append([])
            out[k] = roots[r]
            if members is not None:
                units[roots[r]].append((members, k))
        return out

    out_units = OrderedDict((n, index(ids, n)) for n, ids in out_nodes.items())
    in_units = {n: index(ids, None) for n, ids in in_nodes.items()}
    for n in layers:
        if n not in in_units:
            in_units[n] = np.full(_in_size(layers[n]), -1, dtype=np.int64)
    norm_units = {n: index(ids, None) for n, ids in norm_nodes.items()}
    return ChannelGraph(model_name, layers, out_units, in_units, norm_units, units, depthwise, unreached)


def _in_size(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels
