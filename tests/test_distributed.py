"""ntkfast over torch.distributed: two gloo processes on CPU against the single-process results.

Each spawned group computes everything split and alone on every rank (see _dist_workers.py);
these tests check that the ranks agree bit for bit, that the split results equal the
single-process ones up to summation order, that a failing or absent rank stops every rank, and
that `torchrun -m ntkfast prune` works."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ntkfast
import ntkfast.cli
from ntkfast.distributed import Shard, resolve, split_sizes

from _dist_workers import spawn
from testing import REPO

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    return spawn("scores_and_masks", tmp_path_factory.mktemp("dist"), timeout_s=300)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return {"": value}
    return dict(value)


def _assert_identical_across_ranks(runs, key):
    first = _tensors(runs[0][key])
    for r, run in enumerate(runs[1:], start=1):
        other = _tensors(run[key])
        for n, t in first.items():
            assert torch.equal(t, other[n]), f"{key}[{n}]: rank {r} differs from rank 0"


def _assert_close(split, alone, rtol, what):
    a, b = _tensors(split), _tensors(alone)
    assert a.keys() == b.keys()
    for n in a:
        scale = float(b[n].abs().max()) or 1.0
        err = float((a[n] - b[n]).abs().max()) / scale
        assert err <= rtol, f"{what}[{n}]: split differs from single-process by {err:.2e} (relative to max)"
        assert not torch.equal(a[n], torch.zeros_like(a[n])), f"{what}[{n}] is all zeros"


SCORE_CASES = {  # case -> relative tolerance against the single-process scores
    "ntksap": 1e-5, "ntksap_f64": 1e-12, "ntksap_one_piece": 0.0, "ntksap_reference": 1e-5,
    "snip_rows": 1e-5, "snip_three": 1e-5, "snip_bn_batches": 1e-5, "iterative_snip": 1e-5,
    "grasp_rows": 1e-4, "grasp_train_mode": 1e-4, "grasp_f64": 1e-12, "synflow": 0.0, "magnitude": 0.0,
}


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_scores_split_equal_single_process(split_runs, case):
    _assert_identical_across_ranks(split_runs, f"{case}/split")
    _assert_close(split_runs[0][f"{case}/split"], split_runs[0][f"{case}/alone"], SCORE_CASES[case], case)


PRUNE_CASES = ["ntksap", "ntksap_f64", "snip", "grasp", "iterative_snip", "synflow", "synflow_l2", "random"]


@pytest.mark.parametrize("case", PRUNE_CASES)
def test_prune_masks_bit_identical(split_runs, case):
    _assert_identical_across_ranks(split_runs, f"prune_{case}/split")
    split, alone = split_runs[0][f"prune_{case}/split"], split_runs[0][f"prune_{case}/alone"]
    for n in alone:
        assert torch.equal(split[n], alone[n]), f"prune {case}: mask {n} differs from the single-process one"
    assert split_runs[1][f"prune_{case}/processes"] == 2


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal", "diagonal_trace"])
@pytest.mark.parametrize("sym", [False, True])
def test_empirical_ntk_split_by_rows(split_runs, mode, sym):
    key = f"ntk_{mode}{'_sym' if sym else ''}"
    _assert_identical_across_ranks(split_runs, f"{key}/split")
    split, alone = split_runs[0][f"{key}/split"], split_runs[0][f"{key}/alone"]
    assert split.shape == alone.shape
    assert torch.allclose(split, alone, rtol=1e-12, atol=1e-12 * float(alone.abs().max()))


def test_empirical_ntk_local_block_and_few_rows(split_runs):
    full = split_runs[0]["ntk_full/alone"]
    for run in split_runs:
        rows = run["ntk_local_rows"]
        assert run["ntk_local"].shape == (len(rows),) + tuple(full.shape[1:])
        assert torch.allclose(run["ntk_local"], full[rows[0]:rows[-1] + 1], rtol=1e-12, atol=0)
    assert split_runs[0]["ntk_local_rows"] + split_runs[1]["ntk_local_rows"] == list(range(7))
    assert torch.allclose(split_runs[1]["ntk_two_rows/split"], split_runs[1]["ntk_two_rows/alone"], rtol=1e-12, atol=0)
    assert "gather=False" in split_runs[0]["ntk_create_graph_error"]


@pytest.fixture(scope="module")
def transfer_runs(tmp_path_factory):
    return spawn("transfer_run", tmp_path_factory.mktemp("dist_ntt"), timeout_s=300)


def test_transfer_data_parallel_equals_single_process(transfer_runs):
    a, b = transfer_runs
    assert "error" not in a and "error" not in b, a.get("traceback") or b.get("traceback")
    for key in ("split/masks", "split/state", "prune_ntt"):
        _assert_identical_across_ranks(transfer_runs, key)
    for n, m in a["alone/masks"].items():
        assert torch.equal(a["split/masks"][n], m), f"NTT mask {n} differs from the single-process run"
    for n, v in a["alone/state"].items():
        assert torch.allclose(a["split/state"][n], v, rtol=1e-4, atol=1e-6), n
    hs, ha = a["split/history"], a["alone/history"]
    assert hs["step"] == ha["step"] == [0, 2, 4, 6]
    for k in ("loss", "kernel_distance", "target_distance", "l2"):
        assert hs[k] == pytest.approx(ha[k], rel=1e-4), k


def test_failing_rank_stops_every_rank(tmp_path):
    r0, r1 = spawn("failing_rank", tmp_path, timeout_s=120, pg_timeout_s=60)
    assert r1["kind"] == "ValueError" and "exploded on purpose" in r1["message"]
    assert r0["kind"] == "DistributedError"
    assert "rank 1" in r0["message"] and "exploded on purpose" in r0["message"]
    assert r0["seconds"] < 30, "rank 0 waited for the collective's timeout instead of hearing of the error"


def test_absent_rank_times_out(tmp_path):
    r0, r1 = spawn("absent_rank", tmp_path, timeout_s=120, pg_timeout_s=3)
    assert r0["kind"] is not None, "rank 0 finished although rank 1 never joined"
    assert r0["seconds"] < 7, f"rank 0 stopped after {r0['seconds']:.1f} s, not at the 3 s timeout"


def test_different_models_refused_on_every_rank(tmp_path):
    runs = spawn("different_models", tmp_path, timeout_s=120)
    for run in runs:
        assert run["error_message"] is not None and "model" in run["error_message"]
        assert "rank 1" in run["error_message"] and "classifier.0.weight" in run["error_message"]
        assert run["model_unchanged"]


def test_every_registered_scorer_takes_a_process_group():
    import inspect

    for name in ntkfast.scores.available():
        params = inspect.signature(ntkfast.scores.get(name).fn).parameters
        assert "process_group" in params and params["process_group"].default is None, name


def test_resolve_and_blocks():
    assert resolve(None).size == 1 and not resolve(False).split  # nothing initialised here
    with pytest.raises(ValueError, match="process_group"):
        resolve(True)
    with pytest.raises(ValueError, match="process_group"):
        resolve("world")
    assert split_sizes(7, 2) == [4, 3] and split_sizes(1, 3) == [1, 0, 0]
    assert [list(Shard(None, r, 3).block(8)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="process_group"):
        ntkfast.prune(torch.nn.Linear(3, 2), "magnitude", 0.5, process_group=True, progress=False)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, of this interpreter


def test_torchrun_cli_prune(tmp_path):
    out = tmp_path / "masks.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--model", "resnet20", "--input-shape", "3,8,8", "--method", "ntksap", "--density", "0.05",
            "--rounds", "2", "-o", "repeats=3", "-o", "batch_size=8", "--quiet"]
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ntkfast", "prune", *args,
                           "--out", str(out), "--dist-timeout", "60"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("masks saved to") == 1  # rank 0 alone prints and writes
    assert proc.stdout.count("density") >= 1
    alone = tmp_path / "alone.pt"
    assert ntkfast.cli.main(["prune", *args, "--out", str(alone)]) == 0
    split, single = ntkfast.Masks.load(str(out)), ntkfast.Masks.load(str(alone))
    for n in single:
        assert torch.equal(split[n], single[n]), n
    assert split.metadata["processes"] == 2


def test_torchrun_refuses_commands_that_do_not_split(tmp_path):
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ntkfast", "models"],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0 and "does not split over processes" in proc.stderr


def test_inputs_that_differ_in_kind(tmp_path):
    r0, r1 = spawn("edge_cases", tmp_path, timeout_s=120, pg_timeout_s=60)
    assert "error" not in r0 and "error" not in r1, r0.get("traceback") or r1.get("traceback")
    for run in (r0, r1):
        assert run["architecture"] is not None and "rank 1" in run["architecture"], run["architecture"]
        assert run["nan_model"] is None, run["nan_model"]
        assert run["views_model_unchanged"]
        assert run["bad_data"] is not None and run["bad_data_seconds"] < 30
    for n, t in r0["views_scores"].items():
        assert torch.equal(r1["views_scores"][n], t), f"replicated scorer: rank 1 does not hold rank 0's scores for {n}"
    assert "data" in r1["bad_data"] and "rank 1" in r0["bad_data"]


def test_nccl_groups_made_by_init_from_env_raise_on_timeout_instead_of_aborting(monkeypatch):
    # NCCL's watchdog kills a process whose collective outwaits the timeout; with blocking wait the
    # call raises instead. init_from_env asks for that unless the user chose otherwise.
    from ntkfast import distributed as D

    made = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    monkeypatch.setattr(D, "_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, timeout: made.append((backend, os.environ.get("TORCH_NCCL_BLOCKING_WAIT"))))
    assert D.init_from_env("cuda", timeout_s=30) == "cuda:1"
    assert made == [("nccl", "1")]
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")
    D.init_from_env("cuda", timeout_s=30)
    assert made[-1] == ("nccl", "0")
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT")
    D.init_from_env("cpu", timeout_s=30)
    assert made[-1] == ("gloo", None)
