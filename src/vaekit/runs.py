"""The run folder: atomic files, checkpoints with manifests, a lock, and loading a trained model.

    RUN_DIR/
      config.json            TrainConfig + dataset facts: all that rebuilds model and data pipeline
      model.safetensors      the latest weights
      metrics.jsonl          one JSON object per epoch
      samples.png, reconstructions.png, curves.png
      checkpoints/step-000001234/
          model.safetensors  optimizer.safetensors  state.json  MANIFEST.json (written last)

Every file is written to a temporary name in its folder, flushed, fsynced and renamed, and the
folder is fsynced; a checkpoint is assembled in a temporary folder and renamed into place once
its manifest (SHA-256 of every file) is written, and an old one is renamed out of sight before
it is deleted. So whenever a process dies, every name a reader looks at (files of the run
folder, `step-*` folders) holds complete content; the only debris are dot-named temporaries
(`.NAME.*.tmp`, `checkpoints/.staging-*`, `checkpoints/.trash-*`), removed by the next process
that takes the run's lock. Nothing here ever unpickles: weights and optimizer tensors are
safetensors, everything else JSON.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import jsonio
from .budget import check_elements
from .config import CONFIG_FORMAT, TrainConfig
from .data import Dataset, Pipeline, dataset_for
from .errors import ConfigError, DataError, RunError
from .model import VAE, ModelConfig, build_vae
from .safefiles import (open_private, printable, read_regular, real_folder, refuse_link,
                        remove_tree)

RUN_FORMAT = "vaekit-run/1"
CHECKPOINT_PREFIX = "step-"
# Columns of the per-step log kept in every checkpoint (optimizer.safetensors "step_log"): the
# loss, the batch means of the two ELBO terms (nats), the KL weight beta of the step, and the
# free-bits groups at their floor.
STEP_LOG_COLUMNS = ("loss", "reconstruction", "kl", "beta", "kl_groups_at_floor",
                    "skipped_update")

# mkstemp/mkdtemp create owner-only files; run folders get the modes `open` would give them.
# The umask can only be read by setting it, so it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of the new, never part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value) -> None:
    atomic_write_text(path, jsonio.dumps(value, indent=2) + "\n")  # never NaN or Infinity


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding {path} is full"
    if exc.errno == errno.EFBIG:
        return f"a file in {path} would exceed the file size limit (ulimit -f)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path} is not writable"
    if exc.errno == errno.ENOTDIR:
        return f"part of {path} is a file, not a folder"
    return f"cannot write {path} ({exc.strerror or exc})"


@contextlib.contextmanager
def writing(what: str, where: Path, advice: str | Callable[[], str]) -> Iterator[None]:
    """Writes to a run folder in the block; an OSError becomes one RunError line,
    "{what}: {why, in words}; {advice}", without a traceback (the one place that says so).
    advice may be a function, called when the error happens (to say what is saved by then)."""
    try:
        yield
    except OSError as exc:
        advice = advice() if callable(advice) else advice
        raise RunError(f"{what}: {describe_os_error(exc, where)}; {advice}") from None


# ------------------------------------------------------------------------------------------------
# Tensors <-> bytes, without pickle


def tensors_to_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def tensors_from_file(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(read_regular(Path(path), "a safetensors file", RunError))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}); "
                       "the run folder is damaged, restore the file or retrain") from None


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                         meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------------
# Lock


class RunLock:
    """An exclusive lock on a run folder, released by the kernel even if the process is killed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> "RunLock":
        import fcntl

        # Never through a link: a planted .lock -> ~/file would be truncated below.
        with writing("cannot lock the run folder", self.path, "choose another --out"):
            fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
            self.handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise RunError(f"{self.path.parent} is in use by {holder}; wait for it to finish or "
                           "choose another --out") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"vaekit process {os.getpid()}")
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None

    @staticmethod
    def holder(run_dir: Path) -> str | None:
        """Who holds the lock of `run_dir` ("vaekit process PID"), or None if nobody does."""
        import fcntl

        path = Path(run_dir) / ".lock"
        try:
            handle = os.fdopen(open_private(path, os.O_RDONLY), "r")
        except (OSError, RunError):
            return None  # absent, or a link or special file, which taking the lock refuses
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return handle.read().strip() or "another process"
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None


# ------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir_name(step: int, generation: int = 0) -> str:
    """step-000001234; a later save of the same step is step-000001234.1, .2, ..."""
    return f"{CHECKPOINT_PREFIX}{step:09d}" + (f".{generation}" if generation else "")


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(step, generation) of a checkpoint folder name, None for any other name."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    step, dot, generation = name[len(CHECKPOINT_PREFIX):].partition(".")
    if not step.isdigit() or (dot and not generation.isdigit()):
        return None
    return int(step), int(generation or 0)


def write_checkpoint(run_dir: Path, step: int, files: dict[str, bytes], keep: int) -> Path:
    """Write a checkpoint folder whose MANIFEST.json (hashes of the others) is written last.

    The folder is assembled under a temporary name and renamed into place, so a crash leaves
    either no checkpoint of this step or a complete one; older checkpoints are pruned after.
    A second save of the same step (a time limit reached right after a periodic save) goes to
    a new name rather than replacing the first: replacing would open a moment with neither.
    """
    root = Path(run_dir) / "checkpoints"
    real_folder(root, create=True)  # a link would put (and prune) checkpoints elsewhere
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)
        manifest = {"format": "vaekit-checkpoint/1", "step": step, "files": {}}
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
            manifest["files"][name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        atomic_write_json(staging / "MANIFEST.json", manifest)
        generation = 0
        while (root / checkpoint_dir_name(step, generation)).exists():
            generation += 1
        final = root / checkpoint_dir_name(step, generation)
        os.rename(staging, final)
        fsync_dir(root)
    except BaseException:
        remove_tree(staging)
        raise
    prune_checkpoints(root, keep)
    return final


MANIFEST_SCHEMA = {"format": str, "step": int, "files": dict}
MANIFEST_ENTRY = {"sha256": str, "bytes": int}
# The largest checkpoint file a manifest may promise: weights and Adam's two moments of a model
# under the memory limit are each at most that limit.
CHECKPOINT_FILE_SLACK = 2**20


def verify_checkpoint(folder: Path) -> str | None:
    """None if every file matches the manifest, else the reason it does not.

    The manifest is untrusted JSON: it may only name plain files of its own folder (no path
    separators, no links out), regular files of the size it states; a FIFO listed in it is
    refused, not read (reading would block).
    """
    from .budget import memory_limit

    if (folder / "MANIFEST.json").is_symlink() or not (folder / "MANIFEST.json").exists():
        return "no readable MANIFEST.json"
    try:
        manifest = jsonio.read_json(folder / "MANIFEST.json", "a checkpoint manifest",
                                    schema=MANIFEST_SCHEMA)
        for name, entry in manifest["files"].items():
            jsonio.check(entry, MANIFEST_ENTRY, f"MANIFEST.json entry {name!r}")
    except RunError as exc:
        return f"unusable MANIFEST.json ({str(exc).split(': ', 1)[-1].split(';')[0]})"
    for name, entry in manifest["files"].items():
        if name in ("", ".", "..", "MANIFEST.json") or "/" in name or "\\" in name \
                or "\0" in name:
            return f"the manifest names {name!r}, which is not a file of the checkpoint"
        path = folder / name
        if path.is_symlink():
            return f"{name} is a symbolic link"
        if not path.exists():
            return f"{name} is missing"
        limit = memory_limit() + CHECKPOINT_FILE_SLACK
        try:
            data = read_regular(path, "a checkpoint file", RunError, max_bytes=limit)
        except RunError as exc:
            return str(exc).split(": ", 1)[-1].split(";")[0]
        except OSError:
            return f"{name} is unreadable"
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders, newest step first (by the step in their name, not their mtime)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if real_folder(root):  # a link to another run's checkpoints is refused, never pruned
        for folder in root.iterdir():
            order = parse_checkpoint_name(folder.name)
            if order is not None:
                refuse_link(folder)  # resuming from, or pruning, a folder outside the run
                found.append((order, folder))
    return [(step, folder) for (step, _), folder in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint whose manifest verifies; damaged ones are reported and skipped."""
    for _, folder in list_checkpoints(run_dir):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        warn(f"warning: skipping damaged checkpoint {folder.name}: {problem}")
    return None


def prune_checkpoints(root: Path, keep: int) -> None:
    for _, folder in list_checkpoints(root.parent)[keep:]:
        # Out of sight first: a crash in the middle of rmtree must not leave a step-* folder
        # that has lost some of its files.
        trash = root / f".trash-{folder.name}"
        remove_tree(trash)
        os.rename(folder, trash)  # a step-* link is renamed itself, and then only unlinked
        fsync_dir(root)
        remove_tree(trash)
    for leftover in [*root.glob(".staging-*"), *root.glob(".trash-*")]:  # from earlier crashes
        remove_tree(leftover)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporaries a killed process left in a run folder; returns what was removed.

    Only call with the run's lock held: the temporaries of a live writer look the same.
    """
    run_dir = Path(run_dir)
    removed = [p for p in run_dir.glob(".*" + TMP_SUFFIX) if p.is_file() or p.is_symlink()]
    root = run_dir / "checkpoints"
    if real_folder(root):
        removed += [*root.glob(".staging-*"), *root.glob(".trash-*")]
    for path in removed:
        remove_tree(path)  # links are unlinked, never followed
    return removed


# Step logs of earlier versions, by their column count: the columns they have, and the value of
# each later column that reproduces them (3 columns: before KL schedules and free bits, so beta
# was the configured --beta at every step and no group was at a floor).
EARLIER_STEP_LOGS = {3: ("loss", "reconstruction", "kl"),
                     5: ("loss", "reconstruction", "kl", "beta", "kl_groups_at_floor")}


def upgrade_step_log(step_log: Tensor, beta: float, where: Path) -> Tensor:
    """A checkpoint's step log with today's STEP_LOG_COLUMNS; older layouts are migrated."""
    if step_log.dim() != 2 or not step_log.dtype.is_floating_point:
        raise RunError(f"{where}: the step log is not a (steps, columns) float table; resume from "
                       "an earlier checkpoint or retrain")
    columns = step_log.shape[1]
    if columns == len(STEP_LOG_COLUMNS):
        return step_log.to(torch.float32)
    if columns not in EARLIER_STEP_LOGS:
        raise RunError(f"{where}: the step log has {columns} columns, not the "
                       f"{len(STEP_LOG_COLUMNS)} of this vaekit ({', '.join(STEP_LOG_COLUMNS)}); "
                       "the checkpoint was written by a newer vaekit: upgrade vaekit to resume it")
    fill = {"beta": beta, "kl_groups_at_floor": 0.0, "skipped_update": 0.0}
    present = EARLIER_STEP_LOGS[columns]
    steps = step_log.shape[0]
    upgraded = [step_log[:, present.index(name)] if name in present
                else step_log.new_full((steps,), fill[name]) for name in STEP_LOG_COLUMNS]
    return torch.stack(upgraded, dim=1).to(torch.float32)  # (steps, len(STEP_LOG_COLUMNS))


STATE_FORMAT = "vaekit-train-state/1"
# The keys of a checkpoint's state.json and their types (bool is never an int here).
# (The random state, data_order and noise, is checked by the trainer, which can be told to go on
# without it: --inexact-resume.)
STATE_KEYS = {"format": str, "seed": int, "epoch": int, "step_in_epoch": int,
              "global_step": int, "batch_size": int, "world_size": int,
              "train_seconds": (int, float), "metrics": list, "optimizer": dict}


def check_train_state(state, where: Path) -> dict:
    """The checked content of a checkpoint's state.json (it passed its manifest, but a manifest
    says only that the file is the one written, not that what was written makes sense)."""
    def bad(what: str) -> RunError:
        return RunError(f"{where}: {what}; resume from an earlier checkpoint or retrain")

    if not isinstance(state, dict):
        raise bad("state.json is not a JSON object")
    for key, kind in STATE_KEYS.items():
        if key not in state:
            raise bad(f"state.json lacks {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise bad(f"state.json: {key!r} has the wrong type ({type(state[key]).__name__})")
    if state["format"] != STATE_FORMAT:
        raise bad(f"state.json format {state['format']!r} is not {STATE_FORMAT!r} (a newer vaekit "
                  "wrote it? then upgrade vaekit)")
    counters = ("epoch", "step_in_epoch", "global_step", "batch_size", "world_size")
    negative = [k for k in counters if state[k] < 0 or (k in ("batch_size", "world_size")
                                                         and state[k] == 0)]
    if negative:
        raise bad(f"state.json: {negative[0]!r} is {state[negative[0]]}, not a count")
    if not math.isfinite(state["train_seconds"]) or state["train_seconds"] < 0:
        raise bad("state.json: 'train_seconds' is not a non-negative number")
    if not all(isinstance(m, dict) for m in state["metrics"]) \
            or len(state["metrics"]) > state["epoch"] + 1:
        raise bad("state.json: 'metrics' are not one record per epoch")
    if not isinstance(state.get("inexact_resume", False), bool):
        raise bad("state.json: 'inexact_resume' is not true or false")
    early = state.get("early_stopping", {})
    if not isinstance(early, dict) or ("best_epoch" in early and not (
            isinstance(early["best_epoch"], int) and not isinstance(early["best_epoch"], bool)
            and isinstance(early.get("best_validation_elbo"), (int, float)))):
        raise bad("state.json: 'early_stopping' does not hold a best epoch and its validation "
                  "ELBO")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("param_groups"), list) \
            or not isinstance(optimizer.get("scalars", {}), dict):
        raise bad("state.json: 'optimizer' lacks its param_groups")
    return state


def check_step_log_length(step_log: Tensor, global_step: int, where: Path) -> None:
    if len(step_log) != global_step:
        raise RunError(f"{where}: the step log holds {len(step_log)} steps but state.json counts "
                       f"{global_step}; resume from an earlier checkpoint or retrain")


def load_step_log(checkpoint: Path) -> Tensor:
    """The per-step training log kept in a checkpoint: (steps, len(STEP_LOG_COLUMNS)) float32.

    Row i is step i + 1: the loss minimised (-(reconstruction - beta KL)), the batch means of
    the reconstruction term E_q[log p(x|z)] and of KL(q(z|x) || p(z)) in nats, beta, and the
    free-bits groups at their floor (0 without free bits).
    """
    tensors = tensors_from_file(Path(checkpoint) / "optimizer.safetensors")
    if "step_log" not in tensors:
        raise RunError(f"{checkpoint}: optimizer.safetensors holds no step_log; the checkpoint "
                       "was not written by vaekit train")
    return tensors["step_log"]


# ------------------------------------------------------------------------------------------------
# config.json and loading a run


def model_config_for(config: TrainConfig, data_shape: tuple[int, ...],
                     label_names: list[str] | None = None) -> ModelConfig:
    """The model a training config builds on data of this shape (and these class labels)."""
    num_classes = None
    if config.conditional:
        if not label_names:
            raise DataError(f"{config.data} has no class labels, which --conditional needs: use "
                            "an image folder with class sub-folders, a CSV with a label column, "
                            "an .npz with y arrays, or a labelled built-in dataset")
        num_classes = len(label_names)
    options = {name: getattr(config, name) for name in ModelConfig.model_fields()}
    options["hidden"] = list(config.hidden)  # the model's own copy
    return ModelConfig(data_shape=tuple(data_shape), num_classes=num_classes, **options)


def run_document(config: TrainConfig, data_info: dict, pipeline: Pipeline) -> dict:
    from . import __version__

    return {"format": RUN_FORMAT, "config_format": CONFIG_FORMAT, "vaekit_version": __version__,
            "config": config.to_dict(), "data": data_info, "pipeline": pipeline.info()}


DATA_KEYS = {"name": str, "kind": str, "shape": list, "n_train": int, "n_test": int,
             "label_names": (list, type(None)), "source": str, "fingerprint": str}
# Keys of the data section that runs written before them lack (read as None).
OPTIONAL_DATA_KEYS = {"feature_names": (list, type(None))}
PIPELINE_KEYS = {"mode": str, "kind": str, "split_seed": int, "description": str,
                 "log_jacobian": (int, float)}
PIPELINE_MODES = ("binarize", "scale", "levels", "dequantize", "standardize", "identity")


def _check_section(section, keys: dict, where: str, optional: dict | None = None) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a JSON object")
    optional = optional or {}
    for key, kind in optional.items():
        section.setdefault(key, None)
        if not isinstance(section[key], kind):
            raise ConfigError(f"{where}: {key!r} has the wrong type "
                              f"({type(section[key]).__name__}); restore the run's original "
                              "config.json")
    unknown = sorted(set(section) - set(keys) - set(optional))
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r}; restore the run's original "
                          "config.json")
    for key, kind in keys.items():
        if key not in section:
            raise ConfigError(f"{where} lacks key {key!r}; restore the run's original config.json")
        value = section[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} has the wrong type ({type(value).__name__}); "
                              "restore the run's original config.json")
    return section


def _format_number(value, name: str) -> int | None:
    """N of 'vaekit-run/N' (or of another format name); None if it is not of that form."""
    if not isinstance(value, str) or not value.startswith(f"vaekit-{name}/"):
        return None
    number = value.rpartition("/")[2]
    return int(number) if number.isdigit() and len(number) < 6 else None


def _check_format(value, current: str, key: str, document: dict, path: Path) -> None:
    """Refuse a run of a newer format (naming the version that wrote it) or a damaged one."""
    kind = current.split("/")[0].removeprefix("vaekit-")
    number, readable = _format_number(value, kind), int(current.rpartition("/")[2])
    if number is None:
        raise ConfigError(f"{path}: {key} {value!r} is not a vaekit run format; restore the run's "
                          "original config.json")
    if number > readable:
        from . import __version__

        writer = document.get("vaekit_version")
        writer = f"vaekit {writer}" if isinstance(writer, str) else "a newer vaekit"
        raise ConfigError(f"{path}: written by {writer} in {value}, a newer format than vaekit "
                          f"{__version__} reads ({current}); upgrade vaekit (pip install -U "
                          "vaekit) to use this run")


def describe_filled_options(document: dict) -> str | None:
    """The line that says which options an older run's config.json lacked, or None."""
    filled = document["filled_options"]
    if not filled:
        return None
    shown = ", ".join(f"{name}={json.dumps(value)}" for name, value in filled.items())
    return (f"note: {document['config'].out or 'the run'} was written by vaekit "
            f"{document['vaekit_version']} before {len(filled)} option(s) existed; read with the "
            f"values that reproduce it: {shown}")


def read_run_document(run_dir: Path) -> dict:
    """config.json of a run, checked; older runs of this format are read with the values their
    version implies (document["filled_options"] lists them: see config.ADDED_OPTIONS)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder; give the folder `vaekit train` wrote "
                       "(it holds config.json and model.safetensors)")
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a vaekit run (no config.json); give the folder `vaekit "
                       "train` wrote")
    document = jsonio.read_json(path, "config.json", error=ConfigError,
                                fix="restore the run's original config.json")
    where = str(path)
    if isinstance(document, dict):  # the format first: a newer layout may not fit the checks
        _check_format(document.get("format"), RUN_FORMAT, "format", document, path)
        _check_format(document.get("config_format"), CONFIG_FORMAT, "config_format", document,
                      path)
    _check_section(document, {"format": str, "config_format": str, "vaekit_version": str,
                              "config": dict, "data": dict, "pipeline": dict}, where)
    try:
        document["config"], document["filled_options"] = TrainConfig.from_stored(
            document["config"], where=f"{where} config", written_by=document["vaekit_version"])
    except ConfigError as exc:
        message = str(exc) if where in str(exc) else f"{where}: {exc}"
        if "restore" not in message and "upgrade vaekit" not in message:
            message += "; correct it or restore the run's original config.json"
        raise ConfigError(message) from None
    data = _check_section(document["data"], DATA_KEYS, f"{where} data", OPTIONAL_DATA_KEYS)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in data["shape"]) \
            or not data["shape"]:
        raise ConfigError(f"{where} data: 'shape' must be a list of positive integers; restore "
                          "the run's original config.json")
    if data["kind"] not in ("image8", "real"):
        raise ConfigError(f"{where} data: 'kind' must be image8 or real; restore the run's "
                          "original config.json")
    if data["feature_names"] is not None and (
            len(data["feature_names"]) != math.prod(data["shape"])
            or not all(isinstance(name, str) for name in data["feature_names"])):
        raise ConfigError(f"{where} data: 'feature_names' must be one name per feature; restore "
                          "the run's original config.json")
    pipeline = _check_section(document["pipeline"], PIPELINE_KEYS, f"{where} pipeline")
    if pipeline["mode"] not in PIPELINE_MODES or pipeline["kind"] != data["kind"]:
        raise ConfigError(f"{where} pipeline: unknown mode or kind; restore the run's original "
                          "config.json")
    return document


@dataclass
class Run:
    """A trained run loaded from its folder."""

    path: Path
    config: TrainConfig
    data: dict  # facts about the training data (name, shape, sizes, labels, fingerprint)
    pipeline: Pipeline
    model: VAE
    # options config.json lacked (written by an older vaekit), with the values they were read
    # with: what that version computed (config.ADDED_OPTIONS)
    filled_options: dict = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return model_config_for(self.config, tuple(self.data["shape"]), self.data["label_names"])

    @property
    def label_names(self) -> list[str] | None:
        """The class names a conditional run's labels index; None for unconditional runs.
        Printable text whatever the folder names' bytes were (see safefiles.printable)."""
        names = self.data["label_names"]
        return [printable(name) for name in names] if self.config.conditional else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def features(self):
        """How pictures show this run's non-image data (table_pictures.FeatureScale: the CSV
        header's names, standardised values); None for images."""
        from .table_pictures import feature_scale

        return feature_scale(tuple(self.data["shape"]), self.data.get("feature_names"),
                             self.pipeline)


def check_weight_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: Path) -> None:
    """Name the first tensor the file lacks, has in excess, or holds in another shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise RunError(f"{source}: weights do not fit the model in config.json ({what}); the "
                       "weights and config.json come from different runs; put back the "
                       "config.json of the run that wrote these weights")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise RunError(f"{source}: weight {key!r} has shape {tuple(found[key])} but "
                           f"config.json builds {tuple(shape)}; the weights and config.json "
                           "come from different runs; put back the config.json of the run that "
                           "wrote these weights")


def load_state(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """Load weights, naming the first missing, unexpected, mis-shaped or non-finite tensor."""
    expected = model.state_dict()
    check_weight_shapes({k: tuple(v.shape) for k, v in expected.items()},
                        {k: tuple(v.shape) for k, v in tensors.items()}, source)
    for key, value in expected.items():
        if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
            raise RunError(f"{source}: weight {key!r} holds NaN or infinite values (training "
                           "diverged, or the file is damaged); resume from an earlier checkpoint "
                           "or retrain with a smaller --lr")
        if tensors[key].dtype != value.dtype:
            raise RunError(f"{source}: weight {key!r} is {tensors[key].dtype}, expected "
                           f"{value.dtype}; the file was not written by vaekit, restore the run's "
                           "model.safetensors")
    model.load_state_dict(tensors)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model from config.json and model.safetensors (no pickle anywhere)."""
    run_dir = Path(run_dir)
    document = read_run_document(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        holder = RunLock.holder(run_dir)
        if holder is not None:
            raise RunError(f"{run_dir} is being trained by {holder} and has not finished its "
                           "first epoch yet; wait for it (its weights appear as "
                           "model.safetensors after each epoch)")
        raise RunError(f"{run_dir}: model.safetensors is missing; the run has not finished an "
                       "epoch yet, or the file was removed (resume with vaekit train --resume)")
    config = document["config"]
    try:
        model_config = model_config_for(config, tuple(document["data"]["shape"]),
                                        document["data"]["label_names"])
        # Shapes first, from the meta device and the file's header: a config.json edited to
        # build a huge model is refused before any of it is allocated.
        shapes = model_shapes(model_config)
    except ValueError as exc:
        raise ConfigError(f"{run_dir / 'config.json'}: {exc}") from None
    check_weight_shapes(shapes, safetensors_shapes(weights), weights)
    check_model_memory(shapes, f"{run_dir / 'config.json'}", copies=1,
                       fix="restore the run's original config.json")
    model = build_vae(model_config)
    load_state(model, tensors_from_file(weights), weights)
    model.to(device).eval()
    statistics = {}
    if document["pipeline"]["mode"] == "standardize":
        path = run_dir / "pipeline.safetensors"
        if not path.is_file():
            raise RunError(f"{run_dir}: pipeline.safetensors is missing (it holds the data's "
                           "mean and scale); restore it or retrain")
        statistics = tensors_from_file(path)
        shape = (1, *document["data"]["shape"])
        if set(statistics) != {"mean", "std"} or any(tuple(t.shape) != shape
                                                    for t in statistics.values()):
            raise RunError(f"{path}: does not hold the mean and std of shape {shape}; restore it "
                           "or retrain")
        if not all(bool(torch.isfinite(t).all()) for t in statistics.values()) \
                or not bool((statistics["std"] > 0).all()):
            raise RunError(f"{path}: the mean or std holds NaN, infinite or non-positive values; "
                           "the file is damaged, restore it or retrain")
    pipeline = Pipeline.from_info(document["pipeline"], statistics).to(torch.device(device))
    return Run(run_dir, config, document["data"], pipeline, model, document["filled_options"])


def model_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model a config builds, by name, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_vae(model_config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def check_model_memory(shapes: dict[str, tuple[int, ...]], what: str, copies: int,
                       fix: str) -> None:
    """Refuse a model whose float32 weights, times `copies` (training keeps the gradients and
    Adam's two moments: 4), exceed the memory limit."""
    count = sum(math.prod(shape) for shape in shapes.values())
    check_elements(f"{what} (a model of {count:,} parameters)", count, 4 * copies, fix,
                   ConfigError)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header alone (8-byte length, then JSON)."""
    damaged = (f"{path}: not a readable safetensors file (bad header); the run folder is "
               "damaged, restore the file or retrain")
    from .safefiles import open_regular

    with open_regular(Path(path), "a safetensors file", RunError) as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise RunError(damaged)
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:  # the safetensors format's own limit on its header
            raise RunError(damaged)
        text = handle.read(length)
    try:
        header = jsonio.loads(text.decode("utf-8"), str(path), fix="restore the file")
    except (UnicodeDecodeError, RunError):
        raise RunError(damaged) from None
    if not isinstance(header, dict):
        raise RunError(damaged)
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise RunError(damaged)
        shapes[name] = tuple(entry["shape"])
    return shapes


def load_run_dataset(run: Run) -> Dataset:
    """The run's dataset, loaded as it was for training; refuses data that have changed."""
    config = run.config
    dataset = dataset_for(config)
    if dataset.fingerprint() != run.data["fingerprint"]:
        raise DataError(f"{config.data}: the data differ from those {run.path} was trained on "
                        "(their SHA-256 changed); point the run at the original data")
    return dataset


def model_weights_bytes(model: nn.Module) -> bytes:
    return tensors_to_bytes(dict(model.state_dict()))


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run, one dict per epoch (unreadable lines are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    from .errors import VaekitError

    try:
        lines = jsonio.read_text(path, "metrics.jsonl").splitlines()
    except VaekitError:  # a FIFO, an oversized or non-UTF-8 file: no curves, not a hang
        return []
    rows = []
    for line in lines:
        try:
            row = jsonio.loads(line, str(path))  # depth-limited: no RecursionError
        except VaekitError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_evaluation(run_dir: Path) -> dict | None:
    """evaluation.json of a run (what `vaekit evaluate` wrote), or None where there is none or
    it cannot be read (damaged, nested too deep, not a file): optional, never fatal."""
    path = Path(run_dir) / "evaluation.json"
    if not path.is_file():
        return None
    from .errors import VaekitError

    try:
        value = jsonio.read_json(path, "evaluation.json")
    except VaekitError:
        return None
    return value if isinstance(value, dict) else None
