"""Does a channels-last network make the convolution-bound scorers faster on the CPU, and does it
keep their masks? Each scorer is run on a model and on a channels-last copy of it (the same
weights, ``model.to(memory_format=torch.channels_last)``), interleaved in one process, medians of
3 runs, and the masks compared entry by entry. Not a benchmark suite: it decides whether a layout
option is worth offering (issue 29, part 3).

    python -m benchmarks.explore_channels_last [threads]
"""
import copy
import statistics
import sys
import time

import torch

import ntkfast
from ntkfast import models


def compare(label, model, prune):
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    a, b = prune(model), prune(cl)
    differ = sum(int((a[n] != b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    times = {"nchw": [], "channels_last": []}
    for _ in range(3):
        for k, m in (("nchw", model), ("channels_last", cl)):
            t = time.perf_counter()
            prune(m)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{label:58s} NCHW {med['nchw']:7.3f} s  channels-last {med['channels_last']:7.3f} s  "
          f"speed-up {med['nchw'] / med['channels_last']:5.2f}x  masks differ in {differ}/{total}")


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    print(f"# {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    resnet = models.get("resnet20")
    for method in ("synflow", "synflow_l2"):
        compare(f"{method}, ResNet-20, 100 rounds to 0.01", resnet,
                lambda m, method=method: ntkfast.prune(copy.deepcopy(m), method, 0.01, rounds=100, keep_rule="authors",
                                                       progress=False, on_empty_layer="ignore"))
    compare("ntksap, ResNet-20, 2 rounds x 5 pieces of 100", resnet,
            lambda m: ntkfast.prune(m, "ntksap", 0.1, rounds=2, repeats=5, batch_size=100, progress=False,
                                    on_empty_layer="ignore"))


if __name__ == "__main__":
    main()
