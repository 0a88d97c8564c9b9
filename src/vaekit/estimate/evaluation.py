"""Evaluation of a split and of a run: every estimator's per-example figures, then the summary.

What `vaekit evaluate` computes: importance-sampled log p(x) with its standard error and
effective sample size, the ELBO and its terms from the same samples, the naive estimator, the
posterior means (active units) and the KL per latent dimension.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..data import Pipeline
from ..device import flush_denormals
from ..distributed import DistContext
from ..model import VAE
from .chunks import decode_samples, examples_per_chunk, map_examples, sample_block
from .importance import SCALARS, evaluate_batch
from .summary import Evaluation, discrete_likelihood


def evaluate(model: VAE, raw: Tensor, pipeline: Pipeline, *, split: str = "test", k: int = 5000,
             seed: int = 0, naive: bool = True, batch_size: int | None = None,
             device: torch.device | None = None, dist: DistContext | None = None,
             progress: Callable[[int], None] | None = None,
             labels: Tensor | None = None) -> Evaluation:
    """Estimate log p(x), the ELBO and the rest on every example of raw (a split's raw data).

    labels (N,): the classes of a conditional model's examples; every figure is then of
    log p(x | y).
    batch_size: examples per chunk (default: examples_per_chunk).
    Under torchrun pass DistContext.from_env(): chunks are shared out, results are identical.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = device or next(model.parameters()).device
    block = sample_block(model, k)
    batch_size = batch_size or examples_per_chunk(model, block)
    samples_per_pass = decode_samples(model, min(batch_size, len(raw)))
    latent = model.latent_dim
    was_training = model.training
    model.eval()

    def fn(x: Tensor, start: int, stop: int) -> Tensor:
        y = None if labels is None else labels[start:stop].to(x.device)
        return evaluate_batch(model, x, start, k=k, seed=seed, split=split, naive=naive,
                              block=block, y=y, samples_per_pass=samples_per_pass)

    try:
        table = map_examples(fn, raw, pipeline, split, batch_size, device, dist,
                             outputs=len(SCALARS) + 2 * latent, progress=progress).cpu()
    finally:
        model.train(was_training)
    per_example = {name: table[:, i] for i, name in enumerate(SCALARS)}
    per_example["posterior_mean"] = table[:, len(SCALARS): len(SCALARS) + latent]
    per_example["kl_per_dim"] = table[:, len(SCALARS) + latent:]
    with torch.inference_mode():
        y = None if labels is None else labels[:1].to(device)
        inference = model.infer(pipeline.fixed(raw[:1].to(device), 0, split), y)
        kl_exact = inference.exact_kl_per_dimension() is not None
        prior_variance = [float(v) for v in model.prior_variance().cpu()]
    return Evaluation(per_example, k, seed, split, naive, pipeline.log_jacobian,
                      math.prod(model.data_shape), discrete_likelihood(model, pipeline),
                      kl_exact, prior_variance, pipeline.description,
                      tuple(model.latent_groups))



def evaluate_run(run, dataset, *, split: str = "test", k: int = 5000, limit: int | None = None,
                 seed: int = 0, batch_size: int | None = None, naive: bool = True,
                 dist: DistContext | None = None,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Evaluate a loaded run (runs.load_run) on its dataset (runs.load_run_dataset): the
    evaluation.json object, labelled with the run, the data and what the likelihood scores."""
    import time

    from .. import __version__

    if split not in ("test", "train"):
        raise ValueError(f"unknown split {split!r}: choose one of test, train")
    raw = dataset.test_x if split == "test" else dataset.train_x
    labels = (dataset.test_y if split == "test" else dataset.train_y) \
        if run.config.conditional else None
    total = len(raw)
    rows = subset_rows(total, limit, seed)
    if rows is not None:  # a seeded random subset: a split ordered by class gives every class
        raw = raw[rows]
        labels = None if labels is None else labels[rows]
    device = next(run.model.parameters()).device
    started = time.monotonic()
    with flush_denormals(device):
        evaluation = evaluate(run.model, raw, run.pipeline, split=split, k=k, seed=seed,
                              naive=naive, batch_size=batch_size, device=device, dist=dist,
                              progress=progress, labels=labels)
    seconds = time.monotonic() - started
    result = evaluation.summary()
    if labels is not None:  # a conditional model: every figure is of log p(x | y)
        result["likelihood_of"] += ", given each example's class label y: log p(x | y)"
    result["conditional"] = labels is not None
    dist = dist or DistContext()
    result.update(run=str(run.path), data=run.data["name"], data_shape=run.data["shape"],
                  likelihood=run.config.likelihood, prior=run.config.prior, net=run.config.net,
                  seconds=seconds, device=str(device), processes=dist.world_size,
                  vaekit_version=__version__)
    result["subset"] = None if rows is None else {
        "n": len(rows), "of": total, "seed": seed, "rows": rows.tolist(),
        "how": "seeded random subset of the split (--limit, --seed); each example's noise is "
               "that of its position in the subset"}
    return result


def subset_rows(total: int, limit: int | None, seed: int) -> Tensor | None:
    """The rows (sorted) of a seeded random subset of `limit` of `total` examples; None for
    all of them. The same seed gives the same subset."""
    if limit is None or limit >= total:
        return None
    from ..randomness import derive_seed, seeded_generator

    order = torch.randperm(total, generator=seeded_generator(derive_seed(seed, "subset")))
    return order[:limit].sort().values  # (limit,)


# The k `vaekit evaluate` chooses when not told: the largest of these whose measured cost fits
# the time budget (and at least the smallest: fewer samples say little about the gap).
K_LADDER = (5000, 2000, 1000, 500, 200, 100)
PROBE_EXAMPLES, PROBE_KS = 16, (16, 256)


def choose_k(run, dataset, *, split: str, n: int, budget_seconds: float, naive: bool,
             seed: int = 0) -> dict:
    """k for n examples within budget_seconds, from the cost measured now: PROBE_EXAMPLES
    examples at the two k of PROBE_KS, whose difference is the cost of the extra samples alone
    (the fixed cost of a call cancels). {"k", "mode", "seconds_per_sample" (per example and
    sample), "expected_seconds", "budget_seconds"}."""
    import time

    probe = min(PROBE_EXAMPLES, n)
    seconds = []
    for k in PROBE_KS:
        started = time.monotonic()
        evaluate_run(run, dataset, split=split, k=k, limit=probe, seed=seed, naive=naive)
        seconds.append(time.monotonic() - started)
    extra = PROBE_KS[1] - PROBE_KS[0]
    per_sample = max(seconds[1] - seconds[0], seconds[1] / PROBE_KS[1] * extra / 4) \
        / (probe * extra)  # a floor: timer noise must not make samples look free
    k = next((k for k in K_LADDER if k * n * per_sample <= budget_seconds), K_LADDER[-1])
    return {"k": k, "mode": "chosen for the time budget", "budget_seconds": budget_seconds,
            "seconds_per_sample": per_sample, "expected_seconds": k * n * per_sample}
