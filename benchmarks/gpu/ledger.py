"""The GPU ladder's ledger: which stage passed on which GPU for which version of what it exercises.

benchmarks/results/gpu/ledger.json holds one entry per stage run. A stage counts as done when it
has a "passed" entry whose hash equals the hash of the files it exercises now, so any change to
the kernels, the build, the package's Python or the stage's own scripts sends it round again.

    python3 benchmarks/gpu/ledger.py hash STAGE          the current hash of what STAGE exercises
    python3 benchmarks/gpu/ledger.py next [--from N]     the first stage with no passing entry (or "done")
    python3 benchmarks/gpu/ledger.py record STAGE ...    append an entry (see --help)
    python3 benchmarks/gpu/ledger.py show                one line per stage: done or not, and the last run

The ledger path is $NTKFAST_LEDGER if set (dry runs point it at a temporary copy).
Standard library only: it runs before anything is built.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_LEDGER = REPO / "benchmarks" / "results" / "gpu" / "ledger.json"

# What a stage exercises: the kernels, the build, the package's Python, and the tests, drivers and
# benchmarks it runs. Not the shell harness (lib.sh, stageN.sh, next.sh): mending how a stage is
# run does not undo what an earlier run of it showed.
_KERNELS = ["csrc/**/*", "setup.py", "ntkfast/**/*.py"]

#: stage number -> (name, the files whose content it exercises, as globs relative to the repository)
STAGES = {
    1: ("build-kernels", _KERNELS + [
        "benchmarks/gpu/check_cuda_registrations.py", "benchmarks/gpu/smoke_ops.py",
        "benchmarks/gpu/op_cases.py", "tests/conftest.py", "tests/testing.py", "tests/test_topk_mask*.py", "tests/test_nm_mask.py",
        "tests/test_perturbed_masked.py", "tests/test_masked_gram.py", "tests/test_conv_weight_grad_per_sample.py",
        "tests/test_path_ops.py"]),
    2: ("sanitizer-paths", _KERNELS + [
        "benchmarks/gpu/sanitize_ops.py", "benchmarks/gpu/op_cases.py",
        "tests/*.py"]),
    3: ("kernel-benchmarks", _KERNELS + [
        "benchmarks/common.py", "benchmarks/bench_topk_mask.py", "benchmarks/bench_nm_mask.py",
        "benchmarks/bench_perturbed_masked.py", "benchmarks/bench_masked_gram.py",
        "benchmarks/bench_conv_weight_grad_per_sample.py", "benchmarks/bench_pathkernel.py",
        "benchmarks/bench_synflow.py"]),
    4: ("method-benchmarks", _KERNELS + [
        "benchmarks/common.py", "benchmarks/bench_ntksap.py", "benchmarks/bench_ntk.py",
        "benchmarks/bench_ntt.py", "benchmarks/bench_pathkernel.py", "benchmarks/bench_synflow.py",
        "benchmarks/bench_train.py"]),
    5: ("trainer", _KERNELS + [
        "benchmarks/common.py", "benchmarks/bench_fast_train.py", "ntkfast/training.py",
        "ntkfast/training_grouped.py", "ntkfast/core/grouped.py", "ntkfast/train_engine.py",
        "ntkfast/augment.py", "ntkfast/data/datasets.py"]),
    6: ("semi-structured", _KERNELS + [
        "benchmarks/common.py", "benchmarks/bench_semi_structured.py", "tests/test_semi_structured.py",
        "ntkfast/structured/semi_structured.py", "ntkfast/models/sequence.py"]),
}


def stage_files(stage: int) -> list:
    files = set()
    for pattern in STAGES[stage][1]:
        for f in glob.glob(str(REPO / pattern), recursive=True):
            p = Path(f)
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".o", ".pyc"):
                files.add(p.relative_to(REPO).as_posix())
    return sorted(files)


def stage_hash(stage: int) -> str:
    h = hashlib.sha256()
    for rel in stage_files(stage):
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256((REPO / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


def ledger_path() -> Path:
    return Path(os.environ.get("NTKFAST_LEDGER") or DEFAULT_LEDGER)


def load(path: Path = None) -> list:
    path = path or ledger_path()
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries")
    return data


def save(entries: list, path: Path = None) -> None:
    path = path or ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # write beside, then rename: a run cut off mid-write must not leave half a ledger
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ledger.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def is_done(stage: int, entries: list, current: str = None) -> bool:
    current = current or stage_hash(stage)
    return any(e.get("stage") == stage and e.get("status") == "passed" and e.get("hash") == current
               for e in entries)


def next_stage(entries: list, first: int = 1) -> object:
    for stage in sorted(STAGES):
        if stage >= first and not is_done(stage, entries):
            return stage
    return "done"


def junit_counts(paths) -> dict:
    """passed / failed / skipped counts and the failures' names over junit XML files."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for p in paths:
        if not p or not os.path.exists(p):
            continue
        try:
            root = ET.parse(p).getroot()
        except ET.ParseError as exc:
            out["failures"].append(f"{os.path.basename(p)}: unreadable junit ({exc})")
            out["failed"] += 1
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"] += 1
                out["failures"].append(name)
            elif case.find("skipped") is not None:
                out["skipped"] += 1
            else:
                out["passed"] += 1
    return out


def _git_commit() -> str:
    env = os.environ.get("NTKFAST_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def record(args) -> dict:
    steps = {}
    for s in args.step or []:
        name, _, status = s.partition("=")
        steps[name] = status
    counts = junit_counts(args.junit or [])
    for name, status in steps.items():  # a step that failed outside pytest is a failure too
        if status != "ok" and not status.startswith("unsupported"):  # "unsupported (why)": the runtime refused a tool
            counts["failed"] += 1
            counts["failures"].append(f"step {name}: {status}")
    env = json.loads(Path(args.env).read_text()) if args.env and os.path.exists(args.env) else {}
    dry = bool(args.dry_run)
    status = "dry-run" if dry else ("passed" if counts["failed"] == 0 and steps else "failed")
    entry = {
        "stage": args.stage,
        "name": STAGES[args.stage][0],
        "status": status,
        "commit": _git_commit(),
        "hash": stage_hash(args.stage),
        "gpu": env.get("gpu"),
        "driver": env.get("driver"),
        "torch": env.get("torch"),
        "cuda": env.get("torch_cuda"),
        "nvcc": env.get("nvcc"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": args.wall_s,
        "passed": counts["passed"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "failures": counts["failures"][:200],
        "steps": steps,
    }
    entries = load()
    entries.append(entry)
    save(entries)
    results = None
    if args.results and os.path.exists(args.results):
        results = json.loads(Path(args.results).read_text())
    return {"entry": entry, "env": env, "results": results}


def show(entries: list) -> str:
    lines = []
    for stage, (name, _) in sorted(STAGES.items()):
        h = stage_hash(stage)
        mine = [e for e in entries if e.get("stage") == stage]
        last = mine[-1] if mine else None
        state = "done" if is_done(stage, entries, h) else "to do"
        tail = (f"last: {last['status']} {last['date']} {last.get('gpu')} "
                f"({last['passed']} passed, {last['failed']} failed, {last['skipped']} skipped"
                f"{', hash ' + ('current' if last.get('hash') == h else 'stale')})") if last else "never run"
        lines.append(f"stage {stage} {name:<18} {state:<6} {tail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hash")
    p.add_argument("stage", type=int, choices=sorted(STAGES))
    p.add_argument("--files", action="store_true", help="list the files instead")
    p = sub.add_parser("next")
    p.add_argument("--from", dest="first", type=int, default=1, help="skip the stages before this one")
    sub.add_parser("show")
    p = sub.add_parser("record")
    p.add_argument("stage", type=int, choices=sorted(STAGES))
    p.add_argument("--junit", action="append", help="a junit XML file (repeatable)")
    p.add_argument("--step", action="append", help="NAME=STATUS of a non-pytest step (ok, FAILED rc=N, ...)")
    p.add_argument("--env", help="the JSON that env_info.py wrote")
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--results", help="a JSON file of the stage's measurements, copied into what record prints")
    args = ap.parse_args(argv)
    if args.cmd == "hash":
        print("\n".join(stage_files(args.stage)) if args.files else stage_hash(args.stage))
    elif args.cmd == "next":
        print(next_stage(load(), args.first))
    elif args.cmd == "show":
        print(show(load()))
    else:
        print(json.dumps(record(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
