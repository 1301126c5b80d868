"""The trainer: masks hold, accuracy, errors, determinism; and its progress bars and log."""
import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from ntkfast import Masks, data, models, prunable_parameters
from ntkfast.training import TrainResult, evaluate, train

from testing import devices, internal
from testing import one_thread  # noqa: F401  (the fixture, by name)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_small(data_dir):
    train_set = data.load_mnist(data_dir).subset(2000)
    test_set = data.load_mnist(data_dir, train=False).subset(1000)
    return train_set, test_set


def random_masks(model, density=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Masks({n: torch.rand(p.shape, generator=g) < density for n, p in prunable_parameters(model).items()})


def noise(shape=(3, 16, 16), n=96, k=10, seed=0):
    return data.GaussianNoise(shape, n, num_classes=k, seed=seed)


# -- masks stay applied --------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("optimizer,kw", [
    ("sgd", dict(momentum=0.9, weight_decay=5e-3, lr=0.05)),
    ("adam", dict(weight_decay=1e-3, lr=1e-2)),
])
def test_pruned_weights_stay_zero(optimizer, kw, device):
    torch.manual_seed(0)
    model = models.resnet20(input_shape=(3, 16, 16), num_classes=10)
    masks = random_masks(model, 0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, masks, noise(), noise(seed=1), epochs=2, optimizer=optimizer, batch_size=32,
          device=device, progress=False, **kw)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params[name].detach().cpu()
        assert (p[~m] == 0).all(), name          # exactly zero, despite momentum / weight decay
        assert not torch.equal(p[m], before[name][m]), name  # the kept weights did train
    assert not torch.equal(params["bn.weight"].detach().cpu(), before["bn.weight"])  # unmasked tensors train


def test_masks_with_prune_hooks_fit_weight_orig():
    torch.manual_seed(0)
    model = models.lenet5()
    masks = random_masks(model, 0.1)
    masks.to_prune_hooks(model)  # weight -> weight_orig + weight_mask
    train(model, masks, noise((1, 28, 28), 64), None, epochs=1, batch_size=32, weight_decay=1e-2,
          progress=False)
    for name, m in masks.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert (module.weight_orig.detach()[~m] == 0).all()


def test_masks_zeroed_at_start():
    torch.manual_seed(0)
    model = models.lenet300_100()
    masks = random_masks(model, 0.5)
    train(model, masks, noise((1, 28, 28), 8), None, epochs=1, lr=1e-12, momentum=0.0, progress=False)
    w = model.classifier[0].weight.detach()
    assert (w[~masks["classifier.0.weight"]] == 0).all() and (w[masks["classifier.0.weight"]] != 0).all()


# -- learning ------------------------------------------------------------------------------------

def test_mnist_one_epoch_beats_chance(mnist_small):
    train_set, test_set = mnist_small
    torch.manual_seed(0)
    model = models.lenet300_100()
    result = train(model, random_masks(model, 0.3), train_set, test_set, epochs=1, batch_size=32,
                   progress=False)
    assert isinstance(result, TrainResult)
    assert len(result.train_loss) == len(result.test_accuracy) == 1
    assert result.final_test_accuracy == result.test_accuracy[-1] > 0.6  # chance: 0.1
    assert evaluate(model, test_set)[1] == pytest.approx(result.final_test_accuracy)


def test_dense_training_history():
    torch.manual_seed(0)
    model = models.lenet300_100(input_shape=(1, 8, 8), num_classes=4)
    train_set = noise((1, 8, 8), 64, k=4)
    result = train(model, None, train_set, train_set, epochs=6, optimizer="adam", lr=3e-3, batch_size=16,
                   progress=False)
    assert len(result.train_loss) == len(result.train_accuracy) == len(result.test_loss) == 6
    assert result.epochs == 6
    assert result.test_loss[-1] < result.test_loss[0]  # memorises its random labels
    assert 0.0 <= result.final_test_accuracy <= 1.0


def test_generic_dataset_and_no_test_set():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 8, 8)
    y = torch.randint(0, 3, (40,))
    model = models.lenet300_100((1, 8, 8), 3)
    result = train(model, None, TensorDataset(x, y), None, epochs=2, batch_size=16, progress=False)
    assert result.test_accuracy == [] and result.final_test_accuracy is None
    assert len(result.train_loss) == 2


def test_max_batches_and_lr_milestones():
    torch.manual_seed(0)
    base = models.lenet300_100((1, 8, 8), 3)
    a, b = models.lenet300_100((1, 8, 8), 3), models.lenet300_100((1, 8, 8), 3)
    a.load_state_dict(base.state_dict())
    b.load_state_dict(base.state_dict())
    ds = noise((1, 8, 8), 64, k=3)
    train(a, None, ds, None, epochs=1, batch_size=8, max_batches=2, progress=False)
    # epoch 2 runs with lr * 1e-30: b ends (almost) where a did
    train(b, None, ds, None, epochs=2, batch_size=8, max_batches=2, lr_milestones=[1], lr_gamma=1e-30,
          progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


# -- data, optimisers and schedules the user brings ----------------------------------------------

def _images(n=48, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.ImageDataset(torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8),
                             torch.randint(0, classes, (n,), generator=g), classes=[str(i) for i in range(classes)],
                             mean=(0.5,), std=(0.25,))


def _twins(shape=(1, 6, 6), k=3):
    torch.manual_seed(0)
    a = models.lenet300_100(shape, k)
    b = models.lenet300_100(shape, k)
    b.load_state_dict(a.state_dict())
    return a, b


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_batches_given_as_they_come_train_as_the_dataset_they_came_from():
    from torch.utils.data import DataLoader

    epoch_seed = internal("training")._epoch_seed
    ds = _images()
    a, b = _twins()
    masks = random_masks(a, 0.5)
    ref = train(a, masks, ds, ds, epochs=1, batch_size=16, seed=5, progress=False)
    # the very batches the trainer draws from the dataset, as a list; the test set as a DataLoader
    batches = list(ds.batches(16, shuffle=True, seed=epoch_seed(5, 0)))
    got = train(b, masks, batches, DataLoader(ds, batch_size=16), epochs=1, batch_size=16, seed=5, progress=False)
    assert _same_weights(a, b)
    assert got.train_loss == ref.train_loss and got.test_loss == ref.test_loss
    assert got.test_accuracy == ref.test_accuracy


def test_a_dataloader_over_a_tensor_dataset_trains_as_the_tensor_dataset():
    from torch.utils.data import DataLoader

    epoch_seed = internal("training")._epoch_seed
    ds = _images()
    tensors = TensorDataset(torch.stack([ds[i][0] for i in range(len(ds))]), ds.targets)
    a, b = _twins()
    train(a, None, tensors, None, epochs=1, batch_size=8, seed=2, progress=False)
    loader = DataLoader(tensors, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(epoch_seed(2, 0)))
    train(b, None, loader, None, epochs=1, batch_size=999, seed=2, progress=False)  # its own batch size
    assert _same_weights(a, b)


def test_a_dataloader_is_read_every_epoch_and_shuffles_from_seed():
    from torch.utils.data import DataLoader

    ds = _images()
    loader = DataLoader(ds, batch_size=8, shuffle=True)  # no generator: it draws from the RNG train seeds
    finals = []
    for seed in (1, 1, 2):
        a, _ = _twins()
        res = train(a, None, loader, ds, epochs=3, seed=seed, progress=False)
        assert len(res.train_loss) == len(res.test_loss) == 3
        finals.append(a)
    assert _same_weights(finals[0], finals[1]) and not _same_weights(finals[0], finals[2])


def test_a_sized_collection_of_samples_is_batched_and_one_of_batches_read_as_it_is():
    x, y = torch.randn(12, 1, 6, 6), torch.randint(0, 3, (12,))
    samples = [(x[i], int(y[i])) for i in range(12)]  # single samples: batched here
    a, _ = _twins()
    res = train(a, None, samples, samples, epochs=1, batch_size=5, progress=False)
    assert res.train_loss and res.test_accuracy
    b, _ = _twins()
    res = train(b, None, [(x, y)], None, epochs=2, max_batches=1, progress=False)  # one batch of 12
    assert len(res.train_loss) == 2


def test_a_user_optimizer_trains_as_the_named_one():
    import functools

    a, b = _twins()
    masks = random_masks(a, 0.3)
    train(a, masks, _images(), None, epochs=2, optimizer="adam", lr=1e-2, batch_size=16, progress=False)
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    train(b, masks, _images(), None, epochs=2, optimizer=opt, batch_size=16, progress=False)
    assert _same_weights(a, b)
    assert opt.state  # the user's own optimiser made the steps
    c, _ = _twins()
    train(c, masks, _images(), None, epochs=2, optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
          batch_size=16, progress=False)
    assert _same_weights(a, c)


def test_a_user_optimizer_keeps_pruned_weights_at_zero():
    a, _ = _twins()
    masks = random_masks(a, 0.3)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    train(a, masks, _images(), None, epochs=2, optimizer=opt, batch_size=16, progress=False)
    params = dict(a.named_parameters())
    for name, m in masks.items():
        assert (params[name][~m] == 0).all() and (params[name][m] != 0).any(), name


def test_schedulers_given_as_instance_or_callable_set_the_learning_rate():
    from torch.optim.lr_scheduler import StepLR

    a, _ = _twins()
    opt = torch.optim.Adam(a.parameters(), lr=0.01)
    res = train(a, None, _images(), None, epochs=3, optimizer=opt, scheduler=StepLR(opt, step_size=1, gamma=0.5),
                progress=False)
    assert res.lr == pytest.approx([0.01, 0.005, 0.0025])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.00125)  # stepped after the last epoch too
    b, _ = _twins()
    res = train(b, None, _images(), None, epochs=2, optimizer="sgd", lr=0.1,
                scheduler=lambda o: StepLR(o, step_size=1, gamma=0.1), progress=False)
    assert res.lr == pytest.approx([0.1, 0.01])
    c, _ = _twins()  # per optimiser step: 48 samples in batches of 16 are 3 steps an epoch
    res = train(c, None, _images(), None, epochs=2, optimizer="sgd", lr=0.1, batch_size=16,
                scheduler=lambda o: StepLR(o, step_size=1, gamma=0.5), scheduler_interval="step", progress=False)
    assert res.lr == pytest.approx([0.1, 0.1 * 0.5 ** 3])


def test_reduce_on_plateau_is_stepped_with_the_epochs_loss():
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    a, _ = _twins()
    ds = _images()
    # a learning rate too small to move the loss: every epoch after the first is a plateau
    res = train(a, None, ds, ds, epochs=3, optimizer="sgd", lr=1e-9, momentum=0.0,
                scheduler=lambda o: ReduceLROnPlateau(o, factor=0.5, patience=0, eps=0), progress=False)
    assert res.lr == pytest.approx([1e-9, 1e-9, 5e-10])


def test_the_history_reads_back_from_its_json():
    import json

    ds = _images()
    a, _ = _twins()
    res = train(a, None, ds, ds, epochs=3, optimizer="adam", lr=3e-3, batch_size=16, progress=False)
    assert len(res.lr) == len(res.epoch_seconds) == len(res.test_accuracy) == res.epochs == 3
    assert all(t > 0 for t in res.epoch_seconds) and sum(res.epoch_seconds) <= res.seconds
    assert res.best_test_accuracy == max(res.test_accuracy)
    d = json.loads(res.to_json())
    assert set(d) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "epoch_seconds",
                      "final_test_accuracy", "epochs", "seconds"}
    assert TrainResult.from_dict(d) == res
    d["train_loss"].append(9.0)
    assert len(res.train_loss) == 3  # to_dict copies
    with pytest.raises(ValueError, match="^d: 'loss' is not a field"):
        TrainResult.from_dict({"loss": [1.0]})


def test_the_model_changes_only_as_training_intends():
    a, _ = _twins()
    masks = random_masks(a, 0.5)
    a.eval()
    frozen = {n: p.detach().clone() for n, p in a.named_parameters() if not n.startswith("classifier.4")}
    last = a.classifier[4]
    before = last.weight.detach().clone()
    # an optimiser of the last layer only: the other layers keep their weights, pruned ones excepted
    train(a, masks, _images(), None, epochs=1, optimizer=torch.optim.SGD(last.parameters(), lr=0.1),
          batch_size=16, progress=False)
    params = dict(a.named_parameters())
    for n, p in frozen.items():
        want = p.masked_fill(~masks[n], 0) if n in masks else p
        assert torch.equal(params[n], want), n
    assert not torch.equal(last.weight, before)
    assert not any(m.training for m in a.modules())  # eval mode, as it came
    # the gradient masks are gone: a later backward reaches pruned weights
    x, y = _images()[0]
    torch.nn.functional.cross_entropy(a(x.unsqueeze(0)), y.unsqueeze(0)).backward()
    w = a.classifier[0].weight
    assert (w.grad[~masks["classifier.0.weight"]] != 0).any()


def test_evaluate_reads_any_data_train_takes():
    from torch.utils.data import DataLoader

    a, _ = _twins()
    ds = _images()
    want = evaluate(a, ds, batch_size=16)
    assert evaluate(a, DataLoader(ds, batch_size=16)) == want
    assert evaluate(a, list(ds.batches(16))) == want


def test_bad_data_optimizers_and_schedulers_are_refused_by_name_before_the_model_changes():
    from torch.optim.lr_scheduler import StepLR

    a, other = _twins()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ds = _images()
    x, y = ds.images.float(), ds.targets
    cases = [
        (dict(train_set=(b for b in [(x, y)])), ValueError, "^train_set: got a one-shot iterator"),
        (dict(test_set=iter([(x, y)])), ValueError, "^test_set: got a one-shot iterator"),
        (dict(train_set=[(x, y.float())]), ValueError, "^train_set batch 0: labels"),
        (dict(train_set=[(x, y[:3])]), ValueError, "^train_set batch 0: .*batch sizes differ"),
        (dict(train_set=[x]), ValueError, "^train_set"),
        (dict(train_set={"x": x}), ValueError, "^train_set: expected"),
        (dict(optimizer=42), TypeError, "^optimizer: expected"),
        (dict(optimizer=lambda params: "adam"), TypeError, "^optimizer: the callable returned a str"),
        (dict(optimizer=torch.optim.SGD(other.parameters(), lr=0.1)), ValueError, "^optimizer: it updates"),
        (dict(optimizer=torch.optim.SGD(a.parameters(), lr=0.1), lr=0.1), ValueError, "^lr: "),
        (dict(optimizer=torch.optim.Adam, weight_decay=0.1), ValueError, "^weight_decay: "),
        (dict(scheduler="step"), TypeError, "^scheduler: expected"),
        (dict(scheduler=lambda o: None), TypeError, "^scheduler: the callable returned"),
        (dict(scheduler=StepLR(torch.optim.SGD(a.parameters(), lr=0.1), 1)), ValueError, "^scheduler: it steps another"),
        (dict(scheduler=lambda o: StepLR(o, 1), lr_milestones=[1]), ValueError, "^lr_milestones: "),
        (dict(scheduler=lambda o: StepLR(o, 1), scheduler_interval="batch"), ValueError, "^scheduler_interval: "),
    ]
    for kw, exc, match in cases:
        kw = {"train_set": ds, "test_set": None, **kw}
        with pytest.raises(exc, match=match):
            train(a, None, kw.pop("train_set"), kw.pop("test_set"), 1, progress=False, **kw)
        assert all(torch.equal(before[k], v) for k, v in a.state_dict().items()), match


# -- memory layout -------------------------------------------------------------------------------

def _train_conv(monkeypatch, channels_last, start_channels_last=False, name="lenet5"):
    torch.manual_seed(0)
    shape = (1, 16, 16) if name == "lenet5" else (3, 8, 8)
    model = models.get(name, input_shape=shape, num_classes=3).double()
    if start_channels_last:
        model.to(memory_format=torch.channels_last)
    masks = random_masks(model, 0.4)
    x = torch.randn(40, *shape, dtype=torch.float64)
    ds = TensorDataset(x, torch.randint(0, 3, (40,)))
    result = train(model, masks, ds, ds, epochs=2, optimizer="adam", lr=1e-2, batch_size=8, progress=False,
                   channels_last=channels_last)
    return model, masks, result


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_channels_last_training_gives_the_contiguous_result_and_restores_the_layout(monkeypatch, name):
    # float64, so the two layouts' different rounding stays far below the tolerance (in float32,
    # Adam turns the rounding of near-zero gradients into whole steps: 5e-4 apart after 3 steps)
    ref, masks, ref_result = _train_conv(monkeypatch, channels_last=False, name=name)
    got, _, got_result = _train_conv(monkeypatch, channels_last=True, name=name)
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert p.stride() == torch.empty(p.shape).stride(), name  # the user's layout is back, strides and all
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    assert got_result.test_accuracy == ref_result.test_accuracy
    params = dict(got.named_parameters())
    for name, m in masks.items():
        assert (params[name][~m] == 0).all(), name


def test_a_channels_last_model_stays_channels_last(monkeypatch):
    model, _, _ = _train_conv(monkeypatch, channels_last=True, start_channels_last=True)
    conv = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert conv and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in conv)


class _ViewAfterConv(torch.nn.Module):
    # an NCHW-only forward: .view of a convolution's output fails on channels-last strides
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def test_a_model_that_cannot_run_channels_last_trains_as_it_is():
    torch.manual_seed(0)
    model = _ViewAfterConv().double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    masks = random_masks(model, 0.5)
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    ds = TensorDataset(x, torch.randint(0, 3, (24,)))
    res = train(model, masks, ds, ds, epochs=2, optimizer="adam", lr=1e-2, batch_size=8, progress=False)
    assert all(p.stride() == torch.empty(p.shape).stride() for p in model.parameters())
    ref = _ViewAfterConv().double()
    ref.load_state_dict(init)
    training = internal("training")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_wants_channels_last", lambda model, device, asked=None: False)
        ref_res = train(ref, masks, ds, ds, epochs=2, optimizer="adam", lr=1e-2, batch_size=8, progress=False)
    assert res.test_accuracy == ref_res.test_accuracy
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)  # the same computation, bit for bit


class _ViewWhenTraining(_ViewAfterConv):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1) if self.training else y.flatten(1))


@pytest.mark.parametrize("make", [_ViewAfterConv, _ViewWhenTraining])
def test_the_channels_last_probe_falls_back_in_either_mode_and_leaves_no_trace(make):
    _runs_channels_last = internal("training")._runs_channels_last
    torch.manual_seed(0)
    model = torch.nn.Sequential(make(), torch.nn.BatchNorm1d(3)).eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    ds = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))  # a DataLoader draws from the RNG
    rng = torch.random.get_rng_state()
    assert not _runs_channels_last(model, ds, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), rng) and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]) and v.stride() == buffers[k].stride(), k


def test_the_probe_of_a_model_that_runs_channels_last_leaves_its_statistics_alone():
    _runs_channels_last = internal("training")._runs_channels_last
    model = models.resnet20(input_shape=(3, 8, 8))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert _runs_channels_last(model, noise((3, 8, 8), 8), torch.device("cpu")) and model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    lenet = models.lenet5(input_shape=(1, 16, 16))
    assert _runs_channels_last(lenet, noise((1, 16, 16), 8), torch.device("cpu"))
    # one input channel: contiguous either way, so the strides must say channels-last themselves
    assert lenet.features[0].weight.stride() == (25, 1, 5, 1)


def test_a_5d_parameter_beside_a_conv2d_is_left_alone():
    class WithVolume(_ViewAfterConv):
        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1)) + 0 * self.volume.sum()
    torch.manual_seed(0)
    model = WithVolume()
    model.volume = torch.nn.Parameter(torch.randn(1, 1, 1, 2, 2))
    ds = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    train(model, None, ds, None, epochs=1, batch_size=4, progress=False)
    assert model.volume.is_contiguous()
    assert model.conv.weight.stride() == torch.empty(model.conv.weight.shape).stride()
    assert model.conv.weight.grad.stride() == model.conv.weight.stride()


def test_evaluate_alone_keeps_the_inputs_layout():
    model = _ViewAfterConv()
    ds = TensorDataset(torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,)))
    loss, acc = evaluate(model, ds)
    assert loss > 0 and 0 <= acc <= 1


def test_conv_models_on_cpu_use_channels_last_and_mlps_do_not():
    _wants_channels_last = internal("training")._wants_channels_last
    assert _wants_channels_last(models.lenet5(input_shape=(1, 28, 28)), "cpu")
    assert not _wants_channels_last(models.lenet300_100((1, 28, 28)), "cpu")


# -- determinism ---------------------------------------------------------------------------------

def test_same_seed_same_bits():
    torch.manual_seed(0)
    init = models.resnet20(input_shape=(3, 8, 8)).state_dict()
    finals = []
    for seed in (3, 3, 4):
        model = models.resnet20(input_shape=(3, 8, 8))
        model.load_state_dict(init)
        masks = random_masks(model, 0.5)
        train(model, masks, noise((3, 8, 8), 64), None, epochs=2, batch_size=16, weight_decay=1e-4,
              seed=seed, progress=False)
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in init)
    assert not all(torch.equal(finals[0][k], finals[2][k]) for k in init)


def test_global_rng_restored():
    torch.manual_seed(123)
    model = models.lenet300_100((1, 4, 4), 2)
    state = torch.random.get_rng_state()
    train(model, None, noise((1, 4, 4), 16, k=2), None, epochs=1, progress=False, seed=9)
    assert torch.equal(torch.random.get_rng_state(), state)


# -- errors --------------------------------------------------------------------------------------

def test_errors_checked_before_touching_the_model():
    torch.manual_seed(0)
    model = models.lenet300_100((1, 4, 4), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = noise((1, 4, 4), 8, k=2)
    with pytest.raises(ValueError, match="optimizer"):
        train(model, None, ds, None, epochs=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs"):
        train(model, None, ds, None, epochs=0)
    zeros = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    bad_name = dict(zeros, **{"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks"):
        train(model, bad_name, ds, None, epochs=1)
    bad_shape = dict(zeros)
    bad_shape["classifier.4.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks"):
        train(model, bad_shape, ds, None, epochs=1)
    with pytest.raises(ValueError, match="masks"):
        train(model, [1, 2], ds, None, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- progress ------------------------------------------------------------------------------------

def test_train_progress_bar_and_log(capsys, caplog, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model = models.lenet300_100((1, 4, 4), 2)
    train(model, None, noise((1, 4, 4), 16, k=2), noise((1, 4, 4), 8, k=2), epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "train: 100%" in err and "2/2" in err and "epoch=2" in err and "test_acc=" in err
    assert "epoch/s" in err or "s/epoch" in err  # the rate
    # auto, to a stream that is not a terminal: a short training prints nothing
    train(model, None, noise((1, 4, 4), 16, k=2), None, epochs=1)
    assert capsys.readouterr().err == ""
    # no bar: nothing printed, and each epoch's summary logged at INFO instead
    with caplog.at_level(logging.INFO, logger="ntkfast"):
        train(model, None, noise((1, 4, 4), 16, k=2), None, epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    epochs = [r for r in caplog.records if r.name == "ntkfast.training"]
    assert [r.levelno for r in epochs] == [logging.INFO] * 2
    assert "epoch=1" in epochs[0].getMessage() and "loss=" in epochs[0].getMessage()
    with pytest.raises(TypeError, match="^progress: expected None"):
        train(model, None, noise((1, 4, 4), 16, k=2), None, epochs=1, progress="yes")


def test_train_shows_the_steps_of_an_epoch(capsys, monkeypatch):
    from ntkfast.core import progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)  # as if every step took long
    train(models.lenet300_100((1, 4, 4), 2), None, noise((1, 4, 4), 16, k=2), None, epochs=1, batch_size=4,
          progress=True)
    err = capsys.readouterr().err
    assert "epoch 1:" in err and "/4 [" in err and ("step/s" in err or "s/step" in err)


# -- from a review of the whole package ------------------------------------------------------------


def test_train_attribute_is_always_the_function():
    import ntkfast.training  # noqa: F401  (importing the module must not change what ntkfast.train is)

    from ntkfast.training import train as the_function

    assert ntkfast.train is the_function  # the function, not the module ntkfast.training


def _tiny_images(n=48, name="cifar10"):
    g = torch.Generator().manual_seed(9)
    return data.ImageDataset(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                             torch.randint(0, 10, (n,), generator=g), classes=[str(i) for i in range(10)],
                             mean=(0.5,) * 3, std=(0.25,) * 3, name=name)


def test_augmentation_applies_to_the_raw_batches_and_repeats_with_the_seed():
    from ntkfast import augment

    ds = _tiny_images()
    seen = []

    class Recording(augment.RandomCropFlip):
        def __call__(self, images, generator):
            assert images.dtype == torch.uint8  # raw pixels, before normalisation
            out = super().__call__(images, generator)
            if images.shape[0] == 16:  # the training batches (train first tries it on two images)
                seen.append(out.clone())
            return out

    finals = []
    for seed in (1, 1, 2):
        seen.clear()
        torch.manual_seed(0)
        model = models.get("conv4", input_shape=(3, 16, 16))
        train(model, None, ds, None, epochs=2, batch_size=16, seed=seed, progress=False, augment=Recording(2))
        assert len(seen) == 6  # 3 batches x 2 epochs, every one augmented
        finals.append((model.state_dict(), [s.clone() for s in seen]))
    (a, sa), (b, sb), (c, sc) = finals
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert not all(torch.equal(x, y) for x, y in zip(sa, sc))
    assert not torch.equal(sa[0], sa[3])  # a new draw each epoch


def test_augment_by_recipe_and_auto():
    ds = _tiny_images()
    for aug in ("pad4-crop-flip", "auto"):
        torch.manual_seed(0)
        model = models.get("conv4", input_shape=(3, 16, 16))
        plain = models.get("conv4", input_shape=(3, 16, 16))
        plain.load_state_dict(model.state_dict())
        train(model, None, ds, None, epochs=1, batch_size=16, progress=False, augment=aug)
        train(plain, None, ds, None, epochs=1, batch_size=16, progress=False)
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    # MNIST-like sets train without augmentation in the authors' code: "auto" is then none
    mnist_like = _tiny_images(name="mnist")
    torch.manual_seed(0)
    m1 = models.get("conv4", input_shape=(3, 16, 16))
    m2 = models.get("conv4", input_shape=(3, 16, 16))
    m2.load_state_dict(m1.state_dict())
    train(m1, None, mnist_like, None, epochs=1, batch_size=16, progress=False, augment="auto")
    train(m2, None, mnist_like, None, epochs=1, batch_size=16, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"augment": "crop"}, ValueError, "^augment: unknown recipe"),
    ({"augment": 3}, TypeError, "^augment: expected"),
    ({"augment": "auto", "name": "weird"}, ValueError, "^augment: 'auto' knows no recipe"),
    ({"augment": "pad4-crop-flip", "loader": True}, ValueError, "^augment: .* DataLoader"),
    # a recipe for other image sizes: 64x64 crops of 16x16 images would train and test on different sizes
    ({"augment": "ntksap-tiny-resized-crop-flip"}, ValueError, "^augment: it turns .* 3x16x16 images into 3x64x64"),
])
def test_bad_augment_is_named_before_the_model_changes(kwargs, error, match):
    ds = _tiny_images(name=kwargs.get("name", "cifar10"))
    if kwargs.get("loader"):
        ds = torch.utils.data.DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)),
                                         batch_size=4)
    model = models.get("conv4", input_shape=(3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        train(model, None, ds, None, epochs=1, progress=False, augment=kwargs["augment"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_top5_counts_a_label_among_the_five_highest_outputs():
    from torch import nn

    class Fixed(nn.Module):  # outputs 0..9 rising: class 9 first, then 8, 7, 6, 5
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.arange(10.0).expand(x.shape[0], 10) + self.w

    y = torch.tensor([9, 5, 4, 0, 7, 6])
    batches = [(torch.zeros(6, 2), y)]
    loss, acc, acc5 = evaluate(Fixed(), batches, top5=True)
    assert acc == pytest.approx(1 / 6) and acc5 == pytest.approx(4 / 6)
    assert len(evaluate(Fixed(), batches)) == 2
    result = train(Fixed(), None, batches, batches, epochs=2, optimizer="sgd", lr=0.1, progress=False)
    assert result.test_top5_accuracy == pytest.approx([4 / 6, 4 / 6])
    assert TrainResult.from_dict(result.to_dict()).test_top5_accuracy == result.test_top5_accuracy
    with pytest.raises(TypeError, match="^top5"):
        evaluate(Fixed(), batches, top5=1)
