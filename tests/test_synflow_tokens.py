"""SynFlow's Path Kernel variants on models that embed token ids. An embedding is a Linear layer
on one-hot vectors: fed every token at once (token_input="all") it is that layer fed all ones,
and SynFlow-Dist's mean input is the mean one-hot vector, each token's frequency per position.
Both are checked against the same network written with one-hot inputs and matrix products, fed
ones or the frequencies as a real input, in float64."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast import scores

V, T, D = 11, 4, 6


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.fc1, self.fc = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        return self.fc(torch.relu(self.fc1(h))).mean(1)


class Table(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, D))


class OneHot(nn.Module):
    """The same parameters, the lookups written as products with one-hot (or mean one-hot) rows."""

    def __init__(self, every_position: bool):
        super().__init__()
        self.emb, self.pos = Table(V), Table(T)
        self.fc1, self.fc = nn.Linear(D, D), nn.Linear(D, 3)
        self.every_position = every_position

    def forward(self, x):  # x: [n, T, V], real
        pos = (torch.ones(T, T, dtype=x.dtype) if self.every_position else torch.eye(T, dtype=x.dtype)) @ self.pos.weight
        h = x @ self.emb.weight + pos
        return self.fc(torch.relu(self.fc1(h))).mean(1)


def _pair(every_position):
    torch.manual_seed(0)
    net = Tok().double()
    oracle = OneHot(every_position).double()
    oracle.load_state_dict(net.state_dict())
    return net, oracle


def _masks(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < 0.7 for n, p in net.named_parameters() if p.dim() == 2}


@pytest.mark.parametrize("method", ["synflow", "synflow_l2", "synflow_l2_squared"])
def test_every_token_at_once_is_the_one_hot_layer_fed_ones(method):
    net, oracle = _pair(every_position=True)
    masks = _masks(net)
    before = copy.deepcopy(net.state_dict())
    got = getattr(scores, method)(net, masks, input_shape=(T,))
    want = getattr(scores, method)(oracle, masks, input_shape=(T, V))
    assert set(got) == set(want) and float(got["emb.weight"].sum()) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-300, msg=n)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("method", ["synflow_dist", "synflow_l2_dist"])
def test_dist_feeds_the_token_frequencies(method):
    net, oracle = _pair(every_position=False)
    masks = _masks(net, 2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V - 3, (40, T), generator=g)  # the last tokens never occur
    freq = torch.nn.functional.one_hot(ids, V).double().mean(0)  # [T, V]
    got = getattr(scores, method)(net, masks, data=(ids, torch.zeros(40, dtype=torch.long)))
    want = getattr(scores, method)(oracle, masks, input_mean=freq)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-300, msg=n)
    assert torch.all(got["emb.weight"][V - 3:] == 0) and float(got["emb.weight"][: V - 3].sum()) > 0


def test_iterative_rounds_reuse_the_fed_network():
    """prune() caches the path network across rounds; the masks equal one round at a time."""
    net, _ = _pair(every_position=True)
    a = ntkfast.prune(net, "synflow_l2", 0.2, rounds=3, input_shape=(T,), include=nn.Embedding, progress=False)
    masks = None
    for d in (0.2 ** (1 / 3), 0.2 ** (2 / 3), 0.2):
        masks = ntkfast.prune(net, "synflow_l2", d, masks=masks, input_shape=(T,), include=nn.Embedding,
                              progress=False)
    assert all(torch.equal(a[n], masks[n]) for n in a)


def test_refusals_name_the_layer_and_the_reason():
    net, _ = _pair(every_position=True)
    with pytest.raises(ValueError, match=r"Embedding 'emb' takes token ids \(token_input='refuse'\)"):
        scores.synflow_l2(net, input_shape=(T,), token_input="refuse")
    with pytest.raises(ValueError, match="^data: synflow_dist feeds the mean training input .for token ids, their frequencies"):
        scores.synflow_dist(net)
    with pytest.raises(ValueError, match="^input_mean: synflow_l2_dist of a model whose input is token ids"):
        scores.synflow_l2_dist(net, data=torch.zeros(3, T, dtype=torch.long), input_mean=torch.ones(T))
    with pytest.raises(ValueError, match="^data: token id 11 is outside the embedding's 11 rows"):
        scores.synflow_dist(net, data=torch.full((3, T), V, dtype=torch.long))

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.fc = nn.EmbeddingBag(V, D), nn.Linear(D, 3)

        def forward(self, x):
            return self.fc(self.bag(x))

    with pytest.raises(ValueError, match="^model: synflow_l2 feeds each embedding every token at once, but "
                                         "EmbeddingBag 'bag' sums a bag of ids"):
        scores.synflow_l2(Bag(), input_shape=(T,))


def test_the_path_kernel_of_a_token_model_is_that_of_its_one_hot_form():
    from ntkfast import pathkernel

    net, oracle = _pair(every_position=True)
    masks = _masks(net, 4)
    torch.testing.assert_close(pathkernel.trace(net, masks, input_shape=(T,), dtype=torch.float64),
                               pathkernel.trace(oracle, masks, input_shape=(T, V), dtype=torch.float64), rtol=1e-12,
                               atol=0)
    got, want = pathkernel.diagonal(net, masks, input_shape=(T,)), pathkernel.diagonal(oracle, masks, input_shape=(T, V))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=0, msg=n)
    torch.testing.assert_close(pathkernel.spectrum(net, masks, k=3, input_shape=(T,)),
                               pathkernel.spectrum(oracle, masks, k=3, input_shape=(T, V)), rtol=1e-9, atol=0)
    norms = pathkernel.path_norms(net, masks, input_shape=(T,))
    torch.testing.assert_close(norms.forward["fc1.weight"],
                               pathkernel.path_norms(oracle, masks, input_shape=(T, V)).forward["fc1.weight"])
    with pytest.raises(ValueError, match="^inputs: the model embeds token ids"):
        pathkernel.path_norms(net, masks, inputs=torch.ones(T))


class _Conditioned(nn.Module):
    """A real-valued input and an embedding looking up a buffer (a class token): not a token model."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(3, 5)
        self.fc1, self.fc = nn.Linear(5, 6), nn.Linear(6, 3)
        self.register_buffer("which", torch.tensor([1]))

    def forward(self, x):
        return self.fc(torch.relu(self.fc1(x.float() + self.table(self.which))))


@pytest.mark.parametrize("method", ["synflow", "synflow_l2", "synflow_l2_squared", "trace", "synflow_dist"])
def test_an_embedding_beside_a_real_input_leaves_the_all_ones_input(method):
    """The ones (or the mean input) reach fc1 as for any real-valued model; the table looks up its
    buffer as it is."""
    torch.manual_seed(0)
    net = _Conditioned()
    from ntkfast import pathkernel

    fn = pathkernel.trace if method == "trace" else getattr(scores, method)
    kw = {"data": torch.rand(8, 5, generator=torch.Generator().manual_seed(2)).double()} if method == "synflow_dist" \
        else {"input_shape": (5,)}
    got = fn(net, dtype=torch.float64, **kw)

    class Plain(nn.Module):  # the same network with the looked-up row as a constant
        def __init__(self):
            super().__init__()
            self.fc1, self.fc = net.fc1, net.fc
            self.row = nn.Parameter(net.table.weight[1:2].detach().clone(), requires_grad=False)

        def forward(self, x):
            return self.fc(torch.relu(self.fc1(x.float() + self.row)))

    want = fn(Plain(), dtype=torch.float64, **kw)
    if method == "trace":
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        return
    assert float(got["fc1.weight"].sum()) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=0, msg=n)
