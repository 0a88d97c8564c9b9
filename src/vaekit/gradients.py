"""The gradient of the ELBO: reparameterisation against the score function (the note's point 16).

The demonstration `vaekit explain` reports: the spread of independent gradient estimates of each
kind from the same noise, at several sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .distributions import exact_kl_per_dimension, reparameterize
from .estimate.statistics import MeanSums
from .model import VAE
from .randomness import per_example_normal


@dataclass
class GradientVariance:
    """Spread of `repeats` independent estimates of the gradient of the batch-mean ELBO with
    respect to the encoder's parameters, each from `samples` draws of z per example."""

    estimator: str  # reparameterisation | score-function
    samples: int
    repeats: int
    variance: float  # trace of the covariance: sum over parameters of Var(g_p)
    mean_norm: float  # |mean of the estimates|: the gradient, plus noise of variance / repeats
    parameters: int


def elbo_gradient(model: VAE, x: Tensor, eps: Tensor, estimator: str) -> list[Tensor]:
    """One estimate of d ELBO / d encoder parameters from noise eps (S, B, D).

    reparameterisation: z = loc + scale * eps, differentiate through z (Kingma & Welling 2014).
    score-function (REINFORCE, Williams 1992): E_q[f(z) d log q(z|x)], with z held fixed and no
    baseline or control variate. The KL is differentiated in closed form in both where torch
    knows it, so the two differ only in how they treat the sampled term.
    """
    if estimator not in ("reparameterisation", "score-function"):
        raise ValueError(f"unknown estimator {estimator!r}: choose one of reparameterisation, "
                         "score-function")
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    q, prior = model.encode(x), model.prior
    exact_kl = exact_kl_per_dimension(q, prior)
    if estimator == "reparameterisation":
        z = reparameterize(q, eps)  # (S, B, D), differentiable in the encoder's parameters
        sampled = model.decode(z).log_prob(x)  # (S, B)
        if exact_kl is None:
            sampled = sampled - (q.log_prob(z) - prior.log_prob(z))
        objective = sampled.mean(0)  # (B,)
    else:
        with torch.no_grad():
            z = reparameterize(q, eps)  # (S, B, D), a plain draw: no path to the parameters
            f = model.decode(z).log_prob(x)  # (S, B)
            if exact_kl is None:
                f = f + prior.log_prob(z) - q.log_prob(z)
        # log q(z) at the fixed draw, differentiable in q's parameters only: the family's own
        objective = (f * q.score_log_prob(eps)).mean(0)  # (B,)
    if exact_kl is not None:
        objective = objective - exact_kl.sum(-1)
    return list(torch.autograd.grad(objective.mean(), params))


def gradient_variance(model: VAE, x: Tensor, *, samples: Sequence[int] = (1, 10, 100),
                      repeats: int = 100, seed: int = 0) -> list[GradientVariance]:
    """Both gradient estimators at each sample count, from the same noise (the note's point 16)."""
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    results = []
    was_training = model.training
    model.eval()
    try:
        for count in samples:
            for estimator in ("reparameterisation", "score-function"):
                moments = MeanSums()
                for repeat in range(repeats):
                    eps = per_example_normal((model.latent_dim,), 0, len(x), 0, count,
                                             (seed, "gradient", count, repeat)).to(x.device)
                    grads = elbo_gradient(model, x, eps, estimator)
                    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
                    moments.add(flat.unsqueeze(0))
                variance = float(moments.sample_variance.sum())
                results.append(GradientVariance(estimator, count, repeats, variance,
                                                float(moments.mean.norm()), n_params))
    finally:
        model.train(was_training)
    return results

