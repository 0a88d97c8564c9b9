"""budget: one memory limit for every size a user controls, and the seed range."""

from __future__ import annotations

import pytest

from vaekit import budget
from vaekit.errors import ConfigError, DataError


def test_the_limit_is_half_the_ram_unless_set(monkeypatch):
    monkeypatch.delenv(budget.LIMIT_VARIABLE, raising=False)
    assert budget.memory_limit() == budget.physical_memory() // 2 > 0
    for text, value in [("512M", 512 * 2**20), ("8G", 8 * 2**30), ("1.5k", 1536), ("4096", 4096),
                        ("2GiB", 2 * 2**30)]:
        monkeypatch.setenv(budget.LIMIT_VARIABLE, text)
        assert budget.memory_limit() == value
    monkeypatch.setenv(budget.LIMIT_VARIABLE, "lots")
    with pytest.raises(ConfigError, match="is not a size"):
        budget.memory_limit()


def test_check_bytes_names_the_option_the_limit_and_the_fix(monkeypatch):
    monkeypatch.setenv(budget.LIMIT_VARIABLE, "1M")
    budget.check_bytes("-n 10", 2**20, "lower it")  # exactly the limit fits
    with pytest.raises(DataError) as caught:
        budget.check_elements("-n 300000", 300_000, 4, "lower it", DataError)
    message = str(caught.value)
    assert message.startswith("-n 300000 needs about 1.1 MiB, over vaekit's memory limit of "
                              "1.0 MiB (VAEKIT_MEMORY_LIMIT); lower it")


def test_seeds_must_fit_torch_and_vaekit():
    import torch

    assert budget.check_seed("--seed", budget.MAX_SEED) == 2**63 - 1
    torch.Generator().manual_seed(budget.MAX_SEED)  # torch takes the largest one
    assert budget.check_seed("--seed", -1) == -1  # accepted before: old runs keep loading
    torch.Generator().manual_seed(budget.MIN_SEED)
    for bad in (-(2**63) - 1, 2**63, 2**70, True, 1.0):
        with pytest.raises(ConfigError, match="from -2\\*\\*63 to 2\\*\\*63 - 1"):
            budget.check_seed("--seed", bad)


def test_hard_caps():
    assert budget.check_at_most("classes", 10, 10, "why") == 10
    with pytest.raises(ConfigError, match="classes is 11, over the limit of 10 \\(why\\)"):
        budget.check_at_most("classes", 11, 10, "why")
