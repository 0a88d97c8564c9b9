"""The run-folder compatibility contract: run folders written by earlier vaekit keep working.

tests/fixtures/runs/COMMIT are frozen run folders written by vaekit at COMMIT (see the README
beside them). Each must load, sample, evaluate and resume; options it lacks take the values
that reproduce it (config.ADDED_OPTIONS); an older step log is migrated; a run of a newer
vaekit, a null where a value was resolved, and a state.json that makes no sense are refused in
one line naming what wrote it or what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_vaekit
from vaekit.config import ADDED_OPTIONS
from vaekit.runs import (
    STEP_LOG_COLUMNS,
    latest_checkpoint,
    load_run,
    load_step_log,
    read_run_document,
    tensors_from_file,
)

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
WRITERS = ("bb52941", "76a75dd", "0f6a429")  # oldest first
# What each fixture's config.json lacks: the oldest predates the model family, --lr-decay,
# --precision, --compile, --posterior and --perturb; 76a75dd the last four; 0f6a429 the last two.
# options added after the newest fixture was written: every fixture lacks them (the latent
# family's, the data cache's --data-memory, --skip-bad-images and --fast-resize, and
# --background)
ADDED_AFTER_FIXTURES = {"flow_steps", "latent_groups", "skip_threshold", "data_memory",
                        "skip_bad_images", "fast_resize", "validation_fraction", "patience",
                        "background", "tensorboard"}
LACKS = {"bb52941": set(ADDED_OPTIONS),
         "76a75dd": {"precision", "compile", "posterior", "perturb"} | ADDED_AFTER_FIXTURES,
         "0f6a429": {"posterior", "perturb"} | ADDED_AFTER_FIXTURES}


def copy_fixture(writer: str, tmp_path: Path) -> Path:
    target = tmp_path / f"run-{writer}"
    shutil.copytree(FIXTURES / writer, target)
    return target


def one_line_error(result, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_fixtures_are_what_their_readme_says():
    for writer in WRITERS:
        stored = json.loads((FIXTURES / writer / "config.json").read_text())["config"]
        assert set(ADDED_OPTIONS) - set(stored) == LACKS[writer]
    oldest = latest_checkpoint(FIXTURES / "bb52941")
    assert tensors_from_file(oldest / "optimizer.safetensors")["step_log"].shape[1] == 3


@pytest.mark.parametrize("writer", WRITERS)
def test_old_runs_load_with_the_values_their_version_implies(writer):
    run = load_run(FIXTURES / writer)
    assert set(run.filled_options) == LACKS[writer]
    assert run.filled_options == {k: ADDED_OPTIONS[k] for k in LACKS[writer]}
    # What those values mean: the run computes what its version computed.
    assert run.config.lr_decay == 1.0 and run.config.objective == "elbo"
    assert run.config.precision == "fp32" and run.config.prior_components is None
    current = load_run(FIXTURES / "0f6a429")
    for name, value in current.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], value), name


@pytest.mark.parametrize("writer", WRITERS)
def test_old_runs_sample_and_evaluate(writer, tmp_path):
    run_dir = copy_fixture(writer, tmp_path)
    sampled = run_vaekit("sample", run_dir, "-n", "4", "--out", tmp_path / "s.png")
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "s.png").stat().st_size > 0
    evaluated = run_vaekit("evaluate", run_dir, "--k", "8", "--limit", "20")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Traceback" not in evaluated.stderr
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["n"] == 20 and -60 < result["log_px"] < -30 and result["elbo"] <= result["log_px"]


def test_resumed_old_runs_train_exactly_as_todays(tmp_path):
    """The three fixtures hold bit-identical weights; resumed for one more epoch each, the
    migrated ones (14 options filled in, a 3-column step log) must stay bit-identical to
    today's, step log included."""
    finals = {}
    for writer in WRITERS:
        run_dir = copy_fixture(writer, tmp_path)
        result = run_vaekit("train", "--resume", run_dir, "--epochs", "3", "--no-progress")
        assert result.returncode == 0, result.stderr
        if LACKS[writer]:
            assert "read with the values" in result.stdout + result.stderr
        finals[writer] = (tensors_from_file(run_dir / "model.safetensors"),
                          load_step_log(latest_checkpoint(run_dir)))
        # config.json now states every option; it loads with nothing filled in.
        document = read_run_document(run_dir)
        assert document["filled_options"] == {}
        assert document["config"].epochs == 3
    weights, steps = finals["0f6a429"]
    assert steps.shape == (15, len(STEP_LOG_COLUMNS))
    for writer in WRITERS[:-1]:
        their_weights, their_steps = finals[writer]
        assert all(torch.equal(their_weights[k], v) for k, v in weights.items()), writer
        assert torch.equal(their_steps, steps), writer


def _edit_config(run_dir: Path, edit) -> None:
    path = run_dir / "config.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("edit,words", [
    # an option of a newer vaekit (--posterior is this one's: a later one's --attention-heads)
    (lambda d: d["config"].update(attention_heads=4) or d.update(vaekit_version="9.1.0"),
     ("'attention_heads'", "vaekit 9.1.0", "upgrade vaekit")),
    (lambda d: d.update(config_format="vaekit-config/2", vaekit_version="9.1.0"),
     ("vaekit 9.1.0", "vaekit-config/2", "upgrade vaekit")),
    (lambda d: d.update(format="vaekit-run/7"), ("vaekit-run/7", "upgrade vaekit")),
    (lambda d: d.update(format="something-else/1"), ("not a vaekit run format", "restore")),
    (lambda d: d["config"].update(epochs=None), ("'epochs' is null", "restore")),
    (lambda d: d["config"].update(batch_size=None), ("'batch_size' is null", "restore")),
    (lambda d: d["config"].update(lr=None), ("'lr' is null", "restore")),
    (lambda d: d["config"].update(lr_decay=None), ("'lr_decay' is null", "restore")),
    (lambda d: d["config"].pop("latent_dim"), ("lacks key 'latent_dim'", "restore")),
])
@pytest.mark.parametrize("command", ["sample", "resume"])
def test_runs_that_cannot_be_read_are_refused_in_one_line(tmp_path, edit, words, command):
    run_dir = copy_fixture("76a75dd", tmp_path)
    _edit_config(run_dir, edit)
    before = tree_digest(run_dir)
    args = ("train", "--resume", run_dir, "--epochs", "3", "--no-progress") \
        if command == "resume" else ("sample", run_dir, "--out", tmp_path / "s.png")
    one_line_error(run_vaekit(*args), *words)
    assert tree_digest(run_dir) == before  # config.json not rewritten, nothing pruned


def _rewrite_checkpoint(folder: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and make its manifest agree (a valid-looking lie)."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def _state_edit(change):
    def edit(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        change(state)
        _rewrite_checkpoint(folder, "state.json", json.dumps(state).encode())
    return edit


def _step_log_columns(columns: int):
    def edit(folder: Path) -> None:
        from safetensors.torch import save

        tensors = tensors_from_file(folder / "optimizer.safetensors")
        log = tensors["step_log"]
        tensors["step_log"] = torch.cat([log, log], 1)[:, :columns].contiguous()
        _rewrite_checkpoint(folder, "optimizer.safetensors", save(tensors))
    return edit


@pytest.mark.parametrize("edit,words", [
    (_state_edit(lambda s: s.update(epoch="2")), ("'epoch' has the wrong type",)),
    (_state_edit(lambda s: s.update(global_step=True)), ("'global_step' has the wrong type",)),
    (_state_edit(lambda s: s.update(metrics={"a": 1})), ("'metrics' has the wrong type",)),
    (_state_edit(lambda s: s.update(train_seconds=-1)), ("'train_seconds'",)),
    (_state_edit(lambda s: s.update(optimizer=[])), ("'optimizer' has the wrong type",)),
    (_state_edit(lambda s: s.pop("batch_size")), ("lacks 'batch_size'",)),
    (_state_edit(lambda s: s.update(format="vaekit-train-state/9")), ("upgrade vaekit",)),
    # counters that agree with each other and the random state, but not with the step log
    (_state_edit(lambda s: s.update(global_step=9, epoch=1, step_in_epoch=4,
                                    data_order={"seed": 0, "epoch": 1, "position": 4 * 256},
                                    noise={"seed": 0, "next_step": 9})),
     ("step log holds 10 steps but state.json counts 9",)),
    (_state_edit(lambda s: s.update(global_step=11, epoch=2, step_in_epoch=1,
                                    data_order={"seed": 0, "epoch": 2, "position": 256},
                                    noise={"seed": 0, "next_step": 11})),
     ("step log holds 10 steps but state.json counts 11",)),
    (_step_log_columns(7), ("7 columns", "upgrade vaekit")),
    (_step_log_columns(2), ("2 columns",)),
])
def test_checkpoints_that_make_no_sense_are_refused_in_one_line(tmp_path, edit, words):
    run_dir = copy_fixture("0f6a429", tmp_path)
    edit(latest_checkpoint(run_dir))
    before = tree_digest(run_dir)
    error = one_line_error(run_vaekit("train", "--resume", run_dir, "--epochs", "3",
                                      "--no-progress"), *words)
    assert "step-000000010" in error
    assert tree_digest(run_dir) == before
