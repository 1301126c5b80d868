"""The accuracy study, run from the benchmarks folder: the same program as ``ntkfast study``
(:mod:`ntkfast.study`), so the committed results under ``benchmarks/results/study/`` name the
command that made them either way.

    python -m benchmarks.study --model lenet300_100 --dataset mnist --data-dir ../shared/data \\
        --methods random magnitude snip synflow --densities 0.1 0.01 --seeds 0 1 --epochs 20 \\
        --out benchmarks/results/study/lenet300_100-mnist.jsonl
    python -m ntkfast report benchmarks/results/study/*.jsonl --out benchmarks/results/study
"""
from __future__ import annotations

import sys

from ntkfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["study"] + sys.argv[1:]))
