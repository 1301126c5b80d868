"""NTK-SAP on models that look their input up in an embedding: token ids drawn uniformly from the
table in place of Gaussian noise (token_input="random"), seeded like Z, and equal to a run given
those same ids as inputs=."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import scores


class Tokens(nn.Module):
    def __init__(self, vocab=29):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.pos = nn.Embedding(6, 8)  # looks up positions the model makes, not its input
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.fc(self.enc(h).mean(1))

    def reinitialize(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()


def _seen_ids(net, **kw):
    """The ids each scoring pass fed the input embedding, and the scores."""
    seen = []
    h = net.emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        s = scores.ntksap(net, **kw)
    finally:
        h.remove()
    return seen, s


def test_ids_are_drawn_from_the_whole_table_fresh_for_every_piece():
    torch.manual_seed(0)
    net = Tokens().double()
    seen, s = _seen_ids(net, repeats=3, batch_size=16, input_shape=(6,), engine="sequential")
    drawn = [z for z in seen if z.shape == (16, 6)]
    assert len(drawn) >= 3
    ids = torch.cat([z.reshape(-1) for z in drawn])
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 29
    assert len(ids.unique()) > 20  # the whole table, not a corner of it
    assert not torch.equal(drawn[0], drawn[-1])
    assert all(bool(torch.isfinite(v).all()) for v in s.values()) and float(s["fc.weight"].sum()) > 0


def test_scores_equal_a_run_given_the_same_ids_as_inputs():
    torch.manual_seed(0)
    net = Tokens().double()
    before = copy.deepcopy(net.state_dict())
    seen, drawn = _seen_ids(net, repeats=2, batch_size=8, input_shape=(6,), engine="sequential", seed=5)
    pieces = []
    for z in seen:  # each piece's ids appear in both branches: keep one of each
        if z.shape == (8, 6) and not any(torch.equal(z, p) for p in pieces):
            pieces.append(z)
    assert len(pieces) == 2
    given = scores.ntksap(net, inputs=pieces, engine="sequential", seed=5)
    for n in drawn:
        torch.testing.assert_close(drawn[n], given[n], rtol=1e-12, atol=0)
    again = scores.ntksap(net, repeats=2, batch_size=8, input_shape=(6,), engine="sequential", seed=5)
    assert all(torch.equal(again[n], drawn[n]) for n in drawn)  # seeded
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


class Bag(nn.Module):
    """Token ids -> embedding -> Linear layers: every layer's rows are the samples."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(29, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc1(self.emb(x))).mean(1))

    def reinitialize(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()


@pytest.mark.parametrize("engine", ["grouped", "reference"])
@pytest.mark.parametrize("make", [Tokens, Bag])
def test_every_engine_scores_the_same_draws(engine, make):
    torch.manual_seed(0)
    net = make().double()
    kw = dict(repeats=3, batch_size=8, input_shape=(6,), seed=3)
    base = scores.ntksap(net, engine="sequential", **kw)
    if engine == "grouped" and make is Tokens:
        # its position table is looked up on arange(6), not on the samples: not split by group
        with pytest.raises(ValueError, match=r"engine='grouped': layer 'pos' \(Embedding\) is called on \(6,\)"):
            scores.ntksap(net, engine=engine, **kw)
        return
    other = scores.ntksap(net, engine=engine, **kw)
    for n in base:
        torch.testing.assert_close(other[n], base[n], rtol=1e-9, atol=1e-14)


def test_prune_runs_without_inputs():
    torch.manual_seed(0)
    masks = ntkfast.prune(Tokens(), "ntksap", 0.3, input_shape=(6,), batch_size=8, repeats=1, progress=False,
                          include=nn.Embedding, on_empty_layer="ignore")
    assert abs(masks.density - 0.3) < 0.01 and "emb.weight" in masks


def test_refuse_and_models_whose_ids_it_cannot_tell_are_named():
    net = Tokens()
    with pytest.raises(ValueError, match=r"^model: Embedding 'emb' takes token ids and token_input='refuse'"):
        scores.ntksap(net, repeats=1, batch_size=4, input_shape=(6,), token_input="refuse")
    with pytest.raises(ValueError, match=r"^token_input: expected one of"):
        scores.ntksap(net, repeats=1, batch_size=4, input_shape=(6,), token_input="gaussian")

    class Shifted(Tokens):  # the ids are transformed before the lookup
        def forward(self, x):
            return super().forward((x + 1) % 29)

    with pytest.raises(ValueError, match=r"no embedding looks up the model's input itself"):
        scores.ntksap(Shifted(), repeats=1, batch_size=4, input_shape=(6,))

    class Broken(Tokens):  # fails on any input: the message carries the forward's own error
        def forward(self, x):
            raise RuntimeError("a bug of the model's own")

    with pytest.raises(ValueError, match=r"the forward on ids failed with RuntimeError: a bug of the model's own"):
        scores.ntksap(Broken(), repeats=1, batch_size=4, input_shape=(6,))


def test_an_embedding_beside_a_real_input_keeps_the_gaussian_draw():
    class Conditioned(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(1, 5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x + self.table(torch.zeros(1, dtype=torch.long)))

        def reinitialize(self):
            self.fc.reset_parameters()

    s = scores.ntksap(Conditioned().double(), repeats=1, batch_size=4, input_shape=(5,))
    assert float(s["fc.weight"].sum()) > 0
    # its input is not token ids, so there is nothing for token_input='refuse' to refuse
    again = scores.ntksap(Conditioned().double(), repeats=1, batch_size=4, input_shape=(5,), token_input="refuse")
    assert set(again) == set(s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_token_draws_through_the_grouped_engine_match_the_reference():
    torch.manual_seed(0)
    net = Bag().double().cuda()
    kw = dict(repeats=3, batch_size=8, input_shape=(6,), seed=3)
    ref = scores.ntksap(net, engine="reference", **kw)
    got = scores.ntksap(net, **kw)  # auto: grouped (CUDA graph) on the GPU
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-14)
