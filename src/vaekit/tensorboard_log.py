"""TensorBoard logging of a training run (`vaekit train --tensorboard [DIR]`, the tensorboard
extra): what metrics.jsonl and the progress bar show, as TensorBoard's event files.

    train/elbo, train/reconstruction, train/kl, train/beta   every STEP_EVERY steps: the mean
                                                             of those steps (nats per example)
    epoch/train_*, epoch/test_*, epoch/lr, epoch/beta,       each epoch, at its last step
      epoch/images_per_second, ...
    kl_per_group/NAME, kl_per_dimension/NAME_d               each epoch, on a fixed test batch
    images/samples, images/reconstructions                   each epoch
    hparams (the HParams view) with hparams/* metrics        at the end of training

Every value is logged at its global step (updates done), before the checkpoint of that step is
written; a resumed run reopens the stream with purge_step = the checkpoint's step + 1, so
TensorBoard drops whatever a killed run logged after its last checkpoint and the resumed run
logs those steps once more, identically (resume is exact). Only rank 0 logs. Imported only when
the option is on: a run without it pays nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .latent import LatentDraw

STEP_EVERY = 10  # steps per logged step-scalar: the mean over those steps
KL_EXAMPLES = 256  # test examples of the per-group and per-dimension KL each epoch
TENSORBOARD_EXTRA = "pip install 'vaekit[tensorboard]'"
# per-epoch keys of metrics.jsonl shown under epoch/ (the others are bookkeeping)
EPOCH_SKIP = ("epoch", "step", "complete", "objective", "inexact_resume")


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs TensorBoard, which is not installed: "
                          f"{TENSORBOARD_EXTRA} (or drop --tensorboard)") from None
    return SummaryWriter


def latent_kl(draw: LatentDraw) -> dict[str, float]:
    """Mean KL of each latent group, and of each dimension where the groups factorise, of one
    draw of a batch (latent.py: any structure)."""
    values = {}
    for group in draw.groups:
        values[f"kl_per_group/{group.name}"] = float(group.kl().mean())
    if draw.factorises:
        per_dim = draw.kl_per_dimension().mean(0)  # (D,)
        offset = 0
        for group in draw.groups:
            for d in range(group.z.shape[-1]):
                values[f"kl_per_dimension/{group.name}_{d}"] = float(per_dim[offset + d])
            offset += group.z.shape[-1]
    return values


def image_array(image) -> np.ndarray:
    """A PIL image as the (H, W, 3) uint8 array add_image takes with dataformats HWC."""
    return np.asarray(image.convert("RGB"))


def hparam_values(config: dict) -> dict:
    """The options as TensorBoard's HParams view takes them: numbers, strings and booleans;
    lists as text, unset options as 'none'."""
    values = {}
    for key, value in config.items():
        if key == "tensorboard":
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value)) or "none"
        elif value is None:
            value = "none"
        values[key] = value
    return values


class TensorBoardLog:
    """One run's event stream. steps(...) and epoch(...) are called before each checkpoint."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        writer_class = summary_writer_class()
        self.log_dir = Path(log_dir)
        self.writer = writer_class(str(self.log_dir), purge_step=purge_step)
        self.logged_step = (purge_step - 1) if purge_step else 0  # steps logged up to here

    def steps(self, history: Tensor, columns: tuple[str, ...], log_jacobian: float,
              global_step: int) -> None:
        """Step scalars of the complete windows of STEP_EVERY steps up to global_step, from the
        step log history (global_step, len(columns)); each window logged once."""
        index = {name: columns.index(name) for name in ("reconstruction", "kl", "beta")}
        first = (self.logged_step // STEP_EVERY + 1) * STEP_EVERY  # end of the next window
        for end in range(first, global_step + 1, STEP_EVERY):
            window = history[end - STEP_EVERY:end].double().mean(0)  # (columns,)
            reconstruction = float(window[index["reconstruction"]]) + log_jacobian
            kl = float(window[index["kl"]])
            for tag, value in (("train/elbo", reconstruction - kl),
                               ("train/reconstruction", reconstruction), ("train/kl", kl),
                               ("train/beta", float(window[index["beta"]]))):
                self.writer.add_scalar(tag, value, end)
        self.logged_step = max(self.logged_step, global_step)

    def epoch(self, record: dict, kl: dict[str, float], images: dict) -> None:
        """An epoch's record of metrics.jsonl, the latent KLs and the pictures, at its step."""
        step = record["step"]
        for key, value in record.items():
            if key in EPOCH_SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        for tag, value in kl.items():
            self.writer.add_scalar(tag, value, step)
        for name, image in images.items():
            self.writer.add_image(f"images/{name}", image_array(image), step, dataformats="HWC")
        self.writer.flush()

    def hparams(self, config: dict, record: dict) -> None:
        """The options and the final figures for the HParams view, in this run's own stream
        (add_hparams would start a second run folder for them)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"hparams/{key}": value for key, value in record.items()
                   if key.startswith(("test_", "train_")) and not key.endswith("_seconds")
                   and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)}
        experiment, start, end = hparams(hparam_values(config), metrics)
        step = record["step"]
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
