"""NTK-SAP pruning of CIFAR ResNet-20 split over processes with torch.distributed, against the
same prune in one process.

The authors' settings (20 rounds, R = 5 repeats of one batch of 100 Gaussian inputs, density 0.1,
global, exponential). Every configuration runs in fresh processes (spawned, gloo on CPU, NCCL
on CUDA); the time is rank 0's wall time of the ``ntkfast.prune`` call between two barriers, so
process start-up and imports are left out but everything the prune does (plans, draws, every
all-reduce) is in. Configurations are interleaved run by run; medians are reported. Peak memory
is each process's ru_maxrss (CPU) or torch.cuda.max_memory_allocated (CUDA), the largest over
the ranks. The masks of every configuration are compared with the single-process one.

On this 2-core CPU the honest comparison is one process with 2 threads against 2 processes with 1
thread each (same cores); 1 process with 1 thread shows the scaling per core.

    python -m benchmarks.bench_distributed --runs 3
    python -m benchmarks.bench_distributed --quick          # tiny sizes, smoke test
    python -m benchmarks.bench_distributed --device cuda    # one GPU: the single-process record
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import RESULTS_DIR, machine_info, regenerate_readme
from .floor import ntksap_floor

SUITE = "distributed"


def _worker(rank, world, init, threads, device, params, out):
    torch.set_num_threads(threads)
    if world > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                                             timeout=_dt.timedelta(seconds=600))
    import ntkfast

    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(params["seed"])
    model = ntkfast.models.get(params["model"], num_classes=params["classes"]).to(dev)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def barrier():
        if world > 1:
            torch.distributed.barrier()
        if device == "cuda":
            torch.cuda.synchronize(dev)

    barrier()
    t0 = time.perf_counter()
    masks = ntkfast.prune(model, "ntksap", params["density"], rounds=params["rounds"], repeats=params["repeats"],
                          batch_size=params["batch"], seed=params["seed"], progress=False, on_empty_layer="ignore")
    barrier()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    torch.save({"seconds": seconds, "peak_mb": peak,
                "masks": {n: m.cpu() for n, m in masks.items()} if rank == 0 else None}, f"{out}-{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _launch(world, threads, device, params) -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        procs = [ctx.Process(target=_worker, args=(r, world, init, threads, device, params, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a process of the {world}-process run failed (exit codes {[p.exitcode for p in procs]})")
        ranks = [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(world)]
    return {"seconds": ranks[0]["seconds"], "peak_mb": max(r["peak_mb"] for r in ranks), "masks": ranks[0]["masks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        params = dict(model="resnet20", classes=10, rounds=2, repeats=2, batch=10, density=0.1, seed=0)
    else:
        params = dict(model="resnet20", classes=10, rounds=20, repeats=5, batch=100, density=0.1, seed=0)
    cores = os.cpu_count() or 1
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        configs = {"1 GPU": (1, 1)} | ({f"{gpus} GPUs": (gpus, 1)} if gpus > 1 else {})
    else:
        configs = {f"1 process x {cores} threads": (1, cores), "1 process x 1 thread": (1, 1),
                   f"{cores} processes x 1 thread": (cores, 1)}
    times = {c: [] for c in configs}
    peaks = {c: [] for c in configs}
    masks = {}
    load = os.getloadavg()[0]
    for run in range(args.runs):
        for name, (world, threads) in configs.items():
            res = _launch(world, threads, args.device, params)
            times[name].append(res["seconds"])
            peaks[name].append(res["peak_mb"])
            masks.setdefault(name, res["masks"])
            print(f"run {run + 1}/{args.runs}  {name:28s} {res['seconds']:8.2f} s  peak {res['peak_mb']:.0f} MB",
                  flush=True)
    # the same work's floor with every core in this one process: splitting it can only approach it
    from ntkfast import models

    torch.manual_seed(params["seed"])
    floor = ntksap_floor(models.get(params["model"], num_classes=params["classes"]).to(args.device), params["batch"],
                         params["rounds"] * params["repeats"], stats_pass=True)
    info = machine_info(torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"))
    machine = info.get("gpu") or f"{info.get('cpu', '?')} ({cores} cores)"
    command = "python -m benchmarks.bench_distributed " + " ".join(argv if argv is not None else sys.argv[1:])
    records = []
    names = list(configs)
    # (peer, ours): the split run against each single-process one; one GPU alone is the record
    pairs = [(n, names[-1]) for n in names[:-1]] if len(names) > 1 else [(None, names[0])]
    for peer, ours in pairs:
        ref = masks[peer if peer is not None else ours]
        diff = sum(int((ref[n] != masks[ours][n]).sum()) for n in ref)
        numel = sum(m.numel() for m in ref.values())
        peer_s = statistics.median(times[peer]) if peer is not None else None
        records.append({
            "suite": SUITE, "case": f"resnet20-ntksap-prune: {ours}" + (f" vs {peer}" if peer else ""),
            "device": args.device,
            "machine": machine, "machine_info": info, "params": params,
            "peer": "the same ntkfast.prune(model, 'ntksap', ...) in the configuration named first in the case",
            "ours": "ntkfast.prune split over processes (torch.distributed; pieces in blocks, one all-reduce per round)",
            "peer_s": peer_s, "ours_s": statistics.median(times[ours]),
            "ratio": peer_s / statistics.median(times[ours]) if peer_s else None,
            "floor_s": floor["floor_s"], "floor_what": floor["floor_what"],
            "ours_over_floor": statistics.median(times[ours]) / floor["floor_s"],
            "peer_over_floor": peer_s / floor["floor_s"] if peer_s else None,
            "peer_times_s": times.get(peer), "ours_times_s": times[ours],
            "peer_peak_mb": max(peaks[peer]) if peer else None, "ours_peak_mb": max(peaks[ours]),
            "rel_err": diff / numel, "identical": diff == 0, "diff_entries": diff, "n_runs": args.runs,
            "quick": args.quick, "loadavg_1min_before": load, "command": command,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "configurations": {n: {"processes": w, "threads_each": t} for n, (w, t) in configs.items()},
        })
    for r in records:
        print(f"{r['case']}: {r['peer_s'] or float('nan'):.2f} s -> {r['ours_s']:.2f} s "
              f"({r['ratio'] or float('nan'):.2f}x), masks identical: {r['identical']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.device + ("-quick" if args.quick else "")
    (out / f"{SUITE}-{tag}.json").write_text(json.dumps(records, indent=1))
    if not args.no_readme:
        regenerate_readme(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
