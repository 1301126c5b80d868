"""What every benchmark suite shares: the machine's description, timing, peak memory in a fresh
process, the JSON result files and the results README.

A suite (bench_*.py) describes its cases with :class:`Case` and hands a :class:`Suite` to
:func:`main`. For every case, :func:`main`

1. builds the inputs once (untimed) and runs peer and ntkfast once each, untimed, on the same
   inputs; compares the outputs (``rel_err``, ``identical``, suite-specific fields). These first
   runs are also the first warm-up;
2. times ``--runs`` alternating runs of each side (each run gets fresh per-run inputs from
   ``Case.prepare``, untimed) and keeps the medians; on CUDA, the time is read from CUDA events
   recorded around the call, after a ``torch.cuda.synchronize()``;
3. measures peak memory of each side in a fresh process:
   ``python -m benchmarks.<suite> --case NAME --side peer|ours --measure-memory`` prints one JSON
   line (``ru_maxrss`` on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA);
4. writes one JSON object per case into ``<out>/<suite>-<device tag>.json`` and rebuilds
   ``<out>/README.md`` from every JSON file in ``<out>``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ntkfast.core.machine import cpu_model, machine_info  # noqa: F401  (re-exported for the benchmark scripts)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "ntkfast-bench-quick"

MB = float(2**20)


# ----------------------------------------------------------------------------------------------
# the machine
# ----------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '.', '_' and '-' only)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: torch.cuda.is_available() is False (torch {torch.__version__})")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return dev


def machine_string(device: torch.device, info: Optional[dict] = None) -> str:
    info = info or machine_info(device)
    if device.type == "cuda":
        return f"{info['gpu']} (sm {info['gpu_capability']}, CUDA {info['cuda_runtime']}); host {info['cpu']}"
    return f"{info['cpu']} ({info['torch_threads']} threads of {info['cpu_count']} CPUs)"


def device_tag(device: torch.device, tag: Optional[str] = None) -> str:
    """Suffix of the results file: ``cpu``, or ``cuda-<GPU name>``; ``--tag`` is appended."""
    base = "cpu" if device.type == "cpu" else "cuda-" + slug(torch.cuda.get_device_name(device))
    return f"{base}-{slug(tag)}" if tag else base


def ntkfast_build() -> dict:
    try:
        import ntkfast

        return dict(ntkfast.build_info())
    except Exception as exc:  # the benchmark still says what it could not read
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------


def set_tf32(allow: bool) -> None:
    """TF32 in cuBLAS and cuDNN on or off (cuDNN allows it by default; every benchmark turns it off
    unless its case is named for it), so that GPU float32 timings are of float32 arithmetic."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable, args: Sequence, device: torch.device) -> float:
    """Seconds one call ``fn(*args)`` takes. CUDA: events recorded around the call, after a
    synchronize, read after the end event completed. CPU: time.perf_counter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        end.synchronize()
        torch.cuda.synchronize(device)
        del out
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn(*args)
    t = time.perf_counter() - t0
    del out
    return t


def time_pair(peer: Callable, ours: Callable, prepare: Callable[[], Sequence], device: torch.device,
              runs: int) -> tuple:
    """``runs`` timed calls of each side, alternating which goes first; fresh inputs from
    ``prepare()`` (untimed) before every call. Returns (peer_times, ours_times)."""
    tp, to = [], []
    for i in range(runs):
        order = [("peer", peer), ("ours", ours)] if i % 2 == 0 else [("ours", ours), ("peer", peer)]
        for side, fn in order:
            args = prepare()
            synchronize(device)
            (tp if side == "peer" else to).append(time_once(fn, args, device))
            del args
    return tp, to


def _ru_maxrss_mb() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024 / MB if sys.platform != "darwin" else kib / MB


def measure_peak(fn: Callable, args: Sequence, device: torch.device) -> dict:
    """Peak memory of one call, meant to run in a fresh process. CPU: the process's ru_maxrss
    (high-water resident set, inputs and the Python/torch runtime included) after the call, and
    its growth during the call. CUDA: torch.cuda.max_memory_allocated over the call (inputs
    already on the device included) and the growth over what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(*args)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return {"peak_mb": peak / MB, "base_mb": base / MB, "extra_mb": (peak - base) / MB,
                "kind": "torch.cuda.max_memory_allocated"}
    base = _ru_maxrss_mb()
    out = fn(*args)
    peak = _ru_maxrss_mb()
    del out
    res = {"peak_mb": peak, "base_mb": base, "extra_mb": peak - base, "kind": "ru_maxrss"}
    hwm = _vmhwm_mb()
    if hwm is not None:  # cross-check: the peak of this process's own address space
        res["vmhwm_mb"] = hwm
    return res


def _vmhwm_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        pass
    return None


def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def median_time(fn: Callable[[], Any], runs: int) -> float:
    """Seconds of ``fn()`` (CPU work), the median of ``runs`` calls after one untimed call."""
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ----------------------------------------------------------------------------------------------
# comparing outputs
# ----------------------------------------------------------------------------------------------


def compare_masks(peer: Sequence[torch.Tensor], ours: Sequence[torch.Tensor],
                  names: Optional[Sequence[str]] = None) -> dict:
    """Masks compared entry by entry: ``identical``, ``rel_err`` = fraction of entries that
    differ, kept counts of both, and the tensors that differ (at most 10 named)."""
    if len(peer) != len(ours):
        raise ValueError(f"peer gave {len(peer)} masks, ntkfast {len(ours)}")
    total = diff = kept_p = kept_o = 0
    differing = []
    for i, (p, o) in enumerate(zip(peer, ours)):
        if p.shape != o.shape:
            raise ValueError(f"mask {names[i] if names else i}: peer shape {tuple(p.shape)}, ntkfast {tuple(o.shape)}")
        p = p.bool()
        o = o.bool().to(p.device)
        d = int((p != o).sum())
        total += p.numel()
        diff += d
        kept_p += int(p.sum())
        kept_o += int(o.sum())
        if d:
            differing.append((names[i] if names else str(i), d))
    return {
        "identical": diff == 0,
        "rel_err": diff / total if total else 0.0,
        "diff_entries": diff,
        "numel": total,
        "peer_kept": kept_p,
        "ours_kept": kept_o,
        "tensors_differing": len(differing),
        "differing": [f"{n}: {d}" for n, d in differing[:10]],
    }


def rel_err_norm(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> float:
    """||got - ref|| / ||ref|| over all tensors together, in float64."""
    num = den = 0.0
    for r, g in zip(ref, got):
        r = r.detach().double()
        g = g.detach().double().to(r.device)
        num += float(((g - r) ** 2).sum())
        den += float((r**2).sum())
    return (num**0.5) / (den**0.5) if den > 0 else float(num > 0)


# ----------------------------------------------------------------------------------------------
# suites
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark case.

    setup(device) -> state       inputs shared by both sides, built once, untimed;
    prepare(state) -> tuple      per-call arguments (e.g. a fresh deepcopy of a model), untimed;
    peer(*args), ours(*args)     the two computations, timed;
    compare(state, peer_out, ours_out) -> dict   at least rel_err (and identical, for masks);
    checks(state) -> dict        optional extra untimed checks whose fields go into the record;
    floor(state) -> dict         the least work any exact method must do, timed alone
                                 (benchmarks.floor.record: floor_s, floor_what, floor_parts).
    """

    name: str
    params: dict
    setup: Callable[[torch.device], Any]
    peer: Callable[..., Any]
    ours: Callable[..., Any]
    compare: Callable[[Any, Any, Any], dict]
    prepare: Callable[[Any], tuple] = field(default=lambda state: (state,))
    checks: Optional[Callable[[Any], dict]] = None
    floor: Optional[Callable[[Any], dict]] = None


@dataclass
class Suite:
    """A benchmark suite. ``name`` is the results file prefix and the "suite" field; ``peer`` and
    ``ours`` say in words what the two sides run. ``seed`` names what a ``--seed`` option seeds
    (no such option when None); ``add_args`` adds other options and ``option_argv`` gives back
    those that change the work, for the reproduce command and the memory child. ``runs``: timed
    runs per side by default and with --quick."""

    name: str
    make_cases: Callable[[argparse.Namespace], List[Case]]
    peer: str
    ours: str
    seed: Optional[str] = None
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    option_argv: Callable[[argparse.Namespace], List[str]] = field(default=lambda args: [])
    runs: tuple = (5, 2)

    @property
    def module(self) -> str:
        """The suite's module as ``python -m`` names it (``__main__`` when run as a script)."""
        mod = sys.modules.get(self.make_cases.__module__)
        spec = getattr(mod, "__spec__", None)
        return spec.name if spec is not None else self.make_cases.__module__

    @property
    def default_runs(self) -> int:
        return self.runs[0]

    @property
    def quick_runs(self) -> int:
        return self.runs[1]

    def argv_of(self, args: argparse.Namespace) -> List[str]:
        seed = ["--seed", str(args.seed)] if self.seed is not None and args.seed != 0 else []
        return seed + list(self.option_argv(args))

    def main(self, argv: Optional[Sequence[str]] = None) -> int:
        return main(self, argv)


def base_parser(suite: Suite) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {suite.module}", description=f"{suite.name}: ntkfast vs {suite.peer}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--runs", type=int, default=None,
                   help=f"timed runs per side; medians are reported (default {suite.default_runs}, --quick {suite.quick_runs})")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per side before timing, at least 1: the first one's outputs are compared (default 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sizes, for smoke tests; results go to {QUICK_DIR} unless --out is given")
    p.add_argument("--case", action="append", default=None, help="run only this case (repeatable); --list names them")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR.relative_to(REPO_ROOT)})")
    p.add_argument("--tag", default=None, help="appended to the results file name, e.g. the host's name")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurements (CPU: a fresh process per side; CUDA: in this process)")
    p.add_argument("--no-readme", action="store_true", help="do not rebuild <out>/README.md")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 in cuBLAS and cuDNN (default off: float32 means float32; the JSON records it)")
    p.add_argument("--side", choices=["peer", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    if suite.seed is not None:
        p.add_argument("--seed", type=int, default=0, help=f"seed of {suite.seed} (default 0)")
    if suite.add_args is not None:
        suite.add_args(p)
    return p


def _select(cases: List[Case], wanted: Optional[List[str]]) -> List[Case]:
    if not wanted:
        return cases
    names = [n for w in wanted for n in w.split(",") if n]
    by_name = {c.name: c for c in cases}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"--case: unknown case(s) {missing}; known: {list(by_name)}")
    return [by_name[n] for n in names]


def _memory_child(suite: Suite, case: Case, args: argparse.Namespace, device: torch.device) -> None:
    state = case.setup(device)
    fn = case.peer if args.side == "peer" else case.ours
    call_args = case.prepare(state)
    synchronize(device)
    out = measure_peak(fn, call_args, device)
    out.update(suite=suite.name, case=case.name, side=args.side, device=str(device))
    print(json.dumps(out))


def _measure_in_process(case: Case, side: str, device: torch.device) -> dict:
    try:
        state = case.setup(device)
        call_args = case.prepare(state)
        synchronize(device)
        out = measure_peak(case.peer if side == "peer" else case.ours, call_args, device)
        del call_args, state
        torch.cuda.empty_cache()
        return out
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(exc).splitlines()[0][:200]}"}


def _measure_in_fresh_process(suite: Suite, case: Case, side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", suite.module, "--device", args.device, "--case", case.name,
           "--side", side, "--measure-memory"] + (["--quick"] if args.quick else []) + suite.argv_of(args)
    # Through a shell that forks the child rather than straight from here: on Linux a process's
    # ru_maxrss starts at the resident size of whatever it was forked from (and carries across
    # exec), so a child forked from this (large) process would report our peak, not its own.
    spawn = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd if os.path.exists("/bin/sh") else cmd
    proc = subprocess.run(spawn, cwd=str(REPO_ROOT), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(f"    memory ({side}) FAILED, rc={proc.returncode}: {shlex.join(cmd)}\n{tail}", file=sys.stderr)
        return {"error": f"rc={proc.returncode}: {tail[-300:]}"}
    return json.loads(lines[-1])


def reproduce_command(suite: Suite, case: Case, args: argparse.Namespace) -> str:
    cmd = ["python", "-m", suite.module, "--device", args.device, "--case", case.name,
           "--runs", str(args.runs), "--warmup", str(args.warmup)]
    if args.quick:
        cmd.append("--quick")
    if getattr(args, "tf32", False):
        cmd.append("--tf32")
    if args.tag:
        cmd += ["--tag", args.tag]
    return shlex.join(cmd + suite.argv_of(args))


def _fmt_s(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def run_case(suite: Suite, case: Case, args: argparse.Namespace, device: torch.device, machine: dict) -> dict:
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"[{suite.name}] {case.name} on {device}: {case.params}", flush=True)
    state = case.setup(device)

    # correctness first (and the first warm-up run of each side)
    peer_out = case.peer(*case.prepare(state))
    synchronize(device)
    ours_out = case.ours(*case.prepare(state))
    synchronize(device)
    cmp = dict(case.compare(state, peer_out, ours_out))
    del peer_out, ours_out
    if case.checks is not None:
        cmp.update(case.checks(state))
    shown = {k: v for k, v in cmp.items() if k in ("identical", "rel_err", "score_rel_err", "peer_kept", "ours_kept", "k")}
    print(f"    check: {shown}", flush=True)

    for _ in range(max(args.warmup, 1) - 1):
        for fn in (case.peer, case.ours):
            fn(*case.prepare(state))
            synchronize(device)

    tp, to = time_pair(case.peer, case.ours, lambda st=state: case.prepare(st), device, args.runs)
    peer_s, ours_s = median(tp), median(to)
    ratio = peer_s / ours_s if peer_s and ours_s else None
    print(f"    time: peer {_fmt_s(peer_s)}, ntkfast {_fmt_s(ours_s)}, ratio {ratio:.3g}" if ratio else
          f"    time: peer {_fmt_s(peer_s)}, ntkfast {_fmt_s(ours_s)}", flush=True)

    floor = {}
    if case.floor is not None:  # after the timings, alone: nothing else holds the machine then
        floor = dict(case.floor(state))
        print(f"    floor: {_fmt_s(floor['floor_s'])} ({floor['floor_what']}); "
              f"ntkfast / floor {ours_s / floor['floor_s']:.2f}, peer / floor {peer_s / floor['floor_s']:.2f}", flush=True)
    del state

    mem = {}
    if not args.no_memory:
        for side in ("peer", "ours"):
            # CUDA: max_memory_allocated in this process (reset per side) is the peak of that side's
            # own allocations; a fresh process per case would only add a CUDA start-up each time
            mem[side] = (_measure_in_process(case, side, device) if device.type == "cuda"
                         else _measure_in_fresh_process(suite, case, side, args))
        print("    peak MB: " + ", ".join(
            f"{s} {m.get('peak_mb', float('nan')):.1f} (+{m.get('extra_mb', float('nan')):.1f} during the call)"
            for s, m in mem.items()), flush=True)

    rec = {
        "suite": suite.name,
        "case": case.name,
        "device": device.type,
        "machine": machine_string(device, machine),
        "machine_info": machine,
        "torch": torch.__version__,
        "ntkfast_build": ntkfast_build(),
        "peer": suite.peer,
        "ours": suite.ours,
        "params": case.params,
        "peer_s": peer_s,
        "ours_s": ours_s,
        "ratio": ratio,
        "floor_s": floor.get("floor_s"),
        "ours_over_floor": ours_s / floor["floor_s"] if floor and ours_s else None,
        "peer_over_floor": peer_s / floor["floor_s"] if floor and peer_s else None,
        "floor_what": floor.get("floor_what"),
        "floor_parts": floor.get("floor_parts"),
        "peer_times_s": tp,
        "ours_times_s": to,
        "peer_peak_mb": mem.get("peer", {}).get("peak_mb"),
        "ours_peak_mb": mem.get("ours", {}).get("peak_mb"),
        "peer_extra_mb": mem.get("peer", {}).get("extra_mb"),
        "ours_extra_mb": mem.get("ours", {}).get("extra_mb"),
        "memory_kind": (mem.get("peer") or mem.get("ours") or {}).get("kind"),
        "rel_err": cmp.pop("rel_err", None),
        "identical": cmp.pop("identical", None),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "n_runs": args.runs,
        "warmup": max(args.warmup, 1),
        "quick": bool(args.quick),
        "loadavg_1min_before": load_before,
        "command": reproduce_command(suite, case, args),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    errors = {s: m["error"] for s, m in mem.items() if "error" in m}
    if errors:
        rec["memory_errors"] = errors
    rec.update(cmp)
    return rec


def write_results(out_dir: Path, suite_name: str, tag: str, records: List[dict]) -> Path:
    """Merge ``records`` into ``<out_dir>/<suite>-<tag>.json``: rows of the same case are replaced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite_name}-{tag}.json"
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, list):
                old = []
        except json.JSONDecodeError:
            old = []
    new_cases = {r["case"] for r in records}
    rows = [r for r in old if r.get("case") not in new_cases] + records
    path.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return path


def main(suite: Suite, argv: Optional[Sequence[str]] = None) -> int:
    args = base_parser(suite).parse_args(argv)
    if args.runs is None:
        args.runs = suite.quick_runs if args.quick else suite.default_runs
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    device = resolve_device(args.device)
    set_tf32(args.tf32)
    cases = suite.make_cases(args)
    if args.list:
        for c in cases:
            print(c.name, json.dumps(c.params))
        return 0
    cases = _select(cases, args.case)

    if args.measure_memory:
        if args.side is None or len(cases) != 1:
            raise SystemExit("--measure-memory needs --side and exactly one --case")
        _memory_child(suite, cases[0], args, device)
        return 0

    out_dir = Path(args.out) if args.out else (QUICK_DIR if args.quick else RESULTS_DIR)
    if args.quick and out_dir.resolve() == RESULTS_DIR.resolve():
        raise SystemExit(f"--quick results do not go into {RESULTS_DIR}: give another --out")
    machine = machine_info(device)
    print(f"# {suite.name} on {machine_string(device, machine)}; torch {torch.__version__}; "
          f"ntkfast {ntkfast_build()}", flush=True)
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"# note: 1-minute load average is {load:.2f} before starting: the machine may be busy", flush=True)
    tag = device_tag(device, args.tag)
    for c in cases:  # written case by case, so a run stopped part-way keeps what it finished
        path = write_results(out_dir, suite.name, tag, [run_case(suite, c, args, device, machine)])
        print(f"# wrote {path}", flush=True)
    if not args.no_readme:
        print(f"# wrote {regenerate_readme(out_dir)}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# the results README
# ----------------------------------------------------------------------------------------------


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _mb(total, extra) -> str:
    if total is None:
        return "-"
    return f"{total:.0f} (+{extra:.0f})" if extra is not None else f"{total:.0f}"


def _identical(r: dict) -> str:
    ident = r.get("identical")
    if ident is None:
        return "-"
    if ident:
        return "yes"
    extra = []
    if r.get("diff_entries") is not None:
        extra.append(f"{r['diff_entries']} entries differ")
    if r.get("peer_kept") is not None and r.get("ours_kept") is not None:
        extra.append(f"kept {r['peer_kept']} / {r['ours_kept']}")
    if r.get("diff_only_ties"):
        extra.append("all at tied threshold scores")
    return "no" + (f" ({'; '.join(extra)})" if extra else "")


def regenerate_readme(out_dir: Path = RESULTS_DIR) -> Path:
    """Rebuild ``<out_dir>/README.md``: one markdown table per suite from every ``*.json`` there."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, List[dict]] = {}
    peers: Dict[str, str] = {}
    for path in sorted(out_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for r in data if isinstance(data, list) else []:
            if isinstance(r, dict) and "suite" in r:
                r = dict(r, _file=path.name)
                rows.setdefault(r["suite"], []).append(r)
                peers.setdefault(r["suite"], r.get("peer", ""))
    lines = [
        "# ntkfast benchmark results",
        "",
        "Generated from the JSON files in this folder by `benchmarks.common.regenerate_readme()`"
        " (every suite run rebuilds it); do not edit by hand. What each suite measures, the peers and"
        " the fields: [../README.md](../README.md).",
        "",
        "- time: median of `runs` timed runs after a warm-up; ratio = peer time / ntkfast time"
        " (above 1: ntkfast is faster).",
        "- peak MB: in a fresh process per case and side; CPU: the process's peak resident set"
        " (ru_maxrss, Python and torch included), CUDA: torch.cuda.max_memory_allocated; in"
        " brackets, the growth during the call over the inputs already held.",
        "- floor: the least work any exact method must do, timed alone on the same machine"
        " (`benchmarks/floor.py`: the convolution and matrix calls as single library calls, memory"
        " traffic at the measured copy bandwidth); ntkfast / floor = how far from it we are (1 is"
        " the floor itself).",
        "- rel err: for masks, the fraction of entries where the two masks differ.",
        "- load: the 1-minute load average before the case; figures taken on a busy machine"
        " (load near or above the thread count) are not reliable.",
        "",
    ]
    if not rows:
        lines.append("No results yet: run `python -m benchmarks.run_all --device cpu` from the repository root.")
    for suite_name in sorted(rows):
        lines += [f"## {suite_name}", "", f"Peer: {peers[suite_name]}", ""]
        lines.append("| case | machine | peer | ntkfast | ratio | floor | ntkfast / floor | peer peak MB"
                     " | ntkfast peak MB | rel err | identical | runs | load | date | command |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |")
        for r in sorted(rows[suite_name], key=lambda r: (r.get("device", ""), r.get("machine", ""), r.get("case", ""))):
            case = r.get("case", "?") + (" (quick)" if r.get("quick") else "")
            extra = r.get("score_rel_err")
            rel = _num(r.get("rel_err"))
            if extra is not None:
                rel += f"; round-1 scores {extra:.2g}"
            cells = [
                case,
                f"{r.get('device', '?')}: {r.get('machine', '?')}",
                _fmt_s(r.get("peer_s")),
                _fmt_s(r.get("ours_s")),
                _num(r.get("ratio"), "{:.2f}x"),
                _fmt_s(r.get("floor_s")),
                _num(r.get("ours_over_floor"), "{:.2f}"),
                _mb(r.get("peer_peak_mb"), r.get("peer_extra_mb")),
                _mb(r.get("ours_peak_mb"), r.get("ours_extra_mb")),
                rel,
                _identical(r),
                str(r.get("n_runs", "-")),
                _num(r.get("loadavg_1min_before"), "{:.2f}"),
                str(r.get("date", "-"))[:10],
                f"`{r.get('command', '')}`",
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":  # python -m benchmarks.common: rebuild the results README
    ap = argparse.ArgumentParser(description="Rebuild <out>/README.md from the JSON results there")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    print(regenerate_readme(Path(ap.parse_args().out)))
