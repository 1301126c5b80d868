"""The measurements behind the NTK-SAP CPU remarks in docs/methods/ntksap.md (not a peer benchmark):

1. ``layout``: a 3x3 convolution layer, forward + backward, for 10 weight sets of a batch of 100:
   one stacked pass (split/cat), one grouped convolution, or ten separate calls;
2. ``profile``: the share of the authors'-way loop (engine="reference", ResNet-20, 5 pieces of 100)
   spent in convolutions, by torch.profiler self CPU time;
3. ``sensitivity``: how much NTK-SAP's next-round scores move when one weight of a round-1 mask is
   pruned differently (LeNet-300-100, float64), and how far two engines' float32 masks drift over
   3 rounds at batch 20 and 100.

    python -m benchmarks.explore_ntksap_cpu > benchmarks/results/ntksap-cpu-explore.txt
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .common import median_time


def layout():
    G, B, C, O, H = 10, 100, 16, 16, 32
    xs = torch.randn(G * B, C, H, H, requires_grad=True)
    xc = torch.randn(B, G * C, H, H, requires_grad=True)
    ws = torch.randn(G, O, C, 3, 3, requires_grad=True)

    def stacked():
        y = torch.cat([F.conv2d(a, w, padding=1) for a, w in zip(xs.split(B), ws.unbind(0))])
        y.sum().backward()

    def grouped():
        F.conv2d(xc, ws.reshape(G * O, C, 3, 3), padding=1, groups=G).sum().backward()

    def separate():
        for a, w in zip(xs.split(B), ws.unbind(0)):
            F.conv2d(a.detach().requires_grad_(), w, padding=1).sum().backward()

    print(f"layout: conv 3x3 {C}->{O} at {H}x{H}, {G} weight sets x batch {B}, forward+backward, median of 11")
    for name, fn in (("one stacked pass (split/cat)", stacked), ("one grouped convolution", grouped),
                     ("ten separate calls", separate)):
        print(f"  {name:30s} {median_time(fn, 11) * 1e3:7.1f} ms")


def profile():
    from torch.profiler import ProfilerActivity, profile as prof
    from ntkfast import models
    from ntkfast.scores import ntksap

    m = models.get("resnet20")
    ntksap(m, repeats=1, batch_size=100, engine="reference")
    with prof(activities=[ProfilerActivity.CPU]) as p:
        ntksap(m, repeats=5, batch_size=100, engine="reference", seed=1)
    rows = p.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    conv = sum(r.self_cpu_time_total for r in rows if "convolution" in r.key)
    print(f"profile: authors' loop, ResNet-20, 5 pieces of 100: convolutions {100 * conv / total:.0f}% of self CPU time")


def sensitivity():
    import ntkfast
    from ntkfast import Masks, models
    from ntkfast.masks import threshold
    from ntkfast.scores import ntksap

    m = models.get("lenet300_100").double()
    kw = dict(repeats=2, batch_size=20)
    a1 = ntkfast.prune(m, "ntksap", 0.1 ** (1 / 3), rounds=1, progress=False, engine="reference", **kw)
    a2 = Masks({n: v.clone() for n, v in a1.items()})
    n = "classifier.0.weight"
    a2[n].view(-1)[int(torch.nonzero(a2[n].flatten())[7])] = False
    s1 = ntksap(m, a1, seed=11, engine="reference", **kw)
    s2 = ntksap(m, a2, seed=11, engine="reference", **kw)
    rel = torch.cat([((s1[k] - s2[k]).abs() / s1[k].abs().clamp_min(1e-300))[a2[k]] for k in s1])
    m1 = threshold(s1, 0.1 ** (2 / 3), keep=a1, scope="global")
    m2 = threshold(s2, 0.1 ** (2 / 3), keep=a2, scope="global")
    print("sensitivity: LeNet-300-100 float64, one round-1 weight pruned differently; round-2 scores move by "
          f"median {float(rel.median()):.2e}, max {float(rel.max()):.2e} (relative); round-2 masks differ in "
          f"{sum(int((m1[k] != m2[k]).sum()) for k in m1)} entries")
    m32 = models.get("lenet300_100")
    for engine in ("sequential", "grouped"):
        for batch in (20, 100):
            kw = dict(rounds=3, repeats=2, batch_size=batch, progress=False)
            x = ntkfast.prune(m32, "ntksap", 0.1, engine=engine, **kw)
            y = ntkfast.prune(m32, "ntksap", 0.1, engine="reference", **kw)
            same = sum(int((x[k] == y[k]).sum()) for k in x) / sum(x[k].numel() for k in x)
            print(f"  float32, 3 rounds to 0.1, batch {batch}: {engine} vs reference masks {100 * same:.2f}% identical")


if __name__ == "__main__":
    from .common import cpu_model

    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    layout()
    profile()
    sensitivity()
