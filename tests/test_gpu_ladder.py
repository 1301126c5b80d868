"""The GPU ladder's bookkeeping (benchmarks/gpu): stage hashes, the ledger, junit counting, result
packing. The stages themselves run in CI as a CPU dry run (.ci/gpu_ladder_dry_run.sh)."""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

GPU_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import collect_results  # noqa: E402
import junit  # noqa: E402
import ledger  # noqa: E402


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cu").write_text("kernel v1")
    (tmp_path / "setup.py").write_text("setup")
    (tmp_path / "ntkfast").mkdir()
    (tmp_path / "ntkfast" / "a.py").write_text("x = 1")
    (tmp_path / "benchmarks" / "gpu").mkdir(parents=True)
    (tmp_path / "benchmarks" / "gpu" / "lib.sh").write_text("harness v1")
    monkeypatch.setattr(ledger, "REPO", tmp_path)
    monkeypatch.setenv("NTKFAST_LEDGER", str(tmp_path / "ledger.json"))
    return tmp_path


def test_hash_follows_what_a_stage_exercises_not_the_harness(fake_repo):
    h = ledger.stage_hash(1)
    (fake_repo / "benchmarks" / "gpu" / "lib.sh").write_text("harness v2")
    assert ledger.stage_hash(1) == h
    (fake_repo / "csrc" / "k.cu").write_text("kernel v2")
    assert ledger.stage_hash(1) != h
    h2 = ledger.stage_hash(1)
    (fake_repo / "ntkfast" / "b.py").write_text("y = 2")  # a new module counts too
    assert ledger.stage_hash(1) != h2


def _entry(stage, status, h):
    return {"stage": stage, "status": status, "hash": h}


def test_next_stage_is_the_first_without_a_pass_for_the_current_hash(fake_repo):
    hashes = {s: ledger.stage_hash(s) for s in ledger.STAGES}
    assert ledger.next_stage([]) == 1
    entries = [_entry(1, "passed", hashes[1]), _entry(2, "failed", hashes[2]), _entry(2, "dry-run", hashes[2])]
    assert ledger.next_stage(entries) == 2
    assert ledger.next_stage(entries, first=3) == 3
    entries += [_entry(2, "passed", "stale"), _entry(3, "passed", hashes[3]), _entry(4, "passed", hashes[4]),
                _entry(5, "passed", hashes[5]), _entry(6, "passed", hashes[6])]
    assert ledger.next_stage(entries) == 2
    entries.append(_entry(2, "passed", hashes[2]))
    assert ledger.next_stage(entries) == "done"


def test_junit_counts_and_merge(tmp_path):
    a, b, merged = tmp_path / "a.xml", tmp_path / "b.xml", tmp_path / "m.xml"
    junit.write(str(a), "s1", [("ok_case", 0.1, None), ("bad_case", 0.2, "boom\ntrace"), ("sk", 0, "skipped: why")])
    junit.write(str(b), "s2", [("other", 0.1, None)])
    junit.merge(str(merged), [str(a), str(b), str(tmp_path / "missing.xml")])
    counts = ledger.junit_counts([str(merged)])
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 1, 1)
    assert counts["failures"] == ["s1::bad_case"]


def test_record_counts_failed_steps_and_dry_runs_never_pass(fake_repo, tmp_path):
    xml = tmp_path / "j.xml"
    junit.write(str(xml), "s", [("a", 0.1, None)])
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"gpu": "NVIDIA H200", "driver": "580", "torch": "2.11"}))
    args = SimpleNamespace(stage=1, junit=[str(xml)], step=["build=ok", "tests=TIMEOUT after 9 s", "san=unsupported (x)"],
                           env=str(env), wall_s=12.0, dry_run=False, results=None)
    out = ledger.record(args)
    e = out["entry"]
    assert e["status"] == "failed" and e["failed"] == 1 and e["failures"] == ["step tests: TIMEOUT after 9 s"]
    assert e["gpu"] == "NVIDIA H200" and e["hash"] == ledger.stage_hash(1)
    args.step = ["build=ok"]
    assert ledger.record(args)["entry"]["status"] == "passed"
    args.dry_run = True
    assert ledger.record(args)["entry"]["status"] == "dry-run"
    saved = json.loads((fake_repo / "ledger.json").read_text())
    assert [x["status"] for x in saved] == ["failed", "passed", "dry-run"]
    assert ledger.next_stage(saved) == 2


def _row(suite, case, **kw):
    return {"suite": suite, "case": case, "device": "cuda", "quick": False, **kw}


def test_targets_are_judged_on_full_gpu_rows_only():
    files = {"topk_mask-cuda-NVIDIA-H200.json": [_row("topk_mask", "resnet50-f32-d0.01", ratio=12.0)],
             "ntt-cuda-NVIDIA-H200.json": [_row("ntt", "lenet5-step-B64", ours_s=0.02)],
             "ntk-cpu.json": [_row("ntk", "lenet300_100-full-N256", ratio=80.0, device="cpu")]}
    got = {(t["suite"], t["case"]): t for t in collect_results.judge(files)}
    assert got[("topk_mask", "resnet50-f32-d0.01")]["met"] is True
    assert got[("ntt", "lenet5-step-B64")]["met"] is False
    assert got[("ntk", "lenet300_100-full-N256")]["met"] is None  # a CPU row says nothing of the GPU target


def test_pack_then_unpack_merges_into_the_results_folder(tmp_path):
    res, dest = tmp_path / "res", tmp_path / "dest"
    res.mkdir()
    dest.mkdir()
    rows = [_row("synflow", "vgg16-r100-d0.01", ratio=11.0, peer_s=1.1, ours_s=0.1)]
    (res / "synflow-cuda-NVIDIA-H200.json").write_text(json.dumps(rows))
    (dest / "synflow-cuda-NVIDIA-H200.json").write_text(json.dumps([_row("synflow", "old-case", ratio=1.0)]))
    packed = tmp_path / "results.json"
    collect_results.pack(res, packed)
    stage_json = tmp_path / "stage3.json"
    stage_json.write_text(json.dumps({"entry": {}, "results": json.loads(packed.read_text())}))
    written = collect_results.unpack(stage_json, dest)
    assert [p.name for p in written] == ["synflow-cuda-NVIDIA-H200.json"]
    merged = json.loads((dest / "synflow-cuda-NVIDIA-H200.json").read_text())
    assert sorted(r["case"] for r in merged) == ["old-case", "vgg16-r100-d0.01"]


def test_a_dry_run_walks_every_stage_even_when_the_ladder_is_done(tmp_path):
    # once every stage has passed on a GPU, CI's dry run must still exercise every stage's harness
    import subprocess

    entries = [{"stage": s, "status": "passed", "hash": ledger.stage_hash(s)} for s in ledger.STAGES]
    fake = tmp_path / "ledger.json"
    fake.write_text(json.dumps(entries))
    out = tmp_path / "out"
    script = GPU_DIR / "next.sh"
    env = dict(os.environ, NTKFAST_LEDGER=str(fake), OUT=str(out))
    # stage 1 alone keeps this quick; the walk itself is what is tested
    r = subprocess.run(["bash", str(script), "--stages", "1", "--dry-run"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert "ladder: stage 1" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "stage1.junit.xml").exists()
    after = json.loads(fake.read_text())
    assert after[:len(entries)] == entries and [e["status"] for e in after[len(entries):]] == ["dry-run"]
