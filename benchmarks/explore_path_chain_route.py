"""Would the compiled ``path_chain`` op, picked up for models that are plain chains of Linear
layers, make the path-sum scorers faster on an MLP (issue 29, part 2)? One round's scores of
LeNet-300-100 computed two ways, interleaved in one process, medians of 200 calls:

- general: ``PathNetwork.scores`` as the scorers run it (a forward of the |θ| network at batch 1
  with hooks on the layers, one autograd backward through the activations, ``path_score`` per layer);
- chain: one ``path_chain`` call for every layer's forward and backward path sums, then
  ``path_score`` per layer (the float masks made once per round, as a chain route would).

Both give the same scores (checked here). Beside them, the round's ``topk_mask`` over all
266,200 scores, the other fixed cost of a pruning round, and a whole round of a 100-round
SynFlow-L2 prune. Not a benchmark suite: it decided
whether the route was worth building into the path network.

    python -m benchmarks.explore_path_chain_route [threads]
"""
import statistics
import sys
import time

import torch

from .common import median_time
from ntkfast import models, ops
from ntkfast.pathkernel import PathNetwork


def chain_scores(layers, masks, dtype, power):
    weights = [m.weight.detach().to(dtype) for m in layers]
    biases = [m.bias.detach().to(dtype) for m in layers]
    fm = None if masks is None else [masks[i].to(dtype) for i in range(len(layers))]
    x = torch.ones(1, weights[0].shape[1], dtype=dtype)
    fwd, bwd = ops.path_chain(weights, x, masks=fm, biases=biases, power=power)
    out = []
    for i, w in enumerate(weights):
        a = x if i == 0 else fwd[i - 1]
        b = bwd[i + 1].unsqueeze(0) if i + 1 < len(weights) else torch.ones_like(fwd[-1])
        out.append(ops.path_score(w, a, b, mask=None if fm is None else fm[i], weight_power=1))
    return out


def median_ms(fn, n=200):
    return median_time(fn, n) * 1e3


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; LeNet-300-100, one round's scores")
    torch.manual_seed(0)
    model = models.lenet300_100()
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for density in (1.0, 0.3):
            masks = None if density == 1.0 else {n: torch.rand(p.shape, generator=g) < density
                                                 for n, p in model.named_parameters() if n in names}
            for power in (1, 2):
                net = PathNetwork(model, masks, power, dtype, reuse=True)
                listed = None if masks is None else [masks[n] for n in names]
                general = net.scores(1)
                chain = chain_scores(layers, listed, dtype, power)
                err = max(float((general[n] - c).abs().max() / general[n].abs().max()) for n, c in zip(names, chain))
                t = {"general": [], "chain": []}
                for _ in range(3):  # interleaved
                    t["general"].append(median_ms(lambda: net.scores(1), 60))
                    t["chain"].append(median_ms(lambda: chain_scores(layers, listed, dtype, power), 60))
                gm, cm = statistics.median(t["general"]), statistics.median(t["chain"])
                print(f"{str(dtype).replace('torch.', ''):8s} density {density:3.1f} power {power}: general {gm:6.3f} ms, "
                      f"chain {cm:6.3f} ms ({gm / cm:4.2f}x); scores agree to {err:.1e}")
        flat = torch.rand(sum(p.numel() for n, p in model.named_parameters() if n in names), dtype=dtype)
        print(f"{str(dtype).replace('torch.', ''):8s} topk_mask over the 266,200 scores, density 0.01: "
              f"{median_ms(lambda: ops.topk_mask([flat], 2662)):6.3f} ms")
    import ntkfast

    whole = []
    for _ in range(3):
        t0 = time.perf_counter()
        ntkfast.prune(model, "synflow_l2", 0.01, rounds=100, progress=False)
        whole.append(time.perf_counter() - t0)
    print(f"whole rounds: prune(lenet300_100, 'synflow_l2', 0.01, rounds=100) {statistics.median(whole) * 10:6.3f} ms "
          "a round (float64, its default), median of 3")


if __name__ == "__main__":
    main()
