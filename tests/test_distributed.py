"""Several processes: torchrun runs of the real command on CPU (gloo), against one process.

Every multi-process test launches `python -m torch.distributed.run --nproc-per-node 2` (or
`vaekit train --nproc 2`, which goes through the same launcher) on a free port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import train_tiny

from vaekit.distributed import DistContext, ProcessFailed, _parse_test_failures
from vaekit.errors import ConfigError, VaekitError
from vaekit.randomness import epoch_permutation
from vaekit.runs import latest_checkpoint, tensors_from_file
from vaekit.train import STEP_COLUMNS, build_model, train

SMALL = ["--hidden", "32", "--latent-dim", "3", "--no-progress", "--checkpoint-every-minutes",
         "60"]
SMALL_CONFIG = dict(hidden=[32], latent_dim=3, progress=False, checkpoint_every_minutes=60.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def torchrun(*args, nproc: int = 2, cwd: Path | None = None, env: dict | None = None,
             module: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N -m vaekit ARGS` (or a script)."""
    for _ in range(3):  # another program may take the free port before torchrun binds it
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), *(["-m", "vaekit"] if module else []),
                   *map(str, args)]
        result = subprocess.run(command, cwd=cwd, env=environment(env), capture_output=True,
                                text=True, timeout=timeout)
        if "EADDRINUSE" not in result.stderr:
            break
    return result


def vaekit(*args, cwd: Path | None = None, env: dict | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], cwd=cwd,
                          env=environment(env), capture_output=True, text=True, timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    return tensors_from_file(run / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def exit_codes(stderr: str) -> dict[int, int]:
    """rank -> exit code, from torchrun's failure summary."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


# ------------------------------------------------------------------------------------------------
# One process: the same calls are no-ops


def test_alone_every_call_is_a_no_op(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    context = DistContext.from_env()
    assert not context.enabled and context.world_size == 1 and context.is_main
    values = torch.tensor([[1.5, -2.0, 0.25]])
    assert context.mean_over_processes(values, 7) is values
    assert context.any_of([True, False], torch.device("cpu")) == [True, False]
    assert context.rows(64) == slice(0, 64)
    with pytest.raises(OSError):  # alone, a failure stays what it is
        with context.same_outcome("save"):
            raise OSError("disk full")


def test_a_half_described_launch_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        DistContext.from_env()


def test_the_test_hook_names_rank_point_count_and_action():
    spec = "1:sync:2, 0:save:1:hang, 1:setup"
    assert _parse_test_failures(spec, 1) == {"sync": (2, "fail"), "setup": (1, "fail")}
    assert _parse_test_failures(spec, 0) == {"save": (1, "hang")}
    with pytest.raises(ConfigError):
        _parse_test_failures("one:sync", 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_epoch_is_shared_out_without_repeats(world):
    """The rows the trainer takes (DistContext.rows of each global batch of the epoch's order):
    no example twice in an epoch, on one process or across them; together the whole batches."""
    n, batch = 1438, 60  # digits' training set; 23 full batches, 58 examples left over
    steps = n // batch
    orders = []
    for epoch in range(3):
        order = epoch_permutation(n, seed=0, epoch=epoch)
        assert torch.equal(order, epoch_permutation(n, seed=0, epoch=epoch))  # seeded
        seen = []
        for rank in range(world):
            rows = DistContext(rank=rank, world_size=world).rows(batch)
            for b in range(steps):
                seen.append(order[b * batch + rows.start: b * batch + rows.stop])
        seen = torch.cat(seen)
        assert len(seen) == steps * batch == len(set(seen.tolist()))
        assert set(seen.tolist()) == set(order[:steps * batch].tolist())
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # the order depends on the epoch


# ------------------------------------------------------------------------------------------------
# Two processes against one


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch of digits on two processes, in the default run folder (read-only)."""
    cwd = tmp_path_factory.mktemp("two")
    result = torchrun("train", "--epochs", "1", "--batch-size", "64", *SMALL,
                      "--checkpoint-every-steps", "7", "--keep-checkpoints", "9", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_two_processes_train_digits_like_one(two_process_run, tmp_path):
    cwd, result = two_process_run
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits-mlp-")  # rank 0 named it for all
    two = runs[0]
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
    for name in ("config.json", "model.safetensors", "samples.png", "reconstructions.png",
                 "curves.png"):
        assert (two / name).is_file(), name
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 reports
    # Step checkpoints come at their steps, not only where the processes agree on stops (20).
    assert [folder.name for folder in sorted((two / "checkpoints").iterdir())] == \
        ["step-000000007", "step-000000014", "step-000000021", "step-000000022"]
    assert "x 2 processes (gloo)" in result.stdout

    one = train_tiny(tmp_path / "one", epochs=1, batch_size=64, **SMALL_CONFIG)
    (row_two,), (row_one,) = metrics(two), metrics(one)
    assert abs(row_two["test_elbo"] - row_one["test_elbo"]) < 1.0  # the bar
    for key in ("test_elbo", "test_kl", "train_elbo", "train_kl"):  # in fact the same numbers,
        assert abs(row_two[key] - row_one[key]) < 1e-4, key  # up to float rounding
    assert max_difference(weights(two), weights(one)) < 1e-6


def test_one_update_step_is_the_same_on_two_processes(tmp_path):
    # The whole training set (1438 digits) is one global batch: 1 epoch = 1 step, 719 rows each.
    options = ["--epochs", "1", "--batch-size", "1438", "--out", tmp_path / "two", *SMALL]
    result = torchrun("train", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    one = train_tiny(tmp_path / "one", epochs=1, batch_size=1438, **SMALL_CONFIG)
    two = tmp_path / "two"

    config = json.loads((one / "config.json").read_text())["config"]
    from vaekit.config import TrainConfig

    start = build_model(TrainConfig.from_dict(config), (1, 8, 8)).state_dict()
    moved = max_difference(weights(one), start)
    assert 5e-4 < moved < 2e-3  # Adam's first step moves each weight by about lr = 1e-3
    assert max_difference(weights(two), weights(one)) < 1e-6
    step_two = tensors_from_file(latest_checkpoint(two) / "optimizer.safetensors")["step_log"]
    step_one = tensors_from_file(latest_checkpoint(one) / "optimizer.safetensors")["step_log"]
    assert step_two.shape == step_one.shape == (1, len(STEP_COLUMNS))  # loss, terms, beta...
    torch.testing.assert_close(step_two, step_one, rtol=1e-6, atol=1e-5)  # summed, not rank 0's


def test_one_update_step_of_a_hierarchy_is_the_same_on_two_processes(tmp_path):
    """The hierarchical VAE through the same latent interface: two processes, one step."""
    options = ["--epochs", "1", "--batch-size", "1438", "--latent-groups", "2,3", "--hidden",
               "32", "--no-progress"]
    result = torchrun("train", *options, "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    one = train_tiny(tmp_path / "one", epochs=1, batch_size=1438, hidden=[32],
                     latent_groups=[2, 3], latent_dim=5, progress=False)
    assert max_difference(weights(tmp_path / "two"), weights(one)) < 1e-6


def test_two_process_run_resumes_on_one_process(two_process_run, tmp_path):
    import shutil

    (original,) = (two_process_run[0] / "runs").iterdir()
    run = tmp_path / "run"
    shutil.copytree(original, run)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 22

    train(resume=run, overrides={"epochs": 2}, log=lambda *a, **k: None)  # one process
    straight = train_tiny(tmp_path / "straight", epochs=2, batch_size=64, **SMALL_CONFIG)
    assert [r["step"] for r in metrics(run)] == [22, 44]
    assert max_difference(weights(run), weights(straight)) < 1e-5
    assert abs(metrics(run)[-1]["test_elbo"] - metrics(straight)[-1]["test_elbo"]) < 1e-3


def test_one_process_run_resumes_on_two_with_nproc(tmp_path):
    run = train_tiny(tmp_path / "run", epochs=1, batch_size=64, **SMALL_CONFIG)
    result = vaekit("train", "--resume", run, "--epochs", "2", "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stdout and "x 2 processes (gloo)" in result.stdout
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 44
    straight = train_tiny(tmp_path / "straight", epochs=2, batch_size=64, **SMALL_CONFIG)
    assert max_difference(weights(run), weights(straight)) < 1e-5
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


EVALUATION_WORKER = """
import json, sys
import numpy as np, torch
from vaekit.distributed import DistContext, ProcessFailed
from vaekit.errors import VaekitError
from vaekit.estimate import elbo_per_example, map_examples
from vaekit.runs import load_run, load_run_dataset

run_dir, out = sys.argv[1], sys.argv[2]
dist = DistContext.from_env("cpu")
run = load_run(run_dir)
test_x = load_run_dataset(run).test_x
terms = elbo_per_example(run.model, test_x, run.pipeline, seed=3, batch_size=50, dist=dist)
ranks = map_examples(lambda x, start, stop: torch.full((stop - start, 1), float(dist.rank)),
                     test_x, run.pipeline, "test", 50, torch.device("cpu"), dist)
# Rank r holds r + 1 examples of value r + 1: the mean of all is (1 + 2 * 2) / 3.
mean = dist.mean_over_processes(torch.tensor([float(dist.rank + 1)]), count=dist.rank + 1)
flags = dist.any_of([dist.rank == 1, False], torch.device("cpu"))
try:
    with dist.same_outcome("block"):
        if dist.rank == 1:
            raise VaekitError("disk full on this one")
    caught = None
except ProcessFailed as exc:
    caught = {"message": str(exc), "rank": exc.rank, "quiet": exc.reported_elsewhere}
with open(f"{out}/rank{dist.rank}.json", "w") as handle:
    json.dump({"mean": mean.item(), "flags": flags, "caught": caught}, handle)
if dist.is_main:
    np.save(f"{out}/terms.npy", terms.numpy())
    np.save(f"{out}/ranks.npy", ranks.numpy())
dist.shutdown()
"""


def test_distributed_evaluation_equals_one_process(tiny_run, tmp_path):
    from vaekit.estimate import elbo_per_example
    from vaekit.runs import load_run, load_run_dataset

    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(EVALUATION_WORKER))
    result = torchrun(worker, tiny_run, tmp_path, module=False)
    assert result.returncode == 0, result.stderr[-3000:]
    import numpy as np

    run = load_run(tiny_run)
    test_x = load_run_dataset(run).test_x
    alone = elbo_per_example(run.model, test_x, run.pipeline, seed=3, batch_size=50)
    together = torch.from_numpy(np.load(tmp_path / "terms.npy"))
    assert together.shape == (len(test_x), 2)
    assert torch.equal(together, alone)  # zeros added to each process's rows: bit-identical
    ranks = torch.from_numpy(np.load(tmp_path / "ranks.npy"))[:, 0]
    chunks = torch.arange(len(test_x)) // 50
    assert torch.equal(ranks, (chunks % 2).double())  # chunks went to both processes in turn

    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["mean"] == pytest.approx(5 / 3)  # sums and counts, not a mean of means
        assert report["flags"] == [True, False]
        assert report["caught"] == {"message": "rank 1 of 2: disk full on this one", "rank": 1,
                                    "quiet": rank != 1}


# ------------------------------------------------------------------------------------------------
# A failure on one process stops all, with its message


def test_a_setup_failure_on_rank_1_stops_both_with_its_message(tmp_path):
    started = time.monotonic()
    result = vaekit("train", "--nproc", "2", "--out", tmp_path / "run", "--epochs", "2", *SMALL,
                    env={"VAEKIT_TEST_FAILURE": "1:setup"})
    assert time.monotonic() - started < 120
    assert result.returncode == 2
    message = "vaekit train: error: rank 1 of 2: injected failure at setup 1"
    assert result.stderr.count(message) == 1, result.stderr  # printed once, by rank 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_failure_mid_training_stops_both_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    # The second stop/checkpoint agreement is at step 40, in epoch 2 (22 steps per epoch).
    started = time.monotonic()
    result = torchrun("train", "--epochs", "3", "--batch-size", "64", "--out", run, *SMALL,
                      env={"VAEKIT_TEST_FAILURE": "1:sync:2"})
    assert time.monotonic() - started < 120
    assert result.returncode != 0
    message = "vaekit train: error: rank 1 of 2: injected failure at sync 2"
    assert result.stderr.count(message) >= 1, result.stderr[-3000:]  # rank 1's, + the summary
    assert "Connection closed" not in result.stderr  # rank 0 stopped quietly, not with gloo's
    assert [r["epoch"] for r in metrics(run)] == [1]
    train(resume=run, log=lambda *a, **k: None)  # the last checkpoint is whole: it resumes
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_a_process_blocked_when_another_fails_is_ended_by_its_watchdog(tmp_path):
    # Rank 0 hangs where rank 1 fails, as a process waiting in an nccl collective would.
    # torchrun alone would wait 30 s and then kill it; the watchdog ends it with rank 1's
    # message after GRACE_SECONDS.
    started = time.monotonic()
    result = torchrun("train", "--epochs", "3", "--batch-size", "64", "--out", tmp_path / "run",
                      *SMALL, env={"VAEKIT_TEST_FAILURE": "1:sync:2,0:sync:2:hang"})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert exit_codes(result.stderr) == {0: 2, 1: 2}, result.stderr[-3000:]  # not killed (-9)
    assert "vaekit: error: rank 1 of 2: injected failure at sync 2" in result.stderr  # rank 0's
    assert elapsed < 120


# ------------------------------------------------------------------------------------------------
# `vaekit evaluate` (importance-sampled log p(x)) under torchrun


def _has_evaluate() -> bool:
    from vaekit.cli import COMMANDS

    return "evaluate" in COMMANDS


@pytest.mark.skipif(not _has_evaluate(), reason="this vaekit has no `evaluate` command yet")
def test_evaluate_under_torchrun_equals_one_process(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # 120 examples in chunks of 25: five chunks, shared out between the two processes.
    options = ["evaluate", run, "--k", "64", "--limit", "120", "--batch-size", "25", "--json",
               "--no-progress"]
    alone = vaekit(*options)
    assert alone.returncode == 0, alone.stderr[-3000:]
    together = torchrun(*options)
    assert together.returncode == 0, together.stderr[-3000:]
    one, two = json.loads(alone.stdout), json.loads(together.stdout)  # rank 0 alone prints
    assert (one.pop("processes"), two.pop("processes")) == (1, 2)
    one.pop("seconds"), two.pop("seconds")
    assert two == one  # every estimate, standard error and count, exactly
    assert json.loads((run / "evaluation.json").read_text())["processes"] == 2
