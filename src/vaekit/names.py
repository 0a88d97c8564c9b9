"""The names a user may choose, defined once: config (the CLI and config.json), data and
distributions all read them from here. Torch-free, so `vaekit --help` stays fast.
"""

from __future__ import annotations

NETS = ("mlp", "conv")
# Datasets vaekit knows by name (matched without regard to case, where no such path exists).
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "celeba")
ACTIVATIONS = ("relu", "elu", "gelu", "silu", "tanh", "softplus")
PRIORS = ("normal", "uniform", "mixture", "vamp")
FACTORISED_PRIORS = ("normal", "uniform")  # p(z) = prod_d p(z_d): the KL splits over dimensions
POSTERIORS = ("gaussian", "sigmoid-gaussian", "full-covariance", "iaf")
FACTORISED_POSTERIORS = ("gaussian", "sigmoid-gaussian")  # q(z|x) = prod_d q(z_d|x)
# The posterior families each prior can be paired with, the default first: a posterior must not
# leave the prior's support (the unit cube of the uniform prior), and the VampPrior mixes the
# diagonal Gaussian posterior itself.
POSTERIORS_FOR_PRIOR = {
    "normal": ("gaussian", "full-covariance", "iaf"),
    "mixture": ("gaussian", "full-covariance", "iaf"),
    "vamp": ("gaussian",),
    "uniform": ("sigmoid-gaussian",),
}
LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian", "discretized-logistic",
               "logistic-mixture", "categorical")
LEVEL_LIKELIHOODS = ("discretized-logistic", "logistic-mixture", "categorical")  # 8-bit levels
OBJECTIVES = ("elbo", "iwae")
KL_SCHEDULES = ("constant", "linear", "cyclical")


def resolve_posterior(posterior: str, prior: str) -> str:
    """The posterior family to use: `auto` is the prior's default."""
    return POSTERIORS_FOR_PRIOR[prior][0] if posterior == "auto" else posterior


def posterior_problem(posterior: str, prior: str) -> str | None:
    """None if the pair is valid, else one line naming the valid pairs."""
    if resolve_posterior(posterior, prior) in POSTERIORS_FOR_PRIOR[prior]:
        return None
    pairs = "; ".join(f"--prior {p} with --posterior {' or '.join(q)}"
                      for p, q in POSTERIORS_FOR_PRIOR.items())
    return f"--posterior {posterior} cannot be paired with --prior {prior}: valid pairs are {pairs}"


def builtin_name(name: str) -> str:
    """A built-in dataset's name as vaekit spells it ("MNIST" -> "mnist"); other names (paths)
    as they are, and a path that exists is never taken for a built-in set."""
    import os

    lowered = name.lower()
    if lowered in BUILTIN_DATASETS and name != lowered and not os.path.exists(name):
        return lowered
    return name
