"""ntkfast.ops.loader: which kernels run where, and the warnings when they cannot."""
import warnings

import pytest
import torch


# -- from a review of the whole package ------------------------------------------------------------


def test_tensors_on_devices_without_kernels_warn_once(monkeypatch):
    from ntkfast.ops import loader

    monkeypatch.setattr(loader.STATE, "device_warned", set())
    with pytest.warns(RuntimeWarning, match="meta tensors use the pure-PyTorch reference"):
        assert loader.use_kernel(torch.device("meta")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.use_kernel(torch.device("meta"))
