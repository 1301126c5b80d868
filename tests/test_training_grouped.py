"""The grouped trainer: K networks trained in one stacked pass equal K separate ``train`` runs
(float64), BatchNorm statistics included; its fallback, its errors; and train()'s engine
settings (bf16 autocast, torch.compile, TF32, resident data) on the device at hand."""
import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from ntkfast import data, models, prune
from ntkfast.training import train
from ntkfast.training_grouped import train_grouped

from testing import devices
from testing import one_thread  # noqa: F401  (the fixture, by name)


pytestmark = pytest.mark.usefixtures("one_thread")


def _nets(name, shape, k, dtype=torch.float64, device="cpu"):
    out = []
    for s in range(k):
        torch.manual_seed(100 + s)
        out.append(models.get(name, input_shape=shape).to(device=device, dtype=dtype))
    return out


def _images(n, seed, size=12):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return data.ImageDataset(imgs, labels, classes=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3,
                             name="cifar10")


def _state_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def _same_as_separate(name, shape, train_set, test_set, masks_of, device="cpu", **kw):
    nets = _nets(name, shape, 3, device=device)
    masks = masks_of(nets)
    alone = [copy.deepcopy(n) for n in nets]
    got = train_grouped(nets, masks, train_set, test_set, progress=False, stacked=True, **kw)
    want = [train(n, m, train_set, test_set, progress=False, channels_last=False, **kw) for n, m in zip(alone, masks)]
    for k, (g, w) in enumerate(zip(got, want)):
        assert _state_diff(nets[k], alone[k]) < 1e-10, k
        for field in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_top5_accuracy", "lr"):
            assert getattr(g, field) == pytest.approx(getattr(w, field), abs=1e-10), (k, field)
        assert g.engine["grouped"] == 3
    return nets, masks


def _masks(nets, density=0.3):
    out = [prune(n, "random", density, seed=i, progress=False) for i, n in enumerate(nets)]
    out[1] = None  # one network dense among pruned ones
    return out


@pytest.mark.parametrize("device", devices)
def test_resnet_with_batchnorm_sgd_schedule_equals_separate_runs(device):
    train_set = data.GaussianNoise((3, 12, 12), 80, num_classes=10, seed=1)
    test_set = data.GaussianNoise((3, 12, 12), 30, num_classes=10, seed=2)
    nets, masks = _same_as_separate("resnet20", (3, 12, 12), train_set, test_set, _masks, device=device, epochs=3,
                                    lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=32, lr_milestones=[2],
                                    seed=4)
    for net, m in zip(nets, masks):  # pruned weights stay exactly zero; statistics moved
        params = dict(net.named_parameters())
        for n, mk in (m or {}).items():
            assert not params[n][~mk.to(params[n].device)].any()
        assert int(net.blocks[0].bn1.num_batches_tracked) == 9


def test_mlp_adam_and_augmentation_equal_separate_runs():
    train_set, test_set = _images(70, 0), _images(20, 1)
    _same_as_separate("lenet300_100", (3, 12, 12), train_set, test_set, _masks, epochs=2, optimizer="adam",
                      lr=1e-3, batch_size=16, augment="pad4-crop-flip", seed=2)


def test_lenet5_step_schedule_and_optimizer_factory():
    train_set = data.GaussianNoise((1, 28, 28), 48, num_classes=10, seed=1)
    sched = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6)  # noqa: E731
    _same_as_separate("lenet5", (1, 28, 28), train_set, None, lambda nets: _masks(nets, 0.2), epochs=2,
                      optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), batch_size=16,
                      scheduler=sched, scheduler_interval="step")


def test_reparametrised_model_falls_back_to_one_after_another():
    train_set = data.GaussianNoise((1, 28, 28), 40, num_classes=10, seed=1)
    def reparametrised():
        nets = _nets("lenet300_100", (1, 28, 28), 2)
        for i, n in enumerate(nets):
            torch.manual_seed(i)
            torch_prune.random_unstructured(n.classifier[0], "weight", amount=0.5)
        return nets

    nets, alone = reparametrised(), reparametrised()  # (a pruned module's computed weight refuses deepcopy)
    with pytest.warns(RuntimeWarning, match="weight_orig.*one after the other"):
        got = train_grouped(nets, [None, None], train_set, None, epochs=1, batch_size=8, progress=False, stacked=True)
    want = [train(n, None, train_set, None, epochs=1, batch_size=8, progress=False) for n in alone]
    assert [g.train_loss for g in got] == [w.train_loss for w in want]
    assert "grouped" not in got[0].engine


def test_bad_arguments_are_named_and_leave_the_models_untouched():
    train_set = data.GaussianNoise((1, 28, 28), 16, num_classes=10, seed=1)
    nets = _nets("lenet300_100", (1, 28, 28), 2)
    before = [copy.deepcopy(n.state_dict()) for n in nets]
    other = models.resnet20().double()
    cases = [
        (dict(models=nets[0]), TypeError, "models: expected a non-empty list"),
        (dict(models=[nets[0], nets[0]]), ValueError, "models: the same module appears twice"),
        (dict(models=[nets[0], other]), ValueError, r"models\[1\]: a CifarResNet, but models\[0\] is a NTTNet"),
        (dict(models=[nets[0], copy.deepcopy(nets[1]).float()]), ValueError, r"models\[1\]: its parameters or buffers"),
        (dict(masks=[None]), ValueError, "masks: expected a list of 2 masks"),
        (dict(masks=[{"nope.weight": torch.ones(3, dtype=torch.bool)}, None]), ValueError,
         r"masks\[0\]: masks: the model has no parameter 'nope.weight'"),
        (dict(optimizer=torch.optim.SGD(nets[0].parameters(), lr=0.1)), TypeError, "optimizer: an optimiser made"),
        (dict(scheduler=torch.optim.lr_scheduler.StepLR(torch.optim.SGD(nets[0].parameters(), lr=0.1), 1)),
         TypeError, "scheduler: give a callable"),
        (dict(amp="fp8"), ValueError, "amp: expected one of 'bf16'"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(stacked="yes"), TypeError, "stacked: expected True, False or None"),
    ]
    for kw, exc, match in cases:
        args = dict(models=nets, masks=[None, None], train_set=train_set, test_set=None, epochs=1, progress=False)
        args.update(kw)
        with pytest.raises(exc, match=match):
            train_grouped(**args)
    for n, b in zip(nets, before):
        assert all(torch.equal(v, b[k]) for k, v in n.state_dict().items())


def test_an_error_midway_leaves_every_model_as_it_was():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("broken on purpose")
            return self.fc(x)

    torch.manual_seed(0)
    nets = [Breaks(), Breaks()]
    before = [copy.deepcopy(n.state_dict()) for n in nets]
    ds = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    with pytest.raises(RuntimeError, match="broken on purpose"):
        train_grouped(nets, [None, None], ds, None, epochs=2, batch_size=4, progress=False, stacked=True)
    for n, b in zip(nets, before):
        assert all(torch.equal(v, b[k]) for k, v in n.state_dict().items())


def test_on_the_cpu_by_default_one_after_another_with_the_same_results():
    train_set = data.GaussianNoise((1, 28, 28), 40, num_classes=10, seed=1)
    nets, again = _nets("lenet300_100", (1, 28, 28), 2), _nets("lenet300_100", (1, 28, 28), 2)
    by_default = train_grouped(nets, [None, None], train_set, None, epochs=1, batch_size=8, progress=False)
    stacked = train_grouped(again, [None, None], train_set, None, epochs=1, batch_size=8, progress=False, stacked=True)
    assert "grouped" not in by_default[0].engine and stacked[0].engine["grouped"] == 2
    assert [r.train_loss[0] for r in by_default] == pytest.approx([r.train_loss[0] for r in stacked], abs=1e-12)
    assert max(_state_diff(a, b) for a, b in zip(nets, again)) < 1e-12


# -- train()'s engine settings --------------------------------------------------------------------

@pytest.mark.parametrize("device", devices)
def test_bf16_autocast_trains_and_is_recorded(device):
    train_set = data.GaussianNoise((1, 28, 28), 64, num_classes=10, seed=1)
    torch.manual_seed(0)
    net = models.lenet5().to(device)
    ref = copy.deepcopy(net)
    r = train(net, None, train_set, train_set, epochs=2, batch_size=16, amp="bf16", progress=False)
    full = train(ref, None, train_set, train_set, epochs=2, batch_size=16, progress=False)
    assert r.engine["amp"] == "bf16"
    assert "amp" not in full.engine
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights stay in their dtype
    # bf16 keeps ~3 significant digits: the losses agree to that, not to float32's rounding
    assert r.train_loss == pytest.approx(full.train_loss, rel=3e-2)
    assert r.train_loss != full.train_loss


def test_compile_is_equal_to_eager_and_recorded():
    train_set = data.GaussianNoise((1, 28, 28), 48, num_classes=10, seed=1)
    torch.manual_seed(0)
    net = models.lenet300_100()
    ref = copy.deepcopy(net)
    r = train(net, None, train_set, None, epochs=1, batch_size=16, compile="aot_eager", progress=False)
    w = train(ref, None, train_set, None, epochs=1, batch_size=16, progress=False)
    assert r.engine == {"compile": "aot_eager"}
    assert _state_diff(net, ref) < 1e-6


def test_engine_settings_are_checked_by_name():
    ds = data.GaussianNoise((1, 28, 28), 8, num_classes=10, seed=1)
    net = models.lenet300_100()
    for kw, exc, match in [(dict(compile="no-such-backend"), ValueError, "compile: torch.compile knows no backend"),
                           (dict(compile=3), TypeError, "compile: expected"),
                           (dict(tf32="yes"), TypeError, "tf32: expected True or False"),
                           (dict(resident=1), TypeError, "resident: expected"),
                           (dict(channels_last="x"), TypeError, "channels_last: expected")]:
        with pytest.raises(exc, match=match):
            train(net, None, ds, None, epochs=1, progress=False, **kw)


@pytest.mark.parametrize("device", devices)
def test_resident_dataset_gives_the_batches_of_the_host_copy(device):
    ds = _images(40, 3)
    there = ds.to(device)
    assert ds.to("cpu") is ds
    assert there.images.device.type == torch.device(device).type
    for (xa, ya), (xb, yb) in zip(ds.batches(16, shuffle=True, seed=5, device=device, augment=None),
                                  there.batches(16, shuffle=True, seed=5, augment=None)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    if torch.device(device).type == "cuda":
        torch.manual_seed(0)
        net = models.get("resnet20", input_shape=(3, 12, 12)).to(device)
        r = train(net, None, ds, ds, epochs=1, batch_size=16, progress=False)
        assert r.engine.get("resident") is True
        r = train(net, None, ds, ds, epochs=1, batch_size=16, progress=False, resident=False)
        assert "resident" not in r.engine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 flags act on CUDA only")
def test_tf32_is_off_during_cuda_training_unless_asked_and_restored():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return self.fc(x)

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    train(Spy().cuda(), None, ds, None, epochs=1, batch_size=4, progress=False)
    assert seen[-1] == (False, False)
    train(Spy().cuda(), None, ds, None, epochs=1, batch_size=4, progress=False, tf32=True)
    assert seen[-1] == (True, True)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# -- the engine through the study, reproduce and the command line ---------------------------------

def _mnist_like(n, seed):
    g = torch.Generator().manual_seed(seed)
    return data.ImageDataset(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                             torch.randint(0, 10, (n,), generator=g), classes=[str(i) for i in range(10)],
                             mean=(0.13,), std=(0.31,), name="mnist")


def test_study_records_the_engine_that_was_on_and_checks_it_first(tmp_path):
    from ntkfast.study import run_study

    sets = (_mnist_like(48, 1), _mnist_like(16, 2))
    out = tmp_path / "s.jsonl"
    recs = run_study("lenet300_100", "mnist", None, ["random"], [0.5], [0], out, epochs=1, max_batches=2,
                     datasets=sets, progress=False, engine={"amp": "bf16", "compile": "aot_eager"})
    assert recs[0]["engine"] == {"amp": "bf16", "compile": "aot_eager"}
    plain = run_study("lenet300_100", "mnist", None, ["random"], [0.5], [0], tmp_path / "p.jsonl", epochs=1,
                      max_batches=2, datasets=sets, progress=False)
    assert "engine" not in plain[0]
    for engine, exc, match in [({"amp": "fp16"}, ValueError, "amp: expected one of 'bf16'"),
                               ({"warp": True}, ValueError, "engine: 'warp' is not one of"),
                               ("bf16", TypeError, "engine: expected a mapping")]:
        bad = tmp_path / "bad.jsonl"
        with pytest.raises(exc, match=match):
            run_study("lenet300_100", "mnist", None, ["random"], [0.5], [0], bad, epochs=1, datasets=sets,
                      progress=False, engine=engine)
        assert not bad.exists()


def test_reproduce_names_a_bad_engine_before_reading_data(tmp_path):
    from ntkfast.reproduce import reproduce

    with pytest.raises(ValueError, match="amp: expected one of 'bf16'"):
        reproduce("ntt-lenet5-mnist", tmp_path / "no-data-here", tmp_path / "r.jsonl", engine={"amp": "fp16"})
    assert not (tmp_path / "r.jsonl").exists()


def test_cli_train_passes_the_engine_flags_and_saves_them_in_the_history(data_dir, tmp_path):
    import json

    from ntkfast.cli import main

    history = tmp_path / "h.json"
    assert main(["train", "--model", "lenet300_100", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs",
                 "1", "--max-batches", "2", "--quiet", "--amp", "bf16", "--compile", "aot_eager",
                 "--history-json", str(history)]) == 0
    assert json.loads(history.read_text())["engine"] == {"amp": "bf16", "compile": "aot_eager"}
