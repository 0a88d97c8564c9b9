"""Objectives: pure functions of a model and a batch, returning per-example log-quantities.

    ELBO(x)     = E_q[log p(x|z)] - KL(q(z|x) || p(z))                     <=  log p(x)
    beta-ELBO   = E_q[log p(x|z)] - beta * KL            (Higgins et al. 2017; beta may follow a
                                                          schedule: KLSchedule)
    free bits   = E_q[log p(x|z)] - sum_groups max(lambda, KL_group)         (Kingma et al. 2016)
    IWAE_k(x)   = E[log (1/k) sum_i p(x, z_i) / q(z_i|x)],  z_i ~ q(z|x)    (Burda et al. 2016)
                  ELBO = IWAE_1 <= IWAE_k <= IWAE_{k+1} <= log p(x)

For a conditional model every term is conditioned on the label y, and the bounds are bounds on
log p(x | y). The training loss is `-objective.mean()` and is formed in train.py alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .model import VAE
from .names import KL_SCHEDULES  # noqa: F401  (re-exported)


class ELBOTerms(NamedTuple):
    """The ELBO's two terms per example, in nats: the note's two views of one objective."""

    reconstruction: Tensor  # (B,) E_q[log p(x|z)], the "x in, x out" view (one-sample estimate)
    kl: Tensor  # (B,) KL(q(z|x) || p(z)), the variational-inference view
    kl_dimensions: Tensor | None = None  # (B, D) KL of each latent dimension, when asked for

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl  # (B,)

    def weighted(self, beta: float) -> Tensor:
        """reconstruction - beta * KL: the beta-VAE objective (the ELBO when beta = 1)."""
        return self.reconstruction - beta * self.kl  # (B,)


def elbo_terms(model: VAE, x: Tensor, eps: Tensor | None = None, y: Tensor | None = None, *,
               per_dimension: bool = False) -> ELBOTerms:
    """One-sample ELBO of each example in x (B, *data_shape) [given labels y (B,)].

    Written once for any latent structure (latent.py): the reconstruction term at one draw of
    every latent group, minus the sum of the groups' KL terms (closed form where torch knows the
    pair, else the estimate at the draw). The draw is reparameterised, z = mu + sigma * eps, so
    the reconstruction term is differentiable in the encoder's parameters. eps (B, D), D the
    model's latent_dim over all groups, may be given to fix the noise. per_dimension=True also
    returns the KL of each latent dimension (posteriors and priors that factorise only), which
    free bits needs.
    """
    inference = model.infer(x, y)
    if eps is None:
        eps = torch.randn(len(x), model.latent_dim, device=x.device)  # (B, D)
    draw = inference.draw(eps)
    reconstruction = model.decode(draw.code, y).log_prob(x)  # (B,)
    if per_dimension:
        kl_dimensions = draw.kl_per_dimension()  # (B, D)
        return ELBOTerms(reconstruction, kl_dimensions.sum(-1), kl_dimensions)
    return ELBOTerms(reconstruction, draw.kl())


class IWAETerms(NamedTuple):
    """The importance-weighted bound of each example, and the ELBO from the same k samples."""

    bound: Tensor  # (B,) log (1/k) sum_i w_i: the IWAE_k bound (one draw of it)
    reconstruction: Tensor  # (B,) mean over the k samples of log p(x|z_i)
    kl: Tensor  # (B,) mean over the k samples of log q(z_i|x) - log p(z_i)

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl  # (B,) the k-sample average ELBO estimate


def log_importance_weights(model: VAE, x: Tensor, eps: Tensor, y: Tensor | None = None
                           ) -> tuple[Tensor, Tensor]:
    """log p(x|z_i) and log q(z_i|x) - log p(z_i) for the draws z_i made of noise eps_i, summed
    over latent groups (latent.py).

    eps (k, B, D) -> two tensors (k, B); log w_i is their difference.
    """
    draw = model.infer(x, y).draw(eps)
    log_px_z = model.decode(draw.code, y).log_prob(x)  # (k, B)
    log_ratio = draw.log_ratio()  # (k, B)
    return log_px_z, log_ratio


def iwae_terms(model: VAE, x: Tensor, eps: Tensor, y: Tensor | None = None) -> IWAETerms:
    """The IWAE bound of each example in x (B, *data_shape) with k samples of z each.

    eps (B, k, D): the noise of each example's k samples, example first (as training draws it
    for the global batch, so that each process takes its rows). Gradients flow through the
    reparameterised samples, as in Burda et al. 2016.
    """
    k = eps.shape[1]
    log_px_z, log_ratio = log_importance_weights(model, x, eps.transpose(0, 1), y)  # (k, B) x2
    log_w = log_px_z - log_ratio  # (k, B)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)  # (B,)
    return IWAETerms(bound, log_px_z.mean(0), log_ratio.mean(0))


# ------------------------------------------------------------------------------------------------
# Free bits


def kl_groups(kl_dimensions: Tensor, group_size: int) -> Tensor:
    """(B, D) -> (B, G): the KL of consecutive groups of group_size dimensions (the last may be
    smaller); group_size 1 keeps every dimension, group_size >= D gives one group."""
    if group_size == 1:  # the default: D one-column sums would cost ~2D small kernels a step
        return kl_dimensions
    return torch.stack([chunk.sum(-1) for chunk in kl_dimensions.split(group_size, dim=-1)],
                       dim=-1)


def free_bits_kl(groups: Tensor, floor: float, group_means: Tensor | None = None) -> Tensor:
    """The KL penalty with free bits (Kingma et al. 2016), per example. (B, G) -> (B,)

    The objective is E[log p(x|z)] - sum_g max(floor, E_batch[KL_g]): a group whose KL,
    averaged over the batch, is under the floor costs the floor and gets no gradient, so the
    model may spend up to `floor` nats on it for free. Per example that is KL_g where the group is
    above the floor and the constant floor where it is not; the batch mean of the result is
    exactly sum_g max(floor, mean KL_g). group_means (G,) may be given when the batch spans
    several processes (the mean over the whole global batch).
    """
    if group_means is None:
        group_means = groups.detach().mean(0)  # (G,)
    above = group_means > floor  # (G,)
    return torch.where(above, groups, torch.full_like(groups, floor)).sum(-1)  # (B,)


# ------------------------------------------------------------------------------------------------
# KL weight schedules



@dataclass(frozen=True)
class KLSchedule:
    """The weight beta of the KL term as a function of training progress (in epochs).

    constant  beta throughout (beta = 1: the ELBO; other values: a beta-VAE)
    linear    KL warm-up: beta * min(1, t / warmup_epochs), from 0 (Bowman et al. 2016;
              Sonderby et al. 2016)
    cyclical  cyclical annealing (Fu et al. 2019): the training is cut into cycles of
              cycle_epochs; in each, beta rises linearly from 0 to its full value over the first
              cycle_ratio of the cycle and stays there for the rest.
    """

    kind: str = "constant"
    beta: float = 1.0
    warmup_epochs: float = 10.0
    cycle_epochs: float = 10.0
    cycle_ratio: float = 0.5

    def __post_init__(self):
        if self.kind not in KL_SCHEDULES:
            raise ValueError(f"unknown KL schedule {self.kind!r}: choose one of "
                             f"{', '.join(KL_SCHEDULES)}")

    def __call__(self, epochs: float) -> float:
        """beta after `epochs` epochs of training (fractions count: step / steps per epoch)."""
        if self.kind == "linear":
            return self.beta * min(1.0, epochs / self.warmup_epochs)
        if self.kind == "cyclical":
            phase = (epochs % self.cycle_epochs) / self.cycle_epochs  # in [0, 1)
            return self.beta * min(1.0, phase / self.cycle_ratio)
        return self.beta


# ------------------------------------------------------------------------------------------------
# Training objectives: one object each


class Objective:
    """What training maximises, as one object: the noise it needs, the per-example terms it
    computes from a batch, the per-example objective (the loss is minus its mean, formed in
    train.py alone), what it adds to the step log and to each epoch's record, and how it reads
    in a run's summary. The training loop asks these questions and never which objective it has.

    terms(model, x, y, eps) -> (reconstruction (B,), kl (B,), extra): the ELBO's two terms and
    what the objective needs besides (None for the plain ELBO). It runs inside the module that
    DistributedDataParallel wraps, so everything with a gradient is computed there.
    """

    name = "elbo"
    log_columns: tuple[str, ...] = ()  # step-log columns it fills beyond loss, terms and beta

    def __init__(self, schedule: KLSchedule | None = None):
        self.schedule = schedule or KLSchedule()

    def noise_shape(self, latent_dim: int) -> tuple[int, ...]:
        """The standard normal noise of one example, after the batch dimension."""
        return (latent_dim,)

    def beta(self, epochs: float) -> float:
        """The KL weight after `epochs` epochs of training (fractions count)."""
        return self.schedule(epochs)

    def terms(self, model: VAE, x: Tensor, y: Tensor | None, eps: Tensor
              ) -> tuple[Tensor, Tensor, Tensor | None]:
        terms = elbo_terms(model, x, eps, y)
        return terms.reconstruction, terms.kl, None

    def per_example(self, terms: tuple[Tensor, Tensor, Tensor | None], beta: float,
                    global_mean: Callable[[Tensor], Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective of each example (B,), and the values of its own log columns.
        global_mean(t) averages a tensor over all processes' equal shares of the batch."""
        reconstruction, kl, _ = terms
        return reconstruction - beta * kl, {}  # (B,)

    def epoch_record(self, means: dict[str, float], last: dict[str, float]) -> dict:
        """What an epoch's record adds from its steps' log (means, and the last step's row)."""
        return {"beta": means["beta"], "beta_last": last["beta"]}  # the KL weights used

    def test_record(self, iwae_bound: Callable[[int], Tensor]) -> dict[str, float]:
        """Test-set figures beyond the ELBO (model space). iwae_bound(k): the test set's IWAE
        bound with k samples per example (N,), as the training loop computes it."""
        return {}

    def describe(self) -> str:
        schedule = self.schedule
        text = "ELBO" if schedule.beta == 1 else f"beta-ELBO, beta = {schedule.beta:g}"
        if schedule.kind != "constant":
            text += f", {schedule.kind} KL schedule"
        return text


class FreeBitsObjective(Objective):
    """The ELBO with free bits (Kingma et al. 2016): a floor of `floor` nats on the KL of each
    group of `group_size` latent dimensions, averaged over the whole global batch."""

    log_columns = ("kl_groups_at_floor",)

    def __init__(self, schedule: KLSchedule, floor: float, group_size: int):
        super().__init__(schedule)
        self.floor, self.group_size = floor, group_size

    def terms(self, model: VAE, x: Tensor, y: Tensor | None, eps: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
        if self.group_size >= model.latent_dim:  # one group: any latents, the whole KL
            terms = elbo_terms(model, x, eps, y)
            return terms.reconstruction, terms.kl, terms.kl.unsqueeze(-1)  # (B, 1)
        terms = elbo_terms(model, x, eps, y, per_dimension=True)
        return terms.reconstruction, terms.kl, kl_groups(terms.kl_dimensions, self.group_size)

    def per_example(self, terms, beta, global_mean):
        reconstruction, _, groups = terms
        # the floor applies to each group's KL averaged over the whole global batch
        group_means = global_mean(groups.detach().mean(0))  # (G,)
        floored = free_bits_kl(groups, self.floor, group_means)  # (B,)
        at_floor = (group_means <= self.floor).sum().to(reconstruction.dtype)
        return reconstruction - beta * floored, {"kl_groups_at_floor": at_floor}

    def epoch_record(self, means, last):
        # groups held at the floor, per step
        return {**super().epoch_record(means, last),
                "kl_groups_at_floor": means["kl_groups_at_floor"]}

    def describe(self) -> str:
        return f"{super().describe()}, free bits {self.floor:g} nats per {self.group_size} " \
            "dimension(s)"


class IWAEObjective(Objective):
    """The importance-weighted bound with k samples of z per example (Burda et al. 2016); the
    ELBO of the same samples is logged beside it."""

    name = "iwae"

    def __init__(self, samples: int):
        super().__init__()
        self.samples = samples

    def noise_shape(self, latent_dim: int) -> tuple[int, ...]:
        return (self.samples, latent_dim)  # k samples per example, example first

    def terms(self, model, x, y, eps):
        terms = iwae_terms(model, x, eps, y)
        return terms.reconstruction, terms.kl, terms.bound

    def per_example(self, terms, beta, global_mean):
        return terms[2], {}  # (B,) the IWAE bound

    def epoch_record(self, means, last):
        return {}

    def test_record(self, iwae_bound):
        return {"test_iwae": iwae_bound(self.samples).mean().item()}

    def describe(self) -> str:
        return f"IWAE bound, k = {self.samples}"


def build_objective(config) -> Objective:
    """The objective a TrainConfig asks for."""
    if config.objective == "iwae":
        return IWAEObjective(config.iwae_samples)
    schedule = KLSchedule(config.kl_schedule, config.beta, config.kl_warmup_epochs,
                          config.kl_cycle_epochs, config.kl_cycle_ratio)
    if config.free_bits is not None:
        return FreeBitsObjective(schedule, config.free_bits, config.free_bits_group_size)
    return Objective(schedule)
