"""Accuracy studies: prune at initialisation by several methods, densities and seeds, train each
pruned network, evaluate it, and append one JSON line per finished run (a *cell*).

A study is resumable: cells already in the output file with the same protocol are skipped, and a
line cut short by an interruption is dropped, so a killed study continues where it stopped and
never runs a finished cell twice.

The output file is written only once it is proven a study's: every complete line a valid study
record (an empty or missing file is one too). Anything else (notes, a JSON document, a binary
file) is refused before any work, byte for byte as it was. Only then is a cut last line dropped
(one that starts as a record does) and a record appended, as one ``O_APPEND`` write of a whole
line, under an advisory lock (``flock``) where the file system has one.

Several processes, on one machine or on several that share the folder, may run one study into one
file, each cell exactly once. Before running a cell a process *claims* it: it creates
``<out>.claims/<hash of the cell>.claim`` with ``O_CREAT | O_EXCL`` (its pid, host and start
time), so of two processes that start the same cell at the same moment exactly one runs it. The
others leave the cell, run the rest, and then wait for the cells claimed elsewhere, re-reading the
file, so that each returns with the whole study in the file. A claim is removed once its record
is in the file, or when its cell fails (so that a rerun runs it). One left by a killed process is
taken over: at once when its pid is gone from this machine, and otherwise once its heartbeat (the
claim file's modification time, renewed every ``claim_timeout / 10`` seconds, at most 60, while
the cell runs) is older than ``claim_timeout``. The claims folder is removed once the study is
complete.

``ntkfast report`` turns the file into tables and plots.

    from ntkfast.study import run_study
    run_study("lenet300_100", "mnist", "data/", ["random", "snip", "synflow"], [0.1, 0.01], [0, 1],
              "results.jsonl", epochs=20)
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from .core.checks import check_choice, check_device, check_number
from .core.options import Optimizer, Scope, choices
from .core.files import check_out_path
from .core.progress import check_progress, format_value, progress_bar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; an append is still one O_APPEND write
    fcntl = None

__all__ = ["DEFAULT_ROUNDS", "run_study", "read_results", "check_out", "cell_key"]

_log = logging.getLogger(__name__)

# each method's authors' iterative schedule (SynFlow and its L2 / Dist variants, iterative SNIP:
# 100 rounds; NTK-SAP: 20); every other method scores once
DEFAULT_ROUNDS = {"synflow": 100, "synflow_l2": 100, "synflow_l2_squared": 100, "synflow_dist": 100,
                  "synflow_l2_dist": 100, "iterative_snip": 100, "ntksap": 20}
NTT_DEFAULT_EPOCHS = 20.0  # the NTT authors' demos


def _protocol(**kwargs) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def cell_key(record: Mapping) -> Tuple:
    """What makes two runs the same cell: model, data, method and its settings, density, seed and
    the training protocol."""
    return (record["model"], record["dataset"], record["method"], float(record["density"]), int(record["seed"]),
            int(record["rounds"]), json.dumps(record["options"], sort_keys=True, default=str),
            json.dumps(record["protocol"], sort_keys=True))


_REQUIRED = ("model", "dataset", "method", "density", "seed", "rounds", "options", "protocol",
             "final_test_accuracy", "best_test_accuracy", "layer_density")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_fraction(v) -> bool:
    # NaN fails both comparisons, so a diverged or hand-edited record is named, not averaged
    return _is_number(v) and 0 <= v <= 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# what the study and the report rely on, so a record that passes cannot fail them later with a
# KeyError or TypeError far from its file and line
_FIELDS = (("model", lambda v: isinstance(v, str), "a string"),
           ("dataset", lambda v: isinstance(v, str), "a string"),
           ("method", lambda v: isinstance(v, str), "a string"),
           ("density", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
           ("seed", _is_int, "an int"),
           ("rounds", lambda v: _is_int(v) and v >= 1, "a positive int"),
           ("options", lambda v: isinstance(v, dict), "an object"),
           ("protocol", lambda v: isinstance(v, dict), "an object"),
           ("final_test_accuracy", lambda v: _is_fraction(v), "a fraction in [0, 1]"),
           ("best_test_accuracy", lambda v: v is None or _is_fraction(v), "a fraction in [0, 1] or null"),
           ("layer_density", lambda v: isinstance(v, dict) and all(map(_is_fraction, v.values())),
            "an object of fractions in [0, 1]"))
_PROTOCOL_FIELDS = (("epochs", lambda v: _is_int(v) and v >= 1, "a positive int"),
                    ("optimizer", lambda v: isinstance(v, str), "a string"),
                    ("lr", lambda v: v is None or _is_number(v), "a number or null"),
                    ("batch_size", lambda v: _is_int(v) and v >= 1, "a positive int"),
                    ("scope", lambda v: isinstance(v, str), "a string"))
# how every record run_study writes begins: the evidence that a file holding only a cut line is ours
_RECORD_START = b'{"model": '
_NOT_JSON = object()


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _record_error(rec) -> Optional[str]:
    """Why ``rec`` is not a study record, or None when it is one."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, ok, what in _FIELDS:
        if not ok(rec[key]):
            return f"{key}: expected {what}, got {_short(rec[key])}"
    for key, ok, what in _PROTOCOL_FIELDS:
        if key not in rec["protocol"]:
            return f"protocol: missing {key}"
        if not ok(rec["protocol"][key]):
            return f"protocol.{key}: expected {what}, got {_short(rec['protocol'][key])}"
    milestones = rec["protocol"].get("lr_milestones")
    if milestones is not None and not (isinstance(milestones, list) and all(map(_is_int, milestones))):
        return f"protocol.lr_milestones: expected a list of ints, got {_short(milestones)}"
    return None


def _load_line(line: bytes):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: a line of hostile nesting, [[[[...
        return _NOT_JSON


def _record(obj, path, name: str, i: int) -> dict:
    where = f"{name}: {str(path)!r} line {i + 1}"
    if obj is _NOT_JSON:
        raise ValueError(f"{where} is not a JSON record")
    why = _record_error(obj)
    if why:
        raise ValueError(f"{where} is not an ntkfast study record ({why})")
    return obj


def _looks_cut(line: bytes, proven: bool) -> bool:
    """Whether a last line that is not JSON is a record's write cut short: it starts with ``{``
    after lines already proven records, or as :func:`run_study` starts each record in a file with
    none (nothing else shows that such a file is a study's)."""
    if proven:
        return line.startswith(b"{")
    n = min(len(line), len(_RECORD_START))
    return line[:n] == _RECORD_START[:n]


def _parse(raw: bytes, path, name: str) -> Tuple[List[dict], object]:
    """(the records of a results file's bytes, how to mend its end before appending: None, the
    length to truncate it to, or "newline"). ValueError naming the file and line unless every
    line is a study record, bar a last one cut short."""
    lines = raw.split(b"\n")
    records, end = [], 0  # end: the bytes up to and including the last newline
    for i, line in enumerate(lines[:-1]):
        if line.strip():
            records.append(_record(_load_line(line), path, name, i))
        end += len(line) + 1
    last = lines[-1]  # after the last newline
    if not last.strip():
        return records, None
    obj = _load_line(last)
    if obj is _NOT_JSON and _looks_cut(last, bool(records)):
        return records, end  # the interrupted write of a cell: it will be run again
    # complete JSON without its newline: kept, and the line ended before the next append
    return records + [_record(obj, path, name, len(lines) - 1)], "newline"


def _read_bytes(path: Path, name: str) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ValueError(f"{name}: {str(path)!r} is a folder, not a results file") from None
    except OSError as exc:  # unreadable: one line naming it, not a traceback
        raise ValueError(f"{name}: cannot read {str(path)!r} ({exc.strerror or exc})") from None


def read_results(path, *, repair: bool = False, name: str = "out") -> List[dict]:
    """The records of a JSON-lines results file ([] if it does not exist). Every line must be a
    study record (its fields present and of their types), bar a last line cut short by an
    interruption, which is ignored; anything else is a ValueError naming the argument ``name``,
    the file and the line. With ``repair``, and only once the whole file has passed, the cut line
    is removed and a last line without its newline ended (under the file's lock)."""
    path = Path(path)
    if repair:
        return _settle(path, name)
    raw = _read_bytes(path, name)
    return [] if raw is None else _parse(raw, path, name)[0]


@contextlib.contextmanager
def _locked(path: Path, create: bool):
    """``path`` open for reading and appending, under an exclusive lock: appends and repairs by
    processes sharing the file take turns, so a repair never cuts another's write in flight."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0), 0o666)
    with os.fdopen(fd, "r+b", buffering=0) as f:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: go on unlocked
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield f  # the lock goes with the descriptor


def _prove(f, path: Path, name: str) -> List[dict]:
    """Read the open file ``f`` whole, check it is a study's, and only then mend its end."""
    f.seek(0)
    records, mend = _parse(f.readall(), path, name)
    if mend == "newline":
        _write_all(f, b"\n", path)
    elif mend is not None:
        f.truncate(mend)
    return records


def _settle(path: Path, name: str) -> List[dict]:
    if _read_bytes(path, name) is None:
        return []
    with _locked(path, create=False) as f:
        return _prove(f, path, name)


def _write_all(f, data: bytes, path: Path) -> None:
    """``data`` appended by one write, or not at all: a short write (a full disk) is undone, so
    no cut line is left for another process to read."""
    size = os.fstat(f.fileno()).st_size
    if os.write(f.fileno(), data) != len(data):
        f.truncate(size)
        raise OSError(errno.ENOSPC, "the record could not be written whole", str(path))


def _append(path: Path, record: dict, name: str = "out") -> None:
    """Append ``record`` as one line, after proving the file is still a study's (it may have been
    replaced while the cell ran: never write into a file that is not ours)."""
    line = (json.dumps(record, default=str) + "\n").encode()  # ASCII: newlines inside are escaped
    with _locked(path, create=True) as f:
        _prove(f, path, name)
        _write_all(f, line, path)
        os.fsync(f.fileno())


def check_out(out, name: str = "out") -> str:
    """``out`` as a str, checked before any work as a study's output file: a new file in an
    existing, writable folder, or a study's results (see :func:`read_results`), which is left as
    it was when it is not. ValueError naming ``name`` otherwise."""
    out = check_out_path(out, name)
    if os.path.exists(out) and not os.path.isfile(out):  # a pipe or a device would block or swallow
        raise ValueError(f"{name}: {out!r} is not a regular file")
    try:
        read_results(out, name=name)
    except ValueError as exc:
        raise ValueError(f"{exc}; the file was left as it was ({name} must be a new file or the results "
                         f"of an ntkfast study)") from None
    claims = str(_claims_dir(out))
    if os.path.exists(claims) and not os.path.isdir(claims):
        raise ValueError(f"{name}: {claims!r}, where the study's processes claim their cells, is not a folder")
    return out


# ---------------------------------------------------------------------------------------------
# claims: each cell run once by the processes sharing one results file

_POLL_SECONDS = 5.0  # how often a study waiting for cells claimed elsewhere reads the file again
_HELD: set = set()  # this process's live claims (their tokens), told apart from a dead namesake's


def _claims_dir(out) -> Path:
    """``<out>.claims`` beside the file itself: processes that name it by other paths (relative,
    through a link) share one."""
    return Path(os.path.realpath(out) + ".claims")


def _this_machine() -> dict:
    """What a pid is relative to: the host, and its pid namespace (two containers may share a
    host name, not their pids)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = None
    return {"host": socket.gethostname(), "pidns": ns}


def _alive(pid) -> bool:
    """Whether process ``pid`` of this machine runs (a zombie does not)."""
    if not _is_int(pid) or pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: trust the heartbeat alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _label(head: Mapping) -> str:
    return f"{head['method']} d={head['density']:g} seed={head['seed']}"


class _Claim:
    """A claim this process holds: its heartbeat renewed while the cell runs; removed on leaving
    the ``with`` block, whatever happened in it (a failed cell must stay runnable)."""

    def __init__(self, path: Path, body: bytes, token: str, beat: float):
        self.path, self.body, self.token = path, body, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(beat,), daemon=True)

    def __enter__(self) -> "_Claim":
        _HELD.add(self.token)
        self._thread.start()
        return self

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:  # removed or moved: nothing to renew
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        _HELD.discard(self.token)
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == self.body:  # still ours, not taken over after a long stall
                self.path.unlink()


class _Claims:
    """The claims of one results file's cells: ``<out>.claims/<hash of the cell key>.claim``."""

    def __init__(self, out: Path, timeout: float):
        self.dir = _claims_dir(out)
        self.timeout = timeout
        self.me = {"pid": os.getpid(), **_this_machine()}

    def path(self, head: Mapping) -> Path:
        digest = hashlib.sha256(json.dumps(cell_key(head)).encode()).hexdigest()
        return self.dir / f"{digest[:32]}.claim"

    def take(self, head: Mapping) -> Optional[_Claim]:
        """This process's claim of the cell, or None while another process holds a live one."""
        path = self.path(head)
        for _ in range(5):  # the claim may be released, or taken over by another, in between
            claim = self._create(path, head)
            if claim is not None:
                return claim
            if not self._take_over(path):
                return None
        return None

    def _create(self, path: Path, head: Mapping) -> Optional[_Claim]:
        token = uuid.uuid4().hex
        body = json.dumps({**self.me, "token": token, "cell": _label(head),
                           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}).encode()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # atomic: one winner
            except FileExistsError:
                return None
            except FileNotFoundError:  # no folder yet, or another process's tidy just removed it
                self.dir.mkdir(exist_ok=True)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return _Claim(path, body, token, beat=min(max(self.timeout / 10, 0.01), 60.0))
        return None

    def _take_over(self, path: Path) -> bool:
        """Remove the claim at ``path`` if its holder is gone. True when there is no claim there
        now (so one may be made), False while a live one holds."""
        try:
            raw, mtime = path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile
        if not self._stale(raw, mtime):
            return False
        # moved aside, then checked: between the read and the move another process may have
        # taken it over and made its own (a new claim has a new token, so other bytes)
        aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True
        if aside.read_bytes() == raw and aside.stat().st_mtime == mtime:
            aside.unlink()
            return True
        try:
            os.link(aside, path)  # put the live claim back, unless a newer one took its place
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.rename(aside, path)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        return False

    def _stale(self, raw: bytes, mtime: float) -> bool:
        """Whether a claim's holder is gone: its heartbeat is older than the timeout, or it was a
        process of this machine that no longer runs (or this process, which does not hold it)."""
        if self._now() - mtime > self.timeout:
            return True
        try:
            holder = json.loads(raw)
        except ValueError:  # still being written: judged by its age alone
            return False
        if not isinstance(holder, dict) or any(holder.get(k) != self.me[k] for k in ("host", "pidns")):
            return False
        if holder.get("pid") == self.me["pid"]:
            return holder.get("token") not in _HELD
        return not _alive(holder.get("pid"))

    def _now(self) -> float:
        """Now by the clock that stamps the claims: on a network file system the server's, which
        another machine's clock need not match."""
        probe = self.dir / f".now-{uuid.uuid4().hex}"
        try:
            probe.touch()
            return probe.stat().st_mtime
        except OSError:
            return time.time()
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def tidy(self, heads: Sequence[Mapping]) -> None:
        """Once every cell is in the file: remove their claims (a process killed between its
        append and its release leaves one) and the folder when no other study's remain."""
        for head in heads:
            with contextlib.suppress(OSError):
                self.path(head).unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _done_now(head: Mapping, out: Path, done: dict) -> bool:
    """Whether the cell is in the file, read again: another process may have finished it."""
    done.update((cell_key(r), r) for r in read_results(out))
    return cell_key(head) in done


def _run_cells(todo: Sequence[Mapping], out: Path, done: dict, run: Callable[[Mapping], None],
               claims: _Claims, bar) -> None:
    """``run`` each cell of ``todo`` that no process sharing ``out`` has finished or claimed;
    then wait for the cells claimed elsewhere, taking over those whose claims go stale."""
    pending = list(todo)
    while pending:
        waiting = []
        for head in pending:
            if _done_now(head, out, done):
                bar.update(1, cell=f"{_label(head)} (done elsewhere)")
                continue
            claim = claims.take(head)
            if claim is None:
                waiting.append(head)
                continue
            with claim:
                # finished, and its claim released, between the read and the claim?
                if _done_now(head, out, done):
                    bar.update(1, cell=f"{_label(head)} (done elsewhere)")
                else:
                    run(head)
        pending = waiting
        if pending:
            bar.update(0, cell=f"waiting for {len(pending)} cell(s) other processes run")
            time.sleep(_POLL_SECONDS)


def _check_list(name: str, values, kind, check) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: expected a non-empty list, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or not check(v):
            raise ValueError(f"{name}: invalid entry {v!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: duplicate entries in {values!r}")
    return out


_SEED_RANGE = (-(1 << 63), 1 << 63)  # what torch.Generator.manual_seed takes (an int64)


def check_seeds(seeds) -> list:
    """A non-empty list of distinct int seeds that torch's generators accept."""
    return _check_list("seeds", seeds, int, lambda s: _SEED_RANGE[0] <= s < _SEED_RANGE[1])


def check_run_sizes(**sizes) -> None:
    """Each of ``sizes`` (epochs, train_subset, ...) None or a positive int; ValueError naming it."""
    for name, v in sizes.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _prune_data(train_set, n: int, seed: int):
    """``n`` training samples drawn at random (seeded, not stratified by class), as one labelled
    batch: the pruning data of the data-based scorers (the Synaptic-Flow / NTK-SAP scripts draw
    10 × the number of classes this way)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_set), generator=g)[:n]
    x, y = next(iter(train_set.subset(idx).batches(n)))
    return x, y


def prune_cell(model_name: str, method: str, density: float, seed: int, rounds: int, options: dict,
               train_set, protocol: dict, device, start_masks=None, progress: Optional[bool] = None):
    """(network, masks) of one study cell before training: the network the cell's seed draws,
    pruned as the cell prunes it (NTT: its transferred weights loaded). The same arguments give
    the same masks, so analyses of a finished study can rebuild them without storing them.
    ``start_masks`` (score-based methods only) prunes from those masks instead of the full
    network, for ablations of a cell. ``progress``: as :func:`ntkfast.prune`'s (inside a study,
    an inner bar of the study's)."""
    from . import methods, models, prune

    torch.manual_seed(seed)
    net = models.get(model_name, input_shape=tuple(train_set.input_shape), num_classes=train_set.num_classes)
    net = net.to(device)
    info = methods.get(method)
    if info.single_shot and start_masks is not None:
        raise ValueError(f"start_masks: {method} selects its own masks from the dense network")
    options = dict(options)
    scope = options.pop("scope", protocol["scope"])  # NTT's cells record their own (layerwise, the authors')
    data = None
    if info.raw_data:
        data = train_set
    elif info.needs_data:
        data = _prune_data(train_set, protocol["prune_samples"], seed)
    masks = prune(net, method, density, rounds=rounds, scope=scope, data=data, seed=seed, masks=start_masks,
                  exclude=protocol.get("exclude") or None, progress=progress, on_empty_layer="ignore", **options)
    if masks.learned_weights is not None:  # a method that learned weights with its mask: train from both
        net.load_state_dict(masks.learned_weights)
    return net, masks


ENGINE_OPTIONS = ("amp", "tf32", "compile", "channels_last", "resident")


def _check_engine_options(engine) -> dict:
    """``engine`` as a dict of train()'s engine arguments, each checked now (before any cell)."""
    if engine is None:
        return {}
    if not isinstance(engine, Mapping):
        raise TypeError(f"engine: expected a mapping of {', '.join(ENGINE_OPTIONS)}, got {type(engine).__name__}")
    unknown = sorted(set(engine) - set(ENGINE_OPTIONS))
    if unknown:
        raise ValueError(f"engine: {unknown[0]!r} is not one of {', '.join(ENGINE_OPTIONS)}")
    from .train_engine import check_engine

    e = dict(engine)
    check_engine(e.get("amp"), e.get("tf32", False), e.get("compile", False), e.get("resident"))
    cl = e.get("channels_last")
    if cl is not None and not isinstance(cl, bool):
        raise TypeError(f"engine: channels_last: expected True, False or None, got {type(cl).__name__}")
    return e


def train_cell(net, masks, train_set, test_set, protocol: dict, seed: int, device, progress: Optional[bool] = None,
               engine: Optional[Mapping] = None):
    """Train a pruned cell's network by the study's protocol (:func:`ntkfast.training.train`;
    ``progress`` as its; ``engine``: its keyword arguments ``amp``, ``tf32``, ``compile``,
    ``channels_last``, ``resident``)."""
    from .training import train

    if protocol.get("nesterov"):  # the named "sgd" has no Nesterov switch: the optimiser, made here
        import functools

        import torch

        opt = dict(optimizer=functools.partial(torch.optim.SGD, lr=protocol["lr"], momentum=protocol["momentum"],
                                               weight_decay=protocol["weight_decay"], nesterov=True))
    else:
        opt = dict(optimizer=protocol["optimizer"], lr=protocol["lr"], momentum=protocol["momentum"],
                   weight_decay=protocol["weight_decay"])
    return train(net, masks, train_set, test_set, protocol["epochs"], **opt,
                 batch_size=protocol["batch_size"], lr_milestones=protocol["lr_milestones"] or None,
                 lr_gamma=protocol.get("lr_gamma", 0.1), augment=protocol.get("augment"),
                 device=device, seed=seed, progress=progress, max_batches=protocol["max_batches"],
                 **dict(engine or {}))


def _connectivity_fields(net, masks) -> dict:
    """The kept weights on an input-output path, and the live units per layer (see
    :mod:`ntkfast.connectivity`); empty where the network is beyond that analysis."""
    from .connectivity import connectivity

    try:
        c = connectivity(net, masks)
    except (ValueError, OverflowError, RuntimeError):
        return {}
    return {"effective_density": c.effective.density,
            "live_units": {n: [c.live_units[n], c.units[n]] for n in c.units}}


def _flops_fraction(net, masks) -> Optional[float]:
    from .flops import count_flops

    try:
        return count_flops(net, masks=dict(masks.items())).fraction
    except ValueError:  # a model count_flops cannot run on the meta device: the record goes without
        return None


def _run_cell(model_name: str, method: str, density: float, seed: int, rounds: int, options: dict,
              train_set, test_set, protocol: dict, device, engine: Optional[Mapping] = None) -> dict:
    t0 = time.perf_counter()
    # progress left to the default: the cell's bars are inner bars of the study's, silenced with it
    net, masks = prune_cell(model_name, method, density, seed, rounds, options, train_set, protocol, device)
    prune_s = time.perf_counter() - t0
    res = train_cell(net, masks, train_set, test_set, protocol, seed, device, engine=engine)
    # how the steps ran, where not plain full precision (bf16 autocast changes the numbers a little)
    extra = {"engine": res.engine} if res.engine else {}
    return {
        "final_test_accuracy": res.final_test_accuracy,
        "best_test_accuracy": max(res.test_accuracy) if res.test_accuracy else None,
        "test_accuracy": res.test_accuracy, "train_loss": res.train_loss,
        "final_test_top5_accuracy": res.test_top5_accuracy[-1] if res.test_top5_accuracy else None,
        # what the masks leave of one forward's multiply-accumulates (the authors' FLOPs rule)
        "flops_fraction": _flops_fraction(net, masks),
        # of the pruned weights, the number the cell's density promises (the same as masks.density
        # unless the study keeps layers dense)
        "achieved_density": masks.pruned_density, "layer_density": dict(masks.layer_density()),
        "empty_layers": masks.empty_layers(), **_connectivity_fields(net, masks),
        "prune_seconds": prune_s, "train_seconds": res.seconds, **extra,
    }


# set by the study itself for every cell, so not a method option
_RESERVED = {"seed", "scope", "rounds", "schedule", "data", "progress", "masks", "density", "target_density",
             "on_empty_layer", "model", "cache", "callback", "checkpoint", "checkpoint_every", "exclude"}
_NTT_RESERVED = (_RESERVED - {"scope"})


def _ntt_options(model: torch.nn.Module, options: dict) -> dict:
    """The options the study's NTT cells run with: the user's, then the NTT demos' defaults (20
    epochs; λ_L2 1e-4 for an MLP, 1e-5 for a CNN; layerwise scope), recorded with each cell."""
    import inspect

    from .ntt import transfer

    bad = sorted(set(options) & _NTT_RESERVED)
    if bad:
        raise ValueError(f"method_options: ntt:{bad[0]} is set by the study itself")
    try:
        inspect.signature(transfer).bind_partial(**options)
    except TypeError:
        known = [n for n, p in inspect.signature(transfer).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n not in _NTT_RESERVED]
        unknown = sorted(set(options) - set(known))
        raise ValueError(f"method_options: ntt:{unknown[0] if unknown else '?'} is not an option of "
                         f"ntkfast.transfer (its options: {', '.join(known)})") from None
    out = dict(options)
    if "steps" not in out:
        out.setdefault("epochs", NTT_DEFAULT_EPOCHS)
    conv = any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in model.modules())
    out.setdefault("lambda_l2", 1e-5 if conv else 1e-4)  # the authors' MLP / CNN settings
    from .core.batchnorm import batchnorm_layers

    if batchnorm_layers(model):  # recorded: cells written when NTT's default was "eval" are not these
        out.setdefault("bn", "calibrate")
    out.setdefault("scope", "layerwise")  # the authors'
    return out


def _dense_names(model_name: str, train_set, exclude, dense_classifier: bool) -> List[str]:
    """The mask names of the weights the study keeps dense, resolved on the model the cells prune
    (a name that picks nothing is refused here, before any cell runs)."""
    from . import models
    from .core.exclude import last_linear, resolve_exclude
    from .masks import prunable_parameters

    if not exclude and not dense_classifier:
        return []
    net = models.get(model_name, input_shape=tuple(train_set.input_shape), num_classes=train_set.num_classes)
    wanted = list(exclude or []) + ([last_linear(net)] if dense_classifier else [])
    return list(resolve_exclude(net, wanted, list(prunable_parameters(net))))


def _check_method_options(method: str, options: dict) -> None:
    from .methods import get as method_info

    bad = sorted(set(options) & _RESERVED)
    if bad:
        raise ValueError(f"method_options: {method}:{bad[0]} is set by the study itself")
    try:
        method_info(method).check_options(options)
    except ValueError as exc:
        raise ValueError(f"method_options: {method}: {exc}") from None


def run_study(model: str, dataset: str, data_dir, methods: Sequence[str], densities: Sequence[float],
              seeds: Sequence[int], out, *, epochs: int = 10, optimizer: Optimizer = "sgd", lr: Optional[float] = None,
              momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 128,
              lr_milestones: Optional[Sequence[int]] = None, scope: Scope = "global",
              rounds: Optional[Mapping[str, int]] = None, method_options: Optional[Mapping[str, dict]] = None,
              prune_samples: Optional[int] = None, train_subset: Optional[int] = None,
              test_subset: Optional[int] = None, max_batches: Optional[int] = None, device=None,
              progress: Optional[bool] = None, datasets=None, claim_timeout: float = 600.0,
              exclude: Optional[Sequence[str]] = None, dense_classifier: bool = False,
              nesterov: bool = False, lr_gamma: float = 0.1, augment: Optional[str] = None,
              engine: Optional[Mapping] = None) -> List[dict]:
    """Run every (method, density, seed) cell not yet in ``out`` and append its record there.

    ``nesterov`` (SGD's Nesterov momentum), ``lr_gamma`` (the factor at each of
    ``lr_milestones``) and ``augment`` (a recipe of :mod:`ntkfast.augment`) are part of the
    training protocol; they enter the records only where they differ from the defaults, so
    studies written before they existed resume.

    ``engine``: how the training steps run, not part of the protocol (a study resumes across
    them): :func:`ntkfast.training.train`'s keyword arguments ``amp``, ``tf32``, ``compile``,
    ``channels_last``, ``resident``. Each cell's record names the ones that were on (``engine``).

    Per cell: a fresh ``model`` initialised with ``torch.manual_seed(seed)`` (so every method of one
    seed prunes the same network), pruned by ``method`` to ``density`` (``rounds[method]`` rounds,
    default :data:`DEFAULT_ROUNDS`; ``method_options[method]`` passed to it; data-based scorers
    see ``prune_samples`` random training samples, default 10 per class; "ntt" runs
    :func:`ntkfast.transfer` and trains from its learned weights), then trained ``epochs`` epochs
    by :func:`ntkfast.training.train` and evaluated on the test set after each.

    ``train_subset`` / ``test_subset`` use only the first N images (a reduced run, recorded as
    such). ``datasets``: an already loaded ``(train_set, test_set)`` instead of ``dataset`` and
    ``data_dir`` (``dataset`` is then only the label). Returns the records of the requested cells
    (earlier and new).

    ``exclude`` (layer or weight names, patterns allowed, see :func:`ntkfast.prune`) and
    ``dense_classifier`` (the model's last Linear, :func:`ntkfast.masks.last_linear`) keep layers
    dense in every cell; the density is then that of the other weights. They are resolved against
    the model before any cell runs and recorded in the protocol as the weights' names, so a study
    with other dense layers is another protocol.

    ``out`` is checked before any work (see :func:`check_out`). Processes sharing it run each
    cell once; one cell claimed by a process gone silent is taken over after ``claim_timeout``
    seconds (see the module's notes), and this call returns once every cell is in the file.

    ``progress``: a bar of the cells (rate, ETA, the last accuracy) with, below it, the running
    cell's pruning and training once they have run a couple of seconds. None (default) shows the
    cells' bar on a terminal at once, elsewhere once the study has run a couple of seconds; False
    shows none (each finished cell is then logged at INFO on ``logging.getLogger("ntkfast")``)."""
    from . import models
    from .methods import get as method_info
    from .core.machine import machine_info
    from ._version import __version__
    from .training import DEFAULT_LR, OPTIMIZERS

    if model not in models.available():
        raise ValueError(f"model: unknown {model!r}; see ntkfast.models.available()")
    methods = _check_list("methods", methods, str, lambda m: True)
    for m in methods:
        if m != "ntt":
            method_info(m)  # an unknown method fails here, naming it, before any cell runs
    densities = [float(d) for d in _check_list("densities", densities, (int, float), lambda d: 0 < d <= 1)]
    seeds = check_seeds(seeds)
    rounds = dict(rounds or {})
    method_options = {k: dict(v) for k, v in (method_options or {}).items()}
    for name, where in (("rounds", rounds), ("method_options", method_options)):
        unknown = [k for k in where if k not in methods]
        if unknown:
            raise ValueError(f"{name}: {unknown} not among the study's methods {methods}")
    for k, r in rounds.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rounds: {k}={r!r} is not a positive int")
    if "ntt" in rounds:
        raise ValueError("rounds: ntt runs once (its options: method_options['ntt'], e.g. epochs)")
    for m, opts in method_options.items():
        if m != "ntt":
            _check_method_options(m, opts)
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    check_choice(scope, "scope", choices(Scope))
    check_run_sizes(epochs=epochs, batch_size=batch_size, prune_samples=prune_samples, train_subset=train_subset,
                    test_subset=test_subset, max_batches=max_batches)
    # the trainer's own checks, before any cell runs; numbers normalised so that lr=None and
    # lr=0.1, or 0 and 0.0, are the same protocol when a study resumes
    lr = DEFAULT_LR[optimizer] if lr is None else check_number(lr, "lr", lo=0.0, lo_open=True)
    momentum = check_number(momentum, "momentum", lo=0.0)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0)
    try:
        lr_milestones = sorted(int(m) for m in (lr_milestones or []))
    except (TypeError, ValueError):
        raise ValueError(f"lr_milestones must be a sequence of epoch numbers, got {lr_milestones!r}") from None
    device = check_device(device) if device is not None else torch.device("cpu")

    claim_timeout = check_number(claim_timeout, "claim_timeout", lo=0.0, lo_open=True)
    check_progress(progress)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov: expected True or False, got {nesterov!r}")
    if nesterov and optimizer != "sgd":
        raise ValueError(f"nesterov: Nesterov momentum is SGD's; the optimizer is {optimizer!r}")
    if nesterov and not momentum > 0:
        raise ValueError(f"nesterov: needs a momentum above 0, got momentum={momentum!r}")
    lr_gamma = check_number(lr_gamma, "lr_gamma", lo=0.0, lo_open=True)
    engine = _check_engine_options(engine)
    if augment is not None:
        from . import augment as _augment

        _augment.get(augment)  # an unknown recipe is named now, before any cell runs
    if exclude is not None and (isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence)
                                or not all(isinstance(e, str) for e in exclude)):
        raise ValueError(f"exclude: expected a list of layer names (a study records them), got {exclude!r}")
    if not isinstance(dense_classifier, bool):
        raise ValueError(f"dense_classifier: expected True or False, got {dense_classifier!r}")
    # the output file before the work: a wrong path or a file that is not a study's fails now,
    # not after the data loads (or hours later), and is left as it was
    out = Path(check_out(out))
    existing = read_results(out, repair=True)

    if datasets is None:
        from . import data as D

        train_set = D.load_dataset(dataset, data_dir, train=True)
        test_set = D.load_dataset(dataset, data_dir, train=False)
        dataset = train_set.name or dataset  # "fmnist" and "fashion-mnist" are one study
    else:
        train_set, test_set = datasets
    if train_subset:
        train_set = train_set.subset(min(train_subset, len(train_set)))
    if test_subset:
        test_set = test_set.subset(min(test_subset, len(test_set)))
    protocol = _protocol(epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         batch_size=batch_size, lr_milestones=lr_milestones, scope=scope,
                         prune_samples=prune_samples or 10 * train_set.num_classes, train_subset=train_subset,
                         test_subset=test_subset, max_batches=max_batches)

    # recorded only where not the default: the cells of older studies keep their keys
    if nesterov:
        protocol["nesterov"] = True
    if lr_gamma != 0.1:
        protocol["lr_gamma"] = lr_gamma
    if augment is not None:
        from .core.sources import as_source
        from .training import _check_augment

        _check_augment(augment, as_source(train_set, "train_set"))  # this dataset takes it: now, not after a cell
        protocol["augment"] = augment
    dense = _dense_names(model, train_set, exclude, dense_classifier)
    if dense:  # only then: studies made before exclude= existed keep their cells
        protocol["exclude"] = dense
    done = {cell_key(r): r for r in existing}
    bn_scorers = [m for m in ("snip", "iterative_snip", "grasp") if m in methods]
    if "ntt" in methods or bn_scorers:
        built = models.get(model, input_shape=tuple(train_set.input_shape), num_classes=train_set.num_classes)
    if "ntt" in methods:
        ntt_options = _ntt_options(built, method_options.get("ntt", {}))
    from .core.batchnorm import batchnorm_layers

    if bn_scorers and batchnorm_layers(built):
        # recorded with each cell: results written when these scorers' default was "eval" (options
        # without it) are not resumed as cells of the "train" default
        for m in bn_scorers:
            if not {"bn", "train_mode"} & set(method_options.get(m, {})):
                method_options.setdefault(m, {})["bn"] = "train"
    cells = []
    for seed in seeds:
        for density in densities:
            for method in methods:
                r = 1 if method == "ntt" else rounds.get(method, DEFAULT_ROUNDS.get(method, 1))
                options = ntt_options if method == "ntt" else method_options.get(method, {})
                head = {"model": model, "dataset": dataset, "method": method, "density": density, "seed": seed,
                        "rounds": r, "options": options, "protocol": protocol}
                cells.append(head)
    todo = [c for c in cells if cell_key(c) not in done]
    machine = machine_info(device)
    if len(todo) < len(cells):
        _log.info("study: %d of %d cells already in %s; running the other %d", len(cells) - len(todo), len(cells),
                  out, len(todo))

    def run(head):
        bar.update(0, cell=_label(head))
        result = _run_cell(model, head["method"], head["density"], head["seed"], head["rounds"], head["options"],
                           train_set, test_set, protocol, device, engine)
        record = {**head, **result, "machine": machine, "ntkfast": __version__,
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        _append(out, record)
        done[cell_key(record)] = json.loads(json.dumps(record, default=str))
        bar.update(1, acc=result["final_test_accuracy"])
        _log.log(logging.INFO if bar.silenced else logging.DEBUG, "study: %s done, final test accuracy %s",
                 _label(head), format_value(result["final_test_accuracy"]))

    claims = _Claims(out, claim_timeout)
    # nothing to run, nothing to show (a bar of 0 cells would still print its line)
    bar = progress_bar(len(todo), "study", progress=progress if todo else False, unit="cell")
    try:
        _run_cells(todo, out, done, run, claims, bar)
    finally:
        bar.close()
    claims.tidy(cells)
    return [done[cell_key(c)] for c in cells]
