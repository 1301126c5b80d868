"""benchmarks/floor.py and how a suite records its floor (benchmarks/common.py).

The floor's seconds depend on the machine; what is tested is what it counts (the layers, the
passes, the multiply-adds) and that a suite's results carry it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, floor  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 8 * 8, 30)
        self.fc2 = nn.Linear(30, 5)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_layer_calls_finds_convolutions_and_linears_and_the_network_input():
    net, x = _Net(), torch.randn(2, 3, 8, 8)
    calls = floor.layer_calls(net, x)
    assert [m for m, *_ in calls] == [net.conv, net.fc1, net.fc2]
    assert [is_input for *_, is_input in calls] == [True, False, False]
    assert calls[0][2].shape == (2, 4, 8, 8) and calls[2][2].shape == (2, 5)


def test_network_floor_counts_each_pass_multiply_adds():
    net, n = _Net(), 2
    conv, fc1, fc2 = n * 4 * 64 * 27, n * 256 * 30, n * 30 * 5
    full = floor.network_s(net, torch.randn(n, 3, 8, 8), runs=1)
    # forward and weight gradients of all three layers; input gradients of all but the first,
    # whose input is the network's
    assert full["macs"] == 2 * (conv + fc1 + fc2) + (fc1 + fc2)
    assert full["layers"] == 3 and not full["skipped"]
    assert full["seconds"] == pytest.approx(full["forward_s"] + full["backward_s"])
    assert min(full["forward_s"], full["backward_s"]) > 0
    fwd = floor.network_s(net, torch.randn(n, 3, 8, 8), input_grad=False, weight_grad=False, runs=1)
    assert fwd["macs"] == conv + fc1 + fc2 and fwd["backward_s"] == 0
    # per-output backward passes: the batch is `repeat` times larger
    back = floor.network_s(net, torch.randn(n, 3, 8, 8), forward=False, repeat=5, runs=1)
    assert back["macs"] == 5 * ((conv + fc1 + fc2) + (fc1 + fc2)) and back["forward_s"] == 0
    half = floor.network_s(net, torch.randn(n, 3, 8, 8), input_grad=False, weight_grad=False, runs=1,
                           scale=lambda m: 0.5 if m is net.fc1 else 1.0)
    assert half["macs"] == conv + fc1 // 2 + fc2


def test_network_floor_times_a_linear_on_a_sequence_and_skips_string_padding():
    seq = nn.Sequential(nn.Linear(6, 7), nn.Conv1d(4, 4, 3, padding="same"))
    out = floor.network_s(seq, torch.randn(2, 4, 6), runs=1)
    assert out["layers"] == 1 and out["skipped"] == ["Conv1d"]
    assert out["macs"] == 2 * (2 * 4 * 6 * 7)  # forward and weight gradient; the input is the network's


def test_record_refuses_a_floor_that_is_not_a_positive_time():
    assert floor.record(0.5, "x", a=0.25) == {"floor_s": 0.5, "floor_what": "x", "floor_parts": {"a": 0.25}}
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="floor"):
            floor.record(bad, "x")


def test_traffic_and_rates_are_measured_and_used():
    assert floor.copy_bandwidth() > 1e8  # bytes per second: any machine moves more than 100 MB/s
    assert floor.traffic_s(2e9) == pytest.approx(2e9 / floor.copy_bandwidth())
    assert floor.macs_s(1e9) == pytest.approx(1e9 / floor.gemm_rate())
    scores = [torch.randn(100, 10), torch.randn(50)]
    sel = floor.selection_floor(scores)
    assert sel["floor_s"] == pytest.approx(floor.traffic_s(4 * 1050 + 1050))
    assert floor.selection_floor(scores, [torch.ones(100, 10, dtype=torch.bool), torch.ones(50, dtype=torch.bool)])[
        "floor_s"] > sel["floor_s"]


def test_method_floors_count_their_passes():
    net, x = _Net(), torch.randn(4, 3, 8, 8)
    train = floor.training_floor(net, x, steps=3)
    assert train["floor_parts"]["update_s"] == pytest.approx(
        3 * floor.traffic_s(7 * sum(p.numel() * 4 for p in net.parameters())))
    masks = {"fc1.weight": torch.rand(30, 256) < 0.1}
    sparse = floor.training_floor(net, x, steps=3, masks=masks)
    kept = sum(p.numel() for n, p in net.named_parameters() if n != "fc1.weight") + int(masks["fc1.weight"].sum())
    assert sparse["floor_parts"]["update_s"] == pytest.approx(3 * floor.traffic_s(7 * 4 * kept))
    two = floor.ntksap_floor(net, 4, pieces=2, stats_pass=False)
    three = floor.ntksap_floor(net, 4, pieces=2, stats_pass=True)
    assert two["floor_s"] > 0 and "3 forward" in three["floor_what"] and "2 forward" in two["floor_what"]
    assert floor.path_floor(net, rounds=2)["floor_parts"]["selection_s"] > 0
    assert floor.path_floor(net, select=False)["floor_parts"]["selection_s"] == 0
    ntk = floor.ntk_floor(net, x, outputs=5)
    assert set(ntk["floor_parts"]) == {"forward_s", "backward_s"}


def _suite(seen):
    def make_cases(args):
        def setup(device):
            return {"x": torch.randn(64, 64, device=device)}

        return [common.Case(name="mm", params={"seed": getattr(args, "seed", None)}, setup=setup,
                            peer=lambda st: st["x"] @ st["x"], ours=lambda st: st["x"] @ st["x"],
                            compare=lambda st, a, b: {"rel_err": float((a - b).norm() / a.norm())},
                            floor=lambda st: seen.append(st) or floor.record(1e-4, "one matrix product"))]

    return common.Suite("toy", make_cases, seed="the toy input", runs=(2, 1), peer="x @ x", ours="x @ x")


def test_a_suite_records_its_floor_and_the_readme_shows_it(tmp_path):
    seen = []
    suite = _suite(seen)
    assert suite.main(["--case", "mm", "--no-memory", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert len(seen) == 1
    (rec,) = json.loads((tmp_path / "toy-cpu.json").read_text())
    assert rec["floor_s"] == 1e-4 and rec["floor_what"] == "one matrix product"
    assert rec["ours_over_floor"] == pytest.approx(rec["ours_s"] / 1e-4)
    assert rec["peer_over_floor"] == pytest.approx(rec["peer_s"] / 1e-4)
    assert rec["params"] == {"seed": 3} and rec["command"].endswith("--seed 3")
    assert rec["n_runs"] == 2
    readme = (tmp_path / "README.md").read_text()
    assert "| floor | ntkfast / floor |" in readme
    row = next(line for line in readme.splitlines() if line.startswith("| mm "))
    assert f"| {rec['ours_over_floor']:.2f} |" in row


def test_a_suite_without_a_floor_leaves_the_fields_empty(tmp_path):
    suite = _suite([])
    case_maker = suite.make_cases

    def no_floor(args):
        (case,) = case_maker(args)
        case.floor = None
        return [case]

    bare = common.Suite("bare", no_floor, peer="x", ours="x", runs=(1, 1))
    assert bare.main(["--no-memory", "--out", str(tmp_path)]) == 0
    (rec,) = json.loads((tmp_path / "bare-cpu.json").read_text())
    assert rec["floor_s"] is None and rec["ours_over_floor"] is None
    assert "--seed" not in rec["command"]


def test_timing_a_floor_changes_nothing_of_the_model():
    net = _Net().train()
    net.conv.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    floor.training_floor(net, torch.randn(4, 3, 8, 8), steps=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics too
    assert net.training and net.bn.training and not net.conv.training
