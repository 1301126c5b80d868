"""Neural Tangent Transfer: the loss and its gradient against a torch.func implementation of the
same formula, the mask schedule, the returned weights, and that a transfer on MNIST reduces the
kernel distance."""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import ntkfast
from ntkfast.ntt import reference as ref
from ntkfast.masks import Masks, prunable_parameters
from ntkfast.ntt import teacher_targets, transfer, transfer_loss
from testing import internal

DATA = Path(os.environ.get("NTKFAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 3 * 3, 3))


def _bn():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
                        nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # eval-mode BatchNorm with statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net.eval()


NETS = {"mlp": (_mlp, (12,)), "cnn": (_cnn, (2, 7, 7)), "bn": (_bn, (2, 7, 7))}


def _random_masks(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    return Masks(OrderedDict((n, torch.rand(p.shape, generator=g) < density)
                             for n, p in prunable_parameters(model).items()))


def _setup(net, seed=0, batch=6):
    make, shape = NETS[net]
    torch.manual_seed(seed)
    teacher = make().double()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # the student has moved away from the teacher, as mid-transfer
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(batch, *shape, dtype=torch.float64)
    return teacher, student, x


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("kernel", ["sparse", "authors_code"])
@pytest.mark.parametrize("batch", [6, 7])
def test_loss_and_gradient_match_torch_func(net, kernel, batch):
    teacher, student, x = _setup(net, seed=batch, batch=batch)
    masks = _random_masks(student, 0.4, seed=batch)
    t_out, t_ntk = teacher_targets(teacher, x)
    r_out, r_ntk = ref.teacher_targets(teacher, x)  # the teacher's side, independently
    assert t_ntk.shape == (batch // 2, batch - batch // 2, 3, 3)
    torch.testing.assert_close(t_out, r_out, rtol=1e-12, atol=0)
    torch.testing.assert_close(t_ntk, r_ntk, rtol=1e-10, atol=1e-12)
    kw = dict(density=0.4, lambda_ker=0.7, lambda_l2=0.05, kernel=kernel)
    loss, parts = transfer_loss(student, masks, x, t_out, t_ntk, **kw)
    params = [p for p in student.parameters()]
    grads = torch.autograd.grad(loss, params)
    ref_loss, ref_grads = ref.loss_and_grad(student, masks, x, t_out, t_ntk, **kw)
    _, ref_parts = ref.loss(student, OrderedDict(student.named_parameters()), masks, x, t_out, t_ntk, **kw)
    assert parts["kernel_distance"].item() > 0 and parts["target_distance"].item() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=0)
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-8, atol=0)
    for (name, _), g in zip(student.named_parameters(), grads):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-12, msg=name)
        if name in masks:  # the forward uses W * m: pruned entries get no gradient
            assert torch.all(g[~masks[name]] == 0), name


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("loop", [False, True])
def test_both_cotangent_paths_give_the_torch_func_gradient(net, loop, monkeypatch):
    # The capture picks the vmapped backward or a loop over outputs by the model's layers (for
    # speed only); either must be exact on every kind of network, whichever one it would pick.
    _capture = internal("ntk_capture")
    monkeypatch.setattr(_capture, "_has_convolution", lambda model: loop)
    teacher, student, x = _setup(net, seed=3, batch=6)
    masks = _random_masks(student, 0.5, seed=3)
    t_out, t_ntk = teacher_targets(teacher, x)
    kw = dict(density=0.5, lambda_ker=0.7, lambda_l2=0.05, kernel="sparse")
    loss, _ = transfer_loss(student, masks, x, t_out, t_ntk, **kw)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref_loss, ref_grads = ref.loss_and_grad(student, masks, x, t_out, t_ntk, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=0)
    for (name, _), g in zip(student.named_parameters(), grads):
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("net, batched", [("mlp", True), ("cnn", False), ("bn", False)])
def test_the_transfer_loss_loops_over_outputs_only_for_convolutional_students(net, batched, monkeypatch):
    _capture = internal("ntk_capture")
    calls = []
    real = _capture._batched_backward
    monkeypatch.setattr(_capture, "_batched_backward", lambda *a: calls.append(1) or real(*a))
    teacher, student, x = _setup(net, batch=6)
    t_out, t_ntk = teacher_targets(teacher, x)
    calls.clear()  # the teacher's kernel has no create_graph and may take either path
    transfer_loss(student, _random_masks(student, 0.5, seed=0), x, t_out, t_ntk, density=0.5,
                  lambda_ker=0.7, lambda_l2=0.05)
    assert bool(calls) is batched


def test_the_two_kernels_differ_where_the_authors_code_counts_pruned_entries():
    teacher, student, x = _setup("mlp")
    masks = _random_masks(student, 0.3, seed=1)
    t_out, t_ntk = teacher_targets(teacher, x)
    a, pa = transfer_loss(student, masks, x, t_out, t_ntk, density=0.3, kernel="sparse")
    b, pb = transfer_loss(student, masks, x, t_out, t_ntk, density=0.3, kernel="authors_code")
    assert pa["target_distance"] == pb["target_distance"] and pa["l2"] == pb["l2"]
    assert not torch.isclose(pa["kernel_distance"], pb["kernel_distance"])
    ones = Masks({n: torch.ones_like(m) for n, m in masks.items()})
    c, _ = transfer_loss(student, ones, x, t_out, t_ntk, density=1.0, kernel="sparse")
    d, _ = transfer_loss(student, ones, x, t_out, t_ntk, density=1.0, kernel="authors_code")
    torch.testing.assert_close(c, d, rtol=1e-12, atol=0)


def test_loss_is_zero_kernel_and_target_for_the_dense_teacher_itself():
    teacher, _, x = _setup("cnn")
    ones = Masks({n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(teacher).items()})
    t_out, t_ntk = teacher_targets(teacher, x)
    student = copy.deepcopy(teacher)
    _, parts = transfer_loss(student, ones, x, t_out, t_ntk, density=1.0)
    assert parts["kernel_distance"].item() < 1e-24 and parts["target_distance"].item() < 1e-24


# -- the transfer loop ----------------------------------------------------------------------------

def _data(n=80, shape=(12,), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_transfer_returns_masks_and_zeroed_weights_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    model.train()
    res = transfer(model, 0.25, _data(), steps=12, batch_size=8, mask_update_every=5, progress=False,
                   validation=8, log_every=4)
    masks, state = res
    assert res.masks is masks and res.state_dict is state
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(state) == list(model.state_dict())
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == state[name].shape
        assert int(m.sum()) == round(0.25 * m.numel())  # layerwise, exact count
        assert torch.all(state[name][~m] == 0)
        assert not torch.equal(state[name][m], before[name][m])  # learned
    assert masks.metadata["method"] == "ntt" and masks.metadata["steps"] == 12
    h = res.history
    assert h["step"] == [0, 4, 8, 12]
    assert all(len(v) == 4 for v in h.values())
    fresh = _mlp()
    fresh.load_state_dict(state)  # the weights load into the user's architecture


def test_free_heap_pages_are_released_at_every_log(monkeypatch):
    T = internal("transfer")
    T._release_free_memory()  # the real one: a no-op or malloc_trim, never an error
    calls = []
    monkeypatch.setattr(T, "_release_free_memory", lambda: calls.append(1))
    torch.manual_seed(0)
    transfer(_mlp(), 0.25, _data(), steps=10, batch_size=8, progress=False, validation=8, log_every=4)
    assert len(calls) == 3  # steps 4, 8 and the last


def test_mask_updates_follow_the_schedule_and_freeze_at_the_end():
    torch.manual_seed(1)
    model = _mlp()
    names = list(prunable_parameters(model))
    seen, expected = [], {}

    def watch(info):
        seen.append((info["step"], info["masks_updated"], Masks(info["masks"]).clone()))
        if info["masks_updated"]:  # what the re-selection must pick: top |W| of the dense student
            w = dict(info["student"].named_parameters())
            expected[info["step"]] = Masks(ntkfast.masks.threshold({n: w[n].detach().abs() for n in names}, 0.3,
                                                                   scope="layerwise"))

    res = transfer(model, 0.3, _data(), steps=23, batch_size=8, mask_update_every=5, progress=False, validation=0,
                   lr=5e-2, callback=watch)
    # every 5 steps, but none in the last 5 (steps < 23 - 5)
    assert [s for s, u, _ in seen if u] == [5, 10, 15]
    assert [s for s, _, _ in seen] == list(range(1, 24))
    masks_at = {s: m for s, _, m in seen}
    for s in (5, 10, 15):
        assert masks_at[s + 1] == expected[s]  # the next step trains with the re-selected mask
        assert masks_at[s] != expected[s]
    for s in range(16, 24):
        assert masks_at[s] == expected[15]  # frozen for the last steps
    assert res.masks == expected[15]
    init = ntkfast.masks.threshold({n: p.detach().abs() for n, p in prunable_parameters(model).items()}, 0.3,
                                   scope="layerwise")
    for n in names:  # weights pruned from the start and never kept never moved (zero gradient, no momentum)
        never = ~init[n]
        for s in (5, 10, 15):
            never &= ~expected[s][n]
        assert never.any()
        assert torch.equal(res.state_dict[n][never], torch.zeros(int(never.sum())))
        assert not res.masks[n][never].any()


def test_mask_reselection_lets_pruned_weights_return():
    torch.manual_seed(2)
    model = _mlp()
    res_frozen = transfer(model, 0.3, _data(), steps=30, batch_size=8, mask_update_every=None, progress=False,
                          validation=0, lr=5e-2)
    res_moving = transfer(model, 0.3, _data(), steps=30, batch_size=8, mask_update_every=5, progress=False,
                          validation=0, lr=5e-2)
    init = Masks(ntkfast.masks.threshold({n: p.detach().abs() for n, p in prunable_parameters(model).items()}, 0.3,
                                         scope="layerwise"))
    assert res_frozen.masks == init  # never re-selected: the teacher's magnitude mask
    assert res_moving.masks != init  # re-selected by the student's magnitudes
    changed = sum(int((res_moving.masks[n] & ~init[n]).sum()) for n in init)
    assert changed > 0


def test_global_scope_and_logit_snip_initial_mask():
    torch.manual_seed(3)
    model = _mlp()
    res = transfer(model, 0.2, _data(), steps=1, batch_size=8, scope="global", init_mask="logit_snip",
                   mask_update_every=None, progress=False, validation=0, lr=1e-12)
    x = _data()  # logit SNIP scores the first 128 training inputs (here: all 80, none held out)
    out = model(x)
    names = list(prunable_parameters(model))
    params = dict(model.named_parameters())
    g = torch.autograd.grad(out.square().sum(), [params[n] for n in names])
    scores = {n: (params[n].detach() * gi).abs() for n, gi in zip(names, g)}
    expect = Masks(ntkfast.masks.threshold(scores, 0.2, scope="global"))
    assert res.masks == expect
    assert res.masks.kept == round(0.2 * res.masks.numel)


def test_epochs_count_batches_like_the_authors():
    # 80 inputs, 8 held out: 72 to train on in batches of 16 -> 4 full + 1 of 8 = 5 steps per epoch
    res = transfer(_mlp(), 0.5, _data(), epochs=2, batch_size=16, progress=False, validation=8, log_every=1000)
    assert res.masks.metadata["steps"] == 10 and res.history["step"] == [0, 10]


def test_unlabelled_inputs_in_many_shapes_give_the_same_result():
    torch.manual_seed(4)
    model = _mlp()
    x = _data(40)
    y = torch.randint(0, 3, (40,))
    kw = dict(steps=4, batch_size=8, progress=False, validation=8, seed=3)
    base = transfer(model, 0.5, x, **kw)
    for data in [(x, y), torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x),
                 [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)], [x[:25], x[25:]]]:
        res = transfer(model, 0.5, data, **kw)
        assert res.masks == base.masks
        for k in base.state_dict:
            torch.testing.assert_close(res.state_dict[k], base.state_dict[k], rtol=0, atol=0)
        assert res.history == base.history or res.history["loss"] == base.history["loss"]


def test_callback_can_stop_early():
    res = transfer(_mlp(), 0.5, _data(), steps=50, batch_size=8, progress=False, validation=8,
                   callback=lambda info: info["step"] < 3)
    assert res.masks.metadata["steps"] == 3 and res.history["step"][-1] == 3


class _Interrupt(Exception):
    pass


def _same_result(a, b):
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.history.keys() == b.history.keys()
    for k in a.history:
        if k != "seconds":  # the first train_loss is nan: nothing trained before step 0
            assert torch.allclose(torch.tensor(a.history[k], dtype=torch.float64),
                                  torch.tensor(b.history[k], dtype=torch.float64), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("stop_at, every", [(13, 5), (10, 5), (3, 4), (19, 3)])
def test_an_interrupted_transfer_resumes_from_its_checkpoint_to_the_same_result(tmp_path, stop_at, every):
    # 10 batches per epoch: the resumed runs restart mid-epoch, at an epoch boundary and
    # across a mask re-selection (every 6 steps), from a checkpoint some steps back
    kw = dict(steps=23, batch_size=8, progress=False, validation=8, log_every=4, mask_update_every=6, seed=3)
    model = _cnn()
    data = torch.randn(88, 2, 7, 7)
    whole = transfer(model, 0.3, data, **kw)
    path = tmp_path / "ntt.ckpt"

    def interrupt(info):
        if info["step"] == stop_at:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        transfer(model, 0.3, data, checkpoint=path, checkpoint_every=every, callback=interrupt, **kw)
    # written after the step's callback: the interrupted step itself is not saved
    last_saved = (stop_at - 1) // every * every
    if last_saved:
        assert torch.load(path, weights_only=False)["step"] == last_saved
    else:
        assert not path.exists()  # interrupted before the first checkpoint: starts afresh
    seen = []
    resumed = transfer(model, 0.3, data, checkpoint=path, checkpoint_every=every,
                       callback=lambda info: seen.append(info["step"]), **kw)
    assert seen == list(range(last_saved + 1, 24))
    _same_result(whole, resumed)
    # a finished checkpoint gives the result again without a step
    again = transfer(model, 0.3, data, checkpoint=path, callback=lambda info: seen.append(-1), **kw)
    assert -1 not in seen
    _same_result(whole, again)


def test_a_checkpoint_of_another_transfer_is_refused_by_name(tmp_path):
    kw = dict(steps=4, batch_size=8, progress=False, validation=8)
    model, data = _mlp(), _data()
    path = tmp_path / "ntt.ckpt"
    transfer(model, 0.5, data, checkpoint=path, **kw)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"checkpoint: .*lr \(saved 0.0005, now 0.001\)"):
        transfer(model, 0.5, data, checkpoint=path, lr=1e-3, **kw)
    with pytest.raises(ValueError, match="checkpoint: .*the teacher's weights"):
        transfer(_mlp(), 0.5, data, checkpoint=path, **kw)
    with pytest.raises(ValueError, match="checkpoint: .*the training or validation data"):
        transfer(model, 0.5, data + 1, checkpoint=path, **kw)
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint: .*not a readable"):
        transfer(model, 0.5, data, checkpoint=bad, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(density="a"), "density"),
    (dict(steps=0), "steps"), (dict(steps=1.5), "steps"), (dict(steps=None, epochs=0), "epochs"),
    (dict(steps=3, epochs=1), "steps, epochs"), (dict(batch_size=1), "batch_size"),
    (dict(lr=0), "lr"), (dict(lambda_ker=-1), "lambda_ker"), (dict(init_mask="snip"), "init_mask"),
    (dict(scope="net"), "scope"), (dict(kernel="x"), "kernel"), (dict(validation=79), "validation"),
    (dict(validation=1), "validation"), (dict(validation=torch.zeros(4, 12, dtype=torch.long)), "validation"),
    (dict(validation=torch.randn(4, 5)), "validation"), (dict(data="abc"), "data"),
    (dict(data=torch.zeros(5, 12, dtype=torch.long)), "data"), (dict(data=torch.randn(40, 7)), "data"),
    (dict(mask_update_every=0), "mask_update_every"), (dict(log_every=0), "log_every"),
    (dict(callback=3), "callback"), (dict(seed=1.5), "seed"), (dict(checkpoint=3), "checkpoint"),
    (dict(checkpoint_every=0), "checkpoint_every"),
])
def test_bad_arguments_name_the_argument_and_leave_the_model_alone(kwargs, match):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    args = dict(density=0.5, data=_data(), steps=2, batch_size=8, progress=False)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        transfer(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_models_are_refused_by_name():
    with pytest.raises(TypeError, match="model"):
        transfer("not a model", 0.5, _data(), steps=1)
    with pytest.raises(ValueError, match="model: no prunable"):
        transfer(nn.Sequential(nn.Flatten(), nn.LayerNorm(12)), 0.5, _data(), steps=1)
    hooked = _mlp()
    import torch.nn.utils.prune as tprune

    tprune.random_unstructured(hooked[1], "weight", 0.5)
    with pytest.raises(ValueError, match="model: has torch.nn.utils.prune"):
        transfer(hooked, 0.5, _data(), steps=1)
    frozen = _mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="model: no parameter requires grad"):
        transfer(frozen, 0.5, _data(), steps=1)


def test_frozen_parameters_stay_frozen_and_leave_both_kernels():
    torch.manual_seed(6)
    model = _mlp()
    model[3].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    res = transfer(model, 0.5, _data(), steps=5, batch_size=8, progress=False, validation=8, lr=1e-2)
    m = res.masks["3.weight"]
    assert torch.equal(res.state_dict["3.weight"], model[3].weight.detach() * m)  # masked, not learned
    assert torch.equal(res.state_dict["3.bias"], model[3].bias.detach())
    assert not torch.equal(res.state_dict["1.bias"], model[1].bias.detach())
    with pytest.raises(ValueError, match="kernel"):
        transfer(model, 0.5, _data(), steps=1, kernel="authors_code")
    # logit SNIP scores frozen weights too
    res = transfer(model, 0.5, _data(), steps=1, batch_size=8, progress=False, init_mask="logit_snip",
                   mask_update_every=None, lr=1e-12)
    assert int(res.masks["3.weight"].sum()) == round(0.5 * res.masks["3.weight"].numel())


def test_the_result_pickles_with_its_history():
    res = transfer(_mlp(), 0.5, _data(), steps=3, batch_size=8, progress=False, validation=8)
    again = copy.deepcopy(res)
    assert again.masks == res.masks and again.history == res.history
    assert all(torch.equal(again.state_dict[k], v) for k, v in res.state_dict.items())


def test_prune_ntt_is_the_transfer_masks_and_weights():
    # prune(model, "ntt", d, seed=s) runs transfer(model, d, seed=s) once and hands back its mask and
    # its learned weights whole (ntkfast.methods: returns="masks"), with nothing re-thresholded
    torch.manual_seed(5)
    model = _mlp()
    x = _data()
    y = torch.randint(0, 3, (80,))
    masks = ntkfast.prune(model, "ntt", 0.3, data=(x, y), scope="layerwise", progress=False, steps=6,
                          batch_size=8, seed=3)
    direct = transfer(model, 0.3, (x, y), steps=6, batch_size=8, progress=False, seed=3)
    assert masks == direct.masks
    assert masks.learned_weights.keys() == direct.state_dict.keys()
    assert all(torch.equal(masks.learned_weights[n], direct.state_dict[n]) for n in direct.state_dict)
    assert masks.clone().learned_weights is not masks.learned_weights
    # a whole dataset reaches the transfer as it is; global scope is prune's default
    ds = torch.utils.data.TensorDataset(x, y)
    masks = ntkfast.prune(model, "ntt", 0.3, data=ds, progress=False, steps=4, batch_size=8)
    direct = transfer(model, 0.3, ds, steps=4, batch_size=8, scope="global", progress=False, seed=0)
    assert masks == direct.masks and masks.kept == round(0.3 * masks.numel)
    # score-based methods learn nothing
    assert ntkfast.prune(model, "magnitude", 0.3, progress=False).learned_weights is None
    with pytest.raises(ValueError, match="rounds: method 'ntt' runs once"):
        ntkfast.prune(model, "ntt", 0.3, data=ds, rounds=2, progress=False, steps=2, batch_size=8)
    with pytest.raises(ValueError, match="masks: NTT learns"):  # a model already pruned by hooks
        from ntkfast.ntt.method import ntt

        half = {n: torch.rand(p.shape) < 0.5 for n, p in prunable_parameters(model).items()}
        ntt(model, half, data=ds, target_density=0.3, steps=1, batch_size=8)
    with pytest.raises(ValueError, match="target_density: set by prune"):
        ntkfast.prune(model, "ntt", 0.3, data=ds, progress=False, target_density=0.5)


@pytest.mark.skipif(not (DATA / "mnist").exists(), reason="../shared/data/mnist not present")
def test_a_few_hundred_steps_reduce_the_kernel_distance_on_mnist():
    from ntkfast import data as D
    from ntkfast import models

    ds = D.load_mnist(DATA / "mnist", train=True).subset(8000)
    torch.manual_seed(0)
    model = models.get("lenet300_100")
    res = transfer(model, 0.05, ds, steps=300, progress=False, log_every=100)
    ker = res.history["kernel_distance"]
    target = res.history["target_distance"]
    assert res.history["step"] == [0, 100, 200, 300]
    assert ker[-1] < 0.7 * ker[0], ker
    assert target[-1] < target[0], target


# -- plots and the command line --------------------------------------------------------------------

def test_history_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from ntkfast.plots import plot_transfer_history

    res = transfer(_mlp(), 0.5, _data(), steps=6, batch_size=8, progress=False, validation=8, log_every=2)
    path = tmp_path / "h.png"
    fig = plot_transfer_history(res.history, str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(fig.axes) == 3
    with pytest.raises(ValueError, match="history"):
        plot_transfer_history({"step": []})


@pytest.mark.skipif(not (DATA / "mnist").exists(), reason="../shared/data/mnist not present")
def test_cli_transfer_then_train_from_its_result(tmp_path, capsys):
    from ntkfast.cli import main

    out = tmp_path / "ntt.pt"
    assert main(["transfer", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(DATA),
                 "--density", "0.05", "--steps", "3", "--max-samples", "300", "--out", str(out), "--quiet"]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["model"] == "lenet300_100" and saved["metadata"]["steps"] == 3
    for name, m in saved["masks"].items():
        assert torch.all(saved["state_dict"][name][~m] == 0)
    assert main(["train", "--init", str(out), "--dataset", "mnist", "--data-dir", str(DATA), "--epochs", "1",
                 "--max-batches", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "density 0.05" in text
    # the CLI's refusals are one "ntkfast: error:" line and exit status 2, no traceback
    assert main(["train", "--init", str(out), "--model", "lenet5", "--dataset", "mnist", "--data-dir", str(DATA)]) == 2
    assert "lenet300_100, not a lenet5" in capsys.readouterr().err
    assert main(["train", "--init", str(out), "--masks", str(out), "--dataset", "mnist", "--data-dir", str(DATA)]) == 2
    assert "ntkfast: error:" in capsys.readouterr().err


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation: a filter the mask empties has std 0, whose gradient is NaN."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_student_going_non_finite_is_named_at_its_step_not_blamed_on_the_model():
    torch.manual_seed(0)
    net = nn.Sequential(_StandardisedConv(3, 8, 3, padding=1), nn.ReLU(), _StandardisedConv(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = copy.deepcopy(net.state_dict())
    x = torch.rand(16, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^transfer: the loss or its gradient is not finite at step 1 "):
        transfer(net, 0.1, x, steps=2, batch_size=8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
