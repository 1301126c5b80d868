"""to_semi_structured's checks on the CPU (the conversion itself runs in GPU ladder stage 6)."""
import pytest
import torch
from torch import nn

import ntkfast
from ntkfast.structured import check_two_four, to_semi_structured

CUDA_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def test_check_two_four_names_what_is_not_2_4():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    masks = ntkfast.prune(model, "magnitude", None, structure="2:4", progress=False)
    assert check_two_four(dict(masks)) == {"0.weight": "", "2.weight": ""}
    bad = dict(masks)
    bad["0.weight"] = bad["0.weight"].clone()
    bad["0.weight"][0, :4] = True
    assert check_two_four(bad)["0.weight"] == "1 group(s) of 4 do not keep exactly 2"
    assert check_two_four({"w": torch.ones(3, 6, dtype=torch.bool)})["w"] == "6 columns, not a multiple of 4"
    assert check_two_four({"c": torch.ones(4, 4, 3, 3, dtype=torch.bool)})["c"].startswith("4-d")
    with pytest.raises(ValueError, match="^masks: 'w' is not a bool tensor"):
        check_two_four({"w": torch.ones(4, 4)})


@pytest.mark.skipif(CUDA_SM80, reason="checks the refusal without a suitable GPU")
def test_without_a_suitable_gpu_the_model_is_named():
    model = nn.Sequential(nn.Linear(64, 64))
    masks = ntkfast.prune(model, "magnitude", None, structure="2:4", progress=False)
    with pytest.raises(ValueError, match="^model: semi-structured sparse weights need a CUDA device"):
        to_semi_structured(model, masks)
    with pytest.raises(ValueError, match="^masks: expected a non-empty mapping"):
        to_semi_structured(model, {})
    with pytest.raises(ValueError, match=r"^masks: \['nope.weight'\] name no parameter"):
        to_semi_structured(model, {"nope.weight": torch.ones(2, 4, dtype=torch.bool)})


@pytest.mark.skipif(not CUDA_SM80, reason="needs a CUDA GPU of compute capability 8.0 or more")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_copy_computes_what_the_masked_model_computes(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
    model = model.to("cuda", dtype)
    masks = ntkfast.prune(model, "magnitude", None, structure="2:4", exclude="4", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast, dense = to_semi_structured(model, masks)
    assert "0.weight" not in dense and "2.weight" not in dense and "4.weight" in dense
    masked = masks.apply(__import__("copy").deepcopy(model))
    x = torch.randn(128, 256, device="cuda", dtype=dtype)
    torch.testing.assert_close(fast(x), masked(x), rtol=2e-2, atol=2e-2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pruning_hooks_are_refused_by_name():
    model = nn.Sequential(nn.Linear(64, 64))
    masks = ntkfast.prune(model, "magnitude", None, structure="2:4", progress=False)
    masks.to_prune_hooks(model)
    with pytest.raises(ValueError, match="^model: '0.weight_orig' is re-parametrised by torch.nn.utils.prune"):
        to_semi_structured(model, masks)
