"""Neural Tangent Transfer beyond Linear and Conv weights: models that embed token ids (the NTK is
taken with respect to the weights only, so ids are inputs like any other) and weights include=
adds (embedding tables, attention's fused projection, recurrent weights). The loss and its
gradient against oracles in float64, and whole transfers through prune()."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import ntkfast
from ntkfast.masks import Masks, prunable_parameters
from ntkfast.ntt import reference as ref
from ntkfast.ntt import teacher_targets, transfer, transfer_loss


class Tokens(nn.Module):
    """ids -> embedding (+ a learned position table) -> attention -> per-position head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(23, 8)
        self.pos = nn.Parameter(torch.randn(5, 8) * 0.1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(torch.tanh(h)).mean(1)


INCLUDE = [nn.Embedding, nn.MultiheadAttention]


def _setup(batch=6, seed=0):
    torch.manual_seed(seed)
    teacher = Tokens().double().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 23, (batch, 5), generator=torch.Generator().manual_seed(seed + 1))
    return teacher, student, x


@pytest.mark.parametrize("kernel", ["sparse", "authors_code"])
def test_loss_and_gradient_on_token_ids_match_torch_func(kernel):
    teacher, student, x = _setup()
    names = list(prunable_parameters(student, include=INCLUDE))
    assert "emb.weight" in names and "attn.in_proj_weight" in names
    g = torch.Generator().manual_seed(3)
    masks = Masks(OrderedDict((n, torch.rand(student.get_parameter(n).shape, generator=g) < 0.5) for n in names))
    t_out, t_ntk = teacher_targets(teacher, x)
    r_out, r_ntk = ref.teacher_targets(teacher, x)
    torch.testing.assert_close(t_ntk, r_ntk, rtol=1e-10, atol=1e-12)
    kw = dict(density=0.5, lambda_ker=0.7, lambda_l2=0.05, kernel=kernel)
    loss, parts = transfer_loss(student, masks, x, t_out, t_ntk, **kw)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    with sdpa_kernel([SDPBackend.MATH]):  # the oracle differentiates attention twice too
        ref_loss, ref_grads = ref.loss_and_grad(student, masks, x, t_out, t_ntk, **kw)
    assert parts["kernel_distance"].item() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=0)
    for (name, _), gr in zip(student.named_parameters(), grads):
        torch.testing.assert_close(gr, ref_grads[name], rtol=1e-7, atol=1e-12, msg=name)
        if name == "emb.weight":  # rows of tokens absent from the batch get the L2 term's gradient only
            seen = torch.zeros(23, dtype=torch.bool)
            seen[x.unique()] = True
            w, m = student.emb.weight.detach(), masks[name].double()
            l2 = 2 * (kw["lambda_l2"] / kw["density"]) * w * m
            assert not torch.allclose(gr[seen], l2[seen])
            torch.testing.assert_close(gr[~seen], l2[~seen], rtol=1e-12, atol=0)


def test_prune_ntt_on_token_ids_masks_the_included_weights_and_leaves_the_model():
    _, net, x = _setup(batch=24)
    net = net.float()
    before = copy.deepcopy(net.state_dict())
    masks = ntkfast.prune(net, "ntt", 0.3, data=x, steps=4, batch_size=8, validation=0, progress=False,
                          include=INCLUDE)
    assert masks.metadata["include"] == ["emb.weight", "attn.in_proj_weight"]
    assert set(masks) == {"emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}
    assert abs(masks.density - 0.3) < 0.01
    learned = masks.learned_weights
    assert torch.all(learned["emb.weight"][~masks["emb.weight"]] == 0)
    assert not torch.equal(learned["emb.weight"], before["emb.weight"] * masks["emb.weight"])  # it learned
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_transfer_include_is_checked_like_prune():
    _, net, x = _setup(batch=24)
    with pytest.raises(ValueError, match="include"):
        transfer(net.float(), 0.3, x, steps=1, batch_size=8, validation=0, progress=False, include="nothing_here")


def test_real_valued_models_still_refuse_integer_inputs():
    net = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="^data: expected a floating-point input"):
        transfer(net, 0.5, torch.randint(0, 4, (16, 5)), steps=1, batch_size=8, validation=0, progress=False)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def _brute_ntk(model, values, x1, x2):
    """Per sample, per output, one autograd pass: the Jacobian rows, contracted."""
    names = list(values)

    def rows(x):
        out = []
        for i in range(x.shape[0]):
            f = torch.func.functional_call(model, values, (x[i:i + 1],))[0]
            for k in range(f.shape[0]):
                g = torch.autograd.grad(f[k], [values[n] for n in names], retain_graph=True)
                out.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(out).reshape(x.shape[0], f.shape[0], -1)

    return torch.einsum("iaf,jbf->ijab", rows(x1), rows(x2))


def test_recurrent_weights_loss_and_gradient_against_brute_force():
    """nn.LSTM's fused kernel has no vmap rule under a second derivative: the engine's row-by-row
    fallback. The loss against a per-output autograd kernel; its gradient against central finite
    differences along random directions."""
    torch.manual_seed(0)
    teacher = Recurrent().double().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = list(prunable_parameters(student, include=nn.LSTM))
    assert names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"]
    g = torch.Generator().manual_seed(3)
    masks = Masks(OrderedDict((n, torch.rand(student.get_parameter(n).shape, generator=g) < 0.5) for n in names))
    kw = dict(density=0.5, lambda_ker=0.7, lambda_l2=0.05)
    t_out, t_ntk = teacher_targets(teacher, x)
    tv = {n: p.detach().clone().requires_grad_(True) for n, p in teacher.named_parameters()}
    torch.testing.assert_close(t_ntk, _brute_ntk(teacher, tv, x[:3], x[3:]), rtol=1e-10, atol=1e-12)

    loss, parts = transfer_loss(student, masks, x, t_out, t_ntk, **kw)
    # the kernel term by brute force: the sparse NTK differentiates W through W * m

    def sparse_ntk(params):
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        rows = []
        for xs in (x[:3], x[3:]):
            r = []
            for i in range(xs.shape[0]):
                vals = {n: leaves[n] * masks[n].double() if n in masks else leaves[n] for n in leaves}
                f = torch.func.functional_call(student, vals, (xs[i:i + 1],))[0]
                for k in range(f.shape[0]):
                    gr = torch.autograd.grad(f[k], list(leaves.values()), retain_graph=True)
                    r.append(torch.cat([t.reshape(-1) for t in gr]))
            rows.append(torch.stack(r).reshape(xs.shape[0], 2, -1))
        return torch.einsum("iaf,jbf->ijab", *rows)

    def full_loss(params):
        ker = (sparse_ntk(params) - t_ntk).square().sum() / (3 * 3 * 2 * 2)
        vals = {n: params[n] * masks[n].double() if n in masks else params[n] for n in params}
        out = torch.func.functional_call(student, vals, (x,))
        target = (out - t_out).square().sum() / (6 * 2)
        l2 = sum((params[n] * masks[n].double()).square().sum() for n in masks)
        return kw["lambda_ker"] * ker + target + kw["lambda_l2"] / kw["density"] * l2

    base = {n: p.detach() for n, p in student.named_parameters()}
    torch.testing.assert_close(loss.detach(), full_loss(base), rtol=1e-10, atol=0)
    grads = dict(zip([n for n, _ in student.named_parameters()], torch.autograd.grad(loss, list(student.parameters()))))
    assert grads["rnn.weight_hh_l0"].abs().sum() > 0
    h = 1e-5
    for trial in range(3):
        gen = torch.Generator().manual_seed(10 + trial)
        v = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in base.items()}
        plus = full_loss({n: base[n] + h * v[n] for n in base})
        minus = full_loss({n: base[n] - h * v[n] for n in base})
        fd = (plus - minus) / (2 * h)
        ours = sum((grads[n] * v[n]).sum() for n in base)
        torch.testing.assert_close(ours, fd, rtol=1e-6, atol=1e-9)
    # float32 takes oneDNN's fused LSTM kernel, whose second derivative vmap cannot batch: the same
    # gradient, through the engine's row-by-row fallback
    s32, t32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
    o32, k32 = teacher_targets(t32, x.float())
    loss32, _ = transfer_loss(s32, masks, x.float(), o32, k32, **kw)
    g32 = torch.autograd.grad(loss32, list(s32.parameters()))
    for (n, _), gr in zip(s32.named_parameters(), g32):
        torch.testing.assert_close(gr.double(), grads[n], rtol=2e-3, atol=2e-5, msg=n)
