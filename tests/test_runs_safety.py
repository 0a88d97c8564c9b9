"""The run folder under crashes, full disks, a second user and hostile files (runs.py)."""

from __future__ import annotations

import ast
import errno
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vaekit.errors import RunError
from vaekit.runs import (
    RunLock,
    atomic_write_bytes,
    checkpoint_dir_name,
    latest_checkpoint,
    list_checkpoints,
    load_run,
    parse_checkpoint_name,
    remove_leftovers,
    sha256_bytes,
    tensors_to_bytes,
    verify_checkpoint,
    write_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "vaekit"


def checkpoint_files(step: int) -> dict[str, bytes]:
    """Distinct, checkable content for a checkpoint of `step`."""
    weights = torch.full((64, 32), float(step))
    return {"model.safetensors": tensors_to_bytes({"w": weights}),
            "optimizer.safetensors": tensors_to_bytes({"m": weights * 2, "step_log":
                                                        torch.zeros(step, 3)}),
            "state.json": json.dumps({"step": step}).encode()}


def visible_problems(run: Path) -> list[str]:
    """Every name a reader can see must hold whole content."""
    problems = []
    for _, folder in list_checkpoints(run):
        reason = verify_checkpoint(folder)
        if reason:
            problems.append(f"{folder.name}: {reason}")
    for path in run.iterdir():
        if path.is_file() and not path.name.startswith("."):
            if path.read_bytes() not in (b"old content", b"new content"):
                problems.append(f"{path.name} holds a mix")
    return problems


# ------------------------------------------------------------------------------------------------
# A process killed at every file-system operation of a save


FS_CALLS = ("open", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir", "chmod", "fchmod")


def run_and_die(after_calls: int | None, action) -> int:
    """Fork; the child runs `action` and exits abruptly (as if SIGKILLed: no cleanup, no finally)
    just before its file-system call number `after_calls + 1`. Returns the number of calls the
    action made when it was left to finish (after_calls=None)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        count = [0]
        for name in FS_CALLS:
            real = getattr(os, name)

            def counted(*args, _real=real, **kwargs):
                if after_calls is not None and count[0] >= after_calls:
                    os._exit(137)
                count[0] += 1
                return _real(*args, **kwargs)

            setattr(os, name, counted)
        try:
            action()
        finally:
            os.write(write_end, str(count[0]).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        made = pipe.read()
    os.waitpid(pid, 0)
    return int(made or 0)


@pytest.mark.parametrize("keep", [1, 2])
def test_a_kill_at_any_call_of_a_save_leaves_old_or_new_checkpoint(tmp_path, keep):
    """Checkpoint write, pruning, a re-save of the same step and a run-folder file write, killed
    before each of their file-system calls in turn: every visible name stays whole, the newest
    verified checkpoint is the old or the new one, and the debris is cleaned up."""
    template = tmp_path / "template"
    template.mkdir()
    write_checkpoint(template, 1, checkpoint_files(1), keep=keep)
    (template / "model.safetensors").write_bytes(b"old content")

    def save():
        write_checkpoint(run, 2, checkpoint_files(2), keep=keep)
        write_checkpoint(run, 2, checkpoint_files(2), keep=keep)  # the same step again
        atomic_write_bytes(run / "model.safetensors", b"new content")

    import shutil

    run = tmp_path / "count"
    shutil.copytree(template, run)
    total = run_and_die(None, save)
    assert total > 30  # the save really goes through many calls
    seen_steps = set()
    for n in range(total + 1):
        run = tmp_path / f"killed-{n}"
        shutil.copytree(template, run)
        run_and_die(n, save)
        assert visible_problems(run) == [], f"killed before call {n + 1}"
        newest = latest_checkpoint(run, warn=pytest.fail)
        step = json.loads((newest / "state.json").read_text())["step"]
        assert step in (1, 2)
        assert (newest / "model.safetensors").read_bytes() == \
            checkpoint_files(step)["model.safetensors"]
        seen_steps.add(step)
        remove_leftovers(run)
        assert not [p for p in run.rglob(".*") if p.name != ".lock"], "debris left"
        # the next save after a crash works and prunes to `keep`
        write_checkpoint(run, 3, checkpoint_files(3), keep=keep)
        assert len(list_checkpoints(run)) == keep
        assert not list((run / "checkpoints").glob(".*"))
    assert seen_steps == {1, 2}


def test_same_step_saved_twice_gets_a_new_name(tmp_path):
    first = write_checkpoint(tmp_path, 5, checkpoint_files(5), keep=3)
    second = write_checkpoint(tmp_path, 5, checkpoint_files(5), keep=3)
    assert first.name == checkpoint_dir_name(5) and second.name == checkpoint_dir_name(5, 1)
    assert parse_checkpoint_name(second.name) == (5, 1)
    assert latest_checkpoint(tmp_path) == second
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 5]
    write_checkpoint(tmp_path, 6, checkpoint_files(6), keep=1)
    assert [f.name for _, f in list_checkpoints(tmp_path)] == [checkpoint_dir_name(6)]


def test_newest_checkpoint_is_chosen_by_step_not_by_time(tmp_path):
    new = write_checkpoint(tmp_path, 20, checkpoint_files(20), keep=5)
    old = write_checkpoint(tmp_path, 9, checkpoint_files(9), keep=5)  # written later
    os.utime(old, (4e9, 4e9))
    assert latest_checkpoint(tmp_path) == new
    (new / "model.safetensors").write_bytes(b"corrupt")  # damaged: the older one is taken
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == old
    assert "does not match its SHA-256" in warnings[0]


def test_files_get_the_modes_of_the_umask(tmp_path):
    """Not mkstemp's owner-only 0600: what `open` would give (0666 and 0777 less the umask)."""
    import vaekit.runs

    atomic_write_bytes(tmp_path / "f", b"x")
    folder = write_checkpoint(tmp_path, 1, checkpoint_files(1), keep=1)
    umask = vaekit.runs._UMASK
    assert umask == os.umask(umask)  # read at import; unchanged since
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((folder / "state.json").stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------------------------------------
# A write that fails (disk full)


@pytest.mark.parametrize("failing_call", range(0, 40, 3))
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    write_checkpoint(tmp_path, 1, checkpoint_files(1), keep=1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = [0]
    real_fsync, real_replace = os.fsync, os.replace

    def failing(real):
        def call(*args):
            calls[0] += 1
            if calls[0] > failing_call:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", failing(real_fsync))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    try:
        write_checkpoint(tmp_path, 2, checkpoint_files(2), keep=1)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after == before  # the old checkpoint untouched, no staging folder, no temporaries
        assert latest_checkpoint(tmp_path).name == checkpoint_dir_name(1)
    else:
        # fsync failures in fsync_dir are tolerated (some file systems cannot fsync folders)
        assert latest_checkpoint(tmp_path).name == checkpoint_dir_name(2)


# ------------------------------------------------------------------------------------------------
# The lock


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with RunLock(tmp_path):
        assert RunLock.holder(tmp_path) == f"vaekit process {os.getpid()}"
        with pytest.raises(RunError, match=f"in use by vaekit process {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    assert RunLock.holder(tmp_path) is None
    with RunLock(tmp_path):  # released: can be taken again
        pass


def test_remove_leftovers_only_removes_temporaries(tmp_path):
    write_checkpoint(tmp_path, 1, checkpoint_files(1), keep=1)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".model.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "checkpoints" / ".staging-xyz").mkdir()
    (tmp_path / "checkpoints" / ".staging-xyz" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints" / ".trash-step-000000001").mkdir()
    removed = remove_leftovers(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.json"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [checkpoint_dir_name(1)]


# ------------------------------------------------------------------------------------------------
# Hostile files: nothing is ever unpickled


class Payload:
    """Unpickled, it runs `touch MARKER`: what a hostile 'checkpoint' does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: Path) -> bytes:
    import pickle

    return pickle.dumps({"weights": Payload(marker)}, protocol=2)


def run_guarded(args: list, marker: Path, cwd: Path):
    """Run the CLI with an audit hook that records any attempt to unpickle (find_class)."""
    import subprocess

    hook = textwrap.dedent(f"""
        import sys
        def hook(event, args):
            if event == "pickle.find_class":
                open({str(marker) + '.find_class'!r}, "w").write(repr(args))
        sys.addaudithook(hook)
        from vaekit.cli import main
        raise SystemExit(main({[str(a) for a in args]!r}))
    """)
    return subprocess.run([sys.executable, "-c", hook], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def plant(run: Path, where: str, payload: bytes) -> None:
    """Put the payload at `where`; in a checkpoint, re-hash the manifest so that it verifies."""
    target = run / where
    target.write_bytes(payload)
    if where.startswith("checkpoints/"):
        manifest_path = target.parent / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][target.name] = {"sha256": sha256_bytes(payload), "bytes": len(payload)}
        manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def standardized_run(tmp_path_factory):
    """A short run on real-valued data: it has a pipeline.safetensors too."""
    from vaekit.config import TrainConfig
    from vaekit.train import train

    folder = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    np.save(folder / "real.npy", (rng.normal(size=(200, 6)) * 3 + 1).astype(np.float32))
    config = TrainConfig(data=str(folder / "real.npy"), epochs=1, batch_size=50, hidden=[16],
                         latent_dim=2, progress=False, out=str(folder / "run"))
    return train(config, log=lambda *a, **k: None)


@pytest.mark.parametrize("where,command", [
    ("model.safetensors", "sample"),
    ("model.safetensors", "reconstruct"),
    ("pipeline.safetensors", "sample"),
    ("checkpoints/LATEST/model.safetensors", "resume"),
    ("checkpoints/LATEST/optimizer.safetensors", "resume"),
    ("checkpoints/LATEST/state.json", "resume"),
])
def test_a_planted_pickle_is_refused_and_never_executed(standardized_run, tmp_path, where,
                                                        command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(standardized_run, run)
    marker = tmp_path / "PWNED"
    newest = latest_checkpoint(run).name
    plant(run, where.replace("LATEST", newest), malicious_pickle(marker))
    args = {"sample": ["sample", run, "-n", "4", "--out", tmp_path / "s.png"],
            "reconstruct": ["reconstruct", run, "--out", tmp_path / "r.png"],
            "resume": ["train", "--resume", run, "--epochs", "2", "--no-progress"]}[command]
    result = run_guarded(args, marker, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "not a readable safetensors file" in result.stderr or "training state is unreadable" \
        in result.stderr, result.stderr
    assert not marker.exists(), "the pickle was executed"
    assert not Path(str(marker) + ".find_class").exists(), "an unpickler was started"


@pytest.mark.parametrize("kind", ["npy-object", "npz-object", "torch-save-as-npy", "png"])
def test_a_pickle_given_as_data_is_refused_and_never_executed(tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = malicious_pickle(marker)
    objects = np.empty(2, dtype=object)
    objects[0] = objects[1] = Payload(marker)
    if kind == "npy-object":  # np.save of an object array embeds a pickle
        data = tmp_path / "evil.npy"
        np.save(data, objects, allow_pickle=True)
    elif kind == "npz-object":
        data = tmp_path / "evil.npz"
        np.savez(data, x=objects, allow_pickle=True)
    elif kind == "torch-save-as-npy":
        data = tmp_path / "evil.npy"
        data.write_bytes(payload)
    else:
        data = tmp_path / "images"
        data.mkdir()
        (data / "a.png").write_bytes(payload)
        (data / "b.png").write_bytes(payload)
    result = run_guarded(["train", "--data", data, "--out", tmp_path / "run", "--no-progress"],
                         marker, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists(), "the pickle was executed"
    assert not Path(str(marker) + ".find_class").exists(), "an unpickler was started"
    assert not (tmp_path / "run").exists()


def test_no_code_path_can_unpickle():
    """A static guard over the whole package: no pickle-based loader is called anywhere."""
    forbidden_modules = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names
                             if a.name.split(".")[0] in forbidden_modules]
            elif isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] in forbidden_modules:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                owner = ast.unparse(node.func.value)
                if name == "load" and owner == "torch":
                    problems.append(f"{where} calls torch.load")
                if name == "load" and owner in ("np", "numpy"):
                    flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if flags.get("allow_pickle") != "False":
                        problems.append(f"{where} calls np.load without allow_pickle=False")
                if name in ("read_pickle", "from_pickle"):
                    problems.append(f"{where} calls {name}")
    assert problems == []


def test_load_run_reads_weights_without_pickle(tiny_run):
    run = load_run(tiny_run)
    assert sum(p.numel() for p in run.model.parameters()) > 0
