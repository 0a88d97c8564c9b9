"""The summary of an evaluation: dataset means with standard errors, as evaluation.json holds.

Per-example figures (model space) come in; the summary adds the pipeline's log-Jacobian to
log-densities, forms standard errors from the per-example variances, counts active units and
says in words what every figure was computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import Pipeline
from ..model import VAE
from .diagnostics import pareto_k_threshold, replicate_standard_error
from .statistics import bits_per_dim

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active if Cov_x(E_q[z_d]) > 0.01
# Examples whose importance weights have an effective sample size below this are flagged: a
# few draws carry the estimate, which is then likely too low and its error bar too small.
LOW_ESS = 10.0


@dataclass
class Evaluation:
    """Per-example figures of one split (model space) and what is needed to report them."""

    per_example: dict[str, Tensor]  # SCALARS -> (N,); posterior_mean, kl_per_dim -> (N, D)
    k: int
    seed: int
    split: str
    naive: bool
    log_jacobian: float  # added to log-densities to give the data's own units
    data_dims: int
    discrete: bool  # the likelihood scores discrete data (bits per dimension make sense)
    kl_exact: bool
    prior_variance: list[float]  # per latent dimension: the scale of the active-unit threshold
    description: str  # what log p(x) is a likelihood of
    latent_groups: tuple = ()  # ((name, D_l), ...) of the model (latent.py), in noise order

    @property
    def n(self) -> int:
        return len(self.per_example["log_px"])

    def data_units(self, name: str) -> Tensor:
        """A per-example log-quantity in the data's own units (log-densities get the Jacobian)."""
        values = self.per_example[name]
        if name in ("log_px", "log_px_naive", "log_px_jackknife", "elbo", "reconstruction"):
            return values + self.log_jacobian
        return values

    def _per_group(self, active: Tensor) -> dict:
        """The KL and active units of each latent group, for a model of several groups:
        {"latent_groups": [{name, dims, kl, active_units}, ...]} (KL: the mean over examples of
        the group's KL given the groups above it; None where it does not split over
        dimensions)."""
        if len(self.latent_groups) < 2:
            return {}
        kl = self.per_example["kl_per_dim"].mean(0)  # (D,)
        groups, first = [], 0
        for name, dims in self.latent_groups:
            part = slice(first, first + dims)
            total = float(kl[part].sum())
            groups.append({"name": name, "dims": dims,
                           "kl": total if math.isfinite(total) else None,
                           "active_units": int(active[part].sum())})
            first += dims
        return {"latent_groups": groups}

    def summary(self) -> dict:
        """Dataset means (nats per example) with Monte Carlo standard errors: the JSON report."""
        n, k = self.n, self.k
        per = self.per_example

        def mean(name: str) -> float:
            return float(self.data_units(name).mean())

        def se(variance: str) -> float:
            return float(per[variance].sum().sqrt() / n) if k > 1 else math.nan

        gap = per["log_px"] - per["elbo"]  # the Jacobian cancels
        posterior_mean = per["posterior_mean"]  # (N, D)
        spread = posterior_mean.var(0) if n > 1 else torch.zeros(posterior_mean.shape[1],
                                                                  dtype=torch.float64)
        threshold = ACTIVE_THRESHOLD * torch.tensor(self.prior_variance, dtype=torch.float64)
        log_px, log_px_se_delta = mean("log_px"), se("log_px_var")
        log_px_se, slope = replicate_standard_error(per, "log_px", k)
        if not math.isfinite(log_px_se):  # too few draws for replicates (k < 4)
            log_px_se = log_px_se_delta
        pareto_k = per["log_px_pareto_k"]
        pareto_limit = pareto_k_threshold(k)
        result = {
            "format": "vaekit-evaluation/1", "split": self.split, "n": n, "k": k,
            "seed": self.seed, "likelihood_of": self.description,
            "units": "nats per example; log-densities in the data's own units",
            "log_px": log_px, "log_px_se": log_px_se, "log_px_se_delta": log_px_se_delta,
            "log_px_se_slope": _finite_or_none(slope),
            "log_px_jackknife": _finite_or_none(mean("log_px_jackknife")),
            "log_px_jackknife_se": _finite_or_none(
                replicate_standard_error(per, "log_px_jackknife", k)[0]),
            "log_px_last_doubling_rise": _finite_or_none(per["log_px_rise"].mean()),
            "pareto_k_threshold": pareto_limit,
            "pareto_k_high": int((pareto_k > pareto_limit).sum()),
            "pareto_k_max": _finite_or_none(pareto_k.max()),
            "pareto_k_mean": _finite_or_none(pareto_k[torch.isfinite(pareto_k)].mean()
                                             if bool(torch.isfinite(pareto_k).any())
                                             else torch.tensor(math.nan)),
            "log_px_sd": float(self.data_units("log_px").std()) if n > 1 else 0.0,
            "log_px_ess": float(per["log_px_ess"].mean()),
            "log_px_ess_min": float(per["log_px_ess"].min()),
            "log_px_low_ess": int((per["log_px_ess"] < LOW_ESS).sum()),
            "elbo": mean("elbo"), "elbo_se": se("elbo_var"),
            "reconstruction": mean("reconstruction"),
            "reconstruction_se": se("reconstruction_var"),
            "kl": mean("kl"), "kl_se": 0.0 if self.kl_exact else se("kl_var"),
            "kl_exact": self.kl_exact,
            "elbo_gap": float(gap.mean()), "elbo_gap_se": se("elbo_gap_var"),
        }
        if self.naive:
            naive_se, _ = replicate_standard_error(per, "log_px_naive", k)
            naive_delta = se("log_px_naive_var")
            result.update(log_px_naive=mean("log_px_naive"),
                          log_px_naive_se=naive_se if math.isfinite(naive_se) else naive_delta,
                          log_px_naive_se_delta=naive_delta,
                          log_px_naive_ess=float(per["log_px_naive_ess"].mean()),
                          log_px_naive_pareto_k_high=int(
                              (per["log_px_naive_pareto_k"] > pareto_limit).sum()))
        if self.discrete:
            result.update(bits_per_dim=bits_per_dim(log_px, self.data_dims),
                          bits_per_dim_se=-bits_per_dim(log_px_se, self.data_dims))
        result.update(
            active_units=int((spread > threshold).sum()), latent_dim=len(spread),
            active_threshold=[float(t) for t in threshold],
            posterior_mean_variance=[float(v) for v in spread],
            kl_per_dim=[float(v) for v in per["kl_per_dim"].mean(0)],
            **self._per_group(spread > threshold),
            samples={
                "log_px": f"k = {k} importance samples per example from q(z|x) (IWAE bound)",
                "log_px_naive": f"k = {k} samples per example from p(z)" if self.naive
                else "not computed",
                "elbo": f"the same k = {k} samples per example; KL "
                + ("in closed form" if self.kl_exact else "estimated from them"),
                "log_px_ess": "effective sample size (sum w)^2 / sum w^2 of the importance "
                "weights: mean, minimum over examples, examples below 10",
                "log_px_se": f"replicates: the spread of estimates from disjoint groups of "
                f"k/2 ... k/16 of the k draws, carried to k by its fitted decay (slope "
                f"{slope:.2f}; -1 for finite-variance weights); log_px_se_delta is the delta "
                "method's, which heavy-tailed weights make too small",
                "log_px_jackknife": "the grouped jackknife over 64 blocks of the same draws: "
                "IS_k with its O(1/k) bias removed (Nowozin 2018)",
                "log_px_last_doubling_rise": "IS_k minus IS_(k/2) of the first half of the "
                "draws: what the last doubling of k added",
                "pareto_k": f"the generalized Pareto shape of each example's largest weights "
                f"(PSIS, Vehtari et al. 2024); above {pareto_limit:.2f} the estimate of that "
                "example is not to be trusted",
                "active_units": f"{n} examples (covariance over data of E_q[z])",
            })
        result["pareto_k"] = [_finite_or_none(v) for v in pareto_k]
        return result


def _finite_or_none(value) -> float | None:
    """A float for JSON, or None (null) where it is not finite (JSON has no NaN or infinity)."""
    value = float(value)
    return value if math.isfinite(value) else None


def discrete_likelihood(model: VAE, pipeline: Pipeline) -> bool:
    """Whether log p(x) is (a bound on) the log-probability of discrete data: Bernoulli
    likelihoods, or Gaussian densities of dequantised 8-bit pixels in pixel units."""
    return bool(getattr(model.likelihood, "discrete", False)) or pipeline.mode == "dequantize"

