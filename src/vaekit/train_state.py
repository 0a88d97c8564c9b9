"""The state a training checkpoint holds, and how the loop saves and restores it.

A checkpoint is the model's weights, the optimizer's state with the per-step log, and state.json:
the counters (epoch, step in epoch, global step), the data-order and noise positions they imply,
the training time and the epoch records. Resume checks that the counters agree with each other
and with the seed before continuing exactly (or, when asked, inexactly, recorded in the run).
`TrainingState` is the part of the Trainer (loop.py) that does this; runs.py owns the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import jsonio
from .errors import RunError, TrainingError
from .runs import (
    STATE_FORMAT,
    STEP_LOG_COLUMNS,
    atomic_write_bytes,
    atomic_write_text,
    check_step_log_length,
    check_weight_shapes,
    check_train_state,
    load_state,
    model_weights_bytes,
    optimizer_from_files,
    optimizer_to_files,
    tensors_from_file,
    tensors_to_bytes,
    upgrade_step_log,
    write_checkpoint,
    writing,
)



@dataclass
class Progress:
    """Counters saved in every checkpoint's state.json."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch completed
    global_step: int = 0
    train_seconds: float = 0.0  # over all invocations
    metrics: list = field(default_factory=list)  # one dict per completed epoch
    inexact_resume: bool = False
    # --patience: best_epoch, best_validation_elbo; once stopped also stopped_after_epoch,
    # patience, validation_rows, reason (the best epoch's weights are best.safetensors)
    early_stopping: dict = field(default_factory=dict)


class TrainingState:
    """Saving and restoring the training state; mixed into the Trainer, whose attributes it
    reads: config, model, optimizer, dist, batch_size, steps_per_epoch, run_dir, log, and the
    state itself (progress, step_log, saved_step)."""

    def checkpoint_files(self) -> dict[str, bytes]:
        optimizer_tensors, optimizer_meta = optimizer_to_files(self.optimizer)
        optimizer_tensors["step_log"] = self.step_history()
        state = {"format": STATE_FORMAT, "seed": self.config.seed,
                 "epoch": self.progress.epoch, "step_in_epoch": self.progress.step_in_epoch,
                 "global_step": self.progress.global_step,
                 "batch_size": self.batch_size, "world_size": self.dist.world_size,
                 "data_order": {"seed": self.config.seed, "epoch": self.progress.epoch,
                                "position": self.progress.step_in_epoch * self.batch_size},
                 "noise": {"seed": self.config.seed, "next_step": self.progress.global_step},
                 "train_seconds": self.progress.train_seconds,
                 "metrics": self.progress.metrics, "optimizer": optimizer_meta,
                 "inexact_resume": self.progress.inexact_resume,
                 "early_stopping": self.progress.early_stopping}
        files = {"model.safetensors": model_weights_bytes(self.model),
                 "optimizer.safetensors": tensors_to_bytes(optimizer_tensors),
                 "state.json": (jsonio.dumps(state, indent=1) + "\n").encode()}
        if self.best_weights is not None:
            files["best.safetensors"] = tensors_to_bytes(self.best_weights)
        return files

    def restore(self, folder: Path, inexact: bool) -> None:
        load_state(self.model, tensors_from_file(folder / "model.safetensors"),
                   folder / "model.safetensors")
        try:
            try:
                state = jsonio.read_json(folder / "state.json", "the training state")
            except RunError as exc:  # too deep, too large, NaN tokens, not UTF-8, a FIFO
                reason = str(exc).split(": ", 1)[-1].split(";")[0]
                raise ValueError(reason) from None
            optimizer_tensors = tensors_from_file(folder / "optimizer.safetensors")
            step_log = optimizer_tensors.pop("step_log")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise RunError(f"{folder}: training state is unreadable ({exc!r}); resume from an "
                           "earlier checkpoint or retrain") from None
        step_log = upgrade_step_log(step_log, self.config.beta, folder)
        state = check_train_state(state, folder)
        try:
            optimizer_from_files(self.optimizer, optimizer_tensors, state["optimizer"])
            progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"],
                                state["train_seconds"], state["metrics"],
                                state.get("inexact_resume", False),
                                state.get("early_stopping", {}))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise RunError(f"{folder}: training state is unreadable ({exc!r}); resume from an "
                           "earlier checkpoint or retrain") from None
        problem = self._check_randomness_state(state, progress)
        if problem:
            if not inexact:
                raise RunError(f"{folder}: {problem}, so the run cannot continue exactly; pass "
                               "--inexact-resume to continue anyway (recorded in the run)")
            self.log(f"warning: {problem}; continuing inexactly as asked (--inexact-resume)")
            progress.inexact_resume = True
        check_step_log_length(step_log, progress.global_step, folder)
        if state.get("batch_size") != self.batch_size:
            raise RunError(f"{folder}: saved with batch size {state.get('batch_size')}, now "
                           f"{self.batch_size}; resume with the run's own config")
        progress.metrics = [m for m in progress.metrics if m.get("complete", True)]
        self.best_weights = self._restore_best(folder, progress.early_stopping)
        self.progress = progress
        self.step_log = [step_log]
        self.saved_step = progress.global_step

    def _restore_best(self, folder: Path, early_stopping: dict) -> dict[str, Tensor] | None:
        """The best epoch's weights of an early-stopping run (None before its first epoch)."""
        if "best_epoch" not in early_stopping:
            return None
        path = folder / "best.safetensors"
        if not path.is_file():
            raise RunError(f"{folder}: state.json names a best epoch but best.safetensors is "
                           "missing; resume from an earlier checkpoint or retrain")
        best = tensors_from_file(path)
        check_weight_shapes({k: tuple(v.shape) for k, v in self.model.state_dict().items()},
                            {k: tuple(v.shape) for k, v in best.items()}, path)
        return best

    def _check_randomness_state(self, state: dict, progress: Progress) -> str | None:
        order, noise = state.get("data_order"), state.get("noise")
        if not isinstance(order, dict) or not isinstance(noise, dict):
            return "the data-order or noise state is missing"
        expected_position = progress.step_in_epoch * self.batch_size
        if order.get("seed") != self.config.seed or noise.get("seed") != self.config.seed:
            return "the saved random seed does not match config.json"
        if order.get("epoch") != progress.epoch or order.get("position") != expected_position \
                or noise.get("next_step") != progress.global_step:
            return "the data-order or noise state is inconsistent with the step counters"
        if progress.global_step != progress.epoch * self.steps_per_epoch + progress.step_in_epoch \
                or not 0 <= progress.step_in_epoch < self.steps_per_epoch:
            return "the step counters contradict each other"
        return None

    def step_history(self) -> Tensor:
        return torch.cat(self.step_log).cpu() if self.step_log \
            else torch.zeros(0, len(STEP_LOG_COLUMNS))

    def _saved_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint had been saved yet"
        return f"the last good checkpoint (step {self.saved_step}) is intact"

    def save_checkpoint(self) -> None:
        for name, parameter in self.model.state_dict().items():
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
                raise TrainingError(f"weight {name} became non-finite at step "
                                    f"{self.progress.global_step}; {self._saved_note()}. Try a "
                                    f"lower --lr (now {self.config.lr:g}) or --grad-clip 1.0")
        with self.dist.same_outcome("save"):  # rank 0 writes; the others wait for its outcome
            if self.dist.is_main:
                # A failed write_checkpoint removes its staging folder; what is on disk is the
                # previous checkpoint, whole (or this one, if a later file failed).
                with writing(f"could not save step {self.progress.global_step}", self.run_dir,
                             lambda: f"{self._saved_note()}, free space and resume with vaekit "
                             f"train --resume {self.run_dir}"):
                    write_checkpoint(self.run_dir, self.progress.global_step,
                                     self.checkpoint_files(), self.config.keep_checkpoints)
                    self.saved_step = self.progress.global_step
                    self.write_run_files()

    def write_run_files(self) -> None:
        """model.safetensors and metrics.jsonl of the run folder, from the training state."""
        atomic_write_bytes(self.run_dir / "model.safetensors", model_weights_bytes(self.model))
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(
            jsonio.dumps(m) + "\n" for m in self.progress.metrics))
