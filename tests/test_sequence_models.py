"""The zoo's ViT and LSTM: each computes what PyTorch's own modules compute (float64), and every
registered method prunes them."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntkfast
from ntkfast import methods, models


def test_lstm_is_torchs_lstm():
    torch.manual_seed(0)
    ours = models.lstm(input_shape=(1, 6, 5), num_classes=3, hidden=7, layers=2).double()
    ref = nn.LSTM(5, 7, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for i in range(2):
            getattr(ref, f"weight_ih_l{i}").copy_(ours.ih[i].weight)
            getattr(ref, f"weight_hh_l{i}").copy_(ours.hh[i].weight)
            getattr(ref, f"bias_ih_l{i}").copy_(ours.ih[i].bias)
            getattr(ref, f"bias_hh_l{i}").zero_()
    x = torch.randn(4, 1, 6, 5, dtype=torch.float64)
    want = ours.fc(ref(x.reshape(4, 6, 5))[0][:, -1])
    torch.testing.assert_close(ours(x), want, rtol=1e-12, atol=1e-12)


def test_vit_attention_is_torchs_attention():
    torch.manual_seed(0)
    net = models.vit(input_shape=(3, 8, 8), num_classes=5, patch=2, dim=12, depth=1, heads=3, mlp=8).double()
    attn = net.blocks[0].attn
    x = torch.randn(2, 17, 12, dtype=torch.float64)
    q, k, v = (f(x).reshape(2, 17, 3, 4).transpose(1, 2) for f in (attn.q, attn.k, attn.v))
    want = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 12))
    torch.testing.assert_close(attn(x), want, rtol=1e-12, atol=1e-12)


def test_vit_patches_are_the_images_tiles():
    """Patch (i, j) of the embedding's input is pixel block [i*p:(i+1)*p, j*p:(j+1)*p] of every channel."""
    torch.manual_seed(0)
    net = models.vit(input_shape=(2, 4, 6), num_classes=3, patch=2, dim=8, depth=1, heads=2, mlp=4).double()
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64)
    seen = []
    net.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    net(x)
    tile = x[0, :, 2:4, 4:6].reshape(-1)  # row 1, column 2 of a 2x3 grid: token 5
    torch.testing.assert_close(seen[0][0, 5], tile)


def test_initialisation_and_reinitialize():
    torch.manual_seed(0)
    net = models.vit()
    assert abs(float(net.blocks[0].attn.q.weight.std()) - 0.02 * 0.8796) < 2e-3  # truncated at 2 sigma
    assert float(net.blocks[0].attn.q.weight.abs().max()) <= 0.04 + 1e-7
    before = net.blocks[0].fc1.weight.clone()
    net.reinitialize()
    assert not torch.equal(before, net.blocks[0].fc1.weight) and not net.cls_token.any()
    rnn = models.lstm()
    bound = 1 / math.sqrt(128)
    assert float(rnn.hh[0].weight.abs().max()) <= bound and float(rnn.ih[0].weight.abs().max()) > 0.9 * bound


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="^patch: 5 does not divide"):
        models.vit(patch=5)
    with pytest.raises(ValueError, match="^heads: 3 does not divide dim=128"):
        models.vit(heads=3)
    with pytest.raises(ValueError, match="hidden"):
        models.lstm(hidden=0)


def _small(name):
    torch.manual_seed(0)
    if name == "vit":
        return models.vit(input_shape=(3, 8, 8), num_classes=4, patch=4, dim=8, depth=1, heads=2, mlp=8)
    return models.lstm(input_shape=(1, 5, 6), num_classes=4, hidden=6)


@pytest.mark.parametrize("name", ["vit", "lstm"])
@pytest.mark.parametrize("method", sorted(m for m in methods.available() if not m.startswith("_")))
def test_every_method_prunes_them(name, method):
    net = _small(name)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, *net.input_shape, generator=g)  # non-negative: SynFlow-Dist feeds the mean input
    y = torch.randint(0, 4, (16,), generator=g)
    before = copy.deepcopy(net.state_dict())
    opts = {"ntksap": {"repeats": 1, "batch_size": 4}, "ntt": {"steps": 2, "batch_size": 8, "validation": 0}}
    data = x if method == "ntt" else (x, y)
    masks = ntkfast.prune(net, method, 0.3, data=data, rounds=2 if method in ("synflow", "ntksap") else 1,
                          progress=False, on_empty_layer="ignore", **opts.get(method, {}))
    assert abs(masks.density - 0.3) < 0.02
    names = set(masks)
    if name == "vit":  # q, k and v are layers of their own
        assert {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight"} <= names
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
