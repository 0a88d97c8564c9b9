"""The training loop: maximise the ELBO with Adam, checkpoint, resume exactly, scale out.

One step:   raw batch (uint8) --pipeline--> x --encode--> q(z|x) --eps--> z --decode--> p(x|z)
            loss = -(E_q[log p(x|z)] - beta * KL).mean()      (the only minus sign)

The objective is the ELBO, weighted by beta (constant or following a KLSchedule), optionally
with free bits, or the IWAE bound with k samples of z per example (objectives.py); a
conditional model gets each example's label with it. Every epoch logs the ELBO (beta = 1)
beside the objective, and the beta used.

Exact resume: the data order of an epoch is a function of (seed, epoch) and the noise of a step
of (seed, step) (see randomness.py); a checkpoint stores weights, optimizer state and the
counters, so a resumed run replays the same batches and noise bit for bit.

Distributed: under torchrun each process takes its rows of every global batch and of that
batch's noise; DistributedDataParallel averages the gradients of equal-sized shards, which is
the gradient of the global mean. The run is the same computation for any number of processes.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor, nn

from . import jsonio
from .budget import check_elements
from .config import RESUMABLE_OVERRIDES, TrainConfig
from .data import Dataset, Pipeline, load_dataset, perturb_pixels, resolve_likelihood
from .distributed import DistContext
from .errors import ConfigError, DataError, RunError, TrainingError
from .estimate import bits_per_dim, elbo_per_example, flush_denormals, iwae_per_example
from .model import VAE, build_vae
from .objectives import KLSchedule, elbo_terms, free_bits_kl, iwae_terms, kl_groups
from .randomness import StepNoise, derive_seed, epoch_permutation, seeded_generator
from .runs import (
    STATE_FORMAT,
    STEP_LOG_COLUMNS,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_model_memory,
    check_step_log_length,
    check_train_state,
    describe_filled_options,
    describe_os_error,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    model_config_for,
    model_shapes,
    model_weights_bytes,
    optimizer_from_files,
    optimizer_to_files,
    read_run_document,
    remove_leftovers,
    run_document,
    tensors_from_file,
    tensors_to_bytes,
    upgrade_step_log,
    write_checkpoint,
)

SYNC_EVERY = 20  # steps between cross-process agreements (stop, checkpoint) when distributed
PICTURE_EVERY = 10.0  # seconds between refreshes of samples.png, reconstructions.png, curves.png


STEP_COLUMNS = STEP_LOG_COLUMNS  # the rows train_step returns (defined with the run folder)


class TrainingObjective(nn.Module):
    """The model's per-example training terms as a module: DistributedDataParallel
    synchronises only through forward().

    forward(x, y, eps) -> (reconstruction (B,), kl (B,), extra): the ELBO's two terms, and
    extra = the IWAE bound (B,) for objective iwae, the KL of each free-bits group (B, G) with
    free bits, else None. eps is (B, D), or (B, k, D) for iwae.
    """

    def __init__(self, model: VAE, config: TrainConfig):
        super().__init__()
        self.model = model
        self.iwae = config.objective == "iwae"
        self.group_size = config.free_bits_group_size if config.free_bits is not None else None

    def forward(self, x: Tensor, y: Tensor | None, eps: Tensor
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.iwae:
            terms = iwae_terms(self.model, x, eps, y)
            return terms.reconstruction, terms.kl, terms.bound
        if self.group_size is None:
            terms = elbo_terms(self.model, x, eps, y)
            return terms.reconstruction, terms.kl, None
        if self.group_size >= self.model.latent_dim:  # one group: any prior, the whole KL
            terms = elbo_terms(self.model, x, eps, y)
            return terms.reconstruction, terms.kl, terms.kl.unsqueeze(-1)  # (B, 1)
        terms = elbo_terms(self.model, x, eps, y, per_dimension=True)
        return terms.reconstruction, terms.kl, kl_groups(terms.kl_dimensions, self.group_size)


@dataclass
class Progress:
    """Counters saved in every checkpoint's state.json."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch completed
    global_step: int = 0
    train_seconds: float = 0.0  # over all invocations
    metrics: list = field(default_factory=list)  # one dict per completed epoch
    inexact_resume: bool = False


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run was saved and can be resumed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device "
                              "cpu (or install a CUDA build of PyTorch)")
        if name == "cuda" and dist is not None and dist.enabled:
            name = f"cuda:{dist.local_rank}"
        elif dist is not None and dist.world_size > 1:
            raise ConfigError(f"--device {name} would put every process on one GPU; pass --device "
                              "cuda (each process takes the GPU of its LOCAL_RANK)")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(name)


def default_run_dir(config: TrainConfig) -> Path:
    name = Path(config.data).stem if config.data not in ("digits", "mnist", "fashion-mnist") \
        else config.data
    return Path("runs") / f"{name}-{config.net}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_data(config: TrainConfig) -> tuple[Dataset, Pipeline, TrainConfig]:
    """Load the dataset, settle the likelihood and build the pipeline for this config."""
    dataset = load_dataset(config.data, data_dir=config.data_dir, image_size=config.image_size,
                           channels=config.channels, test_fraction=config.test_fraction,
                           split_seed=config.split_seed)
    config = replace(config, likelihood=resolve_likelihood(config.likelihood, dataset))
    if config.net == "conv" and len(dataset.shape) != 3:
        raise ConfigError(f"--net conv needs images (C, H, W) but {config.data} holds examples of "
                          f"shape {dataset.shape}; use --net mlp")
    if config.perturb > 0 and dataset.kind != "image8":
        raise ConfigError(f"--perturb replaces pixels of 8-bit images by random levels, but "
                          f"{config.data} holds real-valued arrays; drop --perturb")
    pipeline = Pipeline.build(dataset, config.likelihood, config.binarize, config.split_seed)
    return dataset, pipeline, config


def build_model(config: TrainConfig, data_shape: tuple[int, ...],
                label_names: list[str] | None = None) -> VAE:
    """The run's model with its seeded initialisation (the global RNG is left as it was)."""
    model_config = model_config_for(config, data_shape, label_names)
    # Counted on the meta device first: a --latent-dim 10**12 is refused, not allocated.
    check_model_memory(model_shapes(model_config), f"--net {config.net} --hidden "
                       f"{','.join(map(str, config.hidden)) or 'none'} --latent-dim "
                       f"{config.latent_dim}", copies=4,  # weights, gradients, Adam's moments
                       fix="use smaller --hidden, --latent-dim, --prior-components, "
                       "--likelihood-components or --conv-channels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        return build_vae(model_config)


def check_training_sizes(config: TrainConfig, dataset: Dataset) -> None:
    """Sizes that grow with options times the data's dimensions, checked before training (a
    --num-samples 10**8 would otherwise fail only after the last epoch, at the pictures)."""
    dims = math.prod(dataset.shape)
    widest = max([dims, config.latent_dim, *config.hidden])
    fix = "lower it"
    check_elements(f"--num-samples {config.num_samples} (the pictures of {dims}-dimensional "
                   "examples)", config.num_samples, 4 * (2 * dims + widest), f"{fix}, e.g. "
                   "--num-samples 64")
    batch = min(config.batch_size, len(dataset.train_x))
    if config.objective == "iwae":
        check_elements(f"--iwae-samples {config.iwae_samples} (decoding {batch} x "
                       f"{config.iwae_samples} codes per step)", batch * config.iwae_samples,
                       4 * 3 * (dims + widest), f"{fix} or lower --batch-size")
    steps = config.epochs * max(1, len(dataset.train_x) // max(1, config.batch_size))
    check_elements(f"--epochs {config.epochs} (a step log of {steps:,} steps)", steps,
                   4 * 2 * len(STEP_LOG_COLUMNS), f"{fix}; train in stages with --resume")


class Trainer:
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
        n_train = len(dataset.train_x)
        if n_train < self.batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the {n_train} "
                              f"training examples; lower --batch-size")
        self.steps_per_epoch = n_train // self.batch_size  # full batches only: static shapes
        self.train_x = dataset.train_x.to(device)
        if config.binarize == "fixed" and pipeline.mode == "binarize":
            self.train_x = pipeline.fixed(dataset.train_x, 0, split="train").to(device)
            self.train_mode = "identity"
        else:
            self.train_mode = pipeline.mode
        self.train_y = dataset.train_y.to(device) if config.conditional else None
        self.test_y = dataset.test_y if config.conditional else None
        self.schedule = KLSchedule(config.kl_schedule, config.beta, config.kl_warmup_epochs,
                                   config.kl_cycle_epochs, config.kl_cycle_ratio)
        self.model.to(device)
        self.objective = TrainingObjective(self.model, config)
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

    # --- state ------------------------------------------------------------------------------
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
                 "inexact_resume": self.progress.inexact_resume}
        return {"model.safetensors": model_weights_bytes(self.model),
                "optimizer.safetensors": tensors_to_bytes(optimizer_tensors),
                "state.json": (jsonio.dumps(state, indent=1) + "\n").encode()}

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
                                state.get("inexact_resume", False))
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
        self.progress = progress
        self.step_log = [step_log]
        self.saved_step = progress.global_step

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
            else torch.zeros(0, len(STEP_COLUMNS))

    # --- the loop ---------------------------------------------------------------------------
    def train_step(self, raw: Tensor, u: Tensor | None, eps: Tensor, *,
                   y: Tensor | None = None, beta: float | None = None) -> Tensor:
        """One update; returns the detached row of the step log (see STEP_COLUMNS).

        y: the batch's labels (conditional models); beta: the KL weight of this step (default:
        the configured --beta).
        """
        beta = self.config.beta if beta is None else beta
        x = self.pipeline.apply(raw, u) if self.train_mode != "identity" else raw.float()
        with self.autocast():
            reconstruction, kl, extra = self.objective(x, y, eps)  # (B,), (B,), ... float32
        at_floor = torch.zeros((), device=x.device)
        if self.config.objective == "iwae":
            objective = extra  # (B,) the IWAE bound
        elif self.config.free_bits is not None:
            # the floor applies to each group's KL averaged over the whole global batch
            group_means = self.dist.all_reduce_sum(extra.detach().mean(0)) / self.dist.world_size
            floored = free_bits_kl(extra, self.config.free_bits, group_means)  # (B,)
            objective = reconstruction - beta * floored
            at_floor = (group_means <= self.config.free_bits).sum().to(x.dtype)
        else:
            objective = reconstruction - beta * kl  # (B,)
        loss = -objective.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A finite loss can still give non-finite gradients; caught here, before the update, so
        # the message can say which term's gradient it was (a non-finite loss is reported by
        # _check_finite, which names the term of the loss).
        if self.check_each_step and bool(torch.isfinite(loss)) and not self._gradients_finite():
            raise self._gradient_error(x, y, eps)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        # beta is filled on the device: a tensor built on the host and copied would make a GPU
        # step wait for the copy.
        return torch.stack([loss.detach(), reconstruction.detach().mean(), kl.detach().mean(),
                            loss.detach().new_full((), beta), at_floor])  # (len(STEP_COLUMNS),)

    def autocast(self) -> torch.autocast:
        """--precision bf16: the networks' matrix products in bfloat16 (VAE.encode and decode
        hand float32 to the distributions); fp32: a disabled context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.precision == "bf16")

    def _gradients_finite(self) -> bool:
        # One multi-tensor norm (NaN and inf survive it) costs ~0.05 ms; isfinite on each
        # gradient tensor cost ~1 ms a step, a quarter of the step on one CPU thread.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)))

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

    def _saved_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint had been saved yet"
        return f"the last good checkpoint (step {self.saved_step}) is intact"

    def fit(self, time_limit: float | None) -> str:
        """Train until the configured epochs (or the time limit); returns why it stopped."""
        config = self.config
        started = time.monotonic()
        last_checkpoint = time.monotonic()
        shape = self.dataset.shape
        n_train = len(self.train_x)
        while self.progress.epoch < config.epochs:
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
                raw = self.train_x.index_select(0, index)  # (B_local, *shape)
                if config.perturb > 0:  # a background model's inputs (Ren et al. 2019)
                    raw = perturb_pixels(raw, config.perturb, seeded_generator(derive_seed(
                        config.seed, "perturb", self.progress.global_step), self.device),
                        self.batch_size, self.rows)
                y = None if self.train_y is None else self.train_y.index_select(0, index)
                noise = StepNoise(config.seed, self.progress.global_step, self.batch_size,
                                  self.rows, self.device)
                u = noise.uniform(shape) if self.train_mode in ("binarize", "dequantize") else None
                if config.objective == "iwae":  # k samples per example, example first
                    eps = noise.normal(config.iwae_samples, self.model.latent_dim)  # (B_l, k, D)
                else:
                    eps = noise.normal(self.model.latent_dim)  # (B_local, D)
                beta = self.schedule(self.progress.global_step / self.steps_per_epoch)
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
            if stop_reason == "signal" and self.progress.epoch < config.epochs:
                raise self._interrupted()  # (on the very last step the run is simply done)
        return "done"

    def _progress_bar(self, epoch: int):
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.progress.step_in_epoch,
                    desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="step", leave=False,
                    dynamic_ncols=True, mininterval=0.25, file=sys.stderr)

    def _show(self, bar, rows: Tensor) -> None:
        if len(rows):
            _, rec, kl, beta, _ = rows[-50:].mean(0).tolist()
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
        if bool(finite.all()):
            return
        bad = int((~finite.all(1)).nonzero()[0])
        rec_ok, kl_ok = bool(finite[bad, 1]), bool(finite[bad, 2])
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
        record = {}
        if self.config.objective == "iwae":
            bound = iwae_per_example(self.model, self.dataset.test_x, self.pipeline,
                                     self.config.iwae_samples, seed=self.config.split_seed,
                                     device=self.device, dist=self.dist, labels=self.test_y)
            record["test_iwae"] = bound.mean().item() + self.pipeline.log_jacobian
        self.model.train()
        reconstruction = terms[:, 0].mean().item() + self.pipeline.log_jacobian
        kl = terms[:, 1].mean().item()
        record = {"test_elbo": reconstruction - kl, "test_reconstruction": reconstruction,
                  "test_kl": kl, **record}
        if self.pipeline.mode in ("levels", "dequantize"):  # log-probabilities of 8-bit images
            dims = math.prod(self.dataset.shape)
            best = record.get("test_iwae", record["test_elbo"])
            record["test_bits_per_dim"] = bits_per_dim(best, dims)
        record["eval_seconds"] = time.monotonic() - started
        return record

    def end_of_epoch(self, complete: bool) -> None:
        steps = self.step_history()
        epoch_steps = steps[len(steps) - (self.progress.global_step - self._epoch_first_step()):]
        record = {"epoch": self.progress.epoch if complete else self.progress.epoch + 1,
                  "step": self.progress.global_step, "complete": complete}
        if len(epoch_steps):
            loss, rec, kl, beta, at_floor = epoch_steps.double().mean(0).tolist()
            rec += self.pipeline.log_jacobian
            record.update(train_elbo=rec - kl, train_reconstruction=rec, train_kl=kl,
                          train_objective=-loss + self.pipeline.log_jacobian)
            if self.config.objective == "elbo":  # the KL weights used this epoch
                record.update(beta=beta, beta_last=float(epoch_steps[-1, 3]))
            if self.config.free_bits is not None:  # groups held at the floor, per step
                record["kl_groups_at_floor"] = at_floor
        record.update(self.evaluate())
        seconds = self._epoch_seconds
        record.update(train_seconds=seconds, images_per_second=(
            len(epoch_steps) * self.batch_size / seconds if seconds > 0 else None),
            objective=self.config.objective,
            lr=self.epoch_lr(self.progress.epoch - 1 if complete else self.progress.epoch))
        if self.progress.inexact_resume:
            record["inexact_resume"] = True
        self.progress.metrics.append(record)
        self.save_checkpoint()
        final = not complete or self.progress.epoch >= self.config.epochs
        with self.dist.same_outcome("outputs"):  # rank 0 draws; a failure there stops all
            if self.dist.is_main and (final or
                                      time.monotonic() - self.last_pictures >= PICTURE_EVERY):
                try:
                    self.write_outputs()  # rendering costs ~40 ms: not every short epoch
                except OSError as exc:
                    raise RunError(f"could not write the run's images: "
                                   f"{describe_os_error(exc, self.run_dir)}; "
                                   f"{self._saved_note()}, free space and resume with vaekit "
                                   f"train --resume {self.run_dir}") from None
                self.last_pictures = time.monotonic()
        if self.dist.is_main:
            test = f"test ELBO {record['test_elbo']:.2f} (rec {record['test_reconstruction']:.2f}," \
                   f" KL {record['test_kl']:.2f})"
            train = f"train ELBO {record['train_elbo']:.2f}  " if "train_elbo" in record else ""
            speed = f"  {record['images_per_second']:,.0f} img/s" \
                if record["images_per_second"] else ""
            label = f"epoch {record['epoch']}/{self.config.epochs}" + ("" if complete else
                                                                      " (partial)")
            self.log(f"{label}  {train}{test}{speed}")

    def _epoch_first_step(self) -> int:
        done = self.progress.step_in_epoch or self.steps_per_epoch
        return self.progress.global_step - done

    @property
    def _epoch_seconds(self) -> float:
        before = sum(m.get("train_seconds") or 0.0 for m in self.progress.metrics)
        return max(self.progress.train_seconds - before, 0.0)

    def save_checkpoint(self) -> None:
        for name, parameter in self.model.state_dict().items():
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
                raise TrainingError(f"weight {name} became non-finite at step "
                                    f"{self.progress.global_step}; {self._saved_note()}. Try a "
                                    f"lower --lr (now {self.config.lr:g}) or --grad-clip 1.0")
        with self.dist.same_outcome("save"):  # rank 0 writes; the others wait for its outcome
            if self.dist.is_main:
                try:
                    write_checkpoint(self.run_dir, self.progress.global_step,
                                     self.checkpoint_files(), self.config.keep_checkpoints)
                    self.saved_step = self.progress.global_step
                    self.write_run_files()
                except OSError as exc:
                    # A failed write_checkpoint removes its staging folder; what is on disk is
                    # the previous checkpoint, whole (or this one, if a later file failed).
                    raise RunError(f"could not save step {self.progress.global_step}: "
                                   f"{describe_os_error(exc, self.run_dir)}; "
                                   f"{self._saved_note()}, free space and resume with vaekit "
                                   f"train --resume {self.run_dir}") from None

    def write_run_files(self) -> None:
        """model.safetensors and metrics.jsonl of the run folder, from the training state."""
        atomic_write_bytes(self.run_dir / "model.safetensors", model_weights_bytes(self.model))
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(
            jsonio.dumps(m) + "\n" for m in self.progress.metrics))

    def write_outputs(self) -> None:
        """samples.png, reconstructions.png and curves.png for the current weights."""
        from .viz import (class_rows_image, curves_image, examples_image, reconstruction_image,
                          save_png)

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
            z = self.model.prior.sample((n if y is None else len(y),)).to(self.device)  # (n, D)
            samples = self.pipeline.display(self.model.decode(z, y).mean)
            raw = self.dataset.test_x[:n].to(self.device)
            y_test = None if self.test_y is None else self.test_y[:n].to(self.device)
            x = self.pipeline.fixed(raw, 0)
            originals = self.pipeline.display(x)  # what the model encodes
            reconstructions = self.pipeline.display(self.model.reconstruct(x, y_test))
        self.model.train()
        image = class_rows_image(samples, names) if names else examples_image(samples)
        save_png(image, self.run_dir / "samples.png")
        save_png(reconstruction_image(originals, reconstructions),
                 self.run_dir / "reconstructions.png")
        save_png(curves_image(self.progress.metrics), self.run_dir / "curves.png")


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


def check_free_space(run_dir: Path, model: nn.Module, keep: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints the run will write."""
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    needed = weights * (3 * (keep + 1) + 1) + 20 * 2**20  # weights + Adam moments, + images
    existing = Path(run_dir).absolute()
    while not existing.exists() and existing != existing.parent:  # a run not yet created
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise RunError(f"{run_dir}: {free / 2**20:.0f} MiB free but the run needs about "
                       f"{needed / 2**20:.0f} MiB for its checkpoints; free some space or "
                       "choose another --out")


def _handle_signals(trainer: Trainer):
    def handler(signum, frame):
        trainer.stop_signal = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread: leave signals alone
            pass
    return previous


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None,
          overrides: dict | None = None, inexact_resume: bool = False, log=print) -> Path:
    """Train a new run (config) or continue one (resume=RUN_DIR); returns the run folder."""
    overrides = overrides or {}
    if resume is not None:
        run_dir = Path(resume)
        document = read_run_document(run_dir)
        if describe_filled_options(document):
            log(describe_filled_options(document))
        config = document["config"]
        changed = {k: v for k, v in overrides.items() if getattr(config, k) != v}
        frozen = sorted(set(changed) - set(RESUMABLE_OVERRIDES))
        if frozen:
            raise ConfigError(f"--{frozen[0].replace('_', '-')} cannot change when resuming (it "
                              f"would change what the run computes); only "
                              f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OVERRIDES)}"
                              " may")
        config = replace(config, **changed).validate()
    else:
        config = replace(config or TrainConfig(), **overrides).validate().with_presets()
    device = resolve_device(config.device)
    dist = DistContext.from_env(device.type)
    try:
        with dist.stop_together(Interrupted):  # one process failing stops all, with its message
            device = resolve_device(config.device, dist)
            with flush_denormals(device):
                return _train(config, resume, dist, device, inexact_resume, log)
    finally:
        dist.shutdown()


def _train(config: TrainConfig, resume, dist: DistContext, device: torch.device,
           inexact_resume: bool, log) -> Path:
    # Each block below runs without collectives inside; a failure on any process (a missing
    # file, a folder rank 0 cannot write) stops every process with its message (same_outcome).
    with dist.same_outcome("setup"):
        dataset, pipeline, config = prepare_data(config)
        if resume is not None:
            run_dir = Path(resume)
            document = read_run_document(run_dir)
            if document["data"]["fingerprint"] != dataset.fingerprint():
                raise DataError(f"{config.data}: the data differ from those {run_dir} was "
                                "trained on; resume with the same dataset files")
    if resume is None:
        run_dir = Path(dist.broadcast_object(str(Path(config.out) if config.out
                                                 else default_run_dir(config))))
        config = replace(config, out=str(run_dir))
    model = build_model(config, dataset.shape, dataset.label_names)  # its size checked first
    check_training_sizes(config, dataset)
    trainer = Trainer(config, run_dir, dataset, pipeline, model, device, dist, log)
    lock = RunLock(run_dir) if dist.is_main else None
    with dist.same_outcome("run folder"):
        if resume is None and dist.is_main:
            _check_new_run_dir(run_dir)
            check_free_space(run_dir, model, config.keep_checkpoints)  # before creating anything
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunError(f"cannot create the run folder: {describe_os_error(exc, run_dir)}; "
                               "choose another --out") from None
    try:
        folder = None
        with dist.same_outcome("resume"):
            if lock is not None:
                lock.__enter__()
            if dist.is_main:
                removed = remove_leftovers(run_dir)  # safe now: the lock excludes live writers
                if removed:
                    trainer.log(f"removed {len(removed)} temporary file(s) left by an "
                                "interrupted save")
            if resume is not None:  # every process reads the checkpoint rank 0 wrote
                folder = latest_checkpoint(run_dir, warn=trainer.log)
                if folder is not None:
                    trainer.restore(folder, inexact_resume)
                elif list_checkpoints(run_dir) or (run_dir / "model.safetensors").exists():
                    raise RunError(f"{run_dir}: no complete checkpoint to resume from; start a "
                                   "new run instead")
                else:
                    # Stopped before its first checkpoint: starting over is exact (the run is a
                    # function of its seed), so resume does that rather than refuse.
                    trainer.log(f"{run_dir} stopped before its first checkpoint; starting it "
                                "from the beginning")
        if resume is not None:
            if trainer.progress.epoch >= config.epochs:
                if folder is not None and dist.is_main:
                    # A kill after the last checkpoint but before the run folder's own files
                    # leaves those a save behind: bring them up to date from the checkpoint.
                    try:
                        trainer.write_run_files()
                        trainer.write_outputs()
                    except OSError as exc:
                        raise RunError(f"cannot write the run folder: "
                                       f"{describe_os_error(exc, run_dir)}; free space and "
                                       f"run vaekit train --resume {run_dir} again") from None
                trainer.log(f"{run_dir} has already trained {trainer.progress.epoch} epochs; pass "
                            "--epochs N with a larger N to train longer")
                return run_dir
            if folder is not None:
                trainer.log(f"resuming {run_dir} at epoch {trainer.progress.epoch + 1}, step "
                            f"{trainer.progress.global_step}")
        with dist.same_outcome("config"):
            if dist.is_main:
                check_free_space(run_dir, model, config.keep_checkpoints)
                try:
                    # config.json first: a run killed between the two writes can still be
                    # resumed (resume rewrites pipeline.safetensors), one without config.json
                    # cannot.
                    atomic_write_json(run_dir / "config.json",
                                      run_document(config, dataset.info(), pipeline))
                    if pipeline.statistics():
                        atomic_write_bytes(run_dir / "pipeline.safetensors",
                                           tensors_to_bytes(pipeline.statistics()))
                except OSError as exc:
                    raise RunError(f"cannot write the run folder: "
                                   f"{describe_os_error(exc, run_dir)}; choose another --out"
                                   ) from None
        trainer.log(_summary(config, dataset, pipeline, model, device, dist, run_dir))
        previous = _handle_signals(trainer)
        try:
            outcome = trainer.fit(config.time_limit)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if outcome == "time":
            trainer.log(f"time limit of {config.time_limit:g} s reached; saved. Continue with: "
                        f"vaekit train --resume {run_dir}")
        trainer.log(f"run saved in {run_dir}; next: vaekit sample {run_dir}")
        return run_dir
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _check_new_run_dir(run_dir: Path) -> None:
    """A new run needs a free folder: absent, empty, or left by a run killed before config.json."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a folder; choose another --out")
    holder = RunLock.holder(run_dir)
    if holder is not None:
        raise RunError(f"{run_dir} is in use by {holder}; wait for it to finish or choose "
                       "another --out")
    # The lock file and dot-named temporaries are all a run killed during its start leaves.
    if any(p.name != ".lock" and not (p.name.startswith(".") and p.name.endswith(".tmp"))
           for p in run_dir.iterdir()):
        raise RunError(f"{run_dir} already exists and is not empty; continue it with "
                       f"vaekit train --resume {run_dir}, or choose another --out")


def _speed_note(config: TrainConfig) -> str:
    notes = (["bf16 autocast"] if config.precision == "bf16" else []) + \
        (["compiled step"] if config.compile else [])
    return f" ({', '.join(notes)})" if notes else ""


def _summary(config: TrainConfig, dataset: Dataset, pipeline: Pipeline, model: VAE,
             device: torch.device, dist: DistContext, run_dir: Path) -> str:
    from .nets import count_parameters

    procs = f" x {dist.world_size} process{'es' if dist.world_size > 1 else ''} ({dist.backend})" \
        if dist.enabled else ""
    if config.objective == "iwae":
        objective = f"IWAE bound, k = {config.iwae_samples}"
    else:
        objective = "ELBO" if config.beta == 1 else f"beta-ELBO, beta = {config.beta:g}"
        if config.kl_schedule != "constant":
            objective += f", {config.kl_schedule} KL schedule"
        if config.free_bits is not None:
            objective += f", free bits {config.free_bits:g} nats per " \
                f"{config.free_bits_group_size} dimension(s)"
    condition = f"\n  conditional on {len(dataset.label_names)} classes: the ELBO bounds " \
        "log p(x | y)" if config.conditional else ""
    if config.perturb > 0:
        condition += f"\n  background model: {config.perturb:g} of the training pixels " \
            "replaced by random levels every step (for vaekit score --background)"
    return (f"vaekit: {dataset.name} ({len(dataset.train_x)} train / {len(dataset.test_x)} test, "
            f"shape {'x'.join(map(str, dataset.shape))}) | {config.net} VAE, z in R^"
            f"{config.latent_dim}, prior {config.prior}, likelihood {config.likelihood}, "
            f"{count_parameters(model):,} parameters | {config.epochs} epochs, batch "
            f"{config.batch_size}, {device}{procs}{_speed_note(config)}\n  objective: {objective}\n"
            f"  scoring: {pipeline.description}{condition}\n  run folder: {run_dir}")

