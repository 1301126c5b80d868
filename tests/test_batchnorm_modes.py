"""bn= of the data-based scorers and of NTT: "train" is train_mode, "calibrate" equals eval mode on
a copy whose running statistics were set by PyTorch's own cumulative update, the user's model is
untouched, and conflicting or unsupported settings are named."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ntkfast import prune, scores, transfer
from ntkfast.core.batchnorm import bn_setting, calibrate_batchnorm
from ntkfast.core.state import state_copy


def _bn_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5))
    return net.double()


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 0.5,
             torch.randint(0, 5, (12,), generator=g)) for _ in range(n)]


def _calibrated_by_torch(net, batches):
    """The oracle: PyTorch's own train-mode passes with momentum None on a copy."""
    dup = copy.deepcopy(net)
    for m in dup.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    dup.train()
    with torch.no_grad():
        for x, _ in batches:
            dup(x)
    return dup.eval()


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, [getattr(m, "momentum", None) for m in net.modules()]


@pytest.mark.parametrize("method", ["snip", "iterative_snip", "grasp"])
def test_calibrate_is_eval_mode_with_the_batches_mean_statistics(method):
    net, batches = _bn_net(), _batches()
    before, momenta = _state(net)
    fn = getattr(scores, method)
    got = fn(net, data=batches, bn="calibrate")
    want = fn(_calibrated_by_torch(net, batches), data=batches, bn="eval")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)
    # and it is not eval mode on the fresh statistics, nor train mode
    fresh = fn(net, data=batches, bn="eval")
    trained = fn(net, data=batches, bn="train")
    assert any(not torch.allclose(got[n], fresh[n]) for n in got)
    assert any(not torch.allclose(got[n], trained[n]) for n in got)
    after, momenta_after = _state(net)
    assert all(torch.equal(after[k], before[k]) for k in before) and momenta_after == momenta


@pytest.mark.parametrize("method", ["snip", "iterative_snip", "grasp"])
def test_bn_train_is_train_mode(method):
    net, batches = _bn_net(), _batches()
    fn = getattr(scores, method)
    a, b = fn(net, data=batches, bn="train"), fn(net, data=batches, train_mode=True)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_calibrate_batchnorm_sets_the_copy_only():
    net, batches = _bn_net(), _batches()
    st = state_copy(net)
    assert calibrate_batchnorm(net, st, [x for x, _ in batches]) == 3
    oracle = _calibrated_by_torch(net, batches).state_dict()
    for k in ("1.running_mean", "1.running_var", "4.running_var", "9.running_mean"):
        torch.testing.assert_close(st[k], oracle[k], rtol=1e-12, atol=1e-15)
    assert int(st["1.num_batches_tracked"]) == 3
    assert torch.equal(net.state_dict()["1.running_mean"], torch.zeros(6, dtype=torch.float64))


def test_bad_settings_are_named():
    net, batches = _bn_net(), _batches()
    with pytest.raises(ValueError, match="bn: expected one of 'eval', 'train', 'calibrate'"):
        scores.snip(net, data=batches, bn="batch")
    with pytest.raises(ValueError, match="bn: 'eval' contradicts train_mode=True"):
        scores.snip(net, data=batches, bn="eval", train_mode=True)
    with pytest.raises(ValueError, match="bn: 'calibrate' is not supported over a process group"):
        bn_setting("calibrate", False, SimpleNamespace(size=2), _bn_net())
    with pytest.raises(ValueError, match="bn: 'train' is not supported by NTT"):
        transfer(net, 0.5, torch.randn(16, 3, 8, 8, dtype=torch.float64), steps=1, batch_size=4, bn="train",
                 progress=False)


def test_prune_passes_bn_to_the_scorer():
    net, batches = _bn_net(), _batches()
    a = prune(net, "snip", 0.3, data=batches, bn="calibrate", progress=False)
    b = prune(_calibrated_by_torch(net, batches), "snip", 0.3, data=batches, bn="eval", progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", ["snip", "iterative_snip", "grasp"])
def test_the_scorers_default_is_train_mode(method):
    """bn='train' is the measured default; train_mode=False (the older spelling) still means eval."""
    net, batches = _bn_net(), _batches()
    fn = getattr(scores, method)
    default, train, ev = fn(net, data=batches), fn(net, data=batches, bn="train"), fn(net, data=batches, bn="eval")
    assert all(torch.equal(default[n], train[n]) for n in default)
    assert any(not torch.equal(default[n], ev[n]) for n in default)
    old = fn(net, data=batches, train_mode=False)
    assert all(torch.equal(old[n], ev[n]) for n in old)
    with pytest.raises(ValueError, match="bn: 'train' contradicts train_mode=False"):
        fn(net, data=batches, bn="train", train_mode=False)


def test_train_mode_refuses_a_batch_of_one_by_name():
    net = _bn_net()
    one = (torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.tensor([1]))
    with pytest.raises(ValueError, match="data: a batch of one sample cannot be scored with bn='train'"):
        scores.snip(net, data=one)
    scores.snip(net, data=one, bn="eval")  # and the other modes take it


def test_ntt_calibrate_sets_the_teacher_and_student_statistics():
    net = _bn_net()
    x = torch.randn(40, 3, 8, 8, dtype=torch.float64) * 3 + 1
    before, _ = _state(net)
    res = transfer(net, 0.5, x, steps=2, batch_size=8, bn="calibrate", validation=0, progress=False)
    # the student's statistics are the mean over the first training batches (16 of them at most;
    # here the 5 batches of the 40 inputs), set before the transfer and kept (eval mode)
    oracle = _calibrated_by_torch(net, [(x[i:i + 8], None) for i in range(0, 40, 8)]).state_dict()
    for k in ("1.running_mean", "4.running_var"):
        torch.testing.assert_close(res.state_dict[k], oracle[k], rtol=1e-12, atol=1e-15)
    assert res.masks.metadata["bn"] == "calibrate"
    default = transfer(net, 0.5, x, steps=2, batch_size=8, validation=0, progress=False)
    assert all(torch.equal(default.state_dict[k], res.state_dict[k]) for k in res.state_dict)  # calibrate
    plain = transfer(net, 0.5, x, steps=2, batch_size=8, bn="eval", validation=0, progress=False)
    assert torch.equal(plain.state_dict["1.running_mean"], torch.zeros(6, dtype=torch.float64))
    assert "bn" not in plain.masks.metadata
    after, _ = _state(net)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_ntt_without_batchnorm_records_eval_whatever_the_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(32, 12, dtype=torch.float64)
    a = transfer(net, 0.5, x, steps=2, batch_size=8, validation=0, progress=False)
    b = transfer(net, 0.5, x, steps=2, batch_size=8, bn="calibrate", validation=0, progress=False)
    assert "bn" not in a.masks.metadata and "bn" not in b.masks.metadata
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_without_batchnorm_the_default_is_eval_so_dropout_stays_off(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    data = (torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 3, (8,)))
    fn = getattr(scores, method)
    a, b, ev = fn(net, data=data), fn(net, data=data), fn(net, data=data, bn="eval")
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], ev[n]) for n in a)


def _in_net(seed=0):
    """InstanceNorm keeping running statistics: in eval mode it reads them as BatchNorm does."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
                        nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return net.double()


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_an_instancenorm_with_running_statistics_counts_as_batchnorm(method):
    net, batches = _in_net(), _batches()
    before, momenta = _state(net)
    fn = getattr(scores, method)
    default, train, ev = fn(net, data=batches), fn(net, data=batches, bn="train"), fn(net, data=batches, bn="eval")
    assert all(torch.equal(default[n], train[n]) for n in default)  # the BatchNorm default, not eval
    assert any(not torch.allclose(default[n], ev[n]) for n in default)
    # calibrate: eval mode with the batches' mean statistics, PyTorch's own update as the oracle
    # (InstanceNorm reads momentum None as 0, so the oracle steps the cumulative factor itself)
    dup = copy.deepcopy(net)
    dup[1].reset_running_stats()
    dup.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(batches):
            dup[1].momentum = 1.0 / (i + 1)
            dup(x)
    got = fn(net, data=batches, bn="calibrate")
    want = fn(dup.eval(), data=batches, bn="eval")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)
    assert any(not torch.allclose(got[n], ev[n]) for n in got)
    after, momenta_after = _state(net)
    assert all(torch.equal(after[k], before[k]) for k in before) and momenta_after == momenta


def test_ntksap_runs_a_tracked_instancenorm_on_the_reference_engine():
    net = _in_net()
    kw = dict(input_shape=(3, 8, 8), batch_size=8, repeats=2, dtype=torch.float64, seed=3,
              init_fn=lambda m: [l.reset_parameters() for l in m.modules() if hasattr(l, "reset_parameters")])
    ref = scores.ntksap(net, engine="reference", **kw)
    with pytest.warns(RuntimeWarning, match=r"InstanceNorm2d '1' keeps running statistics; using the reference"):
        auto = scores.ntksap(net, engine="auto", **kw)
    assert all(torch.equal(auto[n], ref[n]) for n in ref)
    with pytest.raises(ValueError, match=r"^engine='sequential': the InstanceNorm2d '1' keeps running statistics"):
        scores.ntksap(net, engine="sequential", **kw)


def test_ntksap_runs_a_hooked_layer_on_the_reference_engine():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    net.input_shape = (6,)
    net[0].register_forward_hook(lambda mod, args, out: out * 2)
    kw = dict(batch_size=8, repeats=2, dtype=torch.float64, seed=3,
              init_fn=lambda m: [l.reset_parameters() for l in m.modules() if hasattr(l, "reset_parameters")])
    ref = scores.ntksap(net, engine="reference", **kw)
    with pytest.warns(RuntimeWarning, match=r"the layer '0' has a forward hook, which the grouped copy would not run"):
        auto = scores.ntksap(net, engine="auto", **kw)
    assert all(torch.equal(auto[n], ref[n]) for n in ref)
