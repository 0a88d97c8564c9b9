"""CPU threads: a fair share of the usable cores under load, and the user's choice respected."""

from __future__ import annotations

import os

import pytest
import torch

from vaekit import threads


@pytest.mark.parametrize("cores,load,expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 7.0, 1), (16, 3.2, 13), (16, 40.0, 1),
    (4, float("nan"), 4), (1, 0.0, 1),
])
def test_fair_threads(cores, load, expected):
    assert threads.fair_threads(cores, load) == expected


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_load_and_affinity_decide_unless_the_user_chose(monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.7, 2.0, 1.0))
    line = threads.choose_threads()
    assert torch.get_num_threads() == 1 and line.startswith("using 1 of 4 CPU cores")
    assert "OMP_NUM_THREADS" in line
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.choose_threads() is None and torch.get_num_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(2)
    assert threads.choose_threads() is None and torch.get_num_threads() == 2  # left alone


def test_passive_waits_only_when_the_user_did_not_choose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads.prepare_openmp()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.prepare_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
