"""The training loop: maximise the objective with Adam, step after step, epoch after epoch.

One step:   raw batch (uint8) --pipeline--> x --encode--> q(z|x) --eps--> z --decode--> p(x|z)
            loss = -(E_q[log p(x|z)] - beta * KL).mean()      (the only minus sign)

The objective is the ELBO, weighted by beta (constant or following a KLSchedule), optionally
with free bits, or the IWAE bound with k samples of z per example (objectives.py); a
conditional model gets each example's label with it. Every epoch logs the ELBO (beta = 1)
beside the objective, and the beta used.

The batches of an epoch and the noise of a step are functions of the seed and the counters
(randomness.py), drawn for the whole global batch, each process taking its rows; the counters
and weights are saved and restored by TrainingState (train_state.py); the run around the loop
(folder, lock, resume, signals) is train.py's.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .budget import check_elements
from .config import TrainConfig
from .data import Dataset, Pipeline, perturb_pixels
from .dataset import validation_indices
from .distributed import DistContext
from .errors import ConfigError, TrainingError
from .estimate import bits_per_dim, elbo_per_example, iwae_per_example
from .model import VAE
from .objectives import Objective, build_objective
from .randomness import StepNoise, derive_seed, epoch_permutation, seeded_generator
from .runs import STEP_LOG_COLUMNS, writing
from .train_state import Progress, TrainingState

SYNC_EVERY = 20  # steps between cross-process agreements (stop, checkpoint) when distributed
PICTURE_EVERY = 10.0  # seconds between refreshes of samples.png, reconstructions.png, curves.png

STEP_COLUMNS = STEP_LOG_COLUMNS  # the rows train_step returns (defined with the run folder)


def step_columns(row: Tensor) -> dict:
    """One row of the step log (len(STEP_COLUMNS),) as {column name: Python number}."""
    return dict(zip(STEP_COLUMNS, row.tolist()))


class TrainingObjective(nn.Module):
    """The model's per-example training terms as a module: DistributedDataParallel
    synchronises only through forward().

    forward(x, y, eps) -> objective.terms(model, x, y, eps): (reconstruction (B,), kl (B,),
    extra), see objectives.Objective; eps has the objective's noise shape after the batch.
    """

    def __init__(self, model: VAE, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: Tensor, y: Tensor | None, eps: Tensor
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.objective.terms(self.model, x, eps=eps, y=y)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run was saved and can be resumed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Trainer(TrainingState):
    """The loop: steps, epochs, diagnostics, test figures and pictures; its checkpoint state is
    TrainingState's (train_state.py), the run around it train.py's."""

    def __init__(self, config: TrainConfig, run_dir: Path, dataset: Dataset, pipeline: Pipeline,
                 model: VAE, device: torch.device, dist: DistContext, log=print):
        self.config, self.run_dir, self.dataset = config, run_dir, dataset
        self.pipeline, self.model, self.device, self.dist = pipeline.to(device), model, device, dist
        self.log = log if dist.is_main else (lambda *a, **k: None)
        self.batch_size = config.batch_size
        if self.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by the "
                              f"{dist.world_size} processes; choose a multiple of "
                              f"{dist.world_size}")
        self.local_batch = self.batch_size // dist.world_size
        self.rows = dist.rows(self.batch_size)
        # --validation-fraction: rows of the training split held out to choose when to stop
        kept, held = (validation_indices(len(dataset.train_x), config.validation_fraction,
                                         config.split_seed)
                      if config.validation_fraction else (None, None))
        select = (lambda t: t if kept is None or t is None else t.index_select(0, kept))
        self.validation_x = None if held is None else dataset.train_x.index_select(0, held)
        self.validation_y = None if held is None or not config.conditional else \
            dataset.train_y.index_select(0, held)
        n_train = len(dataset.train_x) if kept is None else len(kept)
        if n_train < self.batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the {n_train} "
                              f"training examples; lower --batch-size")
        self.steps_per_epoch = n_train // self.batch_size  # full batches only: static shapes
        # Mapped data (over --data-memory) stay in the host's page cache on an accelerator too:
        # each batch is gathered there and sent; in-memory data move to the device once.
        self.host_rows = dataset.mapped and device.type != "cpu"
        self.train_x = select(dataset.train_x) if self.host_rows else \
            select(dataset.train_x).to(device)
        if config.binarize == "fixed" and pipeline.mode == "binarize":
            # one float per pixel, in memory: a mapped dataset may not fit
            check_elements(f"--binarize fixed ({dataset.train_x.numel():,} training pixels "
                           "binarised once, as floats)", dataset.train_x.numel(), 4,
                           "use --binarize dynamic", ConfigError)
            self.train_x = select(pipeline.fixed(dataset.train_x, 0, split="train")).to(device)
            self.train_mode = "identity"
        else:
            self.train_mode = pipeline.mode
        self.train_y = select(dataset.train_y).to(device) if config.conditional else None
        self.test_y = dataset.test_y if config.conditional else None
        self.training_objective = build_objective(config)
        self.model.to(device)
        self.objective = TrainingObjective(self.model, self.training_objective)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None)
        if config.compile:
            check_compiler(device)
            self.objective = torch.compile(self.objective)
        self.optimizer = make_adam(self.model.parameters(), config.lr)
        self.progress = Progress()
        self.step_log: list[Tensor] = []  # (steps, len(STEP_COLUMNS)) per-step values
        self.stop_signal: int | None = None
        self.saved_step: int | None = None  # step of the newest checkpoint on disk
        # On one CPU process every step's loss and gradients are checked as they come (it costs
        # no device synchronisation); elsewhere losses are checked when they are logged.
        self.check_each_step = device.type == "cpu" and not dist.enabled
        self.last_pictures = -float("inf")  # time.monotonic() of the last samples/curves PNGs
        self.best_weights: dict[str, Tensor] | None = None  # --patience: of the best epoch
        self.tensorboard = None  # a tensorboard_log.TensorBoardLog on rank 0 with --tensorboard

    # --- the loop ---------------------------------------------------------------------------
    def batch_rows(self, index: Tensor) -> Tensor:
        """The raw training rows of index (B_local,), on the device: an index_select into the
        uint8 tensor (on the host first for mapped data on an accelerator)."""
        if self.host_rows:
            return self.train_x.index_select(0, index.cpu()).to(self.device)
        return self.train_x.index_select(0, index)

    def train_step(self, raw: Tensor, u: Tensor | None, eps: Tensor, *,
                   y: Tensor | None = None, beta: float | None = None) -> Tensor:
        """One update; returns the detached row of the step log (see STEP_COLUMNS).

        y: the batch's labels (conditional models); beta: the KL weight of this step (default:
        the configured --beta).
        """
        beta = self.config.beta if beta is None else beta
        x = self.pipeline.apply(raw, u) if self.train_mode != "identity" else raw.float()
        with self.autocast():
            terms = self.objective(x, y, eps)  # (B,), (B,), ... float32
        objective, logged = self.training_objective.per_example(terms, beta, self._global_mean)
        loss = -objective.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A finite loss can still give non-finite gradients; caught here, before the update, so
        # the message can say which term's gradient it was (a non-finite loss is reported by
        # _check_finite, which names the term of the loss).
        skipped = False  # a Python bool: without --skip-threshold no step waits for the device
        if self.config.skip_threshold is not None:
            # the gradients are already averaged over processes, so every process decides alike
            norm = self._gradient_norm()
            skipped = not bool(norm <= self.config.skip_threshold)  # NaN too: one host sync
        elif self.check_each_step and bool(torch.isfinite(loss)) and \
                not bool(torch.isfinite(self._gradient_norm())):
            raise self._gradient_error(x, y, eps)
        if self.config.grad_clip is not None and not skipped:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)  # no update, no moment update
        else:
            self.optimizer.step()
        # beta is filled on the device: a tensor built on the host and copied would make a GPU
        # step wait for the copy. Columns the objective does not fill are 0.
        reconstruction, kl, _ = terms
        row = {"loss": loss.detach(), "reconstruction": reconstruction.detach().mean(),
               "kl": kl.detach().mean(), "beta": loss.detach().new_full((), beta),
               "skipped_update": loss.detach().new_full((), float(skipped)), **logged}
        zero = torch.zeros((), device=x.device)
        return torch.stack([row.get(name, zero) for name in STEP_COLUMNS])  # (len(STEP_COLUMNS),)

    def _global_mean(self, values: Tensor) -> Tensor:
        """The mean of a per-process value over all processes (equal shares of the batch)."""
        return self.dist.all_reduce_sum(values) / self.dist.world_size

    def autocast(self) -> torch.autocast:
        """--precision bf16: the networks' matrix products in bfloat16 (VAE.encode and decode
        hand float32 to the distributions); fp32: a disabled context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.precision == "bf16")

    def _gradient_norm(self) -> Tensor:
        # One multi-tensor norm (NaN and inf survive it) costs ~0.05 ms; isfinite on each
        # gradient tensor cost ~1 ms a step, a quarter of the step on one CPU thread.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def _gradients_finite(self) -> bool:
        return bool(torch.isfinite(self._gradient_norm()))

    def _gradient_error(self, x: Tensor, y: Tensor | None, eps: Tensor) -> TrainingError:
        """Name the term whose gradient is non-finite, by differentiating each term alone."""
        bad = []
        for name, pick in (("the reconstruction term", 0), ("the KL term", 1)):
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                term = self.objective(x, y, eps)[pick].mean()
            term.backward()
            if not self._gradients_finite():
                bad.append(name)
        self.optimizer.zero_grad(set_to_none=True)
        what = " and ".join(bad) or "the loss"
        return TrainingError(f"training stopped at step {self.progress.global_step + 1} (epoch "
                             f"{self.progress.epoch + 1}): the gradient of {what} became "
                             f"non-finite although the loss was finite; {self._saved_note()}. Try "
                             f"--grad-clip 1.0, a lower --lr (now {self.config.lr:g})"
                             f"{self._scale_advice()}")

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of a (0-based) epoch: --lr decayed by --lr-decay per epoch."""
        return self.config.lr * self.config.lr_decay ** epoch

    def fit(self, time_limit: float | None) -> str:
        """Train until the configured epochs (or the time limit); returns why it stopped."""
        config = self.config
        started = time.monotonic()
        last_checkpoint = time.monotonic()
        shape = self.dataset.shape
        n_train = len(self.train_x)
        while self.progress.epoch < config.epochs and not self.stopped_early:
            epoch = self.progress.epoch
            for group in self.optimizer.param_groups:  # a function of the epoch: resumes exactly
                group["lr"] = self.epoch_lr(epoch)
            order = epoch_permutation(n_train, config.seed, epoch, self.device)
            epoch_log = torch.zeros(self.steps_per_epoch - self.progress.step_in_epoch,
                                    len(STEP_COLUMNS), device=self.device)
            logged = 0
            bar = self._progress_bar(epoch)
            epoch_started = shown = time.monotonic()
            stop_reason = None
            for b in range(self.progress.step_in_epoch, self.steps_per_epoch):
                offset = b * self.batch_size
                index = order[offset + self.rows.start: offset + self.rows.stop]
                raw = self.batch_rows(index)  # (B_local, *shape)
                if config.perturb > 0:  # a background model's inputs (Ren et al. 2019)
                    raw = perturb_pixels(raw, config.perturb, seeded_generator(derive_seed(
                        config.seed, "perturb", self.progress.global_step), self.device),
                        self.batch_size, self.rows)
                y = None if self.train_y is None else self.train_y.index_select(0, index)
                noise = StepNoise(config.seed, self.progress.global_step, self.batch_size,
                                  self.rows, self.device)
                u = noise.uniform(shape) if self.train_mode in ("binarize", "dequantize") else None
                # (B_local, D), or (B_local, k, D) for k samples per example
                eps = noise.normal(*self.training_objective.noise_shape(self.model.latent_dim))
                beta = self.training_objective.beta(self.progress.global_step
                                                    / self.steps_per_epoch)
                epoch_log[logged] = self.train_step(raw, u, eps, y=y, beta=beta)
                logged += 1
                self.progress.step_in_epoch += 1
                self.progress.global_step += 1
                if bar is not None:
                    bar.update(1)
                if self.check_each_step:
                    self._check_finite(epoch_log[logged - 1:logged], self.progress.global_step - 1)
                step_due = (config.checkpoint_every_steps is not None
                            and self.progress.global_step % config.checkpoint_every_steps == 0)
                if self.dist.enabled and self.progress.global_step % SYNC_EVERY and not step_due:
                    continue  # processes agree on stops every SYNC_EVERY steps, not every step
                interrupted, out_of_time, due = self.dist.any_of(
                    [self.stop_signal is not None,
                     time_limit is not None and time.monotonic() - started >= time_limit,
                     step_due
                     or (config.checkpoint_every_minutes is not None  # None: no timed saves
                         and (time.monotonic() - last_checkpoint) / 60
                         >= config.checkpoint_every_minutes)], self.device)
                stop_reason = "signal" if interrupted else "time" if out_of_time else None
                if (due or interrupted) and self.progress.step_in_epoch < self.steps_per_epoch:
                    self._record_steps(epoch_log[:logged], epoch_started)
                    epoch_log, logged = epoch_log[logged:], 0
                    epoch_started = time.monotonic()
                    self._log_steps()
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                if stop_reason is not None:
                    break
                if bar is not None and time.monotonic() - shown > 0.5:
                    self._show(bar, epoch_log[:logged])
                    shown = time.monotonic()
            if bar is not None:
                bar.close()
            self._record_steps(epoch_log[:logged], epoch_started)
            if self.progress.step_in_epoch == self.steps_per_epoch:
                self.progress.epoch += 1
                self.progress.step_in_epoch = 0
                self.end_of_epoch(complete=True)
                last_checkpoint = time.monotonic()
            elif stop_reason == "time":
                self.end_of_epoch(complete=False)
            if stop_reason == "time":
                return "time"
            if stop_reason == "signal" and self.progress.epoch < config.epochs \
                    and not self.stopped_early:
                raise self._interrupted()  # (on the very last step the run is simply done)
        return "early" if self.stopped_early else "done"

    @property
    def stopped_early(self) -> bool:
        return "stopped_after_epoch" in self.progress.early_stopping

    def _progress_bar(self, epoch: int):
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.progress.step_in_epoch,
                    desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="step", leave=False,
                    dynamic_ncols=True, mininterval=0.25, file=sys.stderr)

    def _show(self, bar, rows: Tensor) -> None:
        if len(rows):
            recent = step_columns(rows[-50:].mean(0))
            rec, kl, beta = recent["reconstruction"], recent["kl"], recent["beta"]
            rec += self.pipeline.log_jacobian
            weight = f"  beta {beta:.3g}" if self.config.kl_schedule != "constant" else ""
            bar.set_postfix_str(f"ELBO {rec - kl:.2f}  rec {rec:.2f}  KL {kl:.2f}{weight}",
                                refresh=False)

    def _record_steps(self, rows: Tensor, started: float) -> None:
        """Keep the per-step log and the training time of the steps just taken."""
        if len(rows):
            rows = self.dist.mean_over_processes(rows, self.local_batch)  # (steps, columns) global
            if not self.check_each_step:
                self._check_finite(rows, self.progress.global_step - len(rows))
            self.step_log.append(rows.detach().cpu())
        self.progress.train_seconds += time.monotonic() - started

    def _check_finite(self, rows: Tensor, first_step: int) -> None:
        finite = torch.isfinite(rows)  # (steps, len(STEP_COLUMNS))
        # a skipped update (--skip-threshold) changed nothing, whatever its loss was
        finite |= rows[:, STEP_COLUMNS.index("skipped_update"), None] > 0
        if bool(finite.all()):
            return
        bad = int((~finite.all(1)).nonzero()[0])
        ok = step_columns(finite[bad])
        rec_ok, kl_ok = ok["reconstruction"], ok["kl"]
        term = {(True, False): "the KL term", (False, True): "the reconstruction term",
                (False, False): "both terms (reconstruction and KL)",
                (True, True): "the loss (its two terms are finite)"}[(rec_ok, kl_ok)]
        raise TrainingError(f"training stopped at step {first_step + bad + 1} (epoch "
                            f"{self.progress.epoch + 1}): {term} became non-finite; "
                            f"{self._saved_note()}. Try a lower --lr (now {self.config.lr:g}), "
                            f"--grad-clip 1.0{self._scale_advice()}")

    def _scale_advice(self) -> str:
        if self.config.likelihood != "gaussian":
            return ""
        if self.config.gaussian_scale is None:
            return " or a fixed --gaussian-scale (such as 0.1)"
        return f" or a larger --gaussian-scale (now {self.config.gaussian_scale:g})"

    def _interrupted(self) -> Interrupted:
        name = signal.Signals(self.stop_signal).name
        return Interrupted(f"{name} received: saved the run at step {self.progress.global_step} "
                           f"(epoch {self.progress.epoch + 1}); continue it with: vaekit train "
                           f"--resume {self.run_dir}", 128 + self.stop_signal)

    def evaluate(self) -> dict:
        """Test-set ELBO and its terms (nats per example, in the data's own units); the IWAE
        bound for iwae runs; bits per dimension where the model scores 8-bit images. For a
        conditional model these bound log p(x | y)."""
        self.model.eval()
        started = time.monotonic()
        terms = elbo_per_example(self.model, self.dataset.test_x, self.pipeline,
                                 seed=self.config.split_seed, device=self.device, dist=self.dist,
                                 labels=self.test_y)
        record = self.training_objective.test_record(
            lambda samples: iwae_per_example(self.model, self.dataset.test_x, self.pipeline,
                                             samples, seed=self.config.split_seed,
                                             device=self.device, dist=self.dist,
                                             labels=self.test_y))
        record = {name: value + self.pipeline.log_jacobian for name, value in record.items()}
        self.model.train()
        reconstruction = terms[:, 0].mean().item() + self.pipeline.log_jacobian
        kl = terms[:, 1].mean().item()
        record = {"test_elbo": reconstruction - kl, "test_reconstruction": reconstruction,
                  "test_kl": kl, **record}
        if self.validation_x is not None:
            self.model.eval()
            held = elbo_per_example(self.model, self.validation_x, self.pipeline,
                                    split="validation", seed=self.config.split_seed,
                                    device=self.device, dist=self.dist, labels=self.validation_y)
            self.model.train()
            record["validation_elbo"] = float(held[:, 0].mean() - held[:, 1].mean()) \
                + self.pipeline.log_jacobian
        if self.pipeline.mode in ("levels", "dequantize"):  # log-probabilities of 8-bit images
            dims = math.prod(self.dataset.shape)
            best = record.get("test_iwae", record["test_elbo"])
            record["test_bits_per_dim"] = bits_per_dim(best, dims)
        record["eval_seconds"] = time.monotonic() - started
        return record

    def skipped_updates_line(self, skipped: int, steps: int) -> str:
        """What --skip-threshold did this epoch; a warning when it left no update at all."""
        threshold = self.config.skip_threshold
        if skipped < steps:
            return (f"  skipped {skipped:,} of {steps:,} updates: their gradient norm was above "
                    f"--skip-threshold {threshold:g}")
        return (f"vaekit: warning: every update of this epoch ({steps:,}) was skipped: each "
                f"gradient norm was above --skip-threshold {threshold:g}, so the model did not "
                "change; train again with a larger --skip-threshold or without it (models of "
                "data with many values per example, such as 8-bit images, have gradient norms "
                "in the thousands)")

    def end_of_epoch(self, complete: bool) -> None:
        steps = self.step_history()
        epoch_steps = steps[len(steps) - (self.progress.global_step - self._epoch_first_step()):]
        record = {"epoch": self.progress.epoch if complete else self.progress.epoch + 1,
                  "step": self.progress.global_step, "complete": complete}
        applied = epoch_steps
        if self.config.skip_threshold is not None:  # skipped updates changed nothing: left out
            skipped = epoch_steps[:, STEP_COLUMNS.index("skipped_update")] > 0
            record["skipped_updates"] = int(skipped.sum())
            applied = epoch_steps[~skipped]
        if len(applied):
            means = step_columns(applied.double().mean(0))
            rec = means["reconstruction"] + self.pipeline.log_jacobian
            record.update(train_elbo=rec - means["kl"], train_reconstruction=rec,
                          train_kl=means["kl"],
                          train_objective=-means["loss"] + self.pipeline.log_jacobian)
            record.update(self.training_objective.epoch_record(
                means, step_columns(applied[-1])))
        record.update(self.evaluate())
        seconds = self._epoch_seconds
        record.update(train_seconds=seconds, images_per_second=(
            len(epoch_steps) * self.batch_size / seconds if seconds > 0 else None),
            objective=self.config.objective,
            lr=self.epoch_lr(self.progress.epoch - 1 if complete else self.progress.epoch))
        if self.progress.inexact_resume:
            record["inexact_resume"] = True
        self.progress.metrics.append(record)
        stopping = complete and self.config.patience and self._early_stopping(record)
        if self.tensorboard is not None:  # logged before the checkpoint (see tensorboard_log)
            self._log_epoch(record)
        self.save_checkpoint()
        final = not complete or self.progress.epoch >= self.config.epochs or self.stopped_early
        with self.dist.same_outcome("outputs"):  # rank 0 draws; a failure there stops all
            if self.dist.is_main and (final or
                                      time.monotonic() - self.last_pictures >= PICTURE_EVERY):
                with writing("could not write the run's images", self.run_dir,
                             f"{self._saved_note()}, free space and resume with vaekit train "
                             f"--resume {self.run_dir}"):
                    self.write_outputs()  # rendering costs ~40 ms: not every short epoch
                self.last_pictures = time.monotonic()
        if self.dist.is_main:
            test = f"test ELBO {record['test_elbo']:.2f} (rec {record['test_reconstruction']:.2f}," \
                   f" KL {record['test_kl']:.2f})"
            train = f"train ELBO {record['train_elbo']:.2f}  " if "train_elbo" in record else ""
            speed = f"  {record['images_per_second']:,.0f} img/s" \
                if record["images_per_second"] else ""
            label = f"epoch {record['epoch']}/{self.config.epochs}" + ("" if complete else
                                                                      " (partial)")
            held = f"  validation ELBO {record['validation_elbo']:.2f}" \
                if "validation_elbo" in record else ""
            self.log(f"{label}  {train}{test}{held}{speed}")
            if record.get("skipped_updates"):
                self.log(self.skipped_updates_line(record["skipped_updates"], len(epoch_steps)))
            if stopping:
                self.log(self.early_stopping_line())

    # --- early stopping (--validation-fraction, --patience) -----------------------------------
    def _early_stopping(self, record: dict) -> bool:
        """Keep the best epoch's weights; once --patience epochs pass without a better
        validation ELBO (or the last epoch is done), restore them and add the record of the
        restored model (its test figures are the best epoch's: same weights, same test noise).
        Returns whether training ends here."""
        state = self.progress.early_stopping
        epoch = record["epoch"]
        if "best_epoch" not in state or record["validation_elbo"] > state["best_validation_elbo"]:
            state.update(best_epoch=epoch, best_validation_elbo=record["validation_elbo"])
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        waited = epoch - state["best_epoch"]
        if waited < self.config.patience and epoch < self.config.epochs:
            return False
        state.update(stopped_after_epoch=epoch, patience=self.config.patience,
                     validation_rows=len(self.validation_x),
                     reason="patience" if waited >= self.config.patience else "epochs")
        self.model.load_state_dict(self.best_weights)
        best = next(m for m in self.progress.metrics if m["epoch"] == state["best_epoch"]
                    and m.get("complete", True))
        self.progress.metrics.append({
            "epoch": state["best_epoch"], "step": self.progress.global_step, "complete": True,
            "early_stopping": dict(state),
            **{k: v for k, v in best.items() if k.startswith(("test_", "validation_"))}})
        return True

    def early_stopping_line(self) -> str:
        """What early stopping did, in one line."""
        state = self.progress.early_stopping
        best = state["best_epoch"]
        test = next(m["test_elbo"] for m in reversed(self.progress.metrics)
                    if "early_stopping" in m)
        why = (f"no better validation ELBO for {state['patience']} epochs after epoch {best}"
               if state["reason"] == "patience" else f"the last of {self.config.epochs} epochs")
        return (f"early stopping: {why}; stopped after epoch {state['stopped_after_epoch']} and "
                f"restored the weights of epoch {best} (validation ELBO "
                f"{state['best_validation_elbo']:.2f} on {state['validation_rows']} held-out "
                f"training rows, test ELBO {test:.2f})")

    def _epoch_first_step(self) -> int:
        done = self.progress.step_in_epoch or self.steps_per_epoch
        return self.progress.global_step - done

    @property
    def _epoch_seconds(self) -> float:
        before = sum(m.get("train_seconds") or 0.0 for m in self.progress.metrics)
        return max(self.progress.train_seconds - before, 0.0)

    def write_outputs(self) -> None:
        """samples.png, reconstructions.png and curves.png for the current weights."""
        from .viz import curves_image, save_png

        for name, image in self.output_images().items():
            save_png(image, self.run_dir / f"{name}.png")
        save_png(curves_image(self.progress.metrics), self.run_dir / "curves.png")

    def output_images(self) -> dict:
        """{"samples": new examples E[x|z] (a row per class for conditional models),
        "reconstructions": test inputs above their reconstructions} as images."""
        from .table_pictures import feature_scale
        from .viz import class_rows_image, examples_image, reconstruction_image

        n = self.config.num_samples
        names = self.dataset.label_names if self.config.conditional else None
        self.model.eval()
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "samples"))
            if names:  # one row per class, about n images in all
                per_class = max(1, round(n / len(names)))
                y = torch.arange(len(names), device=self.device).repeat_interleave(per_class)
            else:
                y = None
            z = self.model.sample_codes(n if y is None else len(y), y=y)  # (n, code_dim)
            samples = self.pipeline.display(self.model.decode(z, y).mean)
            rows = picture_rows(len(self.dataset.test_x), n)  # every class, not the first
            raw = self.dataset.test_x[rows].to(self.device)
            y_test = None if self.test_y is None else self.test_y[rows].to(self.device)
            x = self.pipeline.fixed(raw, 0)
            inputs = self.pipeline.display(x) if self.pipeline.noisy else None  # model's view
            originals = self.pipeline.original(raw)
            reconstructions = self.pipeline.display(self.model.reconstruct(x, y_test))
        self.model.train()
        features = feature_scale(self.dataset.shape, self.dataset.feature_names, self.pipeline)
        samples_image = class_rows_image(samples, names, features=features) if names else \
            examples_image(samples, features=features)
        return {"samples": samples_image,
                "reconstructions": reconstruction_image(
                    originals, reconstructions, inputs=inputs,
                    input_name=self.pipeline.input_name, features=features)}

    # --- TensorBoard (--tensorboard; tensorboard_log.py) ---------------------------------------
    def open_tensorboard(self, resumed: bool) -> None:
        """Start (or, resumed, continue) the event stream on rank 0. A resumed stream purges
        what a stopped run logged after the checkpoint it resumes from."""
        if self.config.tensorboard is None or not self.dist.is_main:
            return
        from .tensorboard_log import TensorBoardLog

        folder = Path(self.config.tensorboard) if self.config.tensorboard \
            else self.run_dir / "tensorboard"
        purge = self.progress.global_step + 1 if resumed else None
        with writing("cannot write the TensorBoard log", folder, "choose a writable "
                     "--tensorboard DIR"):
            self.tensorboard = TensorBoardLog(folder, purge_step=purge)

    def close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _log_steps(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.steps(self.step_history(), STEP_COLUMNS, self.pipeline.log_jacobian,
                                   self.progress.global_step)

    def _log_epoch(self, record: dict) -> None:
        """The epoch's steps, figures, latent KLs on a fixed test batch and pictures; the
        options and final figures once training is done."""
        from .tensorboard_log import KL_EXAMPLES, latent_kl

        self._log_steps()
        n = min(KL_EXAMPLES, len(self.dataset.test_x))
        self.model.eval()
        with torch.inference_mode():
            x = self.pipeline.fixed(self.dataset.test_x[:n].to(self.device), 0)
            y = None if self.test_y is None else self.test_y[:n].to(self.device)
            generator = seeded_generator(derive_seed(self.config.split_seed, "tensorboard-kl"),
                                         self.device)
            eps = torch.randn(n, self.model.latent_dim, generator=generator,
                              device=self.device)  # (n, D)
            kl = latent_kl(self.model.infer(x, y).draw(eps))
        self.model.train()
        self.tensorboard.epoch(record, kl, self.output_images())
        if self.progress.epoch >= self.config.epochs:
            self.tensorboard.hparams(self.config.to_dict(), record)


def picture_rows(total: int, n: int) -> Tensor:
    """The rows of a split that pictures show: n of them in a fixed seeded random order (an
    image folder's split is ordered by class; its first rows are one class)."""
    order = torch.randperm(total, generator=seeded_generator(derive_seed(0, "picture rows")))
    return order[:n]  # (min(n, total),)


def make_adam(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where PyTorch has one (one pass over the weights instead of
    about ten: 6x faster than the default on CPU for the 784-400-20 VAE)."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # an older PyTorch or a device without the fused kernel
        return torch.optim.Adam(parameters, lr=lr)


def check_compiler(device: torch.device) -> None:
    """torch.compile generates C++ for CPU code: say so up front instead of failing mid-step."""
    if device.type == "cpu" and not any(shutil.which(name) for name in (
            os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ or clang++; set CXX to "
                          "its path), and none was found: install one or drop --compile")
