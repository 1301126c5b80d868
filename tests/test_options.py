"""The Literal types of the string options (ntkfast.core.options) and the runtime checks: every
public parameter annotated with one refuses a value outside it with a message listing exactly the
type's values, in order. New annotated parameters must be added to CALLS, or the test fails."""
import importlib
import typing

import pytest
import torch
from torch.utils.data import TensorDataset

from ntkfast import methods
from ntkfast.core import options
from ntkfast.core.options import choices
from testing import internal, mlp

ALIASES = [getattr(options, n) for n in options.__all__ if n != "choices"]
MODULES = ["ntkfast", "ntkfast.masks", "ntkfast.prune", "ntkfast.training", "ntkfast.training_grouped", "ntkfast.study", "ntkfast.ntt",
           "ntkfast.ntt.transfer", "ntkfast.ntk", "ntkfast.ops", "ntkfast.ops.masked_gram", "ntkfast.report",
           "ntkfast.models", "ntkfast.scores"]
BAD = "zz-not-an-option"
X = torch.rand(6, 12, generator=torch.Generator().manual_seed(0))


def _annotated():
    """{"module.function:parameter": Literal type} over the public functions and the registry."""
    fns = []
    for name in MODULES:
        mod = importlib.import_module(name)
        fns += [getattr(mod, n) for n in getattr(mod, "__all__", []) if callable(getattr(mod, n, None))]
    fns += [methods.get(n).fn for n in methods.available()]
    out = {}
    for fn in fns:
        try:
            hints = typing.get_type_hints(fn)
        except TypeError:  # a class or a builtin without hints
            continue
        target = getattr(fn, "__wrapped__", fn)
        while hasattr(target, "__wrapped__"):
            target = target.__wrapped__
        for p, h in hints.items():
            # a Literal alone, or inside a Union (train's optimizer: a name, an instance or a factory)
            found = [h] if h in ALIASES else [a for a in typing.get_args(h) if a in ALIASES] \
                if typing.get_origin(h) is typing.Union else []
            if found:
                out[f"{target.__module__}.{target.__qualname__}:{p}"] = found[0]
    return out


def _prune(**kw):
    from ntkfast import prune

    return prune(mlp(), "magnitude", 0.5, progress=False, **kw)


def _transfer(**kw):
    from ntkfast import transfer

    return transfer(mlp(), 0.5, X, steps=1, batch_size=4, progress=False, **kw)


def _study(**kw):
    from ntkfast import data as D
    from ntkfast.study import run_study

    sets = (D.GaussianNoise((1, 28, 28), 16, seed=1), D.GaussianNoise((1, 28, 28), 16, seed=2))
    return run_study("lenet300_100", "noise", None, ["random"], [0.5], [0], "/nonexistent/never/written.jsonl",
                     datasets=sets, progress=False, **kw)


def _model(name):
    from ntkfast import models

    return lambda v: getattr(models, name)(init=v)


def _report(fn):
    from ntkfast import report

    return lambda v: getattr(report, fn)([], **({"path": "/nonexistent/x.png"} if fn == "plot_accuracy" else {}),
                                         metric=v)


CALLS = {
    "ntkfast.masks.density_schedule:schedule": lambda v: __import__("ntkfast").masks.density_schedule(0.5, 2, v),
    "ntkfast.masks.round_density:schedule": lambda v: __import__("ntkfast").masks.round_density(0.5, 1, 2, v),
    "ntkfast.masks.threshold:keep_rule": lambda v: __import__("ntkfast").masks.threshold({"a": X}, 0.5, keep_rule=v),
    "ntkfast.masks.threshold:scope": lambda v: __import__("ntkfast").masks.threshold({"a": X}, 0.5, scope=v),
    "ntkfast.masks.nm_masks:layout": lambda v: __import__("ntkfast").masks.nm_masks({"a": X}, 2, 4, layout=v),
    "ntkfast.masks.nm_misfit:layout": lambda v: __import__("ntkfast").masks.nm_misfit((4, 8), 4, v),
    "ntkfast.prune.prune:keep_rule": lambda v: _prune(keep_rule=v),
    "ntkfast.prune.prune:nm_layout": lambda v: _prune(nm_layout=v),
    "ntkfast.prune.prune:on_indivisible": lambda v: _prune(on_indivisible=v),
    "ntkfast.prune.prune:on_empty_layer": lambda v: _prune(on_empty_layer=v),
    "ntkfast.prune.prune:schedule": lambda v: _prune(schedule=v),
    "ntkfast.prune.prune:scope": lambda v: _prune(scope=v),
    "ntkfast.ntt.transfer.transfer:init_mask": lambda v: _transfer(init_mask=v),
    "ntkfast.ntt.transfer.transfer:kernel": lambda v: _transfer(kernel=v),
    "ntkfast.ntt.transfer.transfer:scope": lambda v: _transfer(scope=v),
    "ntkfast.ntt.transfer.select_masks:scope":
        lambda v: importlib.import_module("ntkfast.ntt.transfer").select_masks({"a": X}, 0.5, v),
    "ntkfast.ntt.transfer.transfer_loss:kernel":
        lambda v: importlib.import_module("ntkfast.ntt.transfer").transfer_loss(None, {}, X, None, None, density=0.5,
                                                                                 kernel=v),
    "ntkfast.ntt.method.ntt:bn": lambda v: methods.get("ntt").fn(mlp(), data=X, target_density=0.5, bn=v),
    "ntkfast.ntt.transfer.transfer:bn": lambda v: _transfer(bn=v),
    **{f"ntkfast.scores.{mod}.{fn}:bn": (lambda v, fn=fn: getattr(__import__("ntkfast.scores").scores, fn)(
        mlp(), data=(X, torch.zeros(6, dtype=torch.long)), bn=v))
       for mod, fn in (("_snip", "snip"), ("_snip", "iterative_snip"), ("_grasp", "grasp"))},
    "ntkfast.ntt.method.ntt:init_mask": lambda v: methods.get("ntt").fn(mlp(), data=X, target_density=0.5, init_mask=v),
    "ntkfast.ntt.method.ntt:kernel": lambda v: methods.get("ntt").fn(mlp(), data=X, target_density=0.5, kernel=v),
    "ntkfast.ntt.method.ntt:scope": lambda v: methods.get("ntt").fn(mlp(), data=X, target_density=0.5, scope=v),
    "ntkfast.ntk.empirical_ntk:mode": lambda v: __import__("ntkfast.ntk").ntk.empirical_ntk(mlp(), X, mode=v),
    "ntkfast.ntk.ntk_spectrum:method": lambda v: __import__("ntkfast.ntk").ntk.ntk_spectrum(mlp(), X, method=v),
    "ntkfast.ntk.ntk_trace:method": lambda v: __import__("ntkfast.ntk").ntk.ntk_trace(mlp(), X, method=v),
    "ntkfast.ops.masked_gram.masked_gram:mode":
        lambda v: __import__("ntkfast.ops").ops.masked_gram(torch.rand(2, 3), torch.rand(2, 1, 4), mode=v),
    "ntkfast.ops.masked_gram.masked_gram_reference:mode":
        lambda v: __import__("ntkfast.ops").ops.masked_gram_reference(torch.rand(2, 3), torch.rand(2, 1, 4), mode=v),
    "ntkfast.training.train:optimizer":
        lambda v: __import__("ntkfast").train(mlp(), None, TensorDataset(X, torch.zeros(6, dtype=torch.long)), None,
                                              1, optimizer=v, progress=False),
    "ntkfast.training.train:amp":
        lambda v: __import__("ntkfast").train(mlp(), None, TensorDataset(X, torch.zeros(6, dtype=torch.long)), None,
                                              1, amp=v, progress=False),
    **{f"ntkfast.training_grouped.train_grouped:{p}":
        (lambda v, p=p: importlib.import_module("ntkfast.training_grouped").train_grouped(
            [mlp(0), mlp(1)], [None, None], TensorDataset(X, torch.zeros(6, dtype=torch.long)), None, 1,
            progress=False, **{p: v})) for p in ("optimizer", "amp")},
    "ntkfast.study.run_study:optimizer": lambda v: _study(optimizer=v),
    "ntkfast.study.run_study:scope": lambda v: _study(scope=v),
    "ntkfast.report.summarise:metric": _report("summarise"),
    "ntkfast.report.markdown_table:metric": _report("markdown_table"),
    "ntkfast.report.plot_accuracy:metric": _report("plot_accuracy"),
    "ntkfast.report.write_report:metric":
        lambda v: __import__("ntkfast.report").report.write_report(["/nonexistent/r.jsonl"], "/nonexistent/out", metric=v),
    **{f"ntkfast.models.cifar_resnet.{n}:init": _model(n) for n in ("resnet20", "resnet32", "resnet56")},
    **{f"ntkfast.models.imagenet_resnet.{n}:init": _model(n) for n in ("resnet18", "resnet50")},
    **{f"ntkfast.models.vgg.{n}:init": _model(n) for n in ("vgg11", "vgg16", "vgg19")},
}


def test_every_annotated_option_has_a_check_here():
    assert sorted(_annotated()) == sorted(CALLS)


@pytest.mark.parametrize("where", sorted(CALLS))
def test_the_check_refuses_what_the_type_leaves_out_and_lists_its_values(where):
    literal = _annotated()[where]
    values = choices(literal)
    param = where.rpartition(":")[2]
    if where.endswith("plot_accuracy:metric"):
        pytest.importorskip("matplotlib")
    with pytest.raises(ValueError) as info:
        CALLS[where](BAD)
    msg = str(info.value)
    assert msg.startswith(param), msg  # named by the argument
    assert BAD in msg
    # exactly the type's values, in order, as the check lists them
    assert ", ".join(map(repr, values)) in msg or ", ".join(values) in msg, (msg, values)


def test_choices_reads_a_literal_and_refuses_anything_else():
    assert choices(options.Scope) == ("global", "layerwise")
    with pytest.raises(TypeError, match="^option: expected a typing.Literal type"):
        choices(str)


def test_the_module_tuples_are_the_types_values():
    # the tuples other code reads are the Literal's own
    from ntkfast import masks, training

    prune_mod = importlib.import_module("ntkfast.prune")
    tmod = importlib.import_module("ntkfast.ntt.transfer")
    assert prune_mod._SCHEDULES == choices(options.Schedule) and prune_mod._SCOPES == choices(options.Scope)
    assert prune_mod._ON_EMPTY == choices(options.OnEmptyLayer) and masks._KEEP_RULES == choices(options.KeepRule)
    assert prune_mod._NM_LAYOUTS == masks._NM_LAYOUTS == choices(options.NmLayout)
    assert prune_mod._ON_INDIVISIBLE == choices(options.OnIndivisible)
    assert training.OPTIMIZERS == choices(options.Optimizer)
    assert internal("ntk_terms").MODES == choices(options.NTKMode)
    assert internal("ntk_trace").METHODS == choices(options.TraceMethod)
    assert tmod.KERNELS == choices(options.TransferKernel) and tmod.INIT_MASKS == choices(options.InitMask)


def test_the_cli_offers_the_same_values():
    # the CLI spells its choices out (its --help loads nothing heavy); they must be the types' values
    from ntkfast.cli import build_parser

    types = {"--schedule": options.Schedule, "--scope": options.Scope, "--optimizer": options.Optimizer,
             "--init-mask": options.InitMask, "--kernel": options.TransferKernel, "--metric": options.Metric,
             "--nm-layout": options.NmLayout, "--on-indivisible": options.OnIndivisible}
    seen = set()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command, parser in sub.choices.items():
        for action in parser._actions:
            for flag in set(action.option_strings) & set(types):
                assert set(action.choices) == set(choices(types[flag])), (command, flag)
                seen.add(flag)
    assert seen == set(types)
