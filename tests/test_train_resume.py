"""Training that survives kills, signals, NaNs, full disks and a second writer (train.py).

The reference is always an uninterrupted run with the same seed; "exact" means its weights,
Adam state and per-step losses are equal bit for bit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vaekit.config import TrainConfig
from vaekit.errors import RunError, TrainingError
from vaekit.runs import (
    latest_checkpoint,
    list_checkpoints,
    load_run,
    load_step_log,
    sha256_bytes,
    tensors_from_file,
    verify_checkpoint,
)
from vaekit.train import STEP_COLUMNS, Trainer, build_model, prepare_data, train

REPO = Path(__file__).resolve().parents[1]
BASE = dict(data="digits", epochs=2, batch_size=64, hidden=[32], latent_dim=3, progress=False,
            checkpoint_every_minutes=60.0, seed=1)
BASE_ARGS = ["--epochs", "2", "--batch-size", "64", "--hidden", "32", "--latent-dim", "3",
             "--no-progress", "--checkpoint-every-minutes", "60", "--seed", "1"]
STEPS = 2 * (1438 // 64)  # 44
TIMING = {"train_seconds", "eval_seconds", "images_per_second"}
quiet = (lambda *a, **k: None)


def untimed_metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical weights, Adam state and per-step losses; equal metrics but for timings."""
    assert (run / "model.safetensors").read_bytes() == \
        (reference / "model.safetensors").read_bytes()
    mine, theirs = latest_checkpoint(run), latest_checkpoint(reference)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = tensors_from_file(mine / name), tensors_from_file(theirs / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name} {key}"
    steps = load_step_log(mine)
    assert steps.shape == (STEPS, len(STEP_COLUMNS)) and torch.equal(steps, load_step_log(theirs))
    assert untimed_metrics(run) == untimed_metrics(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, every checkpoint kept (one every 5 steps and one per epoch)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return train(TrainConfig(**BASE, checkpoint_every_steps=5, keep_checkpoints=100,
                             out=str(out)), log=quiet)


def copy_until(reference: Path, step: int, target: Path) -> Path:
    """The reference run as it stood right after its checkpoint of `step`."""
    shutil.copytree(reference, target)
    for saved, folder in list_checkpoints(target):
        if saved > step:
            shutil.rmtree(folder)
    return target


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vaekit", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(run):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# Exact resume


def test_checkpoint_cadence_does_not_change_the_run(reference, tmp_path):
    other = train(TrainConfig(**BASE, out=str(tmp_path / "run")), log=quiet)
    assert_same_run(other, reference)


@pytest.mark.parametrize("step", [5, 20, 22, 35])  # mid-epoch, end of epoch 1, epoch 2
def test_resume_from_any_checkpoint_is_bit_identical(reference, tmp_path, step):
    run = copy_until(reference, step, tmp_path / "run")
    log = []
    train(resume=run, log=log.append)
    assert any(f"step {step}" in line for line in log), log
    assert_same_run(run, reference)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    run = copy_until(reference, 35, tmp_path / "run")
    newest = latest_checkpoint(run)
    data = bytearray((newest / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of an Adam moment
    (newest / "optimizer.safetensors").write_bytes(bytes(data))
    log = []
    train(resume=run, log=log.append)
    assert any("skipping damaged checkpoint" in line for line in log)
    assert any("step 30" in line for line in log)
    assert_same_run(run, reference)


def test_resume_before_the_first_checkpoint_starts_over(reference, tmp_path):
    """A run killed after config.json but before any checkpoint is resumed from step 0."""
    run = copy_until(reference, 0, tmp_path / "run")
    for name in ("model.safetensors", "metrics.jsonl"):
        (run / name).unlink()
    log = []
    train(resume=run, log=log.append)
    assert any("starting it from the beginning" in line for line in log)
    assert_same_run(run, reference)


def test_resume_of_a_finished_run_repairs_the_files_its_kill_left_behind(reference, tmp_path):
    """Killed after its last checkpoint, before model.safetensors and metrics.jsonl were
    rewritten: resume has nothing to train but brings those files up to date."""
    run = copy_until(reference, STEPS, tmp_path / "run")
    older = dict(list_checkpoints(run))[STEPS // 2]
    shutil.copy(older / "model.safetensors", run / "model.safetensors")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    log = []
    train(resume=run, log=log.append)
    assert any("already trained 2 epochs" in line for line in log)
    assert_same_run(run, reference)


def test_a_run_killed_before_config_json_can_be_started_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("vaekit process 1")  # the lock file, its holder long gone
    (run / ".config.json.x1y2.tmp").write_text("{")  # a half-written temporary
    result = cli("train", "--out", run, *BASE_ARGS, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "removed 1 temporary file" in result.stdout
    assert not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------
# Missing or inconsistent random state


def edit_state(checkpoint: Path, change) -> None:
    """Change state.json and re-hash the manifest (as a foreign or older writer would leave it)."""
    state = json.loads((checkpoint / "state.json").read_text())
    change(state)
    data = json.dumps(state).encode()
    (checkpoint / "state.json").write_bytes(data)
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"]["state.json"] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(checkpoint) is None


@pytest.mark.parametrize("damage,problem", [
    (lambda s: s.pop("data_order"), "data-order or noise state is missing"),
    (lambda s: s.pop("noise"), "data-order or noise state is missing"),
    (lambda s: s["data_order"].update(epoch=7), "inconsistent with the step counters"),
    (lambda s: s["noise"].update(seed=99), "seed does not match"),
    (lambda s: s.update(global_step=s["global_step"] + 1,
                        noise={**s["noise"], "next_step": s["global_step"] + 1}),
     "counters contradict each other"),
])
def test_missing_or_corrupt_random_state_is_an_error(reference, tmp_path, damage, problem):
    run = copy_until(reference, 25, tmp_path / "run")
    edit_state(latest_checkpoint(run), damage)
    before = folder_hashes(run)
    result = cli("train", "--resume", run)
    assert result.returncode == 2
    assert problem in result.stderr and "--inexact-resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert folder_hashes(run) == before


def test_inexact_resume_continues_and_is_recorded(reference, tmp_path):
    run = copy_until(reference, 25, tmp_path / "run")
    edit_state(latest_checkpoint(run), lambda s: s.pop("data_order"))
    result = cli("train", "--resume", run, "--inexact-resume")
    assert result.returncode == 0, result.stderr
    assert "continuing inexactly" in result.stdout
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["inexact_resume"] is True
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["inexact_resume"] is True and "inexact_resume" not in records[0]


# ------------------------------------------------------------------------------------------------
# SIGKILL, SIGINT, SIGTERM and the lock, through the real command


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(reference, tmp_path, sig):
    run = tmp_path / "run"
    process = start("train", "--out", run, *BASE_ARGS, "--checkpoint-every-steps", "1")
    wait_for_checkpoint(run, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr
    line = stderr.strip().splitlines()[-1]
    assert f"{sig.name} received: saved the run at step" in line
    assert f"vaekit train --resume {run}" in line
    step = int(line.split("at step ")[1].split()[0])
    newest = latest_checkpoint(run)
    assert json.loads((newest / "state.json").read_text())["global_step"] == step
    assert verify_checkpoint(newest) is None and len(load_step_log(newest)) == step
    result = cli("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


def test_fault_injection_reduced(tmp_path):
    """The benchmark's reduced form: >= 5 SIGKILLs at random moments and inside writes."""
    report_path = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_injection.py"),
                             "--kills", "5", "--seed", "1", "--json", str(report_path),
                             "--no-record"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(report_path.read_text())
    assert report["kills"] >= 5, result.stdout + result.stderr
    assert report["failed_trials"] == 0, json.dumps(report["failures"], indent=1)
    assert result.returncode == 0


def test_a_second_train_into_a_run_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    first = start("train", "--out", run, *BASE_ARGS, "--epochs", "100000",
                  "--checkpoint-every-steps", "1")
    try:
        wait_for_checkpoint(run, first)
        before = (run / "config.json").read_bytes()
        for args in (["--resume", run], ["--out", run, *BASE_ARGS]):
            result = cli("train", *args)
            assert first.poll() is None, "the first run ended: the test needs it running"
            assert result.returncode == 2
            assert f"in use by vaekit process {first.pid}" in result.stderr, result.stderr
            assert "wait for it to finish" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        assert (run / "config.json").read_bytes() == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # the kernel released the lock of the killed process
    result = cli("train", "--resume", run, "--epochs", "1")
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------
# Non-finite losses and gradients; gradient clipping


def trainer_for(tmp_path: Path, **overrides) -> Trainer:
    config = TrainConfig(**{**BASE, **overrides, "out": str(tmp_path / "run")}).with_presets()
    dataset, pipeline, config = prepare_data(config)
    from vaekit.distributed import DistContext

    (tmp_path / "run").mkdir(exist_ok=True)
    return Trainer(config, tmp_path / "run", dataset, pipeline, build_model(config, dataset.shape),
                   torch.device("cpu"), DistContext(), log=quiet)


def folder_hashes(folder: Path) -> dict:
    """Hashes of every file but the lock file (which names the last process that took it)."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


def resumed_trainer(reference: Path, tmp_path: Path, step: int) -> Trainer:
    run = copy_until(reference, step, tmp_path / "run")
    trainer = trainer_for(tmp_path, checkpoint_every_steps=5, keep_checkpoints=100)
    trainer.restore(latest_checkpoint(run), inexact=False)
    return trainer


@pytest.mark.parametrize("term", ["reconstruction", "KL"])
def test_a_non_finite_term_stops_naming_step_and_term(reference, tmp_path, term):
    trainer = resumed_trainer(reference, tmp_path, 22)
    with torch.no_grad():
        if term == "reconstruction":  # NaN logits: log p(x|z) non-finite, q(z|x) untouched
            trainer.model.decoder.net[-1].bias[0] = float("nan")
        else:  # posterior scale 1e30: KL overflows; z is ignored by the decoder, so p(x|z) is fine
            trainer.model.encoder.net[-1].bias[3:] = 1e30
            trainer.model.decoder.net[0].weight.zero_()
    before = folder_hashes(tmp_path / "run")
    with pytest.raises(TrainingError) as error:
        trainer.fit(None)
    message = str(error.value)
    assert f"stopped at step 23 (epoch 2): the {term} term became non-finite" in message
    assert "the last good checkpoint (step 22) is intact" in message and "--lr" in message
    assert folder_hashes(tmp_path / "run") == before  # nothing saved after the failure


@pytest.mark.parametrize("parameter,names", [
    ("decoder.net.0.weight", "the reconstruction term"),
    ("encoder.net.0.weight", "the reconstruction term and the KL term"),
])
def test_a_non_finite_gradient_of_a_finite_loss_is_caught_before_the_update(
        reference, tmp_path, parameter, names):
    trainer = resumed_trainer(reference, tmp_path, 22)
    weights = dict(trainer.model.named_parameters())[parameter]
    weights.register_hook(lambda grad: grad * float("inf"))  # an overflow in backward
    kept = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match=f"step 23 .*: the gradient of {names} became "
                       "non-finite although the loss was finite; the last good checkpoint "
                       r"\(step 22\) is intact"):
        trainer.fit(None)
    for key, value in trainer.model.state_dict().items():  # the update was not applied
        assert torch.equal(value, kept[key]), key


def test_non_finite_loss_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    np.savetxt(tmp_path / "real.csv", rng.normal(size=(100, 5)), delimiter=",")
    run = tmp_path / "run"
    result = cli("train", "--data", tmp_path / "real.csv", "--likelihood", "gaussian",
                 "--gaussian-scale", "1e-30", "--out", run, "--no-progress", "--batch-size", "20")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "vaekit train: error: training stopped at step 1 (epoch 1): the reconstruction term "
        "became non-finite; no checkpoint had been saved yet. Try a lower --lr (now 0.001), "
        "--grad-clip 1.0 or a larger --gaussian-scale (now 1e-30)")
    assert not (run / "model.safetensors").exists() and not list_checkpoints(run)


def test_grad_clip_rescales_the_gradient_to_the_given_norm(tmp_path):
    clipped, free = trainer_for(tmp_path, grad_clip=0.5), trainer_for(tmp_path)
    raw = clipped.train_x[:64]
    noise = torch.Generator().manual_seed(0)
    u = torch.rand(raw.shape, generator=noise)
    eps = torch.randn(64, 3, generator=noise)
    clipped.train_step(raw, u, eps)
    free.train_step(raw, u, eps)
    # after a step .grad holds the gradient that was applied
    g_clipped = torch.cat([p.grad.flatten() for p in clipped.model.parameters()])
    g_free = torch.cat([p.grad.flatten() for p in free.model.parameters()])
    norm = g_free.norm()
    assert norm > 0.5
    torch.testing.assert_close(g_clipped.norm(), torch.tensor(0.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(g_clipped, g_free * (0.5 / norm), rtol=1e-5, atol=1e-9)
    assert not torch.equal(clipped.model.encoder.net[0].weight, free.model.encoder.net[0].weight)


def test_grad_clip_through_the_cli_is_recorded_and_frozen(reference, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--out", run, *BASE_ARGS, "--epochs", "1", "--grad-clip", "1.5")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["config"]["grad_clip"] == 1.5
    result = cli("train", "--resume", run, "--epochs", "2", "--grad-clip", "3")
    assert result.returncode == 2 and "--grad-clip cannot change when resuming" in result.stderr


# ------------------------------------------------------------------------------------------------
# Full disks and unwritable folders


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import vaekit.train

    monkeypatch.setattr(vaekit.train.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(RunError, match=r"1 MiB free but the run needs about \d+ MiB"):
        train(TrainConfig(**BASE, out=str(tmp_path / "run")), log=quiet)
    assert not (tmp_path / "run").exists()


def test_a_failed_save_keeps_the_last_checkpoint_and_resume_is_exact(reference, tmp_path,
                                                                    monkeypatch):
    """ENOSPC from the 40th fsync on (mid-run): a one-line error naming the intact checkpoint."""
    import vaekit.runs

    calls = [0]
    real_fsync = os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(vaekit.runs.os, "fsync", fsync)
    run = tmp_path / "run"
    with pytest.raises(RunError) as error:
        train(TrainConfig(**BASE, checkpoint_every_steps=2, out=str(run)), log=quiet)
    message = str(error.value)
    saved = int(message.split("the last good checkpoint (step ")[1].split(")")[0])
    assert "the disk holding" in message and "is full" in message
    assert f"resume with vaekit train --resume {run}" in message
    monkeypatch.setattr(vaekit.runs.os, "fsync", real_fsync)
    newest = latest_checkpoint(run)
    assert json.loads((newest / "state.json").read_text())["global_step"] == saved
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*"))
    train(resume=run, log=quiet)
    assert_same_run(run, reference)


def test_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("train", "--out", tmp_path / "file" / "run", *BASE_ARGS)
    assert result.returncode == 2
    assert "part of" in result.stderr and "is a file, not a folder" in result.stderr


def mount(*args) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the size asked for (needs root; skipped elsewhere)."""
    mounted = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        if not mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_disk_too_small_is_detected_before_training(small_disk):
    disk = small_disk("4m")
    result = cli("train", "--out", disk / "run", *BASE_ARGS)
    assert result.returncode == 2
    assert "MiB free but the run needs about" in result.stderr
    assert list(disk.iterdir()) == []


def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint(reference, small_disk):
    disk = small_disk("40m")
    run = disk / "run"
    process = start("train", "--out", run, *BASE_ARGS, "--checkpoint-every-steps", "1")
    wait_for_checkpoint(run, process)
    with open(disk / "filler", "wb") as filler:  # fill the disk, then leave 8 KiB
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        filler.truncate(max(filler.tell() - 8192, 0))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    line = stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "is full; the last good checkpoint (step" in line and "is intact" in line
    saved = int(line.split("the last good checkpoint (step ")[1].split(")")[0])
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["global_step"] == saved
    load_run(run)  # the run folder is whole
    (disk / "filler").unlink()
    result = cli("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


def test_a_read_only_run_folder_is_refused_before_training(tiny_run, tmp_path):
    view = tmp_path / "ro"
    view.mkdir()
    if not mount("--bind", str(tiny_run), str(view)):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not mount("-o", "remount,ro,bind", str(view)):
            pytest.skip("cannot remount read-only here")
        result = cli("train", "--resume", view, "--epochs", "5")
        assert result.returncode == 2
        assert "cannot lock the run folder" in result.stderr and "is not writable" in result.stderr
        result = cli("train", "--out", view / "new", *BASE_ARGS)
        assert result.returncode == 2
        assert "cannot create the run folder" in result.stderr and "not writable" in result.stderr
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_timed_checkpoints_can_be_switched_off(tmp_path):
    """checkpoint_every_minutes=None (Python API / config.json) means no timed saves."""
    run = train(TrainConfig(**{**BASE, "epochs": 1, "checkpoint_every_minutes": None},
                            out=str(tmp_path / "run")), log=quiet)
    assert [step for step, _ in list_checkpoints(run)] == [STEPS // 2]
