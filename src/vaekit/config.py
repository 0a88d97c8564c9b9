"""The training configuration: one dataclass that is the CLI, `config.json` and the docs.

Each field is documented once, in its metadata; `vaekit train --help` is generated from it and
`config.json` stores it. This module must not import torch: `vaekit --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .budget import check_seed, data_memory_budget
from .errors import ConfigError
from .names import (
    ACTIVATIONS,
    FACTORISED_POSTERIORS,
    FACTORISED_PRIORS,
    KL_SCHEDULES,
    LIKELIHOODS,
    NETS,
    OBJECTIVES,
    POSTERIORS,
    PRIORS,
    builtin_name,
    posterior_problem,
    resolve_posterior,
)

# The format of a run's config.json. It changes only when runs written under it can no longer
# be read; options added within a format are listed in ADDED_OPTIONS, so older runs keep loading.
CONFIG_FORMAT = "vaekit-config/1"

# Options added to vaekit-config/1 since its first release, each with the value that reproduces
# what a run written before the option existed computed (not today's default where they differ:
# runs before --lr-decay used a constant learning rate). A config.json lacking one of these keys
# is read with this value, and the loaded run records which keys were filled. A value may be a
# function of the other options (for options whose old behaviour depended on them).
ADDED_OPTIONS: dict[str, Any] = {
    # the model family (mixture/vamp priors, discretised likelihoods, conditional VAE, IWAE,
    # KL schedules, free bits)
    "prior_components": None, "likelihood_components": None, "conditional": False,
    "objective": "elbo", "iwae_samples": 5, "kl_schedule": "constant", "kl_warmup_epochs": 10.0,
    "kl_cycle_epochs": 10.0, "kl_cycle_ratio": 0.5, "free_bits": None, "free_bits_group_size": 1,
    # --lr-decay
    "lr_decay": 1.0,
    # --precision and --compile
    "precision": "fp32", "compile": False,
    # --posterior (auto: the family each prior always used)
    "posterior": "auto",
    # --flow-steps (only the iaf posterior reads it)
    "flow_steps": None,
    # --latent-groups (a hierarchical VAE; older runs have one group)
    "latent_groups": None,
    # --skip-threshold (older runs applied every update)
    "skip_threshold": None,
    # --perturb (training on perturbed inputs, for a background model)
    "perturb": 0.0,
    # the decode-once cache: --data-memory (where data live; never what is computed),
    # --skip-bad-images, and --fast-resize (older runs decoded every image at full size)
    "data_memory": "auto", "skip_bad_images": False, "fast_resize": False,
    # early stopping on a validation split (older runs trained on the whole training split for
    # all their epochs)
    "validation_fraction": 0.0, "patience": 0,
    # --background (older runs dropped the alpha of transparent images)
    "background": "none",
    # --tensorboard (logging only: older runs logged nothing)
    "tensorboard": None,
}

# Options whose default (None) means "the dataset's preset": config.json stores the value the
# preset resolved to, so null there is damage, not a choice.
PRESET_OPTIONS = ("epochs", "batch_size", "lr", "lr_decay", "validation_fraction", "patience")

# Fields a resumed run may change: they alter how long or where it runs, never what it computes.
RESUMABLE_OVERRIDES = (
    "epochs", "time_limit", "device", "checkpoint_every_steps", "checkpoint_every_minutes",
    "keep_checkpoints", "progress", "compile", "data_memory", "tensorboard",
)

# Per-dataset defaults for fields left unset; the chosen values are written to config.json.
# digits has 1,438 training images, so it needs many short epochs and small batches to see
# enough gradient steps in under a minute; MNIST-sized sets need few epochs of batch 128.
# The MNIST-sized presets: 30 epochs at 3e-3 decayed by 0.9 per epoch reach a better test ELBO
# at every epoch than Adam's usual constant 1e-3 (benchmarks/time_to_quality.py) and take about
# a minute on a 2-core CPU.
NO_EARLY_STOPPING = {"validation_fraction": 0.0, "patience": 0}
DATASET_PRESETS = {
    "digits": {"epochs": 150, "batch_size": 64, "lr": 1e-3, "lr_decay": 1.0, **NO_EARLY_STOPPING},
    "mnist": {"epochs": 30, "batch_size": 128, "lr": 3e-3, "lr_decay": 0.9, **NO_EARLY_STOPPING},
    "fashion-mnist": {"epochs": 30, "batch_size": 128, "lr": 3e-3, "lr_decay": 0.9,
                      **NO_EARLY_STOPPING},
}
GENERIC_PRESET = {"epochs": 20, "batch_size": 128, "lr": 1e-3, "lr_decay": 1.0,
                  **NO_EARLY_STOPPING}
# Small tables (real-valued data of at most SMALL_TABLE_ROWS training rows, such as a CSV):
# 20 epochs of 3 steps leave a 455-row table undertrained (breast cancer: test ELBO -95.8), and
# the epochs a table needs depend on it, so the data choose them: a fifth of the training split
# is held out (seeded) and training stops `patience` epochs after the best validation ELBO, with
# that epoch's weights restored (breast cancer: epoch 382 kept of 482, test ELBO +23.7, against
# +17.0 after 300 epochs of batch 128; benchmarks/small_data.py).
SMALL_TABLE_ROWS = 20_000
SMALL_TABLE_PRESET = {"epochs": 3000, "batch_size": 32, "lr": 1e-3, "lr_decay": 1.0,
                      "validation_fraction": 0.2, "patience": 100}


def _opt(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
         exclusive_minimum: bool = False, maximum: float | None = None, metavar: str | None = None,
         group: str = "training", const: Any = None) -> Any:
    # const: the value of the option given without one (`--tensorboard` alone)
    meta = {"help": help, "choices": choices, "minimum": minimum, "exclusive_minimum":
            exclusive_minimum, "maximum": maximum, "metavar": metavar, "group": group,
            "const": const}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- data ---
    data: str = _opt("digits", "dataset: digits (built in, offline), mnist, fashion-mnist, "
                     "cifar10, celeba (64 x 64: centre crop 148, resized), or a path to an image "
                     "folder (class sub-folders become labels) or a .npy/.npz/.csv array file",
                     metavar="NAME_OR_PATH", group="data")
    data_dir: Optional[str] = _opt(None, "folder holding the files of mnist/fashion-mnist (IDX), "
                                   "cifar10 (the binary version) or celeba (img_align_celeba/); "
                                   "searched before the cache and system folders", group="data")
    image_size: Optional[int] = _opt(None, "resize images of an image folder to N x N (needed when "
                                     "their sizes differ)", minimum=1, group="data")
    channels: Optional[int] = _opt(None, "convert images of an image folder to 1 (grey) or 3 (RGB) "
                                   "channels (needed when their modes differ)", choices=(1, 3),
                                   group="data")
    test_fraction: float = _opt(0.2, "share of the data held out for testing when the dataset has "
                                "no test split of its own", minimum=0.0, exclusive_minimum=True,
                                maximum=0.9, group="data")
    split_seed: int = _opt(0, "seed of the train/test split and of the fixed binarisation of the "
                           "test set; independent of --seed so runs compare on the same test data",
                           group="data")
    data_memory: str = _opt("auto", "training data up to this size (shared by the processes "
                            "torchrun starts on one machine) are held in memory; larger image "
                            "data (folders, celeba, cifar10, mnist, uint8 arrays) are read from "
                            "their memory-mapped cache file, one copy in the page cache for all "
                            "processes (0: always mapped; auto: a quarter of this machine's "
                            "RAM, at most 1G; sizes such as 8G)",
                            metavar="SIZE", group="data")
    skip_bad_images: bool = _opt(False, "leave unreadable images of an image folder out (their "
                                 "list is written beside the cache) instead of stopping at the "
                                 "first", group="data")
    fast_resize: bool = _opt(True, "with --image-size, shrink images while decoding them (JPEG: "
                             "decoded at 1/2 to 1/8 scale; others: box-reduced) before the "
                             "bicubic resize: several times faster, pixels differ slightly from "
                             "a full-size decode", group="data")
    background: str = _opt("white", "images of an image folder with transparency (RGBA, LA, "
                           "palette) are composited on this colour: white, black, R,G,B (0..255 "
                           "each) or none (alpha dropped: transparent areas show whatever RGB "
                           "the files store); one line at loading says how many images had it",
                           metavar="white|black|R,G,B|none", group="data")
    binarize: str = _opt("dynamic", "with the Bernoulli likelihood on grey levels: draw a new "
                         "binarisation of each training batch (dynamic, the standard setting) or "
                         "use one fixed seeded binarisation (fixed)", choices=("dynamic", "fixed"),
                         group="data")
    perturb: float = _opt(0.0, "train on perturbed images: each pixel of every training batch is "
                          "replaced, with this probability, by a uniform random level (a fresh "
                          "draw every step). A run trained so is the background model of the "
                          "likelihood ratio of `vaekit score --background` (Ren et al. 2019: "
                          "0.1 to 0.2); 0 trains on the data as they are", minimum=0.0,
                          maximum=0.9, metavar="RATE", group="data")
    # --- model ---
    net: str = _opt("mlp", "encoder/decoder networks: mlp (any data) or conv (images (C, H, W) of "
                    "any size, square or not; stride-2 stages adapt to it)",
                    choices=NETS, group="model")
    hidden: list = _opt([400], "hidden layer sizes, comma separated (MLP layers; for conv, the dense "
                        "layers after the convolutions); 'none' for a linear map", metavar="N[,N...]",
                        group="model")
    conv_channels: Optional[list] = _opt(None, "channels of each stride-2 convolution, comma "
                                         "separated; default: 32, doubling, until the feature map "
                                         "is at most 8 x 8", metavar="C[,C...]", group="model")
    activation: str = _opt("relu", "nonlinearity of the networks",
                           choices=ACTIVATIONS, group="model")
    latent_dim: int = _opt(20, "dimensions of z (20 as in Kingma & Welling's MNIST runs; unused "
                           "dimensions collapse to the prior and cost nothing)", minimum=1,
                           group="model")
    prior: str = _opt("normal", "p(z): normal (standard Gaussian), uniform (on the unit cube; the "
                      "posterior is then a sigmoid-transformed Gaussian), mixture (learned mixture "
                      "of Gaussians) or vamp (VampPrior, Tomczak & Welling 2018: the posterior "
                      "mixed over learned pseudo-inputs); the KL of all but normal is estimated "
                      "by Monte Carlo", choices=PRIORS, group="model")
    posterior: str = _opt("auto", "q(z|x): gaussian (diagonal), sigmoid-gaussian (a diagonal "
                          "Gaussian squashed into the unit cube), full-covariance (a Gaussian "
                          "with every correlation, Cholesky-factored) or iaf (inverse "
                          "autoregressive flow, Kingma et al. 2016; --flow-steps); auto: what "
                          "the prior needs (gaussian for normal, mixture and vamp; "
                          "sigmoid-gaussian for uniform)",
                          choices=("auto", *POSTERIORS), group="model")
    flow_steps: Optional[int] = _opt(None, "steps of the iaf posterior, each a MADE network "
                                     "(default: 2)", minimum=1, maximum=64, group="model")
    latent_groups: Optional[list] = _opt(None, "a hierarchical VAE (top-down inference, as the "
                                         "Ladder VAE and NVAE): the sizes of its latent groups "
                                         "from the top down, comma separated, for example "
                                         "16,32; --latent-dim is then their sum and the first "
                                         "--hidden size the width of its state (MLP nets); with "
                                         "--net conv, the channels of each group's feature "
                                         "maps, the top half of the groups at a quarter of the "
                                         "image's side and the rest at half, the state's "
                                         "channels the last --conv-channels (default 64)",
                                         metavar="D[,D...]", group="model")
    prior_components: Optional[int] = _opt(None, "components of the mixture prior, pseudo-inputs "
                                           "of the vamp prior (default: mixture 10, vamp 500)",
                                           minimum=1, group="model")
    likelihood: str = _opt("auto", "p(x|z): bernoulli (binary data; grey levels are binarised), "
                           "continuous-bernoulli (grey levels in [0, 1]), gaussian (real values; "
                           "8-bit images are dequantised), discretized-logistic, logistic-mixture "
                           "(Salimans et al. 2017) or categorical (256-way softmax; small grey "
                           "images): probabilities of the 8-bit levels of images; auto: bernoulli "
                           "for digits, mnist, fashion-mnist and grey near-binary strokes, "
                           "discretized-logistic for colour images and other grey images, "
                           "bernoulli for arrays in [0, 1], gaussian otherwise (training says "
                           "which and why)",
                           choices=("auto", *LIKELIHOODS), group="model")
    likelihood_components: Optional[int] = _opt(None, "logistics per pixel of the "
                                                "logistic-mixture likelihood (default: 10, as "
                                                "PixelCNN++)", minimum=1, group="model")
    gaussian_scale: Optional[float] = _opt(None, "fixed standard deviation of the Gaussian "
                                           "likelihood; default: learned, one per data dimension",
                                           minimum=0.0, exclusive_minimum=True, group="model")
    conditional: bool = _opt(False, "condition encoder and decoder on the class label (a "
                             "conditional VAE): the data need labels (class sub-folders, a label "
                             "column, y arrays, or a built-in labelled set); the ELBO then bounds "
                             "log p(x | y)", group="model")
    # --- objective ---
    objective: str = _opt("elbo", "training objective: elbo (with --beta, --kl-schedule, "
                          "--free-bits) or iwae (the importance-weighted bound with "
                          "--iwae-samples k, Burda et al. 2016; the ELBO is still reported)",
                          choices=OBJECTIVES, group="objective")
    iwae_samples: int = _opt(5, "k, the samples of z per example of the iwae objective",
                             minimum=1, group="objective")
    # --- training ---
    epochs: Optional[int] = _opt(None, "passes over the training set (default: the dataset's "
                                 "preset: digits 150, mnist/fashion-mnist 30, tables of at most "
                                 "20,000 rows up to 3000 with early stopping, others 20)",
                                 minimum=1)
    batch_size: Optional[int] = _opt(None, "examples per update, over all processes (default: "
                                     "digits 64, small tables 32, others 128)", minimum=1)
    lr: Optional[float] = _opt(None, "Adam learning rate (default: mnist/fashion-mnist 3e-3, "
                               "others 1e-3)", minimum=0.0, exclusive_minimum=True)
    lr_decay: Optional[float] = _opt(None, "multiply the learning rate by this after every epoch "
                                     "(1: constant; 0.9 gives a tenth of it after 22 epochs; "
                                     "default: mnist/fashion-mnist 0.9, others 1)", minimum=0.0,
                                     exclusive_minimum=True, maximum=1.0)
    beta: float = _opt(1.0, "weight of the KL term (1 is the ELBO; other values train a beta-VAE, "
                       "Higgins et al. 2017, and the ELBO is still reported); with a schedule, "
                       "the value it rises to", minimum=0.0, group="objective")
    kl_schedule: str = _opt("constant", "how the KL weight moves: constant (--beta throughout), "
                            "linear (warm-up from 0 to --beta over --kl-warmup-epochs) or "
                            "cyclical (Fu et al. 2019: repeated warm-ups, each cycle of "
                            "--kl-cycle-epochs rising for its first --kl-cycle-ratio); the beta "
                            "used is logged each epoch", choices=KL_SCHEDULES,
                            group="objective")
    kl_warmup_epochs: float = _opt(10.0, "epochs of the linear KL warm-up (fractions allowed)",
                                   minimum=0.0, exclusive_minimum=True, group="objective")
    kl_cycle_epochs: float = _opt(10.0, "epochs per cycle of the cyclical schedule", minimum=0.0,
                                  exclusive_minimum=True, group="objective")
    kl_cycle_ratio: float = _opt(0.5, "share of each cycle during which beta rises (Fu et al.: "
                                 "0.5)", minimum=0.0, exclusive_minimum=True, maximum=1.0,
                                 group="objective")
    free_bits: Optional[float] = _opt(None, "free bits (Kingma et al. 2016): nats of KL per group "
                                      "of latent dimensions that cost the floor, not more; a "
                                      "group under it gets no KL gradient", minimum=0.0,
                                      exclusive_minimum=True, metavar="NATS", group="objective")
    free_bits_group_size: int = _opt(1, "latent dimensions per free-bits group (1: a floor on "
                                     "each dimension)", minimum=1, group="objective")
    grad_clip: Optional[float] = _opt(None, "clip the gradient norm to this value",
                                      minimum=0.0, exclusive_minimum=True)
    skip_threshold: Optional[float] = _opt(None, "skip every update whose gradient norm (before "
                                           "--grad-clip) exceeds this or is not finite, leaving "
                                           "the weights and Adam's moments as they were (VDVAE's "
                                           "grad-skip, Child 2021); counted per epoch as "
                                           "skipped_updates in metrics.jsonl", minimum=0.0,
                                           exclusive_minimum=True, metavar="NORM")
    validation_fraction: Optional[float] = _opt(
        None, "share of the training split held out (seeded by --split-seed) to choose when to "
        "stop: its ELBO is logged every epoch as validation_elbo (default: 0.2 with --patience, "
        "and for tables of at most 20,000 rows without --epochs; 0 otherwise)", minimum=0.0,
        maximum=0.5)
    patience: Optional[int] = _opt(
        None, "early stopping: stop when the validation ELBO has not improved for N epochs and "
        "restore the weights of its best epoch (0: train all --epochs; default: 100 for tables "
        "of at most 20,000 rows without --epochs, with up to 3000 epochs, else 0)", minimum=0,
        metavar="N")
    seed: int = _opt(0, "seed of initialisation, data order and sampling noise")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda or cuda:N", metavar="DEVICE")
    precision: str = _opt("fp32", "arithmetic of the networks while training: fp32, or bf16 "
                          "(autocast: matrix products in bfloat16, distributions, losses and "
                          "weights in float32; pays on GPUs with bfloat16 units, rarely on CPUs)",
                          choices=("fp32", "bf16"))
    compile: bool = _opt(False, "compile the training step with torch.compile (a one-off cost of "
                         "seconds to a minute; pays on GPUs, where small kernels are fused)")
    time_limit: Optional[float] = _opt(None, "stop training after this many seconds (checked "
                                       "after every step; the run is saved and can be resumed)",
                                       minimum=0.0, exclusive_minimum=True, metavar="SECONDS")
    checkpoint_every_steps: Optional[int] = _opt(None, "also checkpoint every N steps inside an "
                                                 "epoch", minimum=1, group="checkpoints")
    checkpoint_every_minutes: Optional[float] = _opt(10.0, "also checkpoint when this many minutes "
                                                     "have passed since the last one",
                                                     minimum=0.0, exclusive_minimum=True,
                                                     group="checkpoints")
    keep_checkpoints: int = _opt(2, "complete checkpoints kept in RUN_DIR/checkpoints", minimum=1,
                                 group="checkpoints")
    tensorboard: Optional[str] = _opt(None, "also log to TensorBoard in DIR (given without "
                                      "DIR, or empty in config.json: RUN_DIR/tensorboard, "
                                      "wherever the run folder is): the ELBO and its terms "
                                      "every 10 steps, the epochs' train and test figures, KL "
                                      "per latent group and dimension, beta, lr, images/s, "
                                      "samples and reconstructions, and the options with the "
                                      "final figures (HParams); needs pip install "
                                      "'vaekit[tensorboard]'", metavar="DIR", const="")
    num_samples: int = _opt(64, "images in samples.png and reconstructions.png", minimum=1)
    progress: bool = _opt(True, "show a progress bar")
    out: Optional[str] = _opt(None, "run folder to create (default: runs/DATA-NET-TIME)",
                              metavar="RUN_DIR")

    # ----------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check ranges and choices of every field; raise ConfigError naming the first bad one."""
        self.data = builtin_name(self.data)  # --data MNIST is mnist, with mnist's preset
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        check_seed("--seed", self.seed)
        check_seed("--split-seed", self.split_seed)
        data_memory_budget(self.data_memory)  # a size or auto
        parse_background(self.background)
        if self.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.device):
            raise ConfigError(f"--device {self.device!r} is not a device: use auto, cpu, cuda or "
                              "cuda:N")
        if self.hidden and any(h < 1 for h in self.hidden):
            raise ConfigError("--hidden sizes must be positive integers, for example --hidden "
                              "400,400 (or 'none')")
        if self.conv_channels is not None and (not self.conv_channels
                                               or any(c < 1 for c in self.conv_channels)):
            raise ConfigError("--conv-channels must be positive integers, for example "
                              "--conv-channels 32,64")
        if self.latent_groups is not None:
            self._check_latent_groups()
        if self.patience and self.validation_fraction == 0:
            raise ConfigError(f"--patience {self.patience} stops on the validation ELBO, and "
                              "--validation-fraction 0 holds no validation rows out: give "
                              "--validation-fraction 0.2, or --patience 0")
        if self.objective == "iwae":
            weighting = [flag for flag, used in (
                ("--beta", self.beta != 1.0), ("--kl-schedule", self.kl_schedule != "constant"),
                ("--free-bits", self.free_bits is not None)) if used]
            if weighting:
                raise ConfigError(f"{weighting[0]} weights the ELBO's KL term, which the iwae "
                                  "bound does not have; drop it or use --objective elbo")
        if self.conditional and self.prior == "vamp":
            raise ConfigError("--prior vamp mixes the posterior over unlabelled pseudo-inputs and "
                              "cannot be --conditional; use --prior normal or mixture")
        problem = posterior_problem(self.posterior, self.prior)
        if problem:
            raise ConfigError(problem)
        if self.flow_steps is not None and self.latent_groups is None and \
                resolve_posterior(self.posterior, self.prior) != "iaf":
            raise ConfigError(f"--flow-steps sets the steps of --posterior iaf; this run's "
                              f"posterior is {resolve_posterior(self.posterior, self.prior)}: "
                              "drop --flow-steps or use --posterior iaf")
        if self.free_bits is not None and self.free_bits_group_size < self.latent_dim:
            # the KL splits over dimensions only when prior and posterior both factorise
            posterior = resolve_posterior(self.posterior, self.prior)
            for option, value, factorised in (("prior", self.prior, FACTORISED_PRIORS),
                                              ("posterior", posterior, FACTORISED_POSTERIORS)):
                if value not in factorised:
                    raise ConfigError(
                        f"--free-bits per group needs a --{option} that factorises over "
                        f"dimensions ({', '.join(factorised)}), not {value}; use "
                        f"--free-bits-group-size {self.latent_dim} (at least --latent-dim: one "
                        "floor on the whole KL)")
        return self

    def _check_latent_groups(self) -> None:
        groups = self.latent_groups
        if not groups or any(d < 1 for d in groups) or len(groups) > 64:
            raise ConfigError("--latent-groups takes 1 to 64 positive sizes from the top group "
                              "down, for example --latent-groups 16,32")
        default_dim = next(f.default for f in dataclasses.fields(self) if f.name == "latent_dim")
        if self.latent_dim not in (sum(groups), default_dim):
            raise ConfigError(f"--latent-groups {','.join(map(str, groups))} has {sum(groups)} "
                              f"latent dimensions, not --latent-dim {self.latent_dim}: drop "
                              "--latent-dim (it follows the groups) or make them agree")
        self.latent_dim = sum(groups)  # the groups decide; config.json stores the sum
        for flag, value, allowed in (("--prior", self.prior, "normal"),
                                     ("--posterior", self.posterior, "auto")):
            if value != allowed and not (flag == "--posterior" and value == "gaussian"):
                raise ConfigError(f"--latent-groups builds a hierarchy with its own priors "
                                  f"and posteriors (a standard normal top group, learned "
                                  f"Gaussians below, posteriors relative to them): use {flag} "
                                  f"{allowed}, not {value}")
        if self.net == "conv":
            if len(groups) > 16:
                raise ConfigError("--net conv --latent-groups takes 1 to 16 groups")
            if self.conditional:
                raise ConfigError("--net conv --latent-groups is unconditional: drop "
                                  "--conditional, or use --net mlp for a conditional hierarchy")
        elif not self.hidden:
            raise ConfigError("--latent-groups needs --hidden: its first size is the width of "
                              "the hierarchy's state, for example --hidden 400")
        if self.prior_components is not None or self.flow_steps is not None:
            raise ConfigError("--latent-groups has no mixture components or flow steps: drop "
                              "--prior-components and --flow-steps")

    def with_presets(self, n_train: int | None = None, kind: str | None = None) -> "TrainConfig":
        """Fill fields left unset from the dataset's preset; data other than the built-in
        sets: the small-table preset for real-valued data of at most SMALL_TABLE_ROWS training
        rows (n_train, kind: of the loaded data) when --epochs is not given (it lets the data
        choose how long), else the generic one. A --patience given without
        --validation-fraction holds out the small-table preset's share."""
        preset = DATASET_PRESETS.get(self.data) or preset_for_size(n_train, kind, self.epochs)
        filled = dataclasses.replace(self, **{k: v for k, v in preset.items()
                                              if getattr(self, k) is None})
        if filled.patience and self.validation_fraction is None:
            filled.validation_fraction = SMALL_TABLE_PRESET["validation_fraction"]
        return filled

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_stored(cls, values: dict, *, where: str, written_by: str) -> tuple["TrainConfig",
                                                                              dict]:
        """Read the options of a run's config.json, written by vaekit `written_by`.

        Keys of options added since (ADDED_OPTIONS) take the value that reproduces the older
        run; they are returned as the second item ({name: value filled in}). A key this vaekit
        does not know comes from a newer vaekit: one line naming the version that wrote it.
        """
        from . import __version__

        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a JSON object of options")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            newer = (f"vaekit {written_by}, a newer vaekit than this one ({__version__})"
                     if written_by != __version__ else
                     f"a build of vaekit {written_by} with options this one lacks")
            raise ConfigError(f"{where} has option {unknown[0]!r}, unknown to vaekit "
                              f"{__version__}: the run was written by {newer} (or the file was "
                              "edited); upgrade vaekit (pip install -U vaekit) to use this run, or remove the "
                              "key if it was added by hand")
        filled = {}
        for name, value in ADDED_OPTIONS.items():
            if name not in values:
                filled[name] = value(values) if callable(value) else value
        nulls = [name for name in PRESET_OPTIONS if values.get(name, filled.get(name)) is None]
        if nulls:
            raise ConfigError(f"{where}: {nulls[0]!r} is null, but a run's config.json holds the "
                              "value training used; restore the run's original config.json or "
                              f"set {nulls[0]!r} to that number")
        return cls.from_dict({**values, **filled}, where=where), filled

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "config") -> "TrainConfig":
        """Strict inverse of `to_dict`: unknown, missing or mistyped keys are errors."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a JSON object of options")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r}: valid keys are "
                              f"{', '.join(names)}")
        missing = [n for n in names if n not in values]
        if missing:
            raise ConfigError(f"{where} lacks key {missing[0]!r}: it was written by another "
                              "vaekit version or edited by hand; restore it or retrain")
        kwargs = {}
        for f in dataclasses.fields(cls):
            kwargs[f.name] = _coerce_json(f, values[f.name], where)
        return cls(**kwargs).validate()


def preset_for_size(n_train: int | None, kind: str | None, epochs: int | None = None) -> dict:
    """The preset of data without their own: by their size and kind, and whether the user
    said how many epochs (then the generic one: N epochs of batch 128, as before the
    small-table preset)."""
    if kind == "real" and n_train is not None and n_train <= SMALL_TABLE_ROWS and epochs is None:
        return SMALL_TABLE_PRESET
    return GENERIC_PRESET


def options_from_file(values: Any, where: str) -> dict:
    """Training options a user's file gives (`vaekit train --config FILE`, the recipes/): a JSON
    object of some of TrainConfig's keys, each checked as config.json's are. Unknown keys are
    refused naming the closest option."""
    import difflib

    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a JSON object of training options, for example "
                          '{"epochs": 30, "latent_groups": [16, 32]}')
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else \
                " (see vaekit train --help: every option's key is its name with underscores)"
            raise ConfigError(f"{where} has {key!r}, which is not a training option{hint}")
    return {key: _coerce_json(fields[key], value, where) for key, value in values.items()}


NAMED_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def parse_background(text: str) -> tuple[int, int, int] | None:
    """--background: white, black, R,G,B or none (None: alpha dropped)."""
    cleaned = text.strip().lower()
    if cleaned == "none":
        return None
    if cleaned in NAMED_BACKGROUNDS:
        return NAMED_BACKGROUNDS[cleaned]
    parts = cleaned.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise ConfigError(f"--background {text!r} is not a colour: use white, black, R,G,B with "
                      "each of R, G, B from 0 to 255 (e.g. 128,128,128), or none")


def _is_cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(base type, optional?) of a field annotation such as Optional[int]."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Optional": Optional, "list": list}, {})  # noqa: S307 (own annotations)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    flag = _flag(f.name)
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{flag} {value!r} is not a valid choice: use one of "
                          f"{', '.join(map(str, choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if lo is not None and (value < lo or (meta.get("exclusive_minimum") and value == lo)):
            bound = f"greater than {lo:g}" if meta.get("exclusive_minimum") else f"at least {lo:g}"
            raise ConfigError(f"{flag} must be {bound}, got {value:g}")
        if hi is not None and value > hi:
            raise ConfigError(f"{flag} must be at most {hi:g}, got {value:g}")


def parse_int_list(text: str, flag: str) -> list:
    if text.strip().lower() in ("none", ""):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers such as 400,400, got "
                          f"{text!r}") from None


def _coerce_json(f: dataclasses.Field, value: Any, where: str) -> Any:
    base, optional = _base_type(f.type)
    what = f"{where}: {f.name!r}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{what} must not be null")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {value!r}")
        return value
    if base is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value):
            raise ConfigError(f"{what} must be a list of integers, got {value!r}")
        return list(value)
    raise AssertionError(f"unhandled field type {f.type}")


# ------------------------------------------------------------------------------------------------
# The CLI face of the dataclass.

def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One option per field; unset options stay out of the namespace so overrides are visible."""
    defaults = cls()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group_name = meta.get("group", "training")
        group = groups.get(group_name) or groups.setdefault(
            group_name, parser.add_argument_group(f"{group_name} options"))
        base, _ = _base_type(f.type)
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = meta["help"] + ("" if default is None else f" (default: {shown})")
        help_text = help_text.replace("%", "%%")
        if base is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        optional_value = {} if meta.get("const") is None else \
            {"nargs": "?", "const": meta["const"]}
        group.add_argument(_flag(f.name), dest=f.name, type=_cli_parser(f.name, base),
                           default=argparse.SUPPRESS, help=help_text,
                           metavar=meta.get("metavar") or _metavar(base, meta.get("choices")),
                           **optional_value)


def _metavar(base: type, choices: tuple | None) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {int: "N", float: "X", str: "TEXT", list: "N[,N...]"}[base]


def _cli_parser(name: str, base: type):
    flag = _flag(name)

    def parse(text: str):
        if base is list:
            try:
                return parse_int_list(text, flag)
            except ConfigError as exc:  # argparse reports only its own exception types
                raise argparse.ArgumentTypeError(str(exc)) from None
        if base is str:
            return text
        try:
            return base(text)
        except ValueError:
            kind = "an integer" if base is int else "a number"
            raise argparse.ArgumentTypeError(f"{flag} takes {kind}, got {text!r}") from None

    parse.__name__ = base.__name__
    return parse


def config_overrides(namespace: argparse.Namespace, cls: type = TrainConfig) -> dict:
    """The config fields the user gave on the command line."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
            if hasattr(namespace, f.name)}


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=False)
