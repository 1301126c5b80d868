"""Physical removal of pruned channels with Torch-Pruning (skipped where it is not installed): the
smaller model computes what the masked one does, with the parameters the masks predict."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import ntkfast  # noqa: E402
from ntkfast.models import VGG, resnet20  # noqa: E402
from ntkfast.structured import channel_masks, export_torch_pruning  # noqa: E402
from testing import mlp, seeded  # noqa: E402


def random_scores(model, key=0):
    g = seeded("export", key)
    return {n: torch.rand(p.shape, generator=g) for n, p in ntkfast.prunable_parameters(model).items()}


def alive_rows(mask):
    return int(mask.reshape(mask.shape[0], -1).any(1).sum())


def expected_parameters(model, masks):
    """What the cut model should hold: the masks' kept weights, and one bias entry and one
    BatchNorm weight and bias per kept channel."""
    total = masks.kept
    mods = dict(model.named_modules())
    previous = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            previous = name
            if m.bias is not None:
                total += alive_rows(masks[f"{name}.weight"])
        elif isinstance(m, nn.BatchNorm2d):  # in these models a BatchNorm follows its conv
            total += 2 * alive_rows(masks[f"{previous}.weight"])
    assert mods  # the walk saw the model
    return total


def check_export(model, masks, x, atol=1e-5):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = export_torch_pruning(model, masks, x[:1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    masked = masks.apply(copy.deepcopy(model)).eval()
    small.eval()
    with torch.no_grad():
        want, got = masked(x), small(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()
    weights = sum(p.numel() for p in ntkfast.prunable_parameters(small).values())
    assert weights == masks.kept  # every pruned weight left, every kept one still there
    assert sum(p.numel() for p in small.parameters()) == expected_parameters(model, masks)
    return small


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_resnet20_export_equals_the_masked_model(scope):
    torch.manual_seed(0)
    model = resnet20()
    model.train()
    x = torch.randn(8, 3, 32, 32, generator=seeded("x"))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            model(x)
    model.eval()
    masks = channel_masks(model, random_scores(model, scope), 0.5, scope=scope)
    small = check_export(model, masks, x)
    dense = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.55 * dense
    assert small.fc.out_features == 10  # the logits stay
    # tied layers were cut to the same width
    assert small.blocks[3].conv2.out_channels == small.blocks[3].shortcut[0].out_channels == small.blocks[5].conv2.out_channels


def test_small_vgg_and_mlp_export():
    torch.manual_seed(0)
    vgg = VGG([16, "M", 32, "M", 32], (3, 16, 16), 5).eval()
    x = torch.randn(4, 3, 16, 16, generator=seeded("vgg"))
    check_export(vgg, channel_masks(vgg, random_scores(vgg, "vgg"), 0.4), x)
    net = mlp().eval()
    xm = torch.randn(5, 12, generator=seeded("mlp"))
    masks = channel_masks(net, random_scores(net, "mlp"), 0.5, example_inputs=xm)
    small = check_export(net, masks, xm)
    assert small[0].out_features == alive_rows(masks["0.weight"]) < 20


def test_conv_flatten_linear_export():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(3, 3, 6, 6, generator=seeded("flat"))
    masks = channel_masks(model, random_scores(model, "flat"), 0.5, example_inputs=x)
    small = check_export(model, masks, x)
    assert small[4].in_features == 36 * small[0].out_channels


def test_export_through_prune_hooks_and_from_prune():
    torch.manual_seed(0)
    model = resnet20().eval()
    masks = ntkfast.prune(model, "magnitude", 0.6, structure="channel", progress=False)
    hooked = masks.to_prune_hooks(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, generator=seeded("hooks"))
    with torch.no_grad():
        hooked(x)  # the hooks' computed weights, which deepcopy refuses, are in place
    small = export_torch_pruning(hooked, masks, x[:1])
    with torch.no_grad():
        assert torch.allclose(small(x), masks.apply(copy.deepcopy(model))(x), atol=1e-5, rtol=0)
    assert not hasattr(small.conv, "weight_orig")


def test_masks_that_are_not_channel_masks_are_refused():
    torch.manual_seed(0)
    model = resnet20().eval()
    ones = ntkfast.Masks.ones(model)
    x = torch.randn(1, 3, 32, 32)
    conv2 = ones["blocks.3.conv2.weight"].clone()
    conv2[0] = False  # conv2 loses channel 0; its shortcut and the stream's other convs keep it
    with pytest.raises(ValueError, match=r"^masks: output channels \[0\] of blocks\.\d\.(conv2|shortcut\.0) are "
                                         r"tied to pruned channels of blocks\.3\.conv2 but kept"):
        export_torch_pruning(model, ntkfast.Masks({**ones, "blocks.3.conv2.weight": conv2}), x)
    conv1 = ones["blocks.1.conv1.weight"].clone()
    conv1[2] = False  # its reader, blocks.1.conv2, still uses channel 2
    with pytest.raises(ValueError, match=r"^masks: blocks\.1\.conv2 keeps weights on its inputs \[2\]"):
        export_torch_pruning(model, ntkfast.Masks({**ones, "blocks.1.conv1.weight": conv1}), x)


def test_float64_export_cuts_the_channels_and_computes_what_the_masked_model_does():
    torch.manual_seed(0)
    model = resnet20().double()
    x = torch.randn(6, 3, 32, 32, generator=seeded("f64"), dtype=torch.float64)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(2):
            model(x)
    model(x).sum().backward()  # every parameter holds a .grad
    model.eval()
    model.blocks[4].train()  # mixed flags, which the export must neither change nor copy wrongly
    model.conv.weight.requires_grad_(False)
    masks = channel_masks(model, random_scores(model, "f64"), 0.3, aggregate="max")
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              {n: (p.grad.clone(), p.requires_grad) for n, p in model.named_parameters()},
              {n: m.training for n, m in model.named_modules()})

    small = export_torch_pruning(model, masks, x[:1])

    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, before[1][n][0]) and p.requires_grad == before[1][n][1]
               for n, p in model.named_parameters())
    assert {n: m.training for n, m in model.named_modules()} == before[2]
    assert {n: m.training for n, m in small.named_modules()} == before[2]
    assert {n: p.requires_grad for n, p in small.named_parameters()} == {n: r for n, (_, r) in before[1].items()}
    # every layer is physically as wide as the channels its masks keep, and reads only kept ones
    cut = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w, mask = small.get_submodule(name).weight, masks[f"{name}.weight"]
            rows = mask.reshape(mask.shape[0], -1).any(1)
            cols = mask.transpose(0, 1).reshape(mask.shape[1], -1).any(1)
            assert w.dtype == torch.float64 and w.shape[:2] == (int(rows.sum()), int(cols.sum())), name
            cut += int((~rows).sum())
    assert cut > 100
    masked = masks.apply(copy.deepcopy(model)).eval()
    small.eval()
    with torch.no_grad():
        want, got = masked(x), small(x)
    assert got.dtype == torch.float64 and got.shape == want.shape == (6, 10)
    assert torch.allclose(got, want, atol=1e-12, rtol=0), (got - want).abs().max()


def test_export_refuses_what_it_cannot_use_by_name():
    torch.manual_seed(0)
    model = resnet20().eval()
    masks = channel_masks(model, random_scores(model, "bad"), 0.5)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match=r"^example_inputs: expected a tensor or a tuple of tensors"):
        export_torch_pruning(model, masks, [x])
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module"):
        export_torch_pruning(masks, masks, x)
    with pytest.raises(ValueError, match=r"^model: has no module 'blocks.9.conv1'"):
        export_torch_pruning(model, ntkfast.Masks({**masks, "blocks.9.conv1.weight": masks["blocks.8.conv1.weight"]}), x)
    with pytest.raises(ValueError, match=r"^masks\['fc.weight'\] has shape \(10, 3\)"):
        export_torch_pruning(model, ntkfast.Masks({**masks, "fc.weight": torch.ones(10, 3, dtype=torch.bool)}), x)
