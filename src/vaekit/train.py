"""Training a run: the data, the model, the run folder and its lock, resume, signals, processes.

    vaekit train  ->  train(config)  ->  prepare_data, build_model, a run folder  ->  Trainer.fit

The loop itself is loop.py (`Trainer`), the checkpoint state train_state.py, the objectives
objectives.py. Exact resume: the data order of an epoch is a function of (seed, epoch) and the
noise of a step of (seed, step) (see randomness.py); a checkpoint stores weights, optimizer
state and the counters, so a resumed run replays the same batches and noise bit for bit.

Distributed: under torchrun each process takes its rows of every global batch and of that
batch's noise; DistributedDataParallel averages the gradients of equal-sized shards, which is
the gradient of the global mean. The run is the same computation for any number of processes.
"""

from __future__ import annotations

import math
import shutil
import signal
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from .budget import check_elements
from .config import RESUMABLE_OVERRIDES, TrainConfig
from .data import Dataset, Pipeline, choose_likelihood, dataset_for
from .device import flush_denormals, resolve_device, reuse_freed_memory
from .distributed import DistContext
from .errors import ConfigError, DataError, RunError
from .loop import (
    STEP_COLUMNS,
    Interrupted,
    Progress,
    Trainer,
    TrainingObjective,
    make_adam,
    step_columns,
)
from .model import VAE, build_vae
from .model_card import write_run_card
from .objectives import build_objective
from .randomness import derive_seed
from .runs import (
    STEP_LOG_COLUMNS,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    check_model_memory,
    describe_filled_options,
    latest_checkpoint,
    list_checkpoints,
    model_config_for,
    model_shapes,
    read_run_document,
    remove_leftovers,
    run_document,
    tensors_to_bytes,
    writing,
)

# The public names of training, importable from here as before the loop had its own module.
__all__ = ["STEP_COLUMNS", "Interrupted", "Progress", "Trainer", "TrainingObjective",
           "build_model", "default_run_dir", "make_adam", "prepare_data", "step_columns", "train"]


def default_run_dir(config: TrainConfig) -> Path:
    name = Path(config.data).stem if config.data not in ("digits", "mnist", "fashion-mnist") \
        else config.data
    return Path("runs") / f"{name}-{config.net}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_data(config: TrainConfig) -> tuple[Dataset, Pipeline, TrainConfig]:
    """Load the dataset, settle the likelihood and build the pipeline for this config."""
    dataset = dataset_for(config)
    likelihood, why = choose_likelihood(config.likelihood, dataset)
    # said at the start of training: the default is decided from the data
    chosen = f"likelihood auto -> {likelihood}: {why}" if config.likelihood == "auto" else ""
    config = replace(config, likelihood=likelihood)
    if config.net == "conv" and len(dataset.shape) != 3:
        raise ConfigError(f"--net conv needs images (C, H, W) but {config.data} holds examples of "
                          f"shape {dataset.shape}; use --net mlp")
    if config.perturb > 0 and dataset.kind != "image8":
        raise ConfigError(f"--perturb replaces pixels of 8-bit images by random levels, but "
                          f"{config.data} holds real-valued arrays; drop --perturb")
    pipeline = Pipeline.build(dataset, config.likelihood, config.binarize, config.split_seed)
    pipeline.chosen = chosen
    return dataset, pipeline, config


# Options of decoding images, and the built-in data that read them (image folders too).
DECODING_OPTIONS = {"image_size": ("cifar10", "celeba"), "channels": ("cifar10", "celeba"),
                    "skip_bad_images": ("celeba",), "fast_resize": ("celeba",)}


def inapplicable_options(config: TrainConfig, pipeline: Pipeline) -> list[str]:
    """A warning line for each option set away from its default that these data or this
    model never read (--image-size on a CSV, --conv-channels on an MLP, ...)."""
    defaults = TrainConfig()
    given = (lambda name: getattr(config, name) != getattr(defaults, name))
    flag = (lambda name: "--" + ("no-" if getattr(config, name) is False and
                                 getattr(defaults, name) is True else "") + name.replace("_", "-"))
    folder = Path(config.data).is_dir()
    kind = {".csv": "a CSV table", ".npy": "an array file", ".npz": "an array file"}.get(
        Path(config.data).suffix.lower(), config.data)
    lines = []
    for name, readers in DECODING_OPTIONS.items():
        if given(name) and not folder and config.data not in readers:
            where = "image folders" + "".join(f", {r}" for r in readers)
            lines.append(f"warning: {flag(name)} applies to {where}; {kind} does not read it, "
                         "so it is ignored")
    if given("conv_channels") and config.net != "conv":
        lines.append(f"warning: --conv-channels applies to --net conv; this run's net is "
                     f"{config.net}, so it is ignored")
    if given("binarize") and pipeline.mode != "binarize":
        lines.append(f"warning: --binarize applies to the Bernoulli likelihood's binarisation; "
                     f"this run's likelihood is {config.likelihood}, so it is ignored")
    return lines


def build_model(config: TrainConfig, data_shape: tuple[int, ...],
                label_names: list[str] | None = None) -> VAE:
    """The run's model with its seeded initialisation (the global RNG is left as it was)."""
    model_config = model_config_for(config, data_shape, label_names)
    # Counted on the meta device first: a --latent-dim 10**12 is refused, not allocated.
    latent = f"--latent-groups {','.join(map(str, config.latent_groups))}" \
        if config.latent_groups else f"--latent-dim {config.latent_dim}"
    check_model_memory(model_shapes(model_config), f"--net {config.net} --hidden "
                       f"{','.join(map(str, config.hidden)) or 'none'} {latent}",
                       copies=4,  # weights, gradients, Adam's moments
                       fix="use smaller --hidden, --latent-dim or --latent-groups, "
                       "--prior-components, --likelihood-components or --conv-channels")
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
    # codes decoded per example and step: k for the IWAE bound, 1 for the ELBO
    samples = math.prod(build_objective(config).noise_shape(config.latent_dim)[:-1])
    if samples > 1:
        check_elements(f"--iwae-samples {config.iwae_samples} (decoding {batch} x "
                       f"{config.iwae_samples} codes per step)", batch * config.iwae_samples,
                       4 * 3 * (dims + widest), f"{fix} or lower --batch-size")
    steps = config.epochs * max(1, len(dataset.train_x) // max(1, config.batch_size))
    check_elements(f"--epochs {config.epochs} (a step log of {steps:,} steps)", steps,
                   4 * 2 * len(STEP_LOG_COLUMNS), f"{fix}; train in stages with --resume")


def check_run_memory(config: TrainConfig, dataset: Dataset, pipeline: Pipeline, model: VAE,
                     device: torch.device, dist: DistContext) -> None:
    """Refuse, before anything is written, a run whose weights, optimizer, activations of one
    batch and data will not fit in vaekit's memory limit (run_memory.py)."""
    from .run_memory import PROBE, check_training_memory, estimate_training_memory

    probe = dataset.train_x[:PROBE]
    x = pipeline.fixed(probe, 0, split="train")  # (PROBE, *shape)
    y = dataset.train_y[:PROBE] if config.conditional else None
    data_bytes = 0 if dataset.mapped else sum(t.numel() * t.element_size() for t in
                                              (dataset.train_x, dataset.test_x))
    objective = build_objective(config)
    estimate = estimate_training_memory(
        TrainingObjective(model, objective), model, x, y,
        objective.noise_shape(model.latent_dim), config.batch_size // dist.world_size,
        data_bytes, device)
    shape = "x".join(map(str, dataset.shape))
    check_training_memory(estimate, f"--net {config.net} --likelihood {config.likelihood} "
                          f"--batch-size {config.batch_size} on {shape} examples")


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
        groups, dims = overrides.get("latent_groups"), overrides.get("latent_dim")
        if groups and dims is not None and dims != sum(groups):  # said both, and they disagree
            raise ConfigError(f"--latent-groups {','.join(map(str, groups))} has {sum(groups)} "
                              f"latent dimensions, not --latent-dim {dims}: drop --latent-dim "
                              "(it follows the groups) or make them agree")
        # the presets are filled once the data are loaded: small tables have their own
        config = replace(config or TrainConfig(), **overrides).validate()
    if config.tensorboard is not None:  # before anything is created: one line if missing
        from .tensorboard_log import summary_writer_class

        summary_writer_class()
    device = resolve_device(config.device)
    dist = DistContext.from_env(device.type)
    try:
        with dist.stop_together(Interrupted):  # one process failing stops all, with its message
            device = resolve_device(config.device, dist)
            with flush_denormals(device), reuse_freed_memory(device):
                return _train(config, resume, dist, device, inexact_resume, log)
    finally:
        dist.shutdown()


def _train(config: TrainConfig, resume, dist: DistContext, device: torch.device,
           inexact_resume: bool, log) -> Path:
    # Each block below runs without collectives inside; a failure on any process (a missing
    # file, a folder rank 0 cannot write) stops every process with its message (same_outcome).
    with dist.same_outcome("setup"):
        dataset, pipeline, config = prepare_data(config)
        if resume is None:
            config = config.with_presets(len(dataset.train_x), dataset.kind).validate()
            for line in inapplicable_options(config, pipeline) if dist.is_main else ():
                log(line)
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
    check_run_memory(config, dataset, pipeline, model, device, dist)
    trainer = Trainer(config, run_dir, dataset, pipeline, model, device, dist, log)
    lock = RunLock(run_dir) if dist.is_main else None
    with dist.same_outcome("run folder"):
        if resume is None and dist.is_main:
            _check_new_run_dir(run_dir)
            check_free_space(run_dir, model, config.keep_checkpoints)  # before creating anything
            with writing("cannot create the run folder", run_dir, "choose another --out"):
                run_dir.mkdir(parents=True, exist_ok=True)
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
            if trainer.stopped_early and config.epochs != document["config"].epochs:
                raise ConfigError(f"{run_dir} finished by early stopping (it restored the "
                                  f"weights of epoch "
                                  f"{trainer.progress.early_stopping['best_epoch']}), so "
                                  "--epochs cannot train it longer; start a new run with "
                                  "--patience 0 or a larger --patience")
            if trainer.progress.epoch >= config.epochs or trainer.stopped_early:
                if folder is not None and dist.is_main:
                    # A kill after the last checkpoint but before the run folder's own files
                    # leaves those a save behind: bring them up to date from the checkpoint.
                    with writing("cannot write the run folder", run_dir, "free space and run "
                                 f"vaekit train --resume {run_dir} again"):
                        trainer.write_run_files()
                        trainer.write_outputs()
                        write_run_card(run_dir)
                if trainer.stopped_early:
                    trainer.log(f"{run_dir} has finished: {trainer.early_stopping_line()}")
                else:
                    trainer.log(f"{run_dir} has already trained {trainer.progress.epoch} epochs; "
                                "pass --epochs N with a larger N to train longer")
                return run_dir
            if folder is not None:
                # the epoch as the epoch lines count it: the one the next step belongs to
                trainer.log(f"resumed from step {trainer.progress.global_step} (epoch "
                            f"{trainer.progress.epoch + 1}) of {run_dir}")
        with dist.same_outcome("config"):
            if dist.is_main:
                check_free_space(run_dir, model, config.keep_checkpoints)
                with writing("cannot write the run folder", run_dir, "choose another --out"):
                    # config.json first: a run killed between the two writes can still be
                    # resumed (resume rewrites pipeline.safetensors), one without config.json
                    # cannot.
                    atomic_write_json(run_dir / "config.json",
                                      run_document(config, dataset.info(), pipeline))
                    if pipeline.statistics():
                        atomic_write_bytes(run_dir / "pipeline.safetensors",
                                           tensors_to_bytes(pipeline.statistics()))
        trainer.log(_summary(config, dataset, pipeline, model, device, dist, run_dir))
        previous = _handle_signals(trainer)
        trainer.open_tensorboard(resumed=resume is not None)
        try:
            outcome = trainer.fit(config.time_limit)
        finally:
            trainer.close_tensorboard()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if dist.is_main:
            with writing("cannot write the model card", run_dir, "free space; the run is "
                         f"saved, and vaekit train --resume {run_dir} writes the card"):
                write_run_card(run_dir)  # README.md: the run as the Hub shows it
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
    objective = build_objective(config).describe()
    condition = f"\n  conditional on {len(dataset.label_names)} classes: the ELBO bounds " \
        "log p(x | y)" if config.conditional else ""
    if pipeline.chosen:
        condition += f"\n  {pipeline.chosen}"
    if dataset.mapped:
        condition += f"\n  data: {dataset.memory}"
    if config.patience:
        held = max(1, round(len(dataset.train_x) * config.validation_fraction))
        condition += (f"\n  early stopping: {held} of the {len(dataset.train_x)} training rows "
                      f"held out (seeded by --split-seed {config.split_seed}); up to "
                      f"{config.epochs} epochs, stopping {config.patience} epochs after the best "
                      "validation ELBO and restoring that epoch's weights")
    elif config.validation_fraction:
        condition += f"\n  validation: {config.validation_fraction:g} of the training rows " \
            "held out, their ELBO logged every epoch"
    if config.perturb > 0:
        condition += f"\n  background model: {config.perturb:g} of the training pixels " \
            "replaced by random levels every step (for vaekit score --background)"
    return (f"vaekit: {dataset.name} ({len(dataset.train_x)} train / {len(dataset.test_x)} test, "
            f"shape {'x'.join(map(str, dataset.shape))}) | {config.net} VAE, z in R^"
            f"{config.latent_dim}, prior {config.prior}, likelihood {config.likelihood}, "
            f"{count_parameters(model):,} parameters | {config.epochs} epochs, batch "
            f"{config.batch_size}, {device}{procs}{_speed_note(config)}\n  objective: {objective}\n"
            f"  scoring: {pipeline.description}{condition}\n  run folder: {run_dir}")

