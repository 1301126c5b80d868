"""The bad-input suite: public function x bad-input class.

Every case hands a public function one bad input (a wrong shape, dtype, device, a non-finite or
empty value, an out-of-range number, a wrong type, a corrupt or hostile file, an interrupt) and
asserts three things: the error is of the expected type, its message names the argument (and so
tells the user what to change), and nothing of the user's changed: the model's parameters and
buffers (values, Parameter identity, requires_grad, .grad), its train/eval flags and hooks, the
masks passed in, and the bytes of every file involved. The session's summary prints the counts
(tried / clear error / state unchanged), so CI's log shows them.

Properties that fit hypothesis (every op against its reference on random shapes, dtypes, strides
and masks) live in ``test_ops_properties.py``; threads in ``test_concurrency.py``; the study's
files in ``test_study_files.py``.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import Masks, data as D, prune, scores
from ntkfast.connectivity import connectivity
from ntkfast.ntk import empirical_ntk, ntk_spectrum, ntk_trace, per_sample_jacobian
from ntkfast import pathkernel

#: counts the conftest prints at the end of the session
TALLY = {"tried": 0, "clear error": 0, "state unchanged": 0}

IN = 12


class Net(nn.Module):
    """A small net with everything a careless call could disturb: BatchNorm statistics, a frozen
    bias, a .grad already set, a forward hook, a submodule left in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(IN, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)
        self.fc2.bias.requires_grad_(False)
        self.fc1.weight.grad = torch.full_like(self.fc1.weight, 0.5)
        self.hook_calls = 0
        self.fc1.register_forward_hook(self._count)
        self.bn.eval()
        self.input_shape = (IN,)

    def _count(self, *_):
        self.hook_calls += 1

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _state(model: nn.Module) -> dict:
    return {
        "params": [(n, id(p), p.requires_grad, p.is_leaf, p.detach().clone(),
                    None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "flags": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()],
        "attrs": [(n, sorted(k for k, v in vars(m).items() if isinstance(v, torch.Tensor)))
                  for n, m in model.named_modules()],
    }


def _same(a, b) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(eq(p, q) for p, q in zip(x, y))
        return x == y or (x != x and y != y)
    return all(eq(a[k], b[k]) for k in a)


def _masks_copy(masks):
    return {n: m.clone() for n, m in masks.items()}


@dataclass
class World:
    model: Net
    masks: Masks
    batch: tuple
    tmp: Path
    files: dict  # name -> (path, bytes) of each file the case made for the call to read

    def file(self, name: str, content: bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(content)
        self.files[name] = (p, content)
        return p


def _world(tmp: Path) -> World:
    model = Net()
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, IN, generator=g), torch.randint(0, 4, (8,), generator=g))
    masks = prune(model, "magnitude", 0.5, progress=False)
    return World(model, masks, batch, tmp, {})


class _Exploit:
    """Unpickling this runs code: it writes the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (Path.write_text, (Path(self.sentinel), "code ran"))


def _hostile_torch_file(w: World, name: str, payload: dict) -> Path:
    buf = io.BytesIO()
    torch.save({**payload, "x": _Exploit(w.tmp / "PWNED")}, buf)
    return w.file(name, buf.getvalue())


def _hostile_pickle(w: World, name: str) -> Path:
    return w.file(name, pickle.dumps(_Exploit(w.tmp / "PWNED")))


def _images(n=10, classes=4):
    g = torch.Generator().manual_seed(5)
    return D.ImageDataset(torch.randint(0, 255, (n, 1, 4, 3), generator=g, dtype=torch.uint8),
                          torch.randint(0, classes, (n,), generator=g),
                          classes=[str(i) for i in range(classes)], mean=(0.5,), std=(0.25,), name="tiny")


@dataclass
class Case:
    fn: str  # the public function
    kind: str  # the bad-input class
    what: str
    call: Callable[[World], object]
    error: type
    names: str  # a regex the message must match: the argument's name
    after: Optional[Callable[[World], None]] = None  # a further check (no code ran, ...)


def _nan_kept(w):
    with torch.no_grad():
        w.model.fc1.weight[0, 0] = float("nan")  # the case's own model; restored below for the check
    return w


def _kind(k):
    return k


def _transfer(w, **kw):
    args = dict(steps=2, batch_size=4, progress=False, log_every=1)
    args.update(kw)
    return ntkfast.transfer(w.model, args.pop("density", 0.5), args.pop("data", w.batch[0]), **args)


def _interrupt_on_forward(w, after_calls=2):
    calls = {"n": 0}

    def stop(*_):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise KeyboardInterrupt

    h = w.model.fc2.register_forward_pre_hook(stop)
    w.cleanup = h.remove
    return w


def _no_code_ran(w):
    assert not (w.tmp / "PWNED").exists(), "a file made code run"


T = torch.tensor
CASES = [
    # -- prune ----------------------------------------------------------------------------------
    Case("prune", "wrong type", "model is a function", lambda w: prune(len, "snip", 0.5), TypeError, "model"),
    Case("prune", "out-of-range", "density 0", lambda w: prune(w.model, "magnitude", 0.0), ValueError, "density"),
    Case("prune", "out-of-range", "density 1.5", lambda w: prune(w.model, "magnitude", 1.5), ValueError, "density"),
    Case("prune", "non-finite", "density nan", lambda w: prune(w.model, "magnitude", float("nan")), ValueError, "density"),
    Case("prune", "out-of-range", "rounds 0", lambda w: prune(w.model, "magnitude", 0.5, rounds=0), ValueError, "rounds"),
    Case("prune", "out-of-range", "seed 2**70", lambda w: prune(w.model, "random", 0.5, seed=2**70), ValueError, "seed"),
    Case("prune", "wrong type", "seed 1.5", lambda w: prune(w.model, "random", 0.5, seed=1.5), ValueError, "seed"),
    Case("prune", "wrong type", "unknown method", lambda w: prune(w.model, "nope", 0.5), ValueError, "method"),
    Case("prune", "wrong type", "unknown option", lambda w: prune(w.model, "snip", 0.5, data=w.batch, bogus=1),
         ValueError, "bogus"),
    Case("prune", "shape", "data of another width", lambda w: prune(w.model, "snip", 0.5, data=(torch.randn(4, 7), T([0, 1, 2, 3]))),
         ValueError, "data"),
    Case("prune", "empty", "data of no samples", lambda w: prune(w.model, "snip", 0.5, data=(torch.randn(0, IN), T([]).long())),
         ValueError, "data"),
    Case("prune", "non-finite", "data holding NaN", lambda w: prune(w.model, "snip", 0.5, data=(torch.full((4, IN), float("nan")), T([0, 1, 2, 3]))),
         ValueError, "data"),
    Case("prune", "out-of-range", "labels beyond the outputs", lambda w: prune(w.model, "snip", 0.5, data=(torch.randn(4, IN), T([0, 1, 2, 9]))),
         ValueError, "data"),
    Case("prune", "dtype", "soft start masks", lambda w: prune(w.model, "magnitude", 0.2, masks={n: torch.full_like(m, 0.5, dtype=torch.float32) for n, m in w.masks.items()}),
         ValueError, "masks"),
    Case("prune", "non-finite", "NaN start masks", lambda w: prune(w.model, "magnitude", 0.2, masks={n: torch.full_like(m, float("nan"), dtype=torch.float32) for n, m in w.masks.items()}),
         ValueError, "masks"),
    Case("prune", "shape", "start masks of another shape", lambda w: prune(w.model, "magnitude", 0.2, masks={n: torch.ones(3, dtype=torch.bool) for n in w.masks}),
         ValueError, "masks"),
    Case("prune", "device", "a meta model", lambda w: prune(Net().to("meta"), "snip", 0.5, data=w.batch), ValueError, "model|meta"),
    Case("prune", "non-finite", "NaN in a kept weight (snip)", lambda w: prune(_nan_kept(w).model, "snip", 0.5, data=w.batch),
         ValueError, "fc1.weight"),
    Case("prune", "non-finite", "NaN in a kept weight (synflow)", lambda w: prune(_nan_kept(w).model, "synflow", 0.5),
         ValueError, "fc1.weight"),
    Case("prune", "interrupt", "KeyboardInterrupt in the third forward (iterative snip)",
         lambda w: prune(_interrupt_on_forward(w).model, "iterative_snip", 0.2, rounds=5, data=w.batch, progress=False),
         KeyboardInterrupt, ""),
    Case("prune", "interrupt", "KeyboardInterrupt in the third forward (grasp)",
         lambda w: prune(_interrupt_on_forward(w).model, "grasp", 0.2, data=w.batch, progress=False),
         KeyboardInterrupt, ""),
    # -- the scorers called directly --------------------------------------------------------------
    Case("scores.snip", "wrong type", "masks a float", lambda w: scores.snip(w.model, 0.5, data=w.batch), ValueError, "masks"),
    Case("scores.grasp", "dtype", "masks of 0.3", lambda w: scores.grasp(w.model, {n: torch.full(m.shape, 0.3) for n, m in w.masks.items()}, data=w.batch),
         ValueError, "masks"),
    Case("scores.synflow", "shape", "input_shape of another width", lambda w: scores.synflow(w.model, input_shape=(7,)),
         ValueError, "input_shape"),
    Case("scores.synflow", "wrong type", "input_shape a string", lambda w: scores.synflow(w.model, input_shape="abc"),
         ValueError, "input_shape"),
    Case("scores.ntksap", "out-of-range", "repeats 0", lambda w: scores.ntksap(w.model, repeats=0), ValueError, "repeats"),
    Case("scores.synflow_l2", "wrong type", "an EmbeddingBag model",
         lambda w: scores.synflow_l2(nn.Sequential(nn.EmbeddingBag(5, 3), nn.Linear(3, 2)), input_shape=(4,)),
         ValueError, "model.*EmbeddingBag"),
    Case("scores.synflow_l2", "wrong type", "token_input 'refuse' on an Embedding model",
         lambda w: scores.synflow_l2(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), input_shape=(1,),
                                     token_input="refuse"), ValueError, "model.*Embedding"),
    Case("scores.random", "out-of-range", "seed -2**64", lambda w: prune(w.model, "random", 0.5, seed=-2**64), ValueError, "seed"),
    Case("scores.grasp", "out-of-range", "eps -1e9", lambda w: prune(w.model, "grasp", 0.5, data=w.batch, eps=-1e9), ValueError, "eps"),
    Case("scores.grasp", "out-of-range", "temperature 0", lambda w: prune(w.model, "grasp", 0.5, data=w.batch, temperature=0),
         ValueError, "temperature"),
    Case("scores.grasp", "wrong type", "temperature a string", lambda w: scores.grasp(w.model, data=w.batch, temperature="200"),
         ValueError, "temperature"),
    Case("scores.snip", "wrong type", "train_mode 'no'", lambda w: scores.snip(w.model, data=w.batch, train_mode="no"),
         ValueError, "train_mode"),
    Case("scores.synflow", "wrong type", "a model returning a dict", lambda w: scores.synflow(_DictNet()), (TypeError, ValueError), "model"),
    Case("scores.ntksap", "wrong type", "a model returning a dict", lambda w: scores.ntksap(_DictNet(), repeats=1), ValueError, "model"),
    Case("scores.ntksap", "wrong type", "token_input 'refuse' on an Embedding model",
         lambda w: scores.ntksap(_token_net(), repeats=1, token_input="refuse"), ValueError, "model.*Embedding"),
    Case("scores.synflow_dist", "wrong type", "ids beyond the table",
         lambda w: scores.synflow_dist(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)),
                                       data=torch.full((4, 2), 9, dtype=torch.long)), ValueError, "data"),
    # -- the NTK ----------------------------------------------------------------------------------
    Case("empirical_ntk", "shape", "x1 of another width", lambda w: empirical_ntk(w.model, torch.randn(3, 7)), ValueError, "x1"),
    Case("empirical_ntk", "shape", "x2 of another width", lambda w: empirical_ntk(w.model, torch.randn(3, IN), torch.randn(3, 7)), ValueError, "x2"),
    Case("empirical_ntk", "dtype", "float16 x1", lambda w: empirical_ntk(w.model, torch.randn(3, IN).half()), ValueError, "x1"),
    Case("empirical_ntk", "dtype", "complex x1", lambda w: empirical_ntk(w.model, torch.randn(3, IN, dtype=torch.complex64)), ValueError, "x1"),
    Case("empirical_ntk", "non-finite", "x1 holding inf", lambda w: empirical_ntk(w.model, torch.full((3, IN), float("inf"))), ValueError, "x1"),
    Case("empirical_ntk", "empty", "x1 of no samples", lambda w: empirical_ntk(w.model, torch.randn(0, IN)), ValueError, "x1"),
    Case("empirical_ntk", "device", "meta x1", lambda w: empirical_ntk(w.model, torch.randn(3, IN, device="meta")), ValueError, "x1"),
    Case("empirical_ntk", "wrong type", "x1 a list", lambda w: empirical_ntk(w.model, [[1.0] * IN]), TypeError, "x1"),
    Case("empirical_ntk", "wrong type", "masks a float", lambda w: empirical_ntk(w.model, torch.randn(3, IN), masks=0.5), ValueError, "masks"),
    Case("empirical_ntk", "dtype", "soft masks", lambda w: empirical_ntk(w.model, torch.randn(3, IN), masks={"fc1.weight": torch.full((16, IN), 0.5)}),
         ValueError, "masks"),
    Case("empirical_ntk", "wrong type", "mode unknown", lambda w: empirical_ntk(w.model, torch.randn(3, IN), mode="half"), ValueError, "mode"),
    Case("empirical_ntk", "out-of-range", "memory_budget -1", lambda w: empirical_ntk(w.model, torch.randn(3, IN), memory_budget=-1), ValueError, "memory_budget"),
    Case("empirical_ntk", "non-finite", "NaN in a kept weight", lambda w: empirical_ntk(_nan_kept(w).model, torch.randn(3, IN)), ValueError, "fc1.weight"),
    Case("ntk_trace", "shape", "x of another width", lambda w: ntk_trace(w.model, torch.randn(3, 7), method="hutchinson"), ValueError, r"\bx\b"),
    Case("ntk_trace", "out-of-range", "n_probes 0", lambda w: ntk_trace(w.model, torch.randn(3, IN), method="hutchinson", n_probes=0), ValueError, "n_probes"),
    Case("ntk_spectrum", "out-of-range", "k 0", lambda w: ntk_spectrum(w.model, torch.randn(3, IN), k=0), ValueError, r"\bk\b"),
    Case("ntk_spectrum", "non-finite", "x holding NaN", lambda w: ntk_spectrum(w.model, torch.full((3, IN), float("nan"))), ValueError, r"\bx\b"),
    Case("per_sample_jacobian", "shape", "x of another width", lambda w: per_sample_jacobian(w.model, torch.randn(3, 7)), ValueError, "x"),
    # -- connectivity and the Path Kernel --------------------------------------------------------
    Case("connectivity", "wrong type", "masks None", lambda w: connectivity(w.model, None), ValueError, "masks"),
    Case("connectivity", "shape", "input_shape of zeros", lambda w: connectivity(w.model, w.masks, input_shape=(0,)), ValueError, "input_shape"),
    Case("pathkernel.trace", "dtype", "soft masks", lambda w: pathkernel.trace(w.model, {n: torch.full(m.shape, 0.7) for n, m in w.masks.items()}),
         ValueError, "masks"),
    Case("pathkernel.path_norms", "out-of-range", "power 0", lambda w: pathkernel.path_norms(w.model, power=0), ValueError, "power"),
    Case("pathkernel.trace", "non-finite", "NaN in a kept weight (path kernel)", lambda w: pathkernel.trace(_nan_kept(w).model), ValueError, "fc1.weight"),
    # -- transfer (NTT) -------------------------------------------------------------------------
    Case("transfer", "out-of-range", "density 0", lambda w: _transfer(w, density=0.0), ValueError, "density"),
    Case("transfer", "out-of-range", "steps 0", lambda w: _transfer(w, steps=0), ValueError, "steps"),
    Case("transfer", "non-finite", "lr nan", lambda w: _transfer(w, lr=float("nan")), ValueError, r"\blr\b"),
    Case("transfer", "shape", "data of another width", lambda w: _transfer(w, data=torch.randn(8, 7)), ValueError, "data"),
    Case("transfer", "empty", "data of no samples", lambda w: _transfer(w, data=torch.randn(0, IN)), ValueError, "data"),
    Case("transfer", "wrong type", "checkpoint a number", lambda w: _transfer(w, checkpoint=3), ValueError, "checkpoint"),
    Case("transfer", "corrupt file", "checkpoint of garbage", lambda w: _transfer(w, checkpoint=w.file("ck.pt", b"\x00garbage")),
         ValueError, "checkpoint"),
    Case("transfer", "corrupt file", "checkpoint cut in half", lambda w: _transfer(w, checkpoint=w.file("ck.pt", _real_torch_file()[:200])),
         ValueError, "checkpoint"),
    Case("transfer", "hostile file", "a checkpoint that runs code", lambda w: _transfer(w, checkpoint=_hostile_torch_file(
        w, "ck.pt", {"format": "ntkfast.transfer-checkpoint/1"})), ValueError, "checkpoint", _no_code_ran),
    Case("transfer", "wrong type", "checkpoint a folder", lambda w: _transfer(w, checkpoint=w.tmp), ValueError, "checkpoint"),
    Case("transfer", "device", "a meta model", lambda w: ntkfast.transfer(Net().to("meta"), 0.5, w.batch[0], steps=1, progress=False),
         ValueError, "model.*meta"),
    Case("transfer", "dtype", "a float16 model", lambda w: ntkfast.transfer(Net().half(), 0.5, w.batch[0].half(), steps=1, progress=False),
         ValueError, "model.*float16"),
    Case("transfer", "non-finite", "NaN in a kept weight (NTT)", lambda w: _transfer(_nan_kept(w)), ValueError, "fc1.weight"),
    Case("transfer", "non-finite", "data holding NaN", lambda w: _transfer(w, data=torch.full((16, IN), float("nan"))),
         ValueError, "data|validation"),
    Case("transfer", "interrupt", "KeyboardInterrupt from the callback", lambda w: _transfer(w, callback=_raise(KeyboardInterrupt)),
         KeyboardInterrupt, ""),
    # -- Masks ----------------------------------------------------------------------------------
    Case("Masks", "dtype", "a 0.3 entry", lambda w: Masks({"fc1.weight": T([0.0, 0.3, 1.0])}), ValueError, r"masks\['fc1.weight'\]"),
    Case("Masks", "dtype", "a complex tensor", lambda w: Masks({"fc1.weight": T([1 + 0j])}), ValueError, "masks"),
    Case("Masks", "wrong type", "a list", lambda w: Masks({"fc1.weight": [1, 0]}), TypeError, "masks"),
    Case("Masks.from_model", "dtype", "a 0.5 weight_mask buffer", lambda w: Masks.from_model(_soft_mask_buffer()), ValueError, "weight_mask"),
    Case("Masks.apply", "shape", "masks of another model", lambda w: Masks({"fc1.weight": torch.ones(3, 3, dtype=torch.bool)}).apply(w.model),
         ValueError, "masks"),
    Case("Masks.apply", "wrong type", "masks naming no parameter", lambda w: Masks({"nope.weight": torch.ones(3, dtype=torch.bool)}).apply(w.model),
         ValueError, "nope"),
    Case("Masks.load", "corrupt file", "garbage", lambda w: Masks.load(w.file("m.pt", b"garbage")), ValueError, "path"),
    Case("Masks.load", "corrupt file", "a cut zip", lambda w: Masks.load(w.file("m.pt", _real_torch_file()[:300])), ValueError, "path"),
    Case("Masks.load", "corrupt file", "format without masks", lambda w: Masks.load(_torch_file(w, "m.pt", {"format": "ntkfast.masks/1"})),
         ValueError, "path"),
    Case("Masks.load", "corrupt file", "soft masks in the ntkfast format", lambda w: Masks.load(_torch_file(
        w, "m.pt", {"format": "ntkfast.masks/1", "masks": {"a": T([0.3, 1.0])}, "metadata": {}})), ValueError, "path"),
    Case("Masks.load", "corrupt file", "a state_dict, not masks", lambda w: Masks.load(_torch_file(w, "m.pt", w.model.state_dict())),
         ValueError, "path"),
    Case("Masks.load", "hostile file", "a file that runs code", lambda w: Masks.load(_hostile_torch_file(w, "m.pt", {"format": "ntkfast.masks/1"})),
         ValueError, "path", _no_code_ran),
    Case("Masks.load", "wrong type", "a folder", lambda w: Masks.load(w.tmp), ValueError, "path"),
    Case("Masks.load", "empty", "no file", lambda w: Masks.load(w.tmp / "absent.pt"), FileNotFoundError, "path"),
    Case("Masks.save", "wrong type", "onto a pipe", lambda w: w.masks.save(_fifo(w)), ValueError, "path"),
    Case("Masks.save", "wrong type", "a number as the path", lambda w: w.masks.save(3), TypeError, "path"),
    Case("Masks.load", "wrong type", "a pipe (would block)", lambda w: Masks.load(_fifo(w)), ValueError, "path"),
    Case("Masks.load", "dtype", "a sparse mask", lambda w: Masks.load(_torch_file(w, "m.pt", {"a": torch.ones(4).to_sparse()})),
         ValueError, "path"),
    Case("Masks.load", "corrupt file", "a future format", lambda w: Masks.load(_torch_file(
        w, "m.pt", {"format": "ntkfast.masks/2", "masks": {"a": torch.ones(2, dtype=torch.bool)}, "metadata": {}})), ValueError, "path"),
    Case("Masks.save", "wrong type", "into a missing folder", lambda w: w.masks.save(w.tmp / "no" / "m.pt"), ValueError, "path.*no"),
    # -- the readers ----------------------------------------------------------------------------
    Case("load_dataset", "wrong type", "unknown name", lambda w: D.load_dataset("imagenet9", w.tmp), ValueError, "dataset"),
    Case("load_dataset", "empty", "an empty MNIST file", lambda w: D.load_dataset("mnist", _mnist(w, images=b"", labels=b"")), ValueError, "idx"),
    Case("load_dataset", "empty", "an MNIST of no images", lambda w: D.load_dataset("mnist", _mnist(w, n=0)), ValueError, "images|N > 0"),
    Case("load_dataset", "corrupt file", "a gzip bomb header", lambda w: D.load_dataset("mnist", _mnist(w, bomb=True)), ValueError, "idx"),
    Case("load_dataset", "corrupt file", "labels beyond 9", lambda w: D.load_dataset("mnist", _mnist(w, label=12)), ValueError, "label"),
    Case("load_dataset", "corrupt file", "a CIFAR batch of nested lists (a memory bomb)", lambda w: D.load_dataset("cifar10", _cifar(w, bomb=True)),
         ValueError, "data_batch_1|test_batch"),
    Case("load_dataset", "hostile file", "a CIFAR batch that runs code", lambda w: D.load_dataset("cifar10", _cifar(w)),
         ValueError, "data_batch_1|test_batch", _no_code_ran),
    # -- training ---------------------------------------------------------------------------------
    Case("train", "out-of-range", "epochs 0", lambda w: ntkfast.train(w.model, None, _images(), None, 0, progress=False), ValueError, "epochs"),
    Case("train", "wrong type", "optimizer unknown", lambda w: ntkfast.train(w.model, None, _images(), None, 1, optimizer="sgdd", progress=False),
         ValueError, "optimizer"),
    Case("train", "device", "a device torch does not know", lambda w: ntkfast.train(w.model, None, _images(), None, 1, device="gpu7", progress=False),
         ValueError, "device"),
    Case("train", "device", "a CPU index (torch ignores it)", lambda w: ntkfast.train(w.model, None, _images(), None, 1, device="cpu:5", progress=False),
         ValueError, "device"),
    Case("train", "device", "a meta model", lambda w: ntkfast.train(Net().to("meta"), None, _images(), None, 1, progress=False),
         ValueError, "model.*meta"),
    Case("train", "dtype", "soft masks", lambda w: ntkfast.train(w.model, {"fc1.weight": torch.full((16, IN), 0.5)}, _images(), None, 1, progress=False),
         ValueError, "masks"),
    Case("train", "out-of-range", "labels beyond the model's outputs", lambda w: ntkfast.train(_flat_net(3), None, _images(classes=8), None, 1, progress=False),
         ValueError, "train_set"),
    Case("train", "out-of-range", "a negative lr milestone", lambda w: ntkfast.train(_flat_net(4), None, _images(), None, 1, lr_milestones=[-1], progress=False),
         ValueError, "lr_milestones"),
    Case("train", "wrong type", "a tensor as train_set", lambda w: ntkfast.train(w.model, None, torch.randn(3, IN), None, 1, progress=False),
         ValueError, "train_set"),
    Case("train", "shape", "images of another size", lambda w: ntkfast.train(w.model, None, _images(), None, 1, progress=False),
         ValueError, "train_set|model|input"),
    Case("train", "wrong type", "a generator as train_set (one epoch only)", lambda w: ntkfast.train(w.model, None, (b for b in [w.batch]), None, 1, progress=False),
         ValueError, "train_set"),
    Case("train", "dtype", "batches with float labels", lambda w: ntkfast.train(w.model, None, [(w.batch[0], w.batch[1].float())], None, 1, progress=False),
         ValueError, "train_set"),
    Case("train", "wrong type", "an optimizer over another model's weights", lambda w: ntkfast.train(
        w.model, None, [w.batch], None, 1, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), progress=False), ValueError, "optimizer"),
    Case("train", "wrong type", "an optimizer factory returning None", lambda w: ntkfast.train(
        w.model, None, [w.batch], None, 1, optimizer=lambda params: None, progress=False), TypeError, "optimizer"),
    Case("train", "wrong type", "a scheduler of another optimizer", lambda w: ntkfast.train(
        w.model, None, [w.batch], None, 1, scheduler=torch.optim.lr_scheduler.StepLR(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), 1),
        progress=False), ValueError, "scheduler"),
    Case("train", "wrong type", "a string as scheduler", lambda w: ntkfast.train(w.model, None, [w.batch], None, 1, scheduler="cosine", progress=False),
         TypeError, "scheduler"),
] + ([] if torch.cuda.is_available() else [
    Case("train", "device", "cuda without CUDA", lambda w: ntkfast.train(w.model, None, _images(), None, 1, device="cuda:0", progress=False),
         ValueError, "device"),
    Case("empirical_ntk", "device", "x1 on cuda without CUDA", lambda w: empirical_ntk(w.model, torch.randn(3, IN, device="cuda")),
         (RuntimeError, AssertionError), "cuda|CUDA"),
])


class _DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN, 3)
        self.input_shape = (IN,)

    def forward(self, x):
        return {"scores": self.fc(x)}  # a mapping with no "logits" (those are taken: Hugging Face's outputs)

    def reinitialize(self):
        self.fc.reset_parameters()
        return self


def _token_net():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    net.input_shape = (3,)
    net.reinitialize = lambda: net
    return net


def _flat_net(classes):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, classes))


def _fifo(w) -> Path:
    p = w.tmp / "pipe"
    if not p.exists():
        os.mkfifo(p)
    return p


def _raise(exc):
    def f(*_a, **_k):
        raise exc
    return f


def _real_torch_file() -> bytes:
    buf = io.BytesIO()
    torch.save({"format": "ntkfast.masks/1", "masks": {"a": torch.ones(64, dtype=torch.bool)}, "metadata": {}}, buf)
    return buf.getvalue()


def _torch_file(w, name, obj) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return w.file(name, buf.getvalue())


def _soft_mask_buffer():
    m = nn.Linear(3, 2)
    m.register_buffer("weight_mask", torch.full((2, 3), 0.5))
    return m


def _idx(dims, payload: bytes, magic_dims=None) -> bytes:
    head = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in (magic_dims or dims))
    return head + payload


def _mnist(w, n=3, images=None, labels=None, bomb=False, label=1) -> Path:
    root = w.tmp / "mnist"
    root.mkdir(exist_ok=True)
    if images is None:
        images = _idx((n, 28, 28), bytes(n * 28 * 28))
        if bomb:
            import gzip
            images = gzip.compress(_idx((60000, 28, 28), b"", magic_dims=(2**31, 2**16, 2**16)) + bytes(1000))
    if labels is None:
        labels = _idx((n,), bytes([label]) * n)
    for split in ("train", "t10k"):
        w.file(f"mnist/{split}-images-idx3-ubyte", images)
        w.file(f"mnist/{split}-labels-idx1-ubyte", labels)
    return w.tmp


def _cifar(w, bomb=False) -> Path:
    root = w.tmp / "cifar-10-batches-py"
    root.mkdir(exist_ok=True)
    inner = [[0] * 200] * 200
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if bomb:  # a few kB that np.asarray would turn into 8M int64 entries
            w.file(f"cifar-10-batches-py/{name}", pickle.dumps({b"data": [inner] * 200, b"labels": [0]}, protocol=2))
        else:
            _hostile_pickle(w, f"cifar-10-batches-py/{name}")
    return w.tmp


def _id(case: Case) -> str:
    return f"{case.fn}|{case.kind}|{case.what}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_refused_by_name_and_changes_nothing(case, tmp_path, request):
    w = _world(tmp_path)
    w.cleanup = lambda: None
    before = _state(w.model)
    masks_before = _masks_copy(w.masks)
    nan_case = "NaN in a kept" in case.what
    TALLY["tried"] += 1
    try:
        with pytest.raises(case.error) as info:
            case.call(w)
    finally:
        w.cleanup()
    msg = str(info.value)
    if case.error is not KeyboardInterrupt:
        assert re.search(case.names, msg, re.IGNORECASE), f"the message does not name {case.names!r}: {msg!r}"
        assert "Traceback" not in msg and len(msg) < 2000
    TALLY["clear error"] += 1
    if nan_case:  # the case itself put the NaN into the model: take it out again before comparing
        with torch.no_grad():
            w.model.fc1.weight[0, 0] = before["params"][0][4][0, 0]
    assert _same(before, _state(w.model)), "the model changed"
    assert all(torch.equal(masks_before[n], w.masks[n]) for n in masks_before), "the masks changed"
    for name, (path, content) in w.files.items():
        assert path.read_bytes() == content, f"{name} changed"
    if case.after is not None:
        case.after(w)
    TALLY["state unchanged"] += 1


def test_the_suite_covers_every_class():
    kinds = {c.kind for c in CASES}
    assert {"shape", "dtype", "device", "non-finite", "empty", "out-of-range", "wrong type", "corrupt file",
            "hostile file", "interrupt"} <= kinds
    assert len({_id(c) for c in CASES}) == len(CASES)


def test_no_source_file_unpickles_without_restriction():
    """weights_only=False or a bare pickle.load anywhere in the package or the benchmarks is a
    code-execution hole for whoever opens a file they were sent."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("ntkfast", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in (r"weights_only\s*=\s*False", r"\bpickle\.loads?\(", r"\bpickle\.Unpickler\(\s*f"):
                if re.search(pattern, text):
                    offenders.append(f"{path.relative_to(root)}: {pattern}")
    assert not offenders, offenders
