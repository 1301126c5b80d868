"""NTK-SAP: a full prune of CIFAR ResNet-20 and one scoring round of CIFAR-100 VGG-16, ntkfast's
engine against the authors'-way reference, in the same process.

The peer is ``engine="reference"``: the NTK-SAP authors' loop written out (two model copies; for
every batch a fresh initialisation, a train-mode no-grad pass with momentum 1 for the BatchNorm
statistics, then the unperturbed and the perturbed copy in eval mode, one backward to the mask).
It draws exactly the same initialisations, inputs and perturbations as ntkfast (piece i's draws
depend on (seed, i) only), so the two sides' scores and masks can be compared entry by entry.

Cases (the authors' CIFAR settings: R = 5 repeats, one batch of 10 x classes Gaussian inputs):
- resnet20-prune: 20 rounds, exponential schedule, global scope, density 0.1 (CIFAR-10);
- resnet20-prune-single-pass: the same with bn_stats="single_pass" (statistics inside the pass);
- vgg16-c100-round: one scoring round of VGG-16 with 100 classes (batch 1000);
- bert-l4-tokens-round: one scoring round of a 4-layer BERT (hidden 256) on token ids drawn
  uniformly from its 30,522-token vocabulary, batch 32 x 64 tokens (needs transformers).

    python -m benchmarks.bench_ntksap --device cpu
    python -m benchmarks.bench_ntksap --quick          # tiny sizes, smoke test
"""
from __future__ import annotations

import sys
from typing import List

import torch

from .common import Case, Suite, compare_masks, rel_err_norm
from .floor import ntksap_floor


def _model(name: str, classes: int, device, seed: int):
    from ntkfast import models

    torch.manual_seed(seed)
    return models.get(name, num_classes=classes).to(device)


def _prune_case(args, bn_stats: str) -> Case:
    rounds, repeats, batch, density = (2, 2, 10, 0.1) if args.quick else (20, 5, 100, 0.1)
    name = "resnet20-prune" + ("-single-pass" if bn_stats == "single_pass" else "")
    params = {"model": "resnet20", "input": [3, 32, 32], "classes": 10, "rounds": rounds, "repeats": repeats,
              "batch": batch, "density": density, "scope": "global", "schedule": "exponential",
              "bn_stats": bn_stats, "seed": args.seed}

    def setup(device):
        return {"model": _model("resnet20", 10, device, args.seed)}

    def prepare(st):
        return (st["model"],)

    def run(model, engine):
        import ntkfast

        kw = dict(rounds=rounds, repeats=repeats, batch_size=batch, seed=args.seed, progress=False,
                  on_empty_layer="ignore")
        if engine == "reference":
            return ntkfast.prune(model, "ntksap", density, engine="reference", **kw)
        return ntkfast.prune(model, "ntksap", density, bn_stats=bn_stats, **kw)

    def compare(st, peer_masks, ours_masks):
        names = list(peer_masks)
        out = compare_masks([peer_masks[n] for n in names], [ours_masks[n] for n in names], names)
        return out

    def checks(st):
        from ntkfast.scores import ntksap

        m = st["model"]
        ref = ntksap(m, repeats=repeats, batch_size=batch, seed=args.seed, engine="reference")
        got = ntksap(m, repeats=repeats, batch_size=batch, seed=args.seed, bn_stats=bn_stats)
        return {"score_rel_err": rel_err_norm(list(ref.values()), [got[n] for n in ref]),
                "score_check": "round-1 scores on the same draws, ||ours - reference|| / ||reference||"}

    return Case(name=name, params=params, setup=setup, prepare=prepare,
                peer=lambda m: run(m, "reference"), ours=lambda m: run(m, "ours"), compare=compare, checks=checks,
                floor=lambda st: ntksap_floor(st["model"], batch, rounds * repeats, stats_pass=bn_stats == "authors"))


def _round_case(args) -> Case:
    classes = 10 if args.quick else 100
    repeats, batch = (2, 20) if args.quick else (5, 10 * classes)
    params = {"model": "vgg16", "input": [3, 32, 32], "classes": classes, "repeats": repeats, "batch": batch,
              "rounds": 1, "seed": args.seed}

    def setup(device):
        return {"model": _model("vgg16", classes, device, args.seed)}

    def prepare(st):
        return (st["model"],)

    def run(model, engine):
        from ntkfast.scores import ntksap

        return ntksap(model, repeats=repeats, batch_size=batch, seed=args.seed, engine=engine)

    def compare(st, peer_scores, ours_scores):
        names = list(peer_scores)
        return {"rel_err": rel_err_norm([peer_scores[n] for n in names], [ours_scores[n] for n in names]),
                "score_check": "||ours - reference|| / ||reference|| over all scores, same draws"}

    return Case(name=f"vgg16-c{classes}-round", params=params, setup=setup, prepare=prepare,
                peer=lambda m: run(m, "reference"), ours=lambda m: run(m, "auto"), compare=compare,
                floor=lambda st: ntksap_floor(st["model"], batch, repeats, stats_pass=True))


def _bert_case(args) -> Case:
    """One scoring round of a small BERT on token ids drawn uniformly from its vocabulary (NTK-SAP's
    data-free input for a token model), built from a config with random weights."""
    layers, width, seq, batch, repeats = (1, 32, 8, 4, 2) if args.quick else (4, 256, 64, 32, 5)
    params = {"model": "bert (transformers, BertForSequenceClassification)", "layers": layers, "hidden": width,
              "heads": 4, "intermediate": 4 * width, "vocab": 30522, "classes": 2, "sequence": seq, "batch": batch,
              "repeats": repeats, "rounds": 1, "token_input": "random", "seed": args.seed}

    def setup(device):
        import transformers

        transformers.logging.set_verbosity_error()
        torch.manual_seed(args.seed)
        cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=4,
                                      intermediate_size=4 * width, num_labels=2)
        return {"model": transformers.BertForSequenceClassification(cfg).to(device).eval()}

    def prepare(st):
        return (st["model"],)

    def run(model, engine):
        from ntkfast.scores import ntksap

        return ntksap(model, repeats=repeats, batch_size=batch, input_shape=(seq,), seed=args.seed, engine=engine,
                      init_fn=lambda m: m.init_weights())

    def compare(st, peer_scores, ours_scores):
        names = list(peer_scores)
        return {"rel_err": rel_err_norm([peer_scores[n] for n in names], [ours_scores[n] for n in names]),
                "score_check": "||ours - reference|| / ||reference|| over all scores, same draws"}

    def floor(st):
        m = st["model"]
        ids = torch.randint(0, 30522, (batch, seq), device=next(m.parameters()).device)
        return ntksap_floor(m, batch, repeats, stats_pass=False, x=ids)

    return Case(name=f"bert-l{layers}-tokens-round", params=params, setup=setup, prepare=prepare,
                peer=lambda m: run(m, "reference"), ours=lambda m: run(m, "auto"), compare=compare, floor=floor)


def make_cases(args) -> List[Case]:
    cases = [_prune_case(args, "authors"), _prune_case(args, "single_pass"), _round_case(args)]
    try:
        import transformers  # noqa: F401  (an optional dependency: the token-model case needs it)
    except ImportError:
        print("# bench_ntksap: transformers is not installed; the BERT case is left out", file=sys.stderr)
    else:
        cases.append(_bert_case(args))
    return cases


def _add_args(p):
    p.add_argument("--seed", type=int, default=0, help="seed of the model and of the draws (default 0)")


def _option_argv(args) -> List[str]:
    return ["--seed", str(args.seed)] if args.seed != 0 else []


SUITE = Suite("ntksap", make_cases, runs=(3, 1), add_args=_add_args, option_argv=_option_argv,
              peer='the authors\' loop (ntkfast engine="reference": two model copies, a train-mode statistics pass '
                   "and two eval passes plus one backward per batch), same draws",
              ours='ntkfast.prune(model, "ntksap", ...) / ntkfast.scores.ntksap(model, ...) with the default engine')

if __name__ == "__main__":
    sys.exit(SUITE.main())
