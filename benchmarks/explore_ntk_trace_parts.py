"""Where the exact NTK trace of ResNet-20 (N = 64, float32) spends its time, by Python call
(cProfile, cumulative): the capture's batched backward for every output's cotangents, the
per-sample convolution weight gradients, the pairwise contractions and the BatchNorm terms.
Not a benchmark suite: it names the part worth cutting next (issue 29).

    python -m benchmarks.explore_ntk_trace_parts [threads]
"""
import cProfile
import pstats
import sys
import time

import torch

from ntkfast import models
from ntkfast.ntk import empirical_ntk

PARTS = [("the capture's batched backward (all outputs' cotangents)", "_capture.py", "_batched_backward"),
         ("per-sample convolution weight gradients", "conv_weight_grad_per_sample.py", "conv_weight_grad_per_sample"),
         ("pairwise contractions of per-sample gradients", "_terms.py", "_dense_pair"),
         ("BatchNorm terms", "_layers.py", "batchnorm_terms")]


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    model = models.get("resnet20").eval()
    x = torch.randn(64, *model.input_shape)
    empirical_ntk(model, x, mode="trace")  # warm-up
    t = time.perf_counter()
    empirical_ntk(model, x, mode="trace")
    wall = time.perf_counter() - t
    prof = cProfile.Profile()
    prof.enable()
    empirical_ntk(model, x, mode="trace")
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = max(v[3] for v in stats.values())
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; wall {wall:.3f} s unprofiled, "
          f"{total:.3f} s profiled")
    for label, file, func in PARTS:
        cum = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == func)
        print(f"  {label:58s} {cum:7.3f} s  {100 * cum / total:5.1f}%")


if __name__ == "__main__":
    main()
