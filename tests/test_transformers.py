"""Hugging Face transformers models from small configs with random weights (nothing downloaded):
BERT for sequence classification, ViT for image classification, GPT-2 with its LM head. Every
method either prunes them or refuses by name; the user's model is left as it was."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ntkfast  # noqa: E402
from ntkfast import methods, scores  # noqa: E402

METHODS = sorted(m for m in methods.available() if not m.startswith("_"))
OPTIONS = {"ntksap": {"repeats": 1, "batch_size": 4, "init_fn": lambda m: m.init_weights()},
           "ntt": {"steps": 1, "batch_size": 4, "validation": 0}}


def _quiet():
    transformers.logging.set_verbosity_error()


def bert():
    _quiet()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    g = torch.Generator().manual_seed(1)
    return (transformers.BertForSequenceClassification(cfg),
            (torch.randint(0, 40, (8, 6), generator=g), torch.randint(0, 3, (8,), generator=g)))


def vit():
    _quiet()
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    g = torch.Generator().manual_seed(1)
    return (transformers.ViTForImageClassification(cfg),
            (torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)))


def gpt2():
    _quiet()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    ids = torch.randint(0, 40, (8, 7), generator=torch.Generator().manual_seed(1))
    return transformers.GPT2LMHeadModel(cfg), (ids[:, :-1], ids[:, 1:])  # next-token targets


def _prune(net, method, data, **kw):
    opts = OPTIONS.get(method, {})
    arg = data[0] if method == "ntt" else data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers left dense, emptied layers
        return ntkfast.prune(net, method, 0.3, data=arg, rounds=2 if method == "iterative_snip" else 1,
                             progress=False, on_empty_layer="ignore", **opts, **kw)


def _unchanged(net, before, flags):
    return (all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
            and flags == [m.training for m in net.modules()] and all(p.grad is None for p in net.parameters()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", [bert, vit, gpt2], ids=["bert", "vit", "gpt2"])
def test_every_method_prunes_or_names_why(build, method):
    net, data = build()
    before, flags = copy.deepcopy(net.state_dict()), [m.training for m in net.modules()]
    kw = {"include": transformers.pytorch_utils.Conv1D} if build is gpt2 else {}
    # token ids: NTK-SAP draws them uniformly, SynFlow and its variants feed every token at once,
    # the Dist variants the token frequencies of data
    masks = _prune(net, method, data, **kw)
    assert abs(masks.density - 0.3) < 0.02
    if build is gpt2:  # the tied output layer is the embedding table, named once
        assert "transformer.wte.weight" in masks and "lm_head.weight" not in masks
        assert len(masks.metadata["include"]) == 8  # c_attn, c_proj, c_fc, c_proj in 2 blocks
    if build is vit:
        assert "vit.layers.0.attention.q_proj.weight" in masks or any("query" in n for n in masks)
    assert _unchanged(net, before, flags)


def test_logits_are_what_is_scored():
    """A ModelOutput's logits stand for the output: SNIP on the HF model equals SNIP on a module
    returning the logits tensor."""
    net, data = vit()

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).logits

    a = scores.snip(net.double(), data=(data[0].double(), data[1]))
    b = scores.snip(Plain(net), data=(data[0].double(), data[1]))
    for n in a:
        torch.testing.assert_close(a[n], b["inner." + n], rtol=1e-12, atol=1e-15)


def test_language_model_loss_is_the_mean_over_positions():
    """SNIP on GPT-2 with targets [N, T] scores the mean next-token cross-entropy over all positions."""
    net, (x, y) = gpt2()
    net = net.double().eval()
    conv1d = transformers.pytorch_utils.Conv1D
    names = list(ntkfast.prunable_parameters(net, include=conv1d))
    params = dict(net.named_parameters())
    got = scores.snip(net, {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, data=(x, y), bn="eval")
    logits = net(x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    raw = {n: (params[n] * g).abs() for n, g in zip(names, grads)}
    total = sum(v.sum() for v in raw.values())
    for n in names:
        torch.testing.assert_close(got[n], raw[n] / total, rtol=1e-10, atol=1e-14)
