"""include=: weights that are not prunable by default (embeddings, transposed convolutions,
recurrent weights, MultiheadAttention's fused in_proj_weight) scored and pruned on request, with
exclude= acting after it; scores against plain autograd in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkfast
from ntkfast import Masks, scores
from ntkfast.masks import prunable_parameters


class Tokens(nn.Module):
    """Token ids -> embedding -> one transformer encoder layer -> mean -> classifier."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 9 * 9, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.up(x)).flatten(1))


def _case(name):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "tokens":
        net, x, inc = Tokens(), torch.randint(0, 30, (6, 5), generator=g), [nn.Embedding, nn.MultiheadAttention]
    elif name == "lstm":
        net, x, inc = Recurrent(), torch.randn(6, 5, 4, generator=g), nn.LSTM
    elif name == "gru":
        net, x, inc = Recurrent(nn.GRU), torch.randn(6, 5, 4, generator=g), "rnn.weight_*"
    else:
        net, x, inc = Upsampler(), torch.randn(6, 2, 4, 4, generator=g), nn.ConvTranspose2d
    net = net.double()
    if x.is_floating_point():
        x = x.double()
    return net, (x, torch.randint(0, 3, (6,), generator=g)), inc


def test_include_picks_the_weights_named():
    net, _, _ = _case("tokens")
    assert list(prunable_parameters(net)) == ["enc.self_attn.out_proj.weight", "enc.linear1.weight",
                                              "enc.linear2.weight", "fc.weight"]
    got = list(prunable_parameters(net, include=[nn.Embedding, "enc.self_attn.in_proj_weight"]))
    assert got == ["emb.weight", "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight", "enc.linear1.weight",
                   "enc.linear2.weight", "fc.weight"]
    lstm, _, _ = _case("lstm")
    assert list(prunable_parameters(lstm, include=nn.LSTM)) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"]
    assert list(prunable_parameters(lstm, include=lambda n, m: n.endswith("hh_l0"))) == ["rnn.weight_hh_l0", "fc.weight"]


@pytest.mark.parametrize("bad,err,msg", [
    ("embed", ValueError, r"^include: 'embed' names no weight tensor of the model; did you mean 'emb'"),
    (nn.GRU, ValueError, r"^include: the model has no weight tensor in a GRU module"),
    (3, TypeError, r"^include: expected a layer name"),
])
def test_a_bad_include_is_named_and_nothing_changes(bad, err, msg):
    net, data, _ = _case("tokens")
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(err, match=msg):
        ntkfast.prune(net, "magnitude", 0.5, include=bad, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_exclude_acts_after_include():
    net, data, _ = _case("tokens")
    masks = ntkfast.prune(net, "magnitude", 0.5, include=[nn.Embedding, nn.MultiheadAttention], exclude="emb",
                          progress=False)
    assert masks.metadata["include"] == ["emb.weight", "enc.self_attn.in_proj_weight"]
    assert masks.metadata["exclude"] == ["emb.weight"] and bool(masks["emb.weight"].all())
    assert not masks["enc.self_attn.in_proj_weight"].all()


@pytest.mark.parametrize("case", ["lstm", "tokens"])
def test_ntt_masks_the_included_weights(case):
    net, data, inc = _case(case)
    net = net.float()
    x = data[0].float() if data[0].is_floating_point() else data[0]
    before = copy.deepcopy(net.state_dict())
    masks = ntkfast.prune(net, "ntt", 0.5, data=x, include=inc, exclude="fc", steps=2, batch_size=3, validation=0,
                          progress=False)
    included = masks.metadata["include"]
    assert included and all(n in masks for n in included)
    assert masks.metadata["exclude"] == ["fc.weight"] and bool(masks["fc.weight"].all())
    assert abs(masks.pruned_density - 0.5) < 0.02
    assert all(not bool(masks[n].all()) for n in included)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_mask_choosing_method_that_does_not_take_include_refuses_it():
    from ntkfast import methods

    @methods.register("_t_masks_no_include", "test-only: keeps everything", single_shot=True, returns="masks",
                      takes=("process_group",))
    def keep_all(model, masks=None, *, data=None, seed=0, process_group=None):
        return methods.MethodResult(masks={n: torch.ones_like(m) for n, m in masks.items()})

    net, data, _ = _case("lstm")
    with pytest.raises(ValueError, match=r"^include: method '_t_masks_no_include' chooses its own masks"):
        ntkfast.prune(net, "_t_masks_no_include", 0.5, data=data[0], include=nn.LSTM, progress=False)


@pytest.mark.parametrize("case", ["tokens", "lstm", "gru", "convT"])
@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "iterative_snip", "grasp", "synflow"])
def test_every_scorer_prunes_included_weights(case, method):
    net, data, inc = _case(case)
    if method == "synflow" and case == "tokens":
        with pytest.raises(ValueError, match="takes token ids"):  # asked not to feed every token
            ntkfast.prune(net, method, 0.3, include=inc, token_input="refuse", input_shape=(5,), progress=False)
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    kw = {"data": data} if method in ("snip", "iterative_snip", "grasp") else {}
    if method == "synflow":
        kw["input_shape"] = tuple(data[0].shape[1:])  # token ids: every token at once (token_input="all")
    masks = ntkfast.prune(net, method, 0.3, include=inc, rounds=2 if method in ("iterative_snip", "synflow") else 1,
                          progress=False, on_empty_layer="ignore", **kw)
    extra = masks.metadata["include"]
    assert extra and all(n in masks for n in extra)
    assert abs(masks.density - 0.3) < 0.01
    assert any(not masks[n].all() for n in extra)  # the included weights take part in the ranking
    # the user's model untouched; the masks apply and round-trip through torch.nn.utils.prune
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert flags == [m.training for m in net.modules()] and all(p.grad is None for p in net.parameters())
    hooked = masks.to_prune_hooks(copy.deepcopy(net))
    back = Masks.from_model(hooked)
    assert all(torch.equal(back[n], masks[n]) for n in masks)


def _plain_grad(net, data, names, create_graph=False):
    params = dict(net.named_parameters())
    loss = F.cross_entropy(net(data[0]), data[1])
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)))


@pytest.mark.parametrize("case", ["tokens", "lstm", "convT"])
def test_snip_on_included_weights_is_plain_autograd(case):
    net, data, inc = _case(case)
    names = list(prunable_parameters(net, include=inc))
    got = scores.snip(net, {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(
        net, include=inc).items()}, data=data, bn="eval")
    grads = _plain_grad(net.eval(), data, names)
    params = dict(net.named_parameters())
    raw = {n: (params[n] * grads[n]).abs() for n in names}
    total = sum(v.sum() for v in raw.values())
    for n in names:
        torch.testing.assert_close(got[n], raw[n] / total, rtol=1e-10, atol=1e-14)


def test_grasp_through_attention_is_the_explicit_hessian_product():
    """GraSP's second derivative through nn.MultiheadAttention (whose fused CPU kernel has none)."""
    net, data, inc = _case("tokens")
    net.eval()
    names = list(prunable_parameters(net, include=inc))
    params = dict(net.named_parameters())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        loss = F.cross_entropy(net(data[0]) / 200.0, data[1])
        g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        z = sum((gi.detach() * gi).sum() for gi in g)
        hg = torch.autograd.grad(z, [params[n] for n in names])
    raw = {n: params[n].detach() * h for n, h in zip(names, hg)}
    total = sum(v.sum() for v in raw.values()).abs() + 1e-10
    got = scores.grasp(net, {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, data=data, bn="eval")
    for n in names:
        torch.testing.assert_close(got[n], raw[n] / total, rtol=1e-8, atol=1e-14)


def test_split_qkv_ranks_query_key_and_value_as_three_layers():
    net, data, _ = _case("tokens")
    name = "enc.self_attn.in_proj_weight"
    kw = dict(data=data, include=nn.MultiheadAttention, scope="layerwise", progress=False)
    with torch.no_grad():  # make the value rows much larger, so that one fused ranking would favour them
        dict(net.named_parameters())[name][16:].mul_(50)
    fused = ntkfast.prune(net, "magnitude", 0.25, **kw)
    split = ntkfast.prune(net, "magnitude", 0.25, split_qkv=True, **kw)
    assert split.metadata["split_qkv"] is True and "split_qkv" not in fused.metadata
    kept_fused = [int(r.sum()) for r in fused[name].chunk(3, 0)]
    kept_split = [int(r.sum()) for r in split[name].chunk(3, 0)]
    assert kept_split == [16, 16, 16]  # a quarter of each 8x8 block
    assert kept_fused == [0, 0, 48]  # the fused ranking takes only v
    for n in split:  # the other layers are pruned as before
        if n != name:
            assert torch.equal(split[n], fused[n]), n


def test_split_qkv_needs_a_fused_weight_and_no_structure():
    net, data, _ = _case("tokens")
    with pytest.raises(ValueError, match="^split_qkv: no nn.MultiheadAttention in_proj_weight is pruned"):
        ntkfast.prune(net, "magnitude", 0.5, split_qkv=True, progress=False)
    with pytest.raises(ValueError, match="^split_qkv: applies to unstructured masks"):
        ntkfast.prune(net, "magnitude", None, include=nn.MultiheadAttention, split_qkv=True, structure="2:4",
                      progress=False)
    with pytest.raises(ValueError, match="^split_qkv: expected True or False"):
        ntkfast.prune(net, "magnitude", 0.5, include=nn.MultiheadAttention, split_qkv="yes", progress=False)


def test_split_qkv_names_an_emptied_block():
    net, data, _ = _case("tokens")
    name = "enc.self_attn.in_proj_weight"
    with torch.no_grad():
        dict(net.named_parameters())[name][:8].mul_(1e-6)  # the query rows score lowest of everything
    with pytest.warns(RuntimeWarning, match=r"enc\.self_attn\.in_proj_weight\[q\]"):
        ntkfast.prune(net, "magnitude", 0.5, include=nn.MultiheadAttention, split_qkv=True, progress=False)


def test_synflow_feeds_an_embedding_every_token_at_once():
    """token_input="all": the embedding is a Linear layer on a one-hot vector, fed all ones."""

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(6, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.emb(x)).mean(1)

    torch.manual_seed(0)
    net = Tok().double()
    ones = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters() if p.dim() == 2}
    got = scores.synflow(net, ones, input_shape=(4,))
    e = net.emb.weight.detach().abs().requires_grad_(True)
    w = net.fc.weight.detach().abs().requires_grad_(True)
    r = (w @ (torch.ones(6, dtype=torch.float64) @ e) + net.fc.bias.detach().abs()).sum()
    ge, gw = torch.autograd.grad(r, [e, w])
    torch.testing.assert_close(got["emb.weight"], (e * ge).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["fc.weight"], (w * gw).detach(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="^token_input: expected one of 'all', 'refuse'"):
        scores.synflow(net, ones, input_shape=(4,), token_input="some")


def test_a_tied_weight_is_picked_by_any_of_its_names():
    """GPT-2's layout: the output layer shares the embedding table, keyed once (its first name),
    and still excluded by the classifier's name, module, type or a predicate."""
    from ntkfast.masks import last_linear

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.body(self.emb(x)))).mean(1)

    torch.manual_seed(0)
    net = LM()
    assert list(prunable_parameters(net)) == ["body.weight", "emb.weight"]
    for entry in ("head", last_linear(net), net.head, lambda name, module: name.startswith("head.")):
        masks = ntkfast.prune(net, "magnitude", 0.5, exclude=entry, progress=False)
        assert masks.metadata["exclude"] == ["emb.weight"], entry


def test_sequence_logits_in_either_layout_and_an_ambiguous_one_refused():
    from ntkfast.core.numerics import cross_entropy

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (2, 5), generator=g)
    hf = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)  # [N, T, classes]
    torch.testing.assert_close(cross_entropy(hf, y), F.cross_entropy(hf.transpose(1, 2), y))
    torch.testing.assert_close(cross_entropy(hf.transpose(1, 2), y), F.cross_entropy(hf.transpose(1, 2), y))
    with pytest.raises(ValueError, match="^data: logits of shape \\(2, 4, 4\\) with targets \\(2, 4\\) can be read"):
        cross_entropy(torch.randn(2, 4, 4), torch.randint(0, 4, (2, 4)))


def test_include_with_channel_structure_is_named_and_synflow_feeds_ones_beside_an_inner_embedding():
    net, data, inc = _case("tokens")
    with pytest.raises(ValueError, match="^include: structure='channel' ranks the output channels"):
        ntkfast.prune(net, "magnitude", 0.5, include=inc, structure="channel", progress=False)

    class Conditioned(nn.Module):  # a real-valued input, and an embedding the input never reaches
        def __init__(self):
            super().__init__()
            self.fc, self.cls = nn.Linear(4, 3), nn.Embedding(3, 3)

        def forward(self, x):
            return self.fc(x) + self.cls(torch.zeros(x.shape[0], dtype=torch.long))

    # the input is real-valued (no embedding looks it up): fed ones, the table computing as it is
    got = scores.synflow(Conditioned(), input_shape=(4,))
    assert float(got["fc.weight"].sum()) > 0


class RenormedTokens(nn.Module):
    """An embedding with max_norm: its forward rewrites the rows it looks up, in place."""

    def __init__(self, bag=False):
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 16, max_norm=0.5, mode="mean") if bag else nn.Embedding(50, 16, max_norm=0.5)
        self.fc = nn.Linear(16 if bag else 160, 3)
        self.bag = bag

    def forward(self, x):
        return self.fc(self.emb(x) if self.bag else self.emb(x).flatten(1))

    def reinitialize(self):
        self.emb.reset_parameters()
        self.fc.reset_parameters()
        return self


@pytest.mark.parametrize("method", ["snip", "iterative_snip", "grasp", "synflow", "synflow_l2", "ntksap"])
@pytest.mark.parametrize("include", [None, nn.Embedding])
def test_a_max_norm_embedding_is_left_as_it_was(method, include):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = RenormedTokens()
    with torch.no_grad():
        net.emb.weight.mul_(3)  # rows well above max_norm, so any lookup would rewrite them
    data = (torch.randint(0, 50, (8, 10), generator=g), torch.randint(0, 3, (8,), generator=g))
    before = copy.deepcopy(net.state_dict())
    kw = {"data": data} if method in ("snip", "iterative_snip", "grasp") else {"input_shape": (10,)}
    if method == "ntksap":
        kw.update(batch_size=4)
    ntkfast.prune(net, method, 0.3, include=include, rounds=2 if method in ("iterative_snip", "synflow") else 1,
                  progress=False, on_empty_layer="ignore", **kw)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    # ntkfast.train is meant to change the model, and PyTorch's renormalisation is part of that
    samples = torch.utils.data.TensorDataset(*data)
    ntkfast.train(net, None, samples, samples, epochs=1, batch_size=8, progress=False)
    assert not torch.equal(net.emb.weight, before["emb.weight"])


def test_ntksap_sends_a_max_norm_embedding_to_the_reference_engine_by_name():
    torch.manual_seed(0)
    net = RenormedTokens()
    with pytest.warns(RuntimeWarning, match=r"the Embedding 'emb' has max_norm \(it rewrites its rows in place\); "
                                            r"using the reference engine"):
        ntkfast.prune(net, "ntksap", 0.3, input_shape=(10,), batch_size=4, progress=False)


def test_ntt_refuses_a_max_norm_embedding_by_name():
    g = torch.Generator().manual_seed(0)
    net = RenormedTokens()
    data = (torch.randint(0, 50, (8, 10), generator=g), torch.randint(0, 3, (8,), generator=g))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="model: the embedding 'emb' has max_norm"):
        ntkfast.prune(net, "ntt", 0.3, data=data, steps=2, batch_size=4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_max_norm_embedding_bag_is_left_as_it_was():
    g = torch.Generator().manual_seed(0)
    net = RenormedTokens(bag=True)
    with torch.no_grad():
        net.emb.weight.mul_(3)
    data = (torch.randint(0, 50, (8, 10), generator=g), torch.randint(0, 3, (8,), generator=g))
    before = net.emb.weight.detach().clone()
    ntkfast.prune(net, "snip", 0.3, data=data, progress=False)
    from ntkfast.training import evaluate

    evaluate(net, torch.utils.data.TensorDataset(*data))
    assert torch.equal(net.emb.weight, before)


class BagTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(30, 8, mode="mean")
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)))


def test_a_layer_without_second_derivatives_is_named_by_grasp_and_ntt():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = BagTokens()
    data = (torch.randint(0, 30, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"^model: grasp differentiates the network twice, and PyTorch has no second "
                                         r"derivative for an operation of this model \(.*embedding_bag.*\); leave "
                                         r"that layer's weights out of include="):
        ntkfast.prune(net, "grasp", 0.3, data=data, include=nn.EmbeddingBag, progress=False)
    with pytest.raises(ValueError, match=r"^model: transfer differentiates the network twice.*; freeze that layer's "
                                         r"weights \(requires_grad_\(False\)\)"):
        ntkfast.prune(net, "ntt", 0.3, data=data, steps=1, batch_size=4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # each way out works: GraSP without the layer in include=, NTT with its weights frozen
    assert "emb.weight" not in ntkfast.prune(net, "grasp", 0.3, data=data, progress=False)
    frozen = copy.deepcopy(net)
    frozen.emb.weight.requires_grad_(False)
    assert ntkfast.prune(frozen, "ntt", 0.3, data=data, steps=1, batch_size=4, progress=False)["fc.weight"].any()
    # a first-order method scores it
    assert ntkfast.prune(net, "snip", 0.3, data=data, include=nn.EmbeddingBag, progress=False)["emb.weight"].any()


def test_the_table_restore_skips_meta_tensors_and_restores_a_row_written_during_the_call():
    from ntkfast.core.concurrency import keeps_renormed_tables

    with torch.device("meta"):
        meta = RenormedTokens()
    with keeps_renormed_tables(meta):  # nothing to compare on the meta device, nothing raised
        pass
    net = RenormedTokens()
    before = net.emb.weight.detach().clone()
    with keeps_renormed_tables(net):
        with torch.no_grad():
            net.emb.weight[3] += 1  # a row written during the call, by the call
    assert torch.equal(net.emb.weight, before)
