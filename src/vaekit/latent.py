"""The latent variables of a model, seen through one interface whatever their structure.

A model's latents are L groups z_1 ... z_L (a single-latent VAE has one). Given x, the model's
`infer(x, y)` returns an `Inference`; `inference.draw(eps)` turns explicit standard normal noise
into one draw of every group, a `LatentDraw`, in which each group carries

    z_l           the draw (..., B, D_l)
    q(z_l | ...)  its posterior given x and the groups drawn before it
    p(z_l | ...)  its prior given the groups it depends on

and the draw carries `code`, the tensor the decoder reads (z itself for one group; the bottom
group of a hierarchy). The ELBO is then written once, for any structure, as

    ELBO(x) = E_q[log p(x | code)] - sum_l KL(q(z_l | ...) || p(z_l | ...))

where each KL is closed form when torch registers the pair and otherwise the Monte Carlo
estimate log q(z_l) - log p(z_l) at the reparameterised draw (as Pyro's Trace_ELBO sums over the
sample sites a model has, and torch.distributions' registry decides where a closed form exists).
Importance sampling needs only log w = log p(x | code) - sum_l [log q(z_l) - log p(z_l)], the
latter the draw's `log_ratio`.

The noise is one tensor (..., B, D) with D = sum_l D_l, split into the groups in order
(`split_noise`); training draws it from the counter-based generators of randomness.py and
estimators per example, so exact resume and multi-process equality hold for any structure.

What a model must provide (the VAE of model.py and the two-group oracle of oracle.py do):

    latent_groups                 ((name, D_l), ...) in the order the noise is split
    latent_dim                    D = sum_l D_l
    code_dim                      dimensions of the code the decoder reads
    infer(x, y) -> Inference      q given x (what does not depend on the noise is computed once)
    decode(code, y) -> p(x | code)
    prior_draws()                 codes from the prior made of noise: .code(eps, choice), and
                                  .needs_choice (a mixture picks components with more noise)
    prior_variance() -> (D,)      the prior's variance of each latent coordinate
    decoder, likelihood, condition(y), num_classes, data_shape   (the decoder fast path, probes)

model.VAE has one group; oracle.LinearGaussianHierarchy has two and is expressed without any
change to objectives, estimators or training.
"""

from __future__ import annotations

import abc
import functools
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution

from .distributions import (
    exact_kl_per_dimension,
    factorises_against,
    kl_or_estimate,
    kl_per_dimension,
    log_ratio_per_dimension,
)


def split_noise(eps: Tensor, dims: Sequence[int]) -> tuple[Tensor, ...]:
    """Noise (..., B, sum(dims)) -> one view (..., B, D_l) per group, in order."""
    if len(dims) == 1:
        return (eps,)  # one group: the tensor itself
    return tuple(eps.split(list(dims), dim=-1))


def _total(terms: list[Tensor]) -> Tensor:
    # a sum that adds nothing to a single term, so one group gives its own tensor bit for bit
    return functools.reduce(operator.add, terms)


@dataclass
class LatentGroup:
    """One group of a draw: z_l, the noise that made it, and its posterior and prior.

    The prior may be given as a function that makes it: it is then made when first needed, after
    the decoder has run, as the single-latent VAE has always done (a learned prior's graph, and so
    the order in which its gradients are summed, is unchanged).
    """

    name: str
    z: Tensor  # (..., B, D_l)
    eps: Tensor  # (..., B, D_l) the standard normal noise z was made of
    q: Distribution  # q(z_l | x, groups above), event (D_l,)
    prior: Distribution | Callable[[], Distribution]  # p(z_l | groups above), event (D_l,)

    @functools.cached_property
    def p(self) -> Distribution:
        return self.prior if isinstance(self.prior, Distribution) else self.prior()

    def kl(self) -> Tensor:
        """KL(q || p) per example: closed form where registered, else the estimate at z."""
        return kl_or_estimate(self.q, self.p, self.z)  # (B,) or (..., B)

    def log_ratio(self) -> Tensor:
        """log q(z_l) - log p(z_l) at the draw. (..., B)"""
        return self.q.log_prob(self.z) - self.p.log_prob(self.z)

    @property
    def factorises(self) -> bool:
        """Whether q and p both factorise over this group's dimensions (per-dimension KLs)."""
        return factorises_against(self.q, self.p)

    def kl_per_dimension(self) -> Tensor:
        """KL of each dimension (B, D_l) (closed form) or its estimate at z (..., B, D_l)."""
        return kl_per_dimension(self.q, self.p, self.z)

    def log_ratio_per_dimension(self) -> Tensor:
        """log q(z_ld) - log p(z_ld) at the draw, (..., B, D_l); factorised groups only."""
        return log_ratio_per_dimension(self.q, self.p, self.z, self.eps)

    def exact_kl_per_dimension(self) -> Tensor | None:
        return exact_kl_per_dimension(self.q, self.p)


@dataclass
class LatentDraw:
    """One draw of every latent group of a batch, and the code the decoder reads."""

    groups: list[LatentGroup]
    code: Tensor  # (..., B, code_dim)

    @property
    def z(self) -> Tensor:
        """Every group's draw side by side. (..., B, D)"""
        if len(self.groups) == 1:
            return self.groups[0].z
        return torch.cat([group.z for group in self.groups], dim=-1)

    def kl(self) -> Tensor:
        """sum_l KL(q(z_l | ...) || p(z_l | ...)): the ELBO's KL term. (..., B)"""
        return _total([group.kl() for group in self.groups])

    def log_ratio(self) -> Tensor:
        """sum_l log q(z_l | ...) - log p(z_l | ...) at the draw. (..., B)"""
        return _total([group.log_ratio() for group in self.groups])

    @property
    def factorises(self) -> bool:
        return all(group.factorises for group in self.groups)

    def kl_per_dimension(self) -> Tensor:
        """The KL of every latent dimension, groups side by side. (B, D) or (..., B, D)"""
        parts = [group.kl_per_dimension() for group in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def log_ratio_per_dimension(self) -> Tensor | None:
        """log q - log p of every latent dimension at the draw (..., B, D), or None when a group
        does not factorise (a mixture prior): then only the total `log_ratio` exists."""
        if not self.factorises:
            return None
        parts = [group.log_ratio_per_dimension() for group in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class Inference(abc.ABC):
    """What a model infers from a batch x before any noise: `draw(eps)` gives a LatentDraw.

    A model computes here what does not depend on the noise (the flat VAE's q(z|x); a
    hierarchy's bottom-up pass), so estimators that draw many blocks of samples of the same
    examples pay for it once.
    """

    @abc.abstractmethod
    def draw(self, eps: Tensor) -> LatentDraw:
        """A draw of every group from noise eps (..., B, D); every model's inference defines it.

        A model of several groups also takes `draw(eps, inferred_groups=m)`: the top m groups
        from q and the groups below them from their priors given the groups above (q_l = p_l
        there), the proposal of the bounds that skip the lowest groups (Havtorn et al. 2021)."""

    def exact_kl_per_dimension(self) -> Tensor | None:
        """The KL of every latent dimension in closed form, (B, D), where it does not depend on
        the draw (one group whose pair torch knows); None otherwise."""
        return None

    def mean_code(self) -> Tensor | None:
        """E_q[z] of every latent dimension (B, D) where known in closed form, else None (then
        estimators average the draws)."""
        return None
