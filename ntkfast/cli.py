"""The `ntkfast` command: prune, transfer, train, study, report, methods, models, info.

Parsing imports nothing heavy (the method and model names come from :mod:`ntkfast._catalog`), so
``ntkfast --help`` and ``ntkfast --version`` answer at once; each command imports torch and what
it needs when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from ._catalog import BUILTIN_METHODS, DATASETS, ZOO_MODELS, model_key
from ._version import __version__


def _default_rounds(method: str) -> int:
    """The pruning rounds of ``method`` when --rounds is not given: the authors' iterative schedules."""
    from .study import DEFAULT_ROUNDS

    return DEFAULT_ROUNDS.get(method, 1)


def _out_file(path, name: str):
    """An output file of the CLI, checked before the work; folders it needs may be missing if they
    can be made (:func:`_make_folder_of` makes them before writing)."""
    from .core.files import check_out_path

    return check_out_path(path, name, missing_folders_ok=True)


def _make_folder_of(path, name: str) -> None:
    import os

    from .core.files import make_folder

    make_folder(os.path.dirname(os.path.abspath(path)), name)


def _is_main_process() -> bool:
    from .distributed import is_main_process

    return is_main_process()


def _option(text: str) -> tuple:
    """KEY=VALUE with VALUE a Python literal (a number, True/False/None, a string, a tuple)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. repeats=5), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 3,32,32, got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _build_model(args):
    from . import models

    kwargs = {}
    if args.input_shape is not None:
        kwargs["input_shape"] = args.input_shape
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    torch = __import__("torch")
    torch.manual_seed(args.seed)
    return models.get(args.model, **kwargs)


def _checked_device(args):
    """``--device`` as a torch.device, refused by name before any work (no CUDA, a typo)."""
    from .core.checks import check_device

    return None if args.device is None else check_device(args.device, "--device")


def _labelled_batch(args, model):
    """A labelled batch for the data-based scorers: the dataset if given, else Gaussian noise."""
    from . import data as D

    if args.dataset:
        if not args.data_dir:
            raise SystemExit("ntkfast: --dataset needs --data-dir")
        ds = D.load_dataset(args.dataset, args.data_dir, train=True)
        x, y = next(iter(ds.batches(args.batch_size, shuffle=True, seed=args.seed)))
        return x, y
    print(f"ntkfast: no --dataset given; scoring on a Gaussian-noise batch of {args.batch_size} with random labels",
          file=sys.stderr)
    noise = D.GaussianNoise(model.input_shape, args.batch_size, num_classes=model.num_classes, seed=args.seed)
    return next(iter(noise.batches(args.batch_size)))


def _dense_layers(args, model):
    """``--exclude`` and ``--dense-classifier`` as the ``exclude=`` of prune and transfer (None
    when neither is given)."""
    from .masks import last_linear

    names = list(args.exclude or [])
    if args.dense_classifier:
        names.append(last_linear(model))
    return names or None


def cmd_prune(args) -> int:
    import torch

    from . import methods, prune

    info = methods.get(args.method)
    _out_file(args.out, "--out")  # before the work: hours must not end in a traceback about a path
    device = _checked_device(args)
    model = _build_model(args)
    if device is not None:
        model = model.to(device)
    rounds = args.rounds if args.rounds is not None else _default_rounds(args.method)
    options = dict(args.option or [])
    for key in ("scope", "target_density"):
        if key in options:
            raise SystemExit(f"ntkfast: -o {key}=...: set by prune itself (use --scope / --density)")
    if args.float64:
        options["dtype"] = torch.float64
    data = None
    if info.raw_data and args.dataset:
        # such a method reads the data set itself (the Dist variants: its un-normalised mean input)
        from . import data as D

        if not args.data_dir:
            raise SystemExit("ntkfast: --dataset needs --data-dir")
        data = D.load_dataset(args.dataset, args.data_dir, train=True)
    elif info.needs_data or args.dataset:
        x, y = _labelled_batch(args, model)
        data = (x.to(args.device or "cpu"), y.to(args.device or "cpu"))
    # a structure fixes the density (N/M): the 0.1 default would contradict it
    nm = args.structure is not None and args.structure != "channel"
    density = args.density if args.density is not None else (None if nm else 0.1)
    t0 = time.perf_counter()
    masks = prune(model, args.method, density, rounds=rounds, schedule=args.schedule, scope=args.scope,
                  data=data, seed=args.seed, progress=False if args.quiet else None, exclude=_dense_layers(args, model),
                  structure=args.structure, nm_layout=args.nm_layout, on_indivisible=args.on_indivisible,
                  channel_aggregate=args.channel_aggregate, **options)
    wall = time.perf_counter() - t0
    # what `ntkfast train --masks` needs to rebuild the same network
    masks.metadata.update(model=args.model, input_shape=list(model.input_shape),
                          num_classes=int(getattr(model, "num_classes", 0) or 0) or None)
    print(masks.report())
    dense = (f" of the pruned weights; {masks.density:.6g} counting the {len(masks.excluded)} excluded tensor(s) as "
             "kept" if masks.excluded else "")
    shape = f", {args.structure} structure" if args.structure else ""
    print(f"\nmethod {args.method}, {rounds} round(s), {args.scope} scope{shape}: density {masks.pruned_density:.6g} "
          f"(target {masks.metadata['density']:.6g}){dense}; scoring time {masks.metadata['score_seconds']:.3f} s, "
          f"total {wall:.3f} s")
    from .flops import count_flops

    flops = count_flops(model, masks=dict(masks.items()))
    masks.metadata["flops_fraction"] = flops.fraction
    print(f"remaining FLOPs: {flops.fraction:.4%} of {flops.total:,} multiply-accumulates per sample "
          "(the Synaptic-Flow / NTK-SAP count)")
    if args.out and _is_main_process():
        _make_folder_of(args.out, "--out")
        masks.save(args.out)
        print(f"masks saved to {args.out}")
        if masks.learned_weights is not None:  # masks files hold masks only
            print(f"note: {args.method} also learned weights, which {args.out} does not hold; "
                  f"`ntkfast transfer --out` saves masks and weights together", file=sys.stderr)
    return 0


_TRANSFER_FORMAT = "ntkfast.transfer/1"


def cmd_transfer(args) -> int:
    import torch

    from . import data as D
    from .core.files import atomic_write, plain_data
    from .ntt import transfer

    if args.steps is not None and args.epochs is not None:
        raise SystemExit("ntkfast: give --steps or --epochs, not both")
    _out_file(args.out, "--out")  # before the work: hours must not end in a traceback about a path
    _out_file(args.plot, "--plot")
    device = _checked_device(args)
    model = _build_model(args)
    if device is not None:
        model = model.to(device)
    train_set = D.load_dataset(args.dataset, args.data_dir, train=True)
    if tuple(train_set.input_shape) != tuple(model.input_shape):
        raise SystemExit(f"ntkfast: --model {args.model} expects inputs {model.input_shape}, the dataset has "
                         f"{train_set.input_shape}; pass --input-shape")
    if args.max_samples:
        train_set = train_set.subset(args.max_samples)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    lambda_l2 = args.lambda_l2 if args.lambda_l2 is not None else (1e-5 if conv else 1e-4)
    res = transfer(model, args.density, train_set, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                   lambda_ker=args.lambda_ker, lambda_l2=lambda_l2, lr=args.lr,
                   mask_update_every=None if args.mask_update_every == 0 else args.mask_update_every,
                   init_mask=args.init_mask, scope=args.scope, seed=args.seed, progress=False if args.quiet else None,
                   kernel=args.kernel, exclude=_dense_layers(args, model))
    h = res.history
    if h["step"]:
        print(f"validation: kernel distance {h['kernel_distance'][0]:.6g} -> {h['kernel_distance'][-1]:.6g}, "
              f"target distance {h['target_distance'][0]:.6g} -> {h['target_distance'][-1]:.6g} "
              f"over {res.masks.metadata['steps']} steps ({h['seconds'][-1]:.1f} s)")
    print(res.masks.report())
    res.masks.metadata["model"] = args.model
    if not _is_main_process():  # under torchrun: rank 0 writes
        return 0
    obj = {"format": _TRANSFER_FORMAT, "model": args.model, "input_shape": list(model.input_shape),
           "num_classes": model.num_classes, "masks": dict(res.masks), "metadata": plain_data(res.masks.metadata),
           "state_dict": {k: v.cpu() for k, v in res.state_dict.items()}, "history": plain_data(h)}
    _make_folder_of(args.out, "--out")
    atomic_write(args.out, lambda f: torch.save(obj, f))
    print(f"masks and learned sparse weights saved to {args.out} (train them: ntkfast train --init {args.out} ...)")
    if args.plot:
        from .plots import plot_transfer_history

        _make_folder_of(args.plot, "--plot")
        from .plot_style import dataset_name, model_name

        plot_transfer_history(h, args.plot, title=f"NTT: {model_name(args.model)} on {dataset_name(args.dataset)}, "
                                                  f"{args.density:.3g} of the weights kept")
        print(f"validation losses plotted to {args.plot}")
    return 0


_TRAIN_FORMAT = "ntkfast.train/1"
_INIT_FORMATS = {_TRANSFER_FORMAT: "`ntkfast transfer --out`", _TRAIN_FORMAT: "`ntkfast train --out`"}


def _load_init(path):
    import torch

    from .core.files import check_in_path

    path = check_in_path(path, "--init")
    what = "`ntkfast transfer --out` or `ntkfast train --out` file"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut, corrupt, foreign, or asking to run code (weights_only refuses it)
        msg = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise ValueError(f"--init: {path!r} is not a readable {what} ({type(e).__name__}: {msg})") from None
    if not isinstance(obj, dict) or obj.get("format") not in _INIT_FORMATS:
        raise ValueError(f"--init: {path!r} is not an {what}")
    bad = [k for k, kind in (("model", str), ("input_shape", list), ("num_classes", int), ("masks", dict),
                             ("state_dict", dict)) if not isinstance(obj.get(k), kind)]
    if bad:
        raise ValueError(f"--init: {path!r} is a damaged {_INIT_FORMATS[obj['format']]} file ({bad[0]} missing or wrong)")
    return obj


def _train_checkpoint(args, model, masks, result) -> dict:
    """What `ntkfast train --out` saves: the trained weights, the masks they were trained under, the
    history and the settings, as plain data torch.load(weights_only=True) reads (and --init takes)."""
    from .core.files import plain_data

    settings = {k: getattr(args, k) for k in ("dataset", "epochs", "optimizer", "lr", "batch_size", "seed",
                                              "max_batches", "masks", "init")}
    return {"format": _TRAIN_FORMAT, "model": args.model, "input_shape": list(model.input_shape),
            "num_classes": int(model.num_classes),
            "masks": {n: m.cpu() for n, m in masks.items()} if masks is not None else {},
            "metadata": plain_data(masks.metadata) if masks is not None else {},
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "history": result.to_dict(), "settings": plain_data(settings)}


def cmd_train(args) -> int:
    from . import Masks
    from . import data as D
    from .core.files import atomic_write
    from .training import train

    init = None
    if args.init:
        if args.masks:
            raise SystemExit("ntkfast: --init carries its masks; give --init or --masks, not both")
        init = _load_init(args.init)
        if args.model is None:
            args.model = init["model"]
        elif model_key(args.model) != model_key(init["model"]):
            raise SystemExit(f"ntkfast: --init {args.init} holds a {init['model']}, not a {args.model}")
        if args.input_shape is None:
            args.input_shape = tuple(init["input_shape"])
        if args.num_classes is None:
            args.num_classes = int(init["num_classes"])
    masks = Masks.load(args.masks) if args.masks else None
    if masks is not None:
        _fit_to_masks_file(args, masks)
    if args.model is None:
        args.model = "lenet300_100"
    # before the work: the trained weights must not be lost to a path
    _out_file(args.out, "--out")
    _out_file(args.history_json, "--history-json")
    model = _build_model(args)
    if init is not None:
        try:
            missing, unexpected = model.load_state_dict(init["state_dict"], strict=False)
        except RuntimeError as exc:  # shapes that do not fit (another --input-shape, say)
            raise SystemExit(f"ntkfast: --init {args.init} does not fit {args.model}: {exc}") from None
        if missing or unexpected:
            raise SystemExit(f"ntkfast: --init {args.init} does not fit {args.model}: missing {missing}, "
                             f"unexpected {unexpected}")
    train_set = D.load_dataset(args.dataset, args.data_dir, train=True)
    test_set = D.load_dataset(args.dataset, args.data_dir, train=False)
    if tuple(train_set.input_shape) != tuple(model.input_shape):
        raise SystemExit(f"ntkfast: --model {args.model} expects inputs {model.input_shape}, the dataset has "
                         f"{train_set.input_shape}; pass --input-shape")
    if init is not None and init["masks"]:
        masks = Masks(init["masks"], init.get("metadata", {}))
    if masks is not None:
        print(f"masks {args.masks or args.init}: density {masks.density:.6g} ({masks.metadata.get('method', '?')})")
    result = train(model, masks, train_set, test_set, args.epochs, optimizer=args.optimizer, lr=args.lr,
                   batch_size=args.batch_size, device=args.device, seed=args.seed, progress=False if args.quiet else None,
                   max_batches=args.max_batches, **_engine_of(args))
    for e in range(len(result.test_accuracy)):
        print(f"epoch {e + 1}: train loss {result.train_loss[e]:.4f}  test loss {result.test_loss[e]:.4f}  "
              f"test accuracy {result.test_accuracy[e]:.2%}")
    print(f"test accuracy: {result.final_test_accuracy:.2%}")
    if args.out:
        import torch

        obj = _train_checkpoint(args, model, masks, result)
        _make_folder_of(args.out, "--out")
        atomic_write(args.out, lambda f: torch.save(obj, f))
        print(f"trained weights, masks and history saved to {args.out} (train on from them: "
              f"ntkfast train --init {args.out} ...)")
    if args.history_json:
        _make_folder_of(args.history_json, "--history-json")
        atomic_write(args.history_json, lambda f: f.write(result.to_json() + "\n"), mode="w")
        print(f"history saved to {args.history_json}")
    return 0


def _method_settings(items, name: str, parse) -> dict:
    """METHOD=VALUE (``--rounds``) or METHOD:KEY=VALUE (``--method-option``) entries, per method."""
    out: dict = {}
    for text in items or []:
        method, sep, rest = text.partition(":" if name == "--method-option" else "=")
        if not sep or not method:
            form = "METHOD:KEY=VALUE" if name == "--method-option" else "METHOD=N"
            raise SystemExit(f"ntkfast: {name} expects {form}, got {text!r}")
        if name == "--method-option":
            key, value = parse(rest)
            out.setdefault(method, {})[key] = value
        else:
            out[method] = parse(rest)
    return out


def _out_error(exc: OSError) -> int:
    """A full disk or a permission changed mid-run: one line, not a traceback."""
    print(f"ntkfast: error: {exc}", file=sys.stderr)
    return 2


def cmd_study(args) -> int:
    from .study import check_out, run_study

    _out_file(args.out, "--out")  # before the data loads, named as the user typed it
    _make_folder_of(args.out, "--out")  # the study appends to its file from the first cell on
    check_out(args.out, "--out")  # an existing file must be a study's results

    def positive_int(text):
        try:
            return int(text)
        except ValueError:
            raise SystemExit(f"ntkfast: --rounds expects METHOD=N with an int N, got {text!r}") from None

    def option(text):
        try:
            return _option(text)
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"ntkfast: --method-option: {exc}") from None

    try:
        records = run_study(
            args.model, args.dataset, args.data_dir, args.methods, args.densities, args.seeds, args.out,
            epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, batch_size=args.batch_size, lr_milestones=args.lr_milestones,
            scope=args.scope, rounds=_method_settings(args.rounds, "--rounds", positive_int),
            method_options=_method_settings(args.method_option, "--method-option", option),
            prune_samples=args.prune_samples, train_subset=args.train_subset, test_subset=args.test_subset,
            max_batches=args.max_batches, device=args.device, progress=False if args.quiet else None,
            claim_timeout=args.claim_timeout, exclude=args.exclude, dense_classifier=args.dense_classifier,
            engine=_engine_of(args) or None)
    except OSError as exc:
        return _out_error(exc)
    for r in records:
        best = "?" if r["best_test_accuracy"] is None else f"{r['best_test_accuracy']:.2%}"
        print(f"{r['method']:>16s}  density {r['density']:<7g} seed {r['seed']}  "
              f"test accuracy {r['final_test_accuracy']:.2%} (best {best})")
    print(f"{len(records)} cells in {args.out}; tables and plots: ntkfast report {args.out} --out DIR")
    return 0


def cmd_reproduce(args) -> int:
    from .presets import get
    from .reproduce import compare, format_comparison, reproduce

    from .study import check_out

    _checked_device(args)
    check_out(args.out, "--out")  # named as the user typed it, before the data loads
    if args.plot:  # before the work: a plot path that cannot be written fails now, not after hours
        import importlib.util

        from .core.files import check_out_path
        from .plots import figure_paths

        if importlib.util.find_spec("matplotlib") is None:
            raise SystemExit("ntkfast reproduce: --plot needs matplotlib (pip install matplotlib)")
        results = os.path.realpath(args.out)
        for path in figure_paths(args.plot, _PLOT_FORMATS):
            check_out_path(path, "--plot", missing_folders_ok=True)
            real = os.path.realpath(path)
            if real == results or real.startswith(results + ".claims" + os.sep):
                raise ValueError(f"--plot: the figure {path!r} would overwrite the results file --out {args.out!r}; "
                                 "give the figure another name")
    reduced = (args.epochs not in (None, get(args.preset).epochs)
               or any(v is not None for v in (args.train_subset, args.test_subset, args.max_batches)))
    try:
        records = reproduce(args.preset, args.data_dir, args.out, methods=args.methods, densities=args.densities,
                            seeds=args.seeds, epochs=args.epochs, budget_s=args.budget_s, device=args.device,
                            progress=False if args.quiet else None, train_subset=args.train_subset,
                            test_subset=args.test_subset, max_batches=args.max_batches,
                            engine=_engine_of(args) or None)
    except ImportError as exc:  # a reader's optional dependency (Pillow, scipy)
        raise SystemExit(f"ntkfast reproduce: {exc}") from None
    rows = compare(records, args.preset)
    print(format_comparison(rows, args.preset, reduced=reduced))
    if args.plot and rows:
        from .plots import figure_paths
        from .reproduce import plot_comparison

        _make_folder_of(args.plot, "--plot")
        try:
            plot_comparison(rows, args.preset, args.plot, formats=_PLOT_FORMATS)
        except ImportError as exc:
            raise SystemExit(f"ntkfast reproduce: {exc}") from None
        for path in figure_paths(args.plot, _PLOT_FORMATS):
            print(path)
    return 0


_PLOT_FORMATS = ("png", "pdf", "svg")


def cmd_report(args) -> int:
    from .core.files import check_out_dir
    from .report import write_report

    import os

    from .core.files import make_folder

    check_out_dir(args.out, "--out", missing_folders_ok=True)  # before reading the results, named as typed
    make_folder(os.path.dirname(os.path.abspath(args.out)), "--out")  # the report makes the folder itself
    try:
        written = write_report(args.results, args.out, metric=args.metric, profile_density=args.profile_density,
                               plots=not args.no_plots, **({"formats": args.formats} if args.formats else {}))
    except ImportError as exc:
        raise SystemExit(f"ntkfast report: {exc}") from None
    except OSError as exc:
        return _out_error(exc)
    for path in written:
        print(path)
    return 0


#: method options the CLI sets through its own flags, not through -o
_OPTIONS_BY_FLAG = {"dtype": "--float64", "input_shape": "--input-shape", "device": "--device"}


def _cli_options(info) -> list:
    """``KEY=DEFAULT`` for each option of a method that ``-o KEY=VALUE`` can set: those whose values
    are Python literals (numbers, strings, True/False/None), not tensors, callables or the options
    the CLI's own flags set."""
    import inspect

    out = []
    for name, p in info.options().items():
        if p.kind is p.VAR_KEYWORD or name in _OPTIONS_BY_FLAG:
            continue
        if p.annotation is p.empty:
            settable = isinstance(p.default, (bool, int, float, str))  # an unannotated None may be anything
        else:
            words = inspect.formatannotation(p.annotation)
            settable = not any(w in words for w in ("Tensor", "Callable", "Mapping", "Sequence", "Module"))
        if settable:
            out.append(f"{name}={p.default!r}")
    return out


def cmd_methods(args) -> int:
    import shutil
    import textwrap

    from . import methods

    rows = [(name, "yes" if (methods.get(name).needs_data or methods.get(name).raw_data) else "-", desc,
             _cli_options(methods.get(name))) for name, desc in methods.available().items()]
    w_name = max(len("METHOD"), *(len(r[0]) for r in rows)) + 2
    w_data = len("DATA") + 2
    indent = " " * (w_name + w_data)
    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    wrap = textwrap.TextWrapper(width=width, initial_indent=indent, subsequent_indent=indent)
    print(f"{'METHOD':<{w_name}}{'DATA':<{w_data}}DESCRIPTION")
    for name, data, desc, opts in rows:
        lines = wrap.wrap(desc)
        print(f"{name:<{w_name}}{data:<{w_data}}{lines[0][len(indent):]}")
        for line in lines[1:]:
            print(line)
        if opts:
            print("\n".join(wrap.wrap("options (-o KEY=VALUE): " + ", ".join(opts))))
    return 0


def cmd_models(args) -> int:
    from . import models

    for name in models.available():
        print(name)
    return 0


def cmd_info(args) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=2, default=str))
    return 0


def _fit_to_masks_file(args, masks) -> None:
    """The network a masks file was made for (``ntkfast prune --out`` records it): taken when
    --model, --input-shape or --num-classes is not given, refused when one given differs."""
    meta = masks.metadata
    made_for = meta.get("model")
    if isinstance(made_for, str):
        if args.model is None:
            args.model = made_for
        elif args.model != made_for:
            raise SystemExit(f"ntkfast: --masks {args.masks} was made for a {made_for}, not a {args.model}; "
                             f"pass --model {made_for} (or leave --model out)")
    elif args.model is None:
        raise SystemExit(f"ntkfast: --masks {args.masks} does not say which model it was made for; pass --model")
    shape = meta.get("input_shape")
    if args.input_shape is None and isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape):
        args.input_shape = tuple(shape)
    classes = meta.get("num_classes")
    if args.num_classes is None and isinstance(classes, int) and classes > 0:
        args.num_classes = classes


def _model_name(text: str) -> str:
    """A zoo name as the zoo spells it ("ResNet-20" is resnet20); anything else as typed, for
    argparse to refuse against the choices."""
    return {model_key(n): n for n in ZOO_MODELS}.get(model_key(text), text)


def _add_model_args(p, default_model):
    p.add_argument("--model", default=default_model, type=_model_name, choices=ZOO_MODELS, metavar="MODEL",
                   help="zoo model: %(choices)s" + ("" if default_model else
                                                   " (default: the one the --masks or --init file was made for, "
                                                   "else lenet300_100)"))
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="input shape without batch, e.g. 3,32,32 (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the model's own)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (initialisation, pruning, shuffling)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _seed(text: str) -> int:
    # core.checks.check_seed's range, without importing torch while parsing
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an int in [-2**63, 2**64), got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _add_exclude_args(p):
    p.add_argument("--exclude", action="append", metavar="NAME", default=None,
                   help="keep this layer dense (a module or weight name such as fc or fc.weight, or a pattern "
                        "such as 'classifier.*'); repeatable. The density is then that of the other weights")
    p.add_argument("--dense-classifier", action="store_true",
                   help="keep the model's classifier (its last Linear layer) dense, as Synaptic-Flow's "
                        "--dense-classifier")


def _add_dist_args(p):
    p.add_argument("--dist-timeout", type=_seconds, default=600.0,
                   help="under torchrun: seconds a process waits for the others in a collective before it "
                        "stops with an error")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad flag in the one line every other error gets (the usage is
    one `--help` away), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default after its text, where there is one to show: not
    None (the text says what happens then), not a flag's False, not one the text already gives."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_engine_args(p) -> None:
    """How the training steps run (ntkfast.training.train's engine arguments)."""
    g = p.add_argument_group("how training runs (named in the results where on)")
    g.add_argument("--amp", default=None, choices=["bf16"], help="the forward in bfloat16 autocast")
    g.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores on CUDA (default: float32 is float32)")
    g.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="the forward through torch.compile (optionally with this backend, e.g. aot_eager)")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="channels-last layout on any device (default: on the CPU only)")
    g.add_argument("--no-resident", dest="resident", action="store_false", default=None,
                   help="copy each batch from the host instead of keeping the dataset on the GPU")


def _engine_of(args) -> dict:
    """The engine arguments given on the command line (none: an empty dict)."""
    out = {}
    for name, default in (("amp", None), ("tf32", False), ("compile", False), ("channels_last", None),
                          ("resident", None)):
        value = getattr(args, name, default)
        if value != default:
            out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ntkfast", description="Fast NTK-based pruning at initialisation.",
                     epilog="`ntkfast COMMAND --help` gives the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a zoo model and print the per-layer density table")
    _add_model_args(p, "resnet20")
    p.add_argument("--method", default="synflow", choices=BUILTIN_METHODS, metavar="METHOD",
                   help="pruning method: %(choices)s (see `ntkfast methods`)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of weights kept; with --structure N:M it is N/M (default: 0.1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="pruning rounds (default: 100 for the synflow variants and iterative_snip, 20 for ntksap, "
                        "else 1)")
    p.add_argument("--structure", default=None, metavar="N:M|channel",
                   help="N:M semi-structured masks, e.g. 2:4: N kept in every M consecutive weights along each "
                        "weight's input dimension; or 'channel': whole output channels, tied ones together")
    p.add_argument("--channel-aggregate", default="sum", choices=["sum", "mean", "l2", "max"],
                   help="with --structure channel: how a channel's weight scores are combined to rank it")
    p.add_argument("--nm-layout", default="channels", choices=["channels", "flat"],
                   help="where N:M groups run in a convolution: along the input channels at each kernel position "
                        "(TensorRT's layout), or along weight.reshape(out, -1)")
    p.add_argument("--on-indivisible", default="error", choices=["error", "unstructured"],
                   help="a layer whose input dimension is not a multiple of M: refuse (default), or prune it "
                        "without the structure")
    p.add_argument("--schedule", default="exponential", choices=["exponential", "linear", "expinv"],
                   help="how the density falls over the rounds")
    p.add_argument("--scope", default="global", choices=["global", "layerwise"],
                   help="rank the weights of all layers together, or of each layer apart")
    p.add_argument("--dataset", default=None, choices=DATASETS, metavar="DATASET",
                   help="for data-based methods: %(choices)s (default: a batch of Gaussian noise)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset")
    p.add_argument("--batch-size", type=int, default=100, help="scoring batch for data-based methods")
    p.add_argument("--float64", action="store_true", help="score in float64")
    p.add_argument("-o", "--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="an option of the method, repeatable (e.g. -o repeats=5 -o epsilon=0.01; see `ntkfast methods`)")
    p.add_argument("--out", default=None, help="save the masks here (torch.save); missing folders are made")
    _add_exclude_args(p)
    _add_dist_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("transfer", help="Neural Tangent Transfer: learn a sparse initialisation, label-free")
    _add_model_args(p, "lenet300_100")
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="DATASET",
                   help="%(choices)s (labels are not used)")
    p.add_argument("--data-dir", required=True, help="folder holding the dataset")
    p.add_argument("--density", type=float, default=0.03, help="fraction of weights kept")
    p.add_argument("--epochs", type=float, default=None, help="NTT epochs (default: 20, as the authors)")
    p.add_argument("--steps", type=int, default=None, help="NTT steps instead of --epochs")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per NTT step")
    p.add_argument("--lambda-ker", type=float, default=1e-3, help="weight of the kernel distance in the loss")
    p.add_argument("--lambda-l2", type=float, default=None,
                   help="weight of the L2 penalty (default: 1e-4 for an MLP, 1e-5 for a CNN, as the authors)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam's learning rate")
    p.add_argument("--mask-update-every", type=int, default=100, help="steps between mask re-selections; 0: never")
    p.add_argument("--init-mask", default="magnitude", choices=["magnitude", "logit_snip"], help="the first mask")
    p.add_argument("--scope", default="layerwise", choices=["layerwise", "global"], help="how the mask is selected")
    p.add_argument("--kernel", default="sparse", choices=["sparse", "authors_code"], help="the student's kernel")
    p.add_argument("--max-samples", type=_positive, default=None, help="use only the first N training images")
    p.add_argument("--out", required=True, help="where to save masks, learned weights and history (torch.save); "
                                                "missing folders are made")
    p.add_argument("--plot", default=None, help="also plot the validation losses to this PNG (needs matplotlib)")
    _add_exclude_args(p)
    _add_dist_args(p)
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("train", help="train a (pruned) zoo model and report test accuracy")
    _add_model_args(p, None)
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="DATASET", help="%(choices)s")
    p.add_argument("--data-dir", required=True, help="folder holding the dataset")
    p.add_argument("--masks", default=None, help="masks file from `ntkfast prune --out`")
    p.add_argument("--init", default=None, help="start from the weights and masks of an `ntkfast transfer --out` "
                                                "or `ntkfast train --out` file (with a fresh optimizer)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training set")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="sgd has momentum 0.9")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.1 for sgd, 1e-3 for adam)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--out", default=None, help="save the trained weights, their masks and the history here "
                                               "(torch.save; --init reads it back); missing folders are made")
    p.add_argument("--history-json", default=None, metavar="FILE",
                   help="also write the per-epoch history (losses, accuracies, lr, seconds) as JSON")
    _add_engine_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("study", help="prune, train and evaluate every (method, density, seed) cell; resumable")
    p.add_argument("--model", required=True, type=_model_name, choices=ZOO_MODELS, metavar="MODEL",
                   help="zoo model: %(choices)s")
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="DATASET", help="%(choices)s")
    p.add_argument("--data-dir", required=True, help="folder holding the dataset")
    p.add_argument("--methods", nargs="+", required=True, choices=BUILTIN_METHODS, metavar="METHOD",
                   help="pruning methods: %(choices)s (see `ntkfast methods`)")
    p.add_argument("--densities", nargs="+", type=float, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds, one cell each")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of each cell")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="the training optimizer")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.1 for sgd, 1e-3 for adam)")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty of the optimizer")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--lr-milestones", nargs="*", type=int, default=None, help="epochs after which lr is x0.1")
    p.add_argument("--scope", default="global", choices=["global", "layerwise"], help="the pruning scope")
    p.add_argument("--rounds", action="append", metavar="METHOD=N",
                   help="pruning rounds of a method (default: synflow* and iterative_snip 100, ntksap 20, else 1)")
    p.add_argument("--method-option", action="append", metavar="METHOD:KEY=VALUE",
                   help="an option of one method, repeatable (e.g. ntt:epochs=5, ntksap:repeats=5)")
    p.add_argument("--prune-samples", type=int, default=None, help="samples the data-based scorers see (default 10 per class)")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N images only (a reduced run)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="JSON-lines results file (appended; finished cells are skipped); "
                                                "missing folders are made")
    p.add_argument("--claim-timeout", type=_seconds, default=600.0,
                   help="seconds after which a cell claimed by a process that stopped renewing its claim "
                        "(a killed one on another machine) is run here instead")
    _add_exclude_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="markdown tables and figures (PNG, PDF, SVG) from `ntkfast study` results")
    p.add_argument("results", nargs="+", help="JSON-lines files from `ntkfast study`")
    p.add_argument("--out", required=True, help="directory for report.md and the plots; missing folders are made")
    p.add_argument("--metric", default="final", choices=["final", "best"], help="test accuracy after the last epoch or the best epoch")
    p.add_argument("--profile-density", type=float, default=None,
                   help="density of the per-layer density plot (default: the middle one of the study)")
    p.add_argument("--no-plots", action="store_true", help="only the tables (no matplotlib needed)")
    p.add_argument("--formats", nargs="+", choices=["png", "pdf", "svg", "eps"], default=None,
                   help="the files of each plot, side by side (default: png pdf svg)")
    p.set_defaults(func=cmd_report)

    from .presets import available as _preset_names  # torch-free: a table of numbers

    p = sub.add_parser("reproduce", help="run a paper's setting (a preset) and compare with its published numbers")
    p.add_argument("preset", choices=_preset_names(), metavar="PRESET", help="%(choices)s")
    p.add_argument("--data-dir", required=True, help="folder holding the preset's dataset")
    p.add_argument("--out", required=True, help="the study file (JSON lines), resumed like `ntkfast study`")
    p.add_argument("--methods", nargs="+", default=None, help="a part of the preset's methods (default: all)")
    p.add_argument("--densities", nargs="+", type=float, default=None, help="a part of its density grid")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: the preset's)")
    p.add_argument("--epochs", type=_positive, default=None, help="fewer epochs than the paper: a reduced run")
    p.add_argument("--train-subset", type=_positive, default=None, help="train on the first N images (reduced)")
    p.add_argument("--test-subset", type=_positive, default=None, help="test on the first N images (reduced)")
    p.add_argument("--max-batches", type=_positive, default=None, help="at most N batches per epoch (reduced)")
    p.add_argument("--budget-s", type=_seconds, default=None,
                   help="start no cell that the cells timed so far say would end after this many seconds")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--plot", default=None, help="also plot ours against the published numbers (PNG, PDF and "
                                                 "SVG beside this path; needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_engine_args(p)
    p.set_defaults(func=cmd_reproduce)

    sub.add_parser("methods", help="list the pruning methods and their -o options").set_defaults(func=cmd_methods)
    sub.add_parser("models", help="list the model zoo").set_defaults(func=cmd_models)
    sub.add_parser("info", help="how the extension was built").set_defaults(func=cmd_info)
    return parser


def _under_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def _library_messages(quiet: bool):
    """The library's messages (the "ntkfast" logger) on stderr above any progress bar while a
    command runs: INFO and up, or only warnings with --quiet. Restored afterwards, for a caller
    of main() in the same process."""
    import logging

    from .core.progress import BarSafeHandler

    log = logging.getLogger("ntkfast")
    handler = BarSafeHandler()
    handler.setFormatter(logging.Formatter("ntkfast: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a bad flag: argparse has said what it had to
        return exc.code if isinstance(exc.code, int) else 2
    args._flags = _flags_of(parser, args.command)
    with _library_messages(getattr(args, "quiet", False)):
        return _dispatch(args)


def _dispatch(args) -> int:
    if not _under_torchrun():
        return _run(args)
    # torchrun: prune and transfer split their work over the processes; rank 0 alone prints and
    # writes files, the others run silently
    if not hasattr(args, "dist_timeout"):
        print(f"ntkfast: error: `{args.command}` does not split over processes; run it without torchrun",
              file=sys.stderr)
        return 2
    import contextlib
    import os

    import torch.distributed as dist

    from .distributed import init_from_env

    try:
        args.device = init_from_env(args.device, args.dist_timeout)
    except ValueError as exc:
        print(f"ntkfast: error: {exc}", file=sys.stderr)
        return 2
    try:
        if dist.get_rank() == 0:
            return _run(args)
        args.quiet = True
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return _run(args)
    finally:
        dist.destroy_process_group()


# commands that hand their flags to a library function whose errors name its parameters
_NAMED_AS_FLAGS = {"study", "reproduce"}


def _flags_of(parser, command) -> dict:
    """The command's option flags by destination: {"budget_s": "--budget-s", ...}."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: a.option_strings[-1] for a in sub._actions if a.option_strings}


def _as_typed(message: str, args) -> str:
    """A library error of study or reproduce that names a parameter ('budget_s: ...', a data
    reader's 'root: ...') names the flag the user typed instead."""
    if getattr(args, "command", None) not in _NAMED_AS_FLAGS:
        return message
    name, sep, rest = message.partition(": ")
    flag = getattr(args, "_flags", {}).get("data_dir" if name == "root" else name) if sep else None
    return f"{flag}: {rest}" if flag else message


def _run(args) -> int:
    try:
        return args.func(args)
    except BrokenPipeError:  # `ntkfast methods | head`: the reader left; say nothing more to it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    except (ValueError, OSError) as exc:  # a bad argument or file, a full disk: one line, no traceback
        print(f"ntkfast: error: {_as_typed(str(exc), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ntkfast: interrupted; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as exc:  # the commands' own "ntkfast: ..." refusals: the same line and status
        if isinstance(exc.code, str):
            text = exc.code[len("ntkfast: "):] if exc.code.startswith("ntkfast: ") else exc.code
            print(f"ntkfast: error: {text}", file=sys.stderr)
            return 2
        raise
