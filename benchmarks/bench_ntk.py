"""The empirical NTK: ``ntkfast.ntk.empirical_ntk`` against the two torch.func methods of the
official PyTorch NTK tutorial (ntkfast.ntk.reference), same process, same inputs, float32.

    peer 1 (timed, the rel_err reference): Jacobian contraction, vmap(jacrev) then einsum
    peer 2 (attempted in a child process limited to 24 GiB of address space): NTK-vector products,
           vmap over sample pairs and output basis vectors of vjp then jvp
    ours: empirical_ntk(model, x, mode=...)

Workloads (the issue's): lenet300_100 full N=256 and trace N=1024; lenet5 full N=64; resnet20
(eval) trace N=64. Then one the Jacobian contraction cannot hold in 24 GiB: lenet300_100 trace
N=4096 (its Jacobian alone is 4096 x 10 x 266,610 float32 = 43.7 GB); both peers are attempted in
a 24 GiB child process, and only ntkfast's time and peak are recorded.

    python -m benchmarks.bench_ntk                # CPU, all cases
    python -m benchmarks.bench_ntk --quick        # small N, smoke test
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import torch

from .common import (QUICK_DIR, RESULTS_DIR, Case, Suite, device_tag, machine_info, machine_string, main as suite_main,
                     measure_peak, ntkfast_build, resolve_device, time_once, write_results)
from .floor import ntk_floor

LIMIT_BYTES = 24 << 30
WORKLOADS = [("lenet300_100", "full", 256), ("lenet300_100", "trace", 1024), ("lenet5", "full", 64),
             ("resnet20", "trace", 64)]
BEYOND = ("lenet300_100", "trace", 4096)
# GPU only: the ImageNet-scale case (neural-tangents' structured method published 985 ms on a V100);
# its Jacobian (1000 x 11.7M float32, 47 GB) is beyond this CPU machine's 24 GiB
GPU_WORKLOADS = [("resnet18", "full", 1)]
NVP_SKIP = {"resnet18"}  # 1000 vjp/jvp pairs of ResNet-18 at 224 x 224: minutes, outside a stage's window


def _inputs(model_name: str, n: int, device, seed: int = 0):
    from ntkfast import models

    torch.manual_seed(seed)
    model = models.get(model_name).to(device).eval()
    x = torch.randn(n, *model.input_shape, device=device)
    return model, x


def _peer_jac(st):
    from ntkfast.ntk import reference

    return reference.jacobian_contraction(st["model"], st["x"], mode=st["mode"])


def _peer_nvp(st):
    from ntkfast.ntk import reference

    return reference.ntk_vector_products(st["model"], st["x"], mode=st["mode"])


def _ours(st):
    from ntkfast.ntk import empirical_ntk

    return empirical_ntk(st["model"], st["x"], mode=st["mode"])


def _child_attempt(model_name: str, mode: str, n: int, method: str, device: str, timeout: int = 900) -> dict:
    """Run one torch.func method in a fresh process whose address space is capped at 24 GiB."""
    code = (
        "import sys, time, torch\n"
        "from benchmarks.bench_ntk import _inputs, _peer_jac, _peer_nvp, apply_memory_cap\n"
        f"apply_memory_cap({device!r})\n"
        f"model, x = _inputs({model_name!r}, {n}, torch.device({device!r}))\n"
        f"st = dict(model=model, x=x, mode={mode!r})\n"
        "t = time.perf_counter()\n"
        f"out = {'_peer_jac' if method == 'jacobian' else '_peer_nvp'}(st)\n"
        "torch.cuda.synchronize() if x.is_cuda else None\n"
        "print('OK', time.perf_counter() - t)\n"
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"not finished after {timeout} s", "wall_s": timeout}
    wall = time.perf_counter() - t0
    if proc.returncode == 0 and "OK" in proc.stdout:
        return {"ok": True, "seconds": float(proc.stdout.split()[-1]), "wall_s": wall}
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"ok": False, "error": tail[-1][:300] if tail else f"rc={proc.returncode}", "rc": proc.returncode,
            "wall_s": wall}


def _make_case(model_name: str, mode: str, n: int, quick: bool, device_name: str) -> Case:
    n = max(1, n // 16) if quick else n
    classes = 1000 if model_name == "resnet18" else 10
    params = {"model": model_name, "mode": mode, "N": n, "dtype": "float32", "outputs": classes}

    def setup(device):
        model, x = _inputs(model_name, n, device)
        return {"model": model, "x": x, "mode": mode}

    def compare(st, peer_out, ours_out):
        # in float64: a fresh eval-mode ResNet-20's kernel entries reach 1e20, whose squares
        # overflow a float32 norm
        peer64, ours64 = peer_out.double(), ours_out.double()
        return {"rel_err": ((ours64 - peer64).norm() / peer64.norm()).item(),
                "peer_max_abs": peer64.abs().max().item()}

    def checks(st):
        if model_name in NVP_SKIP:
            return {"ntk_vector_products": {"ok": None, "error": "not attempted (see NVP_SKIP)"}}
        nvp = _child_attempt(model_name, mode, n, "ntk_vector_products", device_name)
        return {"ntk_vector_products": nvp}

    return Case(name=f"{model_name}-{mode}-N{n}", params=params, setup=setup, peer=_peer_jac, ours=_ours,
                compare=compare, checks=checks, floor=lambda st: ntk_floor(st["model"], st["x"], classes))


def make_cases(args) -> List[Case]:
    work = WORKLOADS + (GPU_WORKLOADS if torch.device(args.device).type == "cuda" else [])
    return [_make_case(m, mode, n, args.quick, args.device) for m, mode, n in work]


def run_beyond(args) -> None:
    """The case no torch.func method finishes in 24 GiB: attempts recorded, ntkfast timed."""
    model_name, mode, n = BEYOND
    if args.quick:
        n = 256
    device = resolve_device(args.device)
    attempts = {m: _child_attempt(model_name, mode, n, m, args.device)
                for m in ("jacobian", "ntk_vector_products")}
    model, x = _inputs(model_name, n, device)
    st = {"model": model, "x": x, "mode": mode}
    _ours(st)
    times = [time_once(_ours, (st,), device) for _ in range(args.runs)]
    floor = ntk_floor(model, x, 10)  # after the timings, alone, as for every other case
    if device.type == "cuda":
        mem = measure_peak(_ours, (st,), device)
        del model, x, st
        times.sort()
        return _write_beyond(args, device, model_name, mode, n, attempts, times, mem, floor)
    code = ("import resource, torch, json\n"
            "from benchmarks.bench_ntk import _inputs, _ours\n"
            f"model, x = _inputs({model_name!r}, {n}, torch.device({args.device!r}))\n"
            "b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"_ours(dict(model=model, x=x, mode={mode!r}))\n"
            "p = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(json.dumps({'peak_mb': p / 1024, 'extra_mb': (p - b) / 1024}))\n")
    proc = subprocess.run(["/bin/sh", "-c", '"$@"', "sh", sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mem = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    times.sort()
    _write_beyond(args, device, model_name, mode, n, attempts, times, mem, floor)


def _write_beyond(args, device, model_name, mode, n, attempts, times, mem, floor) -> None:
    machine = machine_info(device)
    rec = {
        "suite": "ntk", "case": f"{model_name}-{mode}-N{n}-beyond-torch.func", "device": device.type,
        "machine": machine_string(device, machine), "machine_info": machine, "torch": torch.__version__,
        "ntkfast_build": ntkfast_build(),
        "peer": "torch.func Jacobian contraction / NTK-vector products, memory cap: " + apply_memory_cap_kind(device),
        "ours": "ntkfast.ntk.empirical_ntk", "params": {"model": model_name, "mode": mode, "N": n, "dtype": "float32"},
        "peer_s": None, "ours_s": times[len(times) // 2], "ratio": None, "ours_times_s": times,
        "peer_peak_mb": None, "ours_peak_mb": mem.get("peak_mb"), "ours_extra_mb": mem.get("extra_mb"),
        "floor_s": floor["floor_s"], "ours_over_floor": times[len(times) // 2] / floor["floor_s"],
        "peer_over_floor": None, "floor_what": floor["floor_what"], "floor_parts": floor.get("floor_parts"),
        "rel_err": None, "peer_attempts": attempts, "n_runs": args.runs,
        "command": f"python -m benchmarks.bench_ntk --device {device.type} --beyond-only" + (" --quick" if args.quick else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"[ntk] {rec['case']}: peers {attempts}; ntkfast {rec['ours_s']:.3g} s, peak {rec['ours_peak_mb']} MB",
          flush=True)
    out_dir = Path(args.out) if args.out else (QUICK_DIR if args.quick else RESULTS_DIR)
    write_results(out_dir, "ntk", device_tag(device, args.tag), [rec])


def apply_memory_cap_kind(device) -> str:
    return "none (CUDA: the GPU's memory)" if torch.device(device).type == "cuda" else "RLIMIT_AS 24 GiB"


def apply_memory_cap(device: str) -> str:
    """The 24 GiB the CPU runs are held to (this machine's memory): RLIMIT_AS on this process. Not on
    CUDA: a cap on the address space makes CUDA's own set-up fail (it reserves far more virtual
    memory than it uses), and there the GPU's memory is the limit. Returns what was applied."""
    if torch.device(device).type != "cuda":
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))
    return apply_memory_cap_kind(device)


def _add_args(p):
    p.add_argument("--beyond-only", action="store_true", help="only the case torch.func cannot hold in 24 GiB")
    p.add_argument("--no-beyond", action="store_true", help="skip the case torch.func cannot hold in 24 GiB")


SUITE = Suite("ntk", make_cases, runs=(3, 1), add_args=_add_args,
              peer="torch.func Jacobian contraction (tutorial method 1); method 2 (NTK-vector products) attempted in a 24 GiB child",
              ours="ntkfast.ntk.empirical_ntk")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .common import base_parser

    args = base_parser(SUITE).parse_args(argv)
    apply_memory_cap(args.device)
    if args.runs is None:
        args.runs = SUITE.quick_runs if args.quick else SUITE.default_runs
    rc = 0
    if not args.beyond_only:
        rc = suite_main(SUITE, [a for a in argv if a not in ("--no-beyond",)])
    if not args.no_beyond and not args.measure_memory and not args.list and not args.case:
        run_beyond(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
