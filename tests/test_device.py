"""device.py: choosing the device, and subnormal floats flushed while vaekit works on CPU."""

from __future__ import annotations

import pytest
import torch

from vaekit.device import flush_denormals, resolve_device
from vaekit.errors import ConfigError


def test_subnormal_floats_count_as_zero_while_training_on_cpu_and_not_after():
    subnormal = torch.tensor([1e-39])  # below float32's smallest normal number, 1.2e-38
    assert (subnormal * 1.0).item() != 0  # PyTorch's default keeps them
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    with flush_denormals(torch.device("cpu")):
        assert (subnormal * 1.0).item() == 0
    assert (subnormal * 1.0).item() != 0


def test_resolve_device_names_cpu_and_refuses_a_missing_gpu_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
