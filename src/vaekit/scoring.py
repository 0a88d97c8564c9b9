"""Scoring new data with a trained run: log p(x) of every example, and where it falls among
the run's own test examples.

For each example x of any data vaekit reads, under the run's model:

    log p(x)         importance sampled with k draws from q(z|x) (the IWAE bound, as in
                     `vaekit evaluate`), its Monte Carlo standard error and effective sample size
    bits per dim     -log2 p(x) / dimensions (discrete data only)
    ELBO             E_q[log p(x|z)] - KL(q(z|x) || p(z)), both terms, from the same k draws
    reconstruction   mean squared error between x and E[x|z] at the posterior mean code, per
    error            dimension, in the data's units (pixels in [0, 1])
    posterior mean   E_q[z], the code
    percentile       of log p(x) among the run's test examples (scored once and cached)

New data go through the run's own pipeline: converted to the run's channels and size like its
training images, binarised (one fixed seeded binarisation per example index, as the test set)
or dequantised or standardised as the run's likelihood needs. The estimator is `estimate.evaluate`,
called on chunks of SCORE_CHUNK examples; inside a chunk it streams over examples and samples
within a fixed memory budget, so no tensor of all k draws of all examples is ever held.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import parse_background
from .data import Pipeline, batches, read_examples
from .device import flush_denormals
from .errors import DataError
from .estimate import discrete_likelihood, evaluate
from .model import VAE
from .randomness import derive_seed

SCORE_CHUNK = 4096  # examples per call of the estimator (its own chunks are smaller)
RECONSTRUCT_BATCH = 512  # examples per decoder pass of the reconstruction error
TEST_SCORES_FORMAT = "vaekit-test-scores/1"
# Inputs that are already in model space: the estimator applies no transform and no noise.
MODEL_SPACE = Pipeline("identity", "real", 0)


@dataclass
class ExampleScores:
    """Per-example figures of a set of examples under one model; log-quantities in nats, in
    the data's own units (the pipeline's log-Jacobian added)."""

    log_px: np.ndarray  # (N,) importance-sampled log p(x)
    log_px_se: np.ndarray  # (N,) its Monte Carlo standard error
    log_px_ess: np.ndarray  # (N,) effective sample size of its importance weights
    elbo: np.ndarray  # (N,)
    elbo_se: np.ndarray  # (N,) its Monte Carlo standard error
    reconstruction: np.ndarray  # (N,) E_q[log p(x|z)]
    kl: np.ndarray  # (N,) KL(q(z|x) || p(z))
    reconstruction_error: np.ndarray  # (N,) mean squared error per dimension, data units
    posterior_mean: np.ndarray  # (N, D) E_q[z]
    k: int
    seed: int
    dims: int  # dimensions of one example
    discrete: bool  # log p(x) is (a bound on) a log-probability: bits per dimension make sense
    description: str  # what log p(x) is a likelihood of

    SCALARS = ("log_px", "log_px_se", "log_px_ess", "elbo", "elbo_se", "reconstruction", "kl",
               "reconstruction_error")

    def __len__(self) -> int:
        return len(self.log_px)

    @property
    def bits_per_dim(self) -> np.ndarray | None:
        """-log2 p(x) / dims per example, for discrete data; None for densities."""
        return -self.log_px / (self.dims * math.log(2.0)) if self.discrete else None

    def to_tensors(self) -> dict[str, Tensor]:
        names = (*self.SCALARS, "posterior_mean")
        return {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
                for name in names}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **facts) -> "ExampleScores":
        arrays = {name: tensors[name].double().numpy() for name in (*cls.SCALARS,
                                                                    "posterior_mean")}
        return cls(**arrays, **facts)


def score_examples(model: VAE, raw: Tensor, pipeline: Pipeline, *, k: int, seed: int = 0,
                   split: str = "new", batch_size: int | None = None,
                   device: torch.device | None = None,
                   progress: Callable[[int], None] | None = None) -> ExampleScores:
    """Score every example of raw (N, *shape), a batch of the run's raw data, under model.

    split names the noise stream: the fixed binarisation or dequantisation of example i is a
    function of (pipeline.split_seed, split, i), and its importance samples of (seed, split,
    i), so the same data score the same on every call.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2 for a standard error, got {k}")
    if len(raw) == 0:
        raise ValueError("no examples to score")
    device = device or next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {name: [] for name in ("log_px", "log_px_var",
                                                            "log_px_ess", "elbo", "elbo_var",
                                                            "reconstruction", "kl",
                                                            "posterior_mean")}
    errors = []
    was_training = model.training
    model.eval()
    try:
        with flush_denormals(device):
            for start, stop in batches(len(raw), SCORE_CHUNK):
                with torch.inference_mode():
                    x = pipeline.fixed(raw[start:stop].to(device), start, split)  # (b, *shape)
                # Each chunk draws its importance samples from its own stream; within it the
                # estimator keys them by the example's index in the chunk.
                result = evaluate(model, x, MODEL_SPACE, split=split, k=k, naive=False,
                                  seed=derive_seed(seed, "score", split, start),
                                  batch_size=batch_size, device=device, progress=progress)
                for name in parts:
                    parts[name].append(result.per_example[name].cpu())
                errors.append(reconstruction_error(model, x, pipeline))
    finally:
        model.train(was_training)
    joined = {name: torch.cat(values).double().numpy() for name, values in parts.items()}
    shift = pipeline.log_jacobian  # log-densities in the data's own units
    return ExampleScores(
        log_px=joined["log_px"] + shift, log_px_se=np.sqrt(joined["log_px_var"]),
        log_px_ess=joined["log_px_ess"], elbo=joined["elbo"] + shift,
        elbo_se=np.sqrt(joined["elbo_var"]),
        reconstruction=joined["reconstruction"] + shift, kl=joined["kl"],
        reconstruction_error=torch.cat(errors).double().numpy(),
        posterior_mean=joined["posterior_mean"], k=k, seed=seed,
        dims=math.prod(model.data_shape), discrete=discrete_likelihood(model, pipeline),
        description=pipeline.description)


def data_key(raw: Tensor) -> str:
    """The noise stream of a set of examples, named by its content: the same data get the same
    binarisation and importance samples whichever command scores them, and different sets
    independent ones."""
    digest = hashlib.sha256()
    digest.update(str(tuple(raw.shape)).encode())
    digest.update(raw.contiguous().cpu().numpy())  # the buffer itself, no copy
    return "new-" + digest.hexdigest()[:16]


def reconstruction_error(model: VAE, x: Tensor, pipeline: Pipeline) -> Tensor:
    """Mean squared error per dimension between x (B, *shape), in model space, and E[x|z] at
    its posterior mean code, both in the data's units. (B,) float64"""
    out = []
    with torch.inference_mode():
        for start, stop in batches(len(x), RECONSTRUCT_BATCH):
            part = x[start:stop]  # (b, *shape)
            difference = pipeline.display(model.reconstruct(part)) - pipeline.display(part)
            out.append(difference.double().square().flatten(1).mean(1).cpu())  # (b,)
    return torch.cat(out)


def percentiles(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Percentile of each value among the reference values: 100 x (share below + half the
    share equal), so the reference's own median scores 50. (N,)"""
    ordered = np.sort(reference)
    below = np.searchsorted(ordered, values, side="left")
    at_most = np.searchsorted(ordered, values, side="right")
    return 100.0 * (below + at_most) / (2.0 * len(ordered))


def scores_summary(scores: ExampleScores, reference: ExampleScores, *, data: str) -> dict:
    """A scored set beside the run's test set: means, and how its log p(x) ranks among the
    test examples' (what `vaekit score` prints, and its --json object)."""
    ranks = percentiles(scores.log_px, reference.log_px)
    summary = {"format": "vaekit-scores/1", "data": data, "n": len(scores), "k": scores.k,
               "seed": scores.seed, "likelihood_of": scores.description,
               "log_px_mean": float(scores.log_px.mean()),
               "log_px_mean_se": float(np.sqrt((scores.log_px_se ** 2).sum()) / len(scores)),
               "test_log_px_mean": float(reference.log_px.mean()), "n_test": len(reference),
               "percentile_median": float(np.median(ranks)),
               "below_test_1st_percentile": int((ranks < 1).sum()),
               "below_test_5th_percentile": int((ranks < 5).sum()),
               "elbo_mean": float(scores.elbo.mean()),
               "reconstruction_error_mean": float(scores.reconstruction_error.mean())}
    if scores.bits_per_dim is not None:
        summary["bits_per_dim_mean"] = float(scores.bits_per_dim.mean())
        summary["test_bits_per_dim_mean"] = float(reference.bits_per_dim.mean())
    return summary


def scores_csv(rows, reference: ExampleScores) -> str:
    """One CSV of per-example scores, rows of every set: (set name, ExampleScores, extra
    per-example columns by name) per set; percentiles among the reference (test) scores."""
    latent = rows[0][1].posterior_mean.shape[1]
    extra_names = list(rows[0][2])
    header = ["set", "index", "log_px", "log_px_se", "log_px_ess", "bits_per_dim",
              "test_percentile", "elbo", "elbo_se", "reconstruction", "kl",
              "reconstruction_error",
              *extra_names, *(f"z{d}" for d in range(latent))]
    lines = [",".join(header)]
    for name, scores, extra in rows:
        bits = scores.bits_per_dim if scores.bits_per_dim is not None else \
            np.full(len(scores), np.nan)
        ranks = percentiles(scores.log_px, reference.log_px)
        columns = [scores.log_px, scores.log_px_se, scores.log_px_ess, bits, ranks, scores.elbo,
                   scores.elbo_se, scores.reconstruction, scores.kl, scores.reconstruction_error,
                   *(extra[n] for n in extra_names)]
        table = np.column_stack([*columns, scores.posterior_mean])  # (N, columns)
        for index, row in enumerate(table):
            lines.append(f"{name},{index}," + ",".join("" if not np.isfinite(v) else f"{v:.6g}"
                                                       for v in row))
    return "\n".join(lines) + "\n"



# ------------------------------------------------------------------------------------------------
# New data through the run's pipeline


def load_new_data(run, source: str) -> tuple[Tensor, str]:
    """Every example of `source` as the run's raw data: (raw (N, *run shape), what was read).

    Image folders are converted to the run's channel count and, if the run resized its
    training images (--image-size), resized the same way. Anything whose shape, kind or values
    the run's model cannot score is refused in one line.
    """
    shape = tuple(run.data["shape"])
    kind = run.data["kind"]
    is_folder = Path(source).expanduser().is_dir()
    channels = shape[0] if kind == "image8" and len(shape) == 3 else None
    if is_folder and kind != "image8":
        raise DataError(f"{source}: a folder of images, but {run.path} was trained on "
                        f"real-valued arrays of shape {_shape(shape)}; give a .npy/.npz/.csv "
                        "file of such arrays")
    raw, new_kind, what = read_examples(source, data_dir=run.config.data_dir,
                                        image_size=run.config.image_size if is_folder else None,
                                        channels=channels if is_folder else None,
                                        fast_resize=run.config.fast_resize,
                                        background=parse_background(run.config.background))
    if new_kind != kind:
        want = "8-bit images (uint8)" if kind == "image8" else "real-valued arrays"
        got = "8-bit images" if new_kind == "image8" else "real-valued arrays"
        raise DataError(f"{source}: holds {got} but {run.path} was trained on {want}; give data "
                        "of the same kind (for images: uint8 arrays or image files)")
    if tuple(raw.shape[1:]) != shape:
        hint = (" (pass images of that size, or train the run with --image-size to have "
                "images resized)" if is_folder and run.config.image_size is None else
                "; convert them to the run's shape")
        raise DataError(f"{source}: examples have shape {_shape(raw.shape[1:])} but "
                        f"{run.path} was trained on {_shape(shape)}{hint}")
    check_scorable(raw, run, source)
    return raw, what


def check_scorable(raw: Tensor, run, source: str) -> None:
    """Refuse real values the run's likelihood cannot score (8-bit images always can)."""
    if run.data["kind"] != "real" or run.config.likelihood not in ("bernoulli",
                                                                   "continuous-bernoulli"):
        return
    lo, hi = float(raw.min()), float(raw.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{source}: values range over [{lo:g}, {hi:g}] but the run's "
                        f"{run.config.likelihood} likelihood scores values in [0, 1]; rescale "
                        "them as the training data were")
    if run.pipeline.mode == "identity" and run.config.likelihood == "bernoulli" and \
            not bool(((raw == 0) | (raw == 1)).all()):
        raise DataError(f"{source}: the run was trained on binary values and scores only 0 or "
                        "1; binarise these as the training data were")


def _shape(shape) -> str:
    return " x ".join(str(s) for s in shape)


# ------------------------------------------------------------------------------------------------
# The run's test set, scored once and cached in the run folder


def reference_cache_path(run, k: int, seed: int) -> Path:
    return run.path / f"test-scores-k{k}-seed{seed}.safetensors"


def _weights_digest(run) -> str:
    digest = hashlib.sha256()
    with open(run.path / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_scores(run, k: int, seed: int = 0, *, load_dataset: Callable | None = None,
                batch_size: int | None = None, progress: Callable[[int], None] | None = None,
                warn: Callable[[str], None] = print, write_cache: bool = True
                ) -> ExampleScores:
    """The run's test examples scored at k (seed): read from RUN_DIR/test-scores-kK-seedS
    .safetensors when that file was written for these weights and data, else computed and
    written there atomically (unless write_cache is false). load_dataset: returns the run's
    dataset (default: runs.load_run_dataset), called only when the scores must be computed."""
    from .runs import atomic_write_bytes, describe_os_error, tensors_from_file, tensors_to_bytes

    path = reference_cache_path(run, k, seed)
    facts = {"format": TEST_SCORES_FORMAT, "k": str(k), "seed": str(seed),
             "weights_sha256": _weights_digest(run), "data_fingerprint": run.data["fingerprint"]}
    scored = dict(k=k, seed=seed, dims=math.prod(run.data["shape"]),
                  discrete=discrete_likelihood(run.model, run.pipeline),
                  description=run.pipeline.description)
    if path.is_file():
        cached = _read_cache(path, facts, tensors_from_file)
        if cached is not None:
            return ExampleScores.from_tensors(cached, **scored)
    if load_dataset is None:
        from .runs import load_run_dataset

        load_dataset = lambda: load_run_dataset(run)  # noqa: E731
    dataset = load_dataset()
    scores = score_examples(run.model, dataset.test_x, run.pipeline, k=k, seed=seed,
                            split="test", batch_size=batch_size, progress=progress)
    if not write_cache:
        return scores
    try:
        atomic_write_bytes(path, tensors_to_bytes(scores.to_tensors(), facts))
    except OSError as exc:  # a read-only run still scores; it is only slower next time
        warn(f"warning: cannot cache the test-set scores ({describe_os_error(exc, path)}); "
             "they will be computed again next time")
    return scores


def _read_cache(path: Path, facts: dict, reader) -> dict | None:
    """The cached tensors if the file holds scores of these weights, data, k and seed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if any(metadata.get(key) != value for key, value in facts.items()):
            return None  # other weights (a resumed run), other data or another k: recompute
        tensors = reader(path)
    except Exception:  # noqa: BLE001 (any damage to the file means: compute afresh)
        return None  # damaged: recompute and replace
    names = (*ExampleScores.SCALARS, "posterior_mean")
    if set(tensors) != set(names) or len({len(t) for t in tensors.values()}) != 1:
        return None
    return tensors


# ------------------------------------------------------------------------------------------------
# One example at a time (the explorer's uploads)


class SingleExampleScorer:
    """log p(x) of one example at a time and its percentile among the run's test examples.

    The test set is scored at the same k on the first call, so a server starts at once; a
    cache that `vaekit score --k K` left in the run folder is read instead, but none is written
    (a browsing session leaves the run folder as it was). A conditional run has no log p(x) to
    give, and yields None.
    """

    def __init__(self, run, k: int = 100, seed: int = 0):
        import threading

        self.run, self.k, self.seed = run, k, seed
        self.reference: np.ndarray | None = None
        self.lock = threading.Lock()

    def __call__(self, raw: Tensor, split: str = "upload") -> dict | None:
        """raw (1, *shape): the run's raw data. log p(x), its s.e., k and the percentile."""
        if self.run.config.conditional:
            return None
        with self.lock:  # the first call scores the test set; the others wait for it
            if self.reference is None:
                self.reference = reference_scores(self.run, self.k, self.seed,
                                                  write_cache=False).log_px
        scores = score_examples(self.run.model, raw, self.run.pipeline, k=self.k,
                                seed=self.seed, split=split)
        return {"log_px": float(scores.log_px[0]), "log_px_se": float(scores.log_px_se[0]),
                "score_k": self.k, "test_examples": len(self.reference),
                "test_percentile": float(percentiles(scores.log_px, self.reference)[0])}
