"""Evaluation: the ELBO, log p(x) by importance sampling, the naive estimator, and their gaps.

    ELBO(x)      = E_q[log p(x|z)] - KL(q(z|x) || p(z))                      <= log p(x)
    IS_k(x)      = log (1/k) sum_j p(x, z_j) / q(z_j|x),   z_j ~ q(z|x)      (Burda et al. 2016)
    naive_k(x)   = log (1/k) sum_j p(x | z_j),             z_j ~ p(z)         (the note's point 9)
    log p(x) - ELBO(x) = KL(q(z|x) || p(z|x))                                 (the note's point 14)

Every figure comes with its sample count and a Monte Carlo standard error. The package's modules
each do one job:

    statistics   running means and log-mean-exps over blocks of samples, with their errors
    chunks       how many examples and samples go together; the map over a split's examples
    decoding     the decoder fast path: log p(x | z_j) for many codes of the same examples
    importance   importance sampling and the naive estimator for one batch of examples
    diagnostics  Pareto k, replicate standard errors and the jackknife of the weights
    bounds       ELBO terms, the IWAE bound and the KL per dimension of a split, fixed noise
    summary      dataset means with standard errors: the evaluation.json object
    evaluation   evaluate (a split) and evaluate_run (what `vaekit evaluate` computes)
"""

from ..device import flush_denormals  # where it lived before device.py
from .bounds import (
    elbo_per_example,
    iwae_per_example,
    kl_per_dimension,
    skip_bounds_per_example,
)
from .chunks import (
    CHUNK_ELEMENTS,
    DECODE_ELEMENTS,
    PASS_SAMPLES,
    FixedInputs,
    decode_samples,
    decoded_elements_per_sample,
    examples_per_chunk,
    map_examples,
    sample_block,
)
from .decoding import log_likelihood
from .evaluation import evaluate, evaluate_run
from .importance import (
    SCALARS,
    ImportanceBlock,
    evaluate_batch,
    importance_blocks,
    log_weights,
    noise_chunks,
    prior_blocks,
)
from .statistics import LogMeanExp, MeanSums, bits_per_dim, log_mean_exp
from .summary import ACTIVE_THRESHOLD, LOW_ESS, Evaluation, discrete_likelihood

__all__ = [
    "ACTIVE_THRESHOLD", "CHUNK_ELEMENTS", "DECODE_ELEMENTS", "LOW_ESS", "PASS_SAMPLES", "SCALARS",
    "Evaluation", "FixedInputs", "ImportanceBlock", "LogMeanExp", "MeanSums", "bits_per_dim",
    "decode_samples", "decoded_elements_per_sample", "discrete_likelihood", "elbo_per_example",
    "evaluate", "evaluate_batch", "evaluate_run", "examples_per_chunk", "importance_blocks",
    "iwae_per_example", "kl_per_dimension", "log_likelihood", "log_mean_exp", "log_weights",
    "map_examples", "noise_chunks", "prior_blocks", "sample_block", "flush_denormals",
    "skip_bounds_per_example",
]


def __getattr__(name: str):
    # The gradient-variance demonstration moved to gradients.py (beside report.py, its user);
    # its old import path keeps working. Imported on use: gradients.py imports this package.
    if name in ("GradientVariance", "elbo_gradient", "gradient_variance"):
        from .. import gradients

        return getattr(gradients, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
