"""Pack a stage's benchmark result files into one JSON (only 8 files come back from a GPU window),
judge the issue's targets on them, and unpack them into benchmarks/results/ afterwards.

    python3 benchmarks/gpu/collect_results.py pack RESULTS_DIR OUT.json     (the stage does this)
    python3 benchmarks/gpu/collect_results.py unpack STAGE.json [DEST]      (after the window)

unpack merges each suite file's rows into DEST (default benchmarks/results), replacing rows of the
same case, as the suites themselves do, then rebuilds DEST/README.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (suite, case, field, comparison, bound, what it means): the targets of the GPU-ladder issue, on the
# H200, each against the peer on the same GPU
TARGETS = [
    ("topk_mask", "resnet50-f32-d0.01", "ratio", ">=", 10, "topk_mask on 25.5M scores vs torch.cat + kthvalue"),
    ("synflow", "vgg16-r100-d0.01", "ratio", ">=", 10, "100 rounds of SynFlow on VGG-16 vs the authors'-way loop"),
    ("ntksap", "resnet20-prune", "ratio", ">=", 10, "NTK-SAP ResNet-20 full prune vs the authors' loop"),
    ("ntk", "lenet300_100-full-N256", "ratio", ">=", 50, "LeNet-300-100 full NTK, N=256, vs torch.func"),
    ("ntk", "resnet18-full-N1", "ours_s", "<", 0.1, "ResNet-18 224x224 K=1000 N=1 full NTK (neural-tangents: 985 ms, V100)"),
    ("ntt", "lenet5-step-B64", "ours_s", "<=", 0.01, "NTT LeNet-5 step"),
]


def judge(files: dict) -> list:
    rows = {(r.get("suite"), r.get("case")): r for rs in files.values() for r in rs if isinstance(r, dict)}
    out = []
    for suite, case, fld, op, bound, what in TARGETS:
        r = rows.get((suite, case))
        value = None if r is None else r.get(fld)
        met = None
        if r is not None and (r.get("quick") or r.get("device") != "cuda"):
            value = None  # the targets are for the full sizes on the GPU, not a dry run's
        if value is not None:
            met = {">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
        out.append({"suite": suite, "case": case, "field": fld, "target": f"{op} {bound}", "value": value,
                    "met": met, "what": what})
    return out


def pack(results_dir: Path, out: Path) -> dict:
    files = {}
    for p in sorted(results_dir.glob("*.json")):
        try:
            files[p.name] = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            files[p.name] = {"error": f"unreadable: {exc}"}
    packed = {"files": files, "targets": judge(files)}
    out.write_text(json.dumps(packed, indent=1, default=str) + "\n")
    for t in packed["targets"]:
        if t["value"] is not None:
            state = "met" if t["met"] else "MISSED"
            print(f"target {t['suite']}/{t['case']}: {t['field']} = {t['value']:.4g} ({t['target']}): {state}")
    return packed


def unpack(stage_json: Path, dest: Path) -> list:
    sys.path.insert(0, str(REPO))
    from benchmarks.common import regenerate_readme, write_results

    data = json.loads(stage_json.read_text())
    results = data.get("results") or data  # a stage's JSON holds the packed results under "results"
    written = []
    for name, rows in (results.get("files") or {}).items():
        if not isinstance(rows, list) or not name.endswith(".json"):
            continue
        suite = rows[0]["suite"] if rows else None
        if not suite or not name.startswith(suite + "-"):
            continue
        tag = name[len(suite) + 1:-len(".json")]
        written.append(write_results(dest, suite, tag, rows))
    if written:
        regenerate_readme(dest)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "pack":
        pack(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) >= 2 and argv[0] == "unpack":
        dest = Path(argv[2]) if len(argv) > 2 else REPO / "benchmarks" / "results"
        for p in unpack(Path(argv[1]), dest):
            print(f"wrote {p}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
