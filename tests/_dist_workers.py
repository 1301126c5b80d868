"""Processes for the torch.distributed tests: `spawn` starts a gloo group of CPU processes running
one of the functions below; each returns a dict of tensors/values written back to the parent.

The functions compute every result twice on every rank: split over the group
(``process_group=None``, the world group) and alone (``process_group=False``), so the parent can
compare the split result with the single-process one and the ranks with each other."""
from __future__ import annotations

import datetime
import os
import time
import traceback

import torch


def spawn(fn_name: str, tmp_path, world: int = 2, timeout_s: float = 120.0, pg_timeout_s: float = 60.0,
          **kwargs) -> list:
    """Run ``fn_name(rank, world, **kwargs)`` of this module in ``world`` fresh processes joined by
    a gloo group; returns their results in rank order ({"error": ..., "kind": ...} for a rank that
    raised). Fails if they do not all finish within ``timeout_s`` (a hang)."""
    ctx = torch.multiprocessing.get_context("spawn")
    init = os.path.join(str(tmp_path), f"init-{fn_name}-{time.monotonic_ns()}")
    outs = [os.path.join(str(tmp_path), f"out-{fn_name}-{r}.pt") for r in range(world)]
    procs = [ctx.Process(target=_entry, args=(r, world, init, fn_name, outs[r], pg_timeout_s, kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout_s} s (hang)")
    results = []
    for r, path in enumerate(outs):
        if not os.path.exists(path):
            raise AssertionError(f"rank {r} exited with code {procs[r].exitcode} without a result")
        results.append(torch.load(path, weights_only=False))
    return results


def _entry(rank, world, init, fn_name, out, pg_timeout_s, kwargs):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=pg_timeout_s))
    try:
        result = globals()[fn_name](rank, world, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}", "kind": type(exc).__name__,
                  "traceback": traceback.format_exc()}
    torch.save(result, out)
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - a broken group after an error
        pass


# -- the workloads --------------------------------------------------------------------------------
def _small_resnet():
    import ntkfast

    torch.manual_seed(0)
    return ntkfast.models.get("resnet20", input_shape=(3, 8, 8), num_classes=10)


def _mlp():
    import ntkfast

    torch.manual_seed(1)
    return ntkfast.models.get("lenet300_100", input_shape=(1, 8, 8), num_classes=10)


def _batches(n_batches: int, rows: int, shape, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((rows,) + tuple(shape), generator=g), torch.randint(0, 10, (rows,), generator=g))
            for _ in range(n_batches)]


def scores_and_masks(rank, world):
    """Scores of the splitting scorers, prune masks and the NTK, split and alone."""
    import ntkfast
    from ntkfast import scores
    from ntkfast.ntk import empirical_ntk

    out = {}
    net = _small_resnet()
    mlp = _mlp()
    one = _batches(1, 11, (1, 8, 8))  # one batch of an odd size: its rows are split
    three = _batches(3, 6, (1, 8, 8))  # three batches over two ranks: rows too
    two = _batches(2, 8, (3, 8, 8))  # two whole batches, one per rank
    cases = {
        "ntksap": (scores.ntksap, net, dict(repeats=5, batch_size=8)),
        "ntksap_f64": (scores.ntksap, net, dict(repeats=3, batch_size=8, dtype=torch.float64)),
        "ntksap_one_piece": (scores.ntksap, mlp, dict(repeats=1, batch_size=8)),  # rank 1 has no piece
        "ntksap_reference": (scores.ntksap, net, dict(repeats=3, batch_size=8, engine="reference")),
        "snip_rows": (scores.snip, mlp, dict(data=one)),
        "snip_three": (scores.snip, mlp, dict(data=three)),
        "snip_bn_batches": (scores.snip, net, dict(data=two)),
        "iterative_snip": (scores.iterative_snip, mlp, dict(data=three)),
        "grasp_rows": (scores.grasp, mlp, dict(data=one)),
        "grasp_train_mode": (scores.grasp, net, dict(data=two, train_mode=True)),
        "grasp_f64": (scores.grasp, mlp, dict(data=three, dtype=torch.float64)),
        "synflow": (scores.synflow, net, {}),  # not split: computed everywhere, rank 0's broadcast
        "magnitude": (scores.magnitude, mlp, {}),
    }
    for name, (fn, model, opts) in cases.items():
        out[f"{name}/split"] = fn(model, **opts)
        out[f"{name}/alone"] = fn(model, process_group=False, **opts)
    prunes = {
        "ntksap": (net, dict(method="ntksap", density=0.1, rounds=3, repeats=3, batch_size=8)),
        "ntksap_f64": (net, dict(method="ntksap", density=0.05, rounds=2, repeats=3, batch_size=8,
                                 dtype=torch.float64)),
        "snip": (mlp, dict(method="snip", density=0.05, data=one)),
        "grasp": (mlp, dict(method="grasp", density=0.1, data=three)),
        "iterative_snip": (mlp, dict(method="iterative_snip", density=0.02, rounds=4, data=three)),
        "synflow": (net, dict(method="synflow", density=0.02, rounds=5)),
        "synflow_l2": (mlp, dict(method="synflow_l2", density=0.02, rounds=3)),
        "random": (mlp, dict(method="random", density=0.3, seed=3)),
    }
    for name, (model, opts) in prunes.items():
        m = ntkfast.prune(model, progress=False, **opts)
        out[f"prune_{name}/split"] = dict(m)
        out[f"prune_{name}/processes"] = m.metadata["processes"]
        out[f"prune_{name}/alone"] = dict(ntkfast.prune(model, progress=False, process_group=False, **opts))
    g = torch.Generator().manual_seed(9)
    x1 = torch.randn(7, 3, 8, 8, generator=g, dtype=torch.float64)
    x2 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    net64 = _small_resnet().double().eval()
    for mode in ("full", "trace", "diagonal", "diagonal_trace"):
        other = x1[:7].flip(0) if mode.startswith("diagonal") else x2
        out[f"ntk_{mode}/split"] = empirical_ntk(net64, x1, other, mode=mode)
        out[f"ntk_{mode}/alone"] = empirical_ntk(net64, x1, other, mode=mode, process_group=False)
        out[f"ntk_{mode}_sym/split"] = empirical_ntk(net64, x1, mode=mode)
        out[f"ntk_{mode}_sym/alone"] = empirical_ntk(net64, x1, mode=mode, process_group=False)
    out["ntk_local"] = empirical_ntk(net64, x1, x2, gather=False)
    out["ntk_local_rows"] = list(ntkfast.distributed.local_rows(7))
    out["ntk_two_rows/split"] = empirical_ntk(net64, x1[:1], x2)  # fewer rows than ranks
    out["ntk_two_rows/alone"] = empirical_ntk(net64, x1[:1], x2, process_group=False)
    try:
        empirical_ntk(net64, x1, x2, create_graph=True)
        out["ntk_create_graph_error"] = None
    except ValueError as exc:
        out["ntk_create_graph_error"] = str(exc)
    return out


def transfer_run(rank, world, steps=6):
    """A few NTT steps split over the group and alone."""
    import ntkfast

    mlp = _mlp()
    x = torch.randn(160, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    opts = dict(steps=steps, batch_size=32, mask_update_every=3, log_every=2, progress=False, validation=32)
    res = {}
    for how, pg in (("split", None), ("alone", False)):
        r = ntkfast.transfer(mlp, 0.1, x, process_group=pg, **opts)
        res[f"{how}/masks"] = dict(r.masks)
        res[f"{how}/state"] = dict(r.state_dict)
        res[f"{how}/history"] = r.history
    m = ntkfast.prune(mlp, "ntt", 0.1, data=x, steps=4, batch_size=32, progress=False)
    res["prune_ntt"] = dict(m)
    return res


def failing_rank(rank, world):
    """Rank 1's re-initialisation raises in the middle of NTK-SAP: every rank must stop with it."""
    from ntkfast import scores

    net = _small_resnet()

    def init_fn(model):
        if rank == 1:
            raise ValueError("init_fn exploded on purpose")
        model.reinitialize()

    t0 = time.monotonic()
    try:
        scores.ntksap(net, repeats=4, batch_size=8, init_fn=init_fn)
    except Exception as exc:  # noqa: BLE001 - what the test inspects
        return {"kind": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - t0}
    return {"kind": None, "seconds": time.monotonic() - t0}


def absent_rank(rank, world):
    """Rank 1 never joins (it is busy elsewhere): rank 0 must stop at the group's timeout."""
    import ntkfast

    if rank == 1:
        time.sleep(8.0)
        return {"kind": None}
    t0 = time.monotonic()
    try:
        ntkfast.prune(_mlp(), "snip", 0.1, data=_batches(1, 8, (1, 8, 8)), progress=False)
    except Exception as exc:  # noqa: BLE001 - what the test inspects
        return {"kind": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - t0}
    return {"kind": None, "seconds": time.monotonic() - t0}


def different_models(rank, world):
    """Ranks whose models differ are refused, on every rank, before any work."""
    import ntkfast

    torch.manual_seed(rank)
    model = ntkfast.models.get("lenet300_100", input_shape=(1, 8, 8), num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ntkfast.prune(model, "synflow", 0.1, rounds=2, progress=False)
        err = None
    except ValueError as exc:
        err = str(exc)
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return {"error_message": err, "model_unchanged": same}


def edge_cases(rank, world):
    """Inputs that differ between ranks in kind, not only in value, and scorers returning views."""
    import ntkfast
    from ntkfast import scores

    out = {}
    # different architectures: a clear error on every rank, not a crash in the collective
    torch.manual_seed(0)
    width = (1, 8, 8) if rank == 0 else (1, 6, 6)
    model = ntkfast.models.get("lenet300_100", input_shape=width, num_classes=10)
    try:
        ntkfast.prune(model, "magnitude", 0.5, progress=False)
        out["architecture"] = None
    except ValueError as exc:
        out["architecture"] = str(exc)
    # identical models holding NaN are the same model
    torch.manual_seed(0)
    model = ntkfast.models.get("lenet300_100", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        model.classifier[0].bias[0] = float("nan")
    try:
        ntkfast.prune(model, "random", 0.5, progress=False)
        out["nan_model"] = None
    except ValueError as exc:
        out["nan_model"] = str(exc)
    # a scorer returning views of the model's weights (and an expanded tensor): rank 0's scores
    # are broadcast into copies, never into the model
    torch.manual_seed(rank)  # different weights per rank, scored without prune's checks
    model = ntkfast.models.get("lenet300_100", input_shape=(1, 8, 8), num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def views(model, masks=None, *, data=None, seed=0):
        from collections import OrderedDict

        named = dict(model.named_parameters())
        out = OrderedDict()
        for n in ntkfast.prunable_parameters(model):
            p = named[n]
            out[n] = p.detach() if p.dim() == 2 and p.shape[0] > 10 else torch.ones(1).expand(p.shape)
        return out

    if "views" not in scores.available():
        scores.register("views", "test scorer returning views")(views)
    got = scores.get("views").fn(model)
    out["views_scores"] = {n: t.clone() for n, t in got.items()}
    out["views_model_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # one rank's data does not fit: every rank stops at once, with the error
    torch.manual_seed(0)
    model = ntkfast.models.get("lenet300_100", input_shape=(1, 8, 8), num_classes=10)
    shape = (1, 8, 8) if rank == 0 else (3, 8, 8)
    t0 = time.monotonic()
    try:
        ntkfast.prune(model, "snip", 0.5, data=(torch.randn(4, *shape), torch.zeros(4, dtype=torch.long)),
                      progress=False)
        out["bad_data"] = None
    except Exception as exc:  # noqa: BLE001 - what the test inspects
        out["bad_data"] = f"{type(exc).__name__}: {exc}"
    out["bad_data_seconds"] = time.monotonic() - t0
    return out
