"""Objectives: pure functions of a model and a batch, returning per-example log-quantities.

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x)

The training loss is `-objective.mean()` and is formed in train.py alone.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .distributions import kl_or_estimate, reparameterize
from .model import VAE


class ELBOTerms(NamedTuple):
    """The ELBO's two terms per example, in nats: the note's two views of one objective."""

    reconstruction: Tensor  # (B,) E_q[log p(x|z)], the "x in, x out" view (one-sample estimate)
    kl: Tensor  # (B,) KL(q(z|x) || p(z)), the variational-inference view

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl  # (B,)

    def weighted(self, beta: float) -> Tensor:
        """reconstruction - beta * KL: the beta-VAE objective (the ELBO when beta = 1)."""
        return self.reconstruction - beta * self.kl  # (B,)


def elbo_terms(model: VAE, x: Tensor, eps: Tensor | None = None) -> ELBOTerms:
    """One-sample ELBO of each example in x (B, *data_shape).

    z is drawn by the reparameterisation trick, z = mu + sigma * eps, so the reconstruction term
    is differentiable in the encoder's parameters. eps (B, D) may be given to fix the noise.
    """
    q = model.encode(x)
    z = q.rsample() if eps is None else reparameterize(q, eps)  # (B, D)
    reconstruction = model.decode(z).log_prob(x)  # (B,)
    kl = kl_or_estimate(q, model.prior, z)  # (B,)
    return ELBOTerms(reconstruction, kl)
